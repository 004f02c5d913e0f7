"""Run one message through a workflow: filters, variables, transformers, activities. Pure over a
run context; the activities themselves do the I/O."""
