"""The read side of monitoring, as the API and the UI call it: metrics, verdict, drift, alerts.

The monitor process fills the tables (carrara.monitoring.monitor); the functions here only read
them and derive what the API shows, with the rules of carrara.monitoring.rules; the API and the
UI read metrics and verdicts through `*_view`, which remember answers for a few seconds
(carrara.monitoring.views). Each area lives
in its own module; this one is the single entry point callers import.
"""

from __future__ import annotations

from carrara.monitoring.alerts import list_alerts
from carrara.monitoring.drift import DriftReport, FeatureDriftReport, drift
from carrara.monitoring.metrics import (
    MetricsPoint,
    MetricsReport,
    VariantReport,
    live_predictions,
    metrics,
)
from carrara.monitoring.queries import window
from carrara.monitoring.verdict import Comparison, Verdict, verdict
from carrara.monitoring.views import ViewCache, metrics_view, verdict_view, verdict_views

__all__ = [
    "Comparison",
    "DriftReport",
    "FeatureDriftReport",
    "MetricsPoint",
    "MetricsReport",
    "VariantReport",
    "Verdict",
    "ViewCache",
    "drift",
    "list_alerts",
    "live_predictions",
    "metrics",
    "metrics_view",
    "verdict",
    "verdict_view",
    "verdict_views",
    "window",
]
