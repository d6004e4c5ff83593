"""SQLAlchemy 2 typed models; importing this package registers every table on `Base.metadata`."""

from carrara.models.auth import ApiToken, AuditEvent
from carrara.models.base import Base
from carrara.models.datasets import Dataset, DatasetVersion
from carrara.models.deployments import Deployment, DeploymentRevision
from carrara.models.feature_sets import FeatureSetRevision
from carrara.models.monitoring import (
    Alert,
    FeatureDrift,
    JoinedOutcome,
    MonitorOffset,
    OutcomeStats,
    PendingPrediction,
    VariantMetrics,
    VariantMetricsHourly,
)
from carrara.models.outbox import OutboxMessage
from carrara.models.registry import ModelAlias, ModelVersion, RegisteredModel
from carrara.models.scorers import ScorerInstance
from carrara.models.training import TrainingRun

__all__ = [
    "Alert",
    "ApiToken",
    "AuditEvent",
    "Base",
    "Dataset",
    "DatasetVersion",
    "Deployment",
    "DeploymentRevision",
    "FeatureDrift",
    "FeatureSetRevision",
    "JoinedOutcome",
    "ModelAlias",
    "ModelVersion",
    "MonitorOffset",
    "OutboxMessage",
    "OutcomeStats",
    "PendingPrediction",
    "RegisteredModel",
    "ScorerInstance",
    "TrainingRun",
    "VariantMetrics",
    "VariantMetricsHourly",
]
