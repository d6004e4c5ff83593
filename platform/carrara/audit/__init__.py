"""The audit log: who changed what, when (and before/after for deployments)."""
