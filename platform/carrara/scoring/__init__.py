"""The scorer process: reconcile loop, model runtime and cache, splitter, micro-batch loop, DLQ."""
