"""Monitoring: per-variant live metrics, outcome join, A/B verdicts, drift."""
