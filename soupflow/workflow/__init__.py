"""Workflow files: model, schema, loader, checks and the reviewer's tools. No sockets, no threads."""
