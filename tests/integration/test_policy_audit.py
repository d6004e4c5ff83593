"""Every change is audited whoever makes it: the monitor's automatic rollback shows in the audit
log (actor `monitor`) with the verdict's evidence, and UI changes are audited like API calls.
"""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from carrara.audit.service import evidence_of
from carrara.deployments import service as deployments
from carrara.models import Dataset, DatasetVersion, JoinedOutcome, TrainingRun
from carrara.monitoring.policies import apply_policies
from carrara.monitoring.watched import Watched
from carrara.registry import service as registry
from carrara.settings import Settings

NAME = "audited-rollback"
OUTCOMES_PER_ARM = 200


def _binary_version(session: Session, model: str, version: int) -> None:
    """A model version trained (per its run) on a binary dataset, so its verdict is log loss."""
    dataset = Dataset(
        name=f"ds-{model}-{version}",
        topic=f"topic-{model}",
        key_field="user_id",
        label_field="label",
        task="binary",
        features=[{"name": "amount", "type": "float"}],
    )
    session.add(dataset)
    session.flush()
    snapshot = DatasetVersion(
        dataset_id=dataset.id,
        number=1,
        offsets=[{"partition": 0, "start": 0, "end": 10}],
        event_count=10,
    )
    session.add(snapshot)
    session.flush()
    run = TrainingRun(
        dataset_version_id=snapshot.id,
        algorithm="logistic_regression",
        registered_model_name=model,
        status="succeeded",
    )
    session.add(run)
    session.flush()
    registry.register_version(session, model, version, run.id, f"models:/{model}/{version}", {})
    session.flush()


def _seed_outcomes(session: Session, variant: str, version: int, *, good: bool) -> None:
    """Joined outcomes of one variant: confident and right (`good`), or confidently wrong."""
    now = datetime.now(UTC)  # after the revision's creation (the transaction's start)
    for i in range(OUTCOMES_PER_ARM):
        outcome = float(i % 2)
        right = 0.9 if outcome else 0.1
        score = right if good else 1.0 - right
        session.add(
            JoinedOutcome(
                deployment=NAME,
                variant=variant,
                shadow=False,
                model_version=version,
                score=score,
                outcome=outcome,
                correct=good,
                predicted_at=now,
                observed_at=now,
            )
        )
    session.flush()


def test_an_automatic_rollback_by_the_monitor_is_audited_with_its_evidence(
    client: TestClient,
    db_session: Session,
    editor_headers: dict[str, str],
    test_settings: Settings,
    monitored_topics: tuple[str, str, str],
) -> None:
    _binary_version(db_session, "audited-clf", 1)
    _binary_version(db_session, "audited-clf", 2)
    spec: dict[str, Any] = {
        "input_topic": monitored_topics[0],
        "output_topic": monitored_topics[1],
        "key_field": "user_id",
        "variants": [
            {"name": "champion", "model": "audited-clf", "version": 1, "weight": 80},
            {"name": "challenger", "model": "audited-clf", "version": 2, "weight": 20},
        ],
        "monitoring": {"outcomes_topic": monitored_topics[2], "champion": "champion"},
        "policy": {"auto_rollback": True, "min_outcomes": 50},
        "reason": "try the challenger",
    }
    created = client.put(f"/api/v1/deployments/{NAME}", json=spec, headers=editor_headers)
    assert created.status_code == 201, created.text
    _seed_outcomes(db_session, "champion", 1, good=True)
    _seed_outcomes(db_session, "challenger", 2, good=False)

    # The monitor's policy step, as its loop runs it (it reads only the deployment's name).
    watched = cast(Watched, SimpleNamespace(name=NAME))
    assert apply_policies(db_session, test_settings, watched) == "auto_rollback"

    _, current = deployments.get_deployment(db_session, NAME)
    assert (current.number, current.created_by) == (2, "monitor")

    response = client.get(
        "/api/v1/audit",
        params={"resource_type": "deployment", "resource_id": NAME, "actor": "monitor"},
        headers=editor_headers,
    )
    assert response.status_code == 200, response.text
    entries = response.json()["items"]
    assert [e["action"] for e in entries] == ["deployment.auto_rollback"]
    entry = entries[0]
    assert entry["detail"].startswith("revision 2: auto-rollback: ")
    weights = {v["name"]: v["weight"] for v in entry["after"]["variants"]}
    assert weights == {"champion": 100, "challenger": 0}
    before = {v["name"]: v["weight"] for v in entry["before"]["variants"]}
    assert before == {"champion": 80, "challenger": 20}

    evidence = evidence_of(entry["detail"])
    assert evidence is not None
    assert evidence["champion"] == "champion"
    assert evidence["challenger"] == "challenger"
    assert evidence["metric"] == "log_loss"
    assert evidence["n_champion"] == evidence["n_challenger"] == OUTCOMES_PER_ARM
    assert evidence["mean_champion"] < evidence["mean_challenger"]  # lower log loss is better
    assert evidence["p_value"] < 0.05
    assert evidence["revision"] == 1

    # The editor's own change is audited too, under the editor's name (not the monitor's).
    everyone = client.get(
        "/api/v1/audit",
        params={"resource_type": "deployment", "resource_id": NAME},
        headers=editor_headers,
    ).json()["items"]
    assert [(e["actor"], e["action"]) for e in everyone] == [
        ("monitor", "deployment.auto_rollback"),
        ("test-editor", "deployment.apply"),
    ]
