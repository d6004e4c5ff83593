"""Input drift of a deployment: live bin counts of each feature (written by the monitor for the
champion's model version) against that version's training profile, judged by
`rules.feature_drift`. The API's drift report and the drift alerts both read them here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from carrara.deployments import service as deployments
from carrara.models import FeatureDrift, ModelVersion, RegisteredModel
from carrara.monitoring.queries import last_spec, summed_arrays, window
from carrara.monitoring.rules import config_of, feature_drift


@dataclass
class LiveCounts:
    """Summed feature_drift rows of a window: bin counts and missing values per feature."""

    counts: dict[str, list[int]]
    missing: dict[str, int]


def live_counts(
    session: Session, name: str, model_version_id: int, start: datetime, end: datetime | None
) -> LiveCounts:
    """The live bin counts of `name`'s inputs in [start, end) (no end: up to the newest).

    Only counts binned by this version's profile (the champion may have changed in the window).
    """
    conditions = [
        FeatureDrift.deployment == name,
        FeatureDrift.model_version_id == model_version_id,
        FeatureDrift.bucket_start >= start,
    ]
    if end is not None:
        conditions.append(FeatureDrift.bucket_start < end)
    in_window = select(FeatureDrift.feature, FeatureDrift.counts).where(*conditions)
    counts = summed_arrays(session, in_window, FeatureDrift.counts, [FeatureDrift.feature])
    missing = session.execute(
        select(FeatureDrift.feature, func.sum(FeatureDrift.missing))
        .where(*conditions)
        .group_by(FeatureDrift.feature)
    ).all()
    return LiveCounts(
        counts={str(key[0]): values for key, values in counts.items()},
        missing={str(feature): int(total or 0) for feature, total in missing},
    )


@dataclass
class FeatureDriftReport:
    feature: str
    kind: str
    psi: float | None
    ks: float | None
    live_count: int
    missing: int
    drifted: bool


@dataclass
class DriftReport:
    deployment: str
    start: datetime
    end: datetime
    threshold: float
    model: str
    model_version: int
    features: list[FeatureDriftReport]
    note: str | None = None


def drift(
    session: Session, name: str, start: datetime | None = None, end: datetime | None = None
) -> DriftReport:
    """PSI (and KS for numeric features) of live inputs in [start, end) vs. the training profile.

    The window defaults as `queries.window` says (the last hour). Live counts are the
    feature_drift rows the monitor wrote for the champion's model version, summed over the
    window; the expected shares are that version's `feature_profile`.
    """
    start, end = window(start, end)
    deployment, _ = deployments.get_deployment(session, name)
    spec = last_spec(session, deployment)
    threshold = config_of(spec).drift_psi_threshold
    champion = deployments.variant_of(spec, deployments.champion_of(spec))
    version = session.scalar(
        select(ModelVersion)
        .join(RegisteredModel, ModelVersion.registered_model_id == RegisteredModel.id)
        .where(
            RegisteredModel.name == champion["model"],
            ModelVersion.version == champion["version"],
        )
    )
    report = DriftReport(
        deployment=name,
        start=start,
        end=end,
        threshold=threshold,
        model=champion["model"],
        model_version=champion["version"],
        features=[],
    )
    profile: Any = version.feature_profile if version is not None else None
    features = profile.get("features") if isinstance(profile, dict) else None
    if version is None or not isinstance(features, dict) or not features:
        report.note = (
            f"model {champion['model']} v{champion['version']} (champion '{champion['name']}') "
            "has no training profile to compare with; versions trained by Carrara store one"
        )
        return report
    live = live_counts(session, name, version.id, start, end)
    for feature in sorted(features):
        result = feature_drift(features[feature], live.counts.get(feature), threshold)
        report.features.append(
            FeatureDriftReport(
                feature=feature,
                kind=result.kind,
                psi=result.psi,
                ks=result.ks,
                live_count=result.live_count,
                missing=live.missing.get(feature, 0),
                drifted=result.drifted,
            )
        )
    return report
