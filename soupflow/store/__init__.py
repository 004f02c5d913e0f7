"""The durable store: object files (spool) and the message queue. Upstream: listener, workers."""
