"""Liveness and readiness of the control plane."""
