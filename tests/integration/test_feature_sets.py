"""Feature sets over the REST API and the CLI, against the real Postgres and Kafka."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
from confluent_kafka import Producer
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from carrara.cli import app
from carrara.models import AuditEvent, TrainingRun
from carrara.settings import Settings
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import LiveApi

BASE_MS = 1_714_564_800_000
SQL = """SELECT amount,
       LN(amount + 1) AS log_amount,
       COUNT(*) OVER (PARTITION BY user ORDER BY ts RANGE INTERVAL '1' HOUR PRECEDING) AS n_1h,
       SUM(amount) OVER (PARTITION BY user ORDER BY ts RANGE INTERVAL '10' SECOND PRECEDING) AS s_10s,
       ts - LAG(ts) OVER (PARTITION BY user ORDER BY ts) AS gap
FROM {name}"""  # noqa: E501


def _dataset(client: TestClient, headers: dict[str, str], settings: Settings, topic: str) -> str:
    TopicAdmin(settings.kafka_bootstrap).create_topic(topic, partitions=2)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    # u0 on partition 0, u1 on partition 1; u0 has a tie (offsets 1, 2) and an out-of-order event.
    events = [
        (0, {"user": "u0", "ts": BASE_MS, "amount": 1.0}),
        (0, {"user": "u0", "ts": BASE_MS + 5000, "amount": 2.0}),
        (0, {"user": "u0", "ts": BASE_MS + 5000, "amount": 4.0}),
        (0, {"user": "u0", "ts": BASE_MS + 1000, "amount": 8.0}),
        (1, {"user": "u1", "ts": BASE_MS, "amount": 3.0}),
        (1, {"user": "u1", "ts": BASE_MS + 20_000, "amount": None}),
    ]
    for partition, event in events:
        producer.produce(topic, value=orjson.dumps(event), partition=partition)
    assert producer.flush(30) == 0
    name = f"fs-{uuid.uuid4().hex[:8]}"
    body = {
        "name": name,
        "topic": topic,
        "key_field": "user",
        "event_time_field": "ts",
        "features": [{"name": "amount", "type": "float"}],
        "task": "anomaly",
    }
    assert client.post("/api/v1/datasets", json=body, headers=headers).status_code == 201
    return name


def test_feature_sets_are_revisions_validated_audited_and_previewed(
    client: TestClient,
    editor_headers: dict[str, str],
    viewer_headers: dict[str, str],
    stack_settings: Settings,
    topic_name: str,
    db_session: Session,
) -> None:
    name = _dataset(client, editor_headers, stack_settings, topic_name)
    url = f"/api/v1/datasets/{name}/features"
    assert client.get(url, headers=viewer_headers).json() == {
        "dataset": name,
        "current": None,
        "revisions": [],
    }

    bad = client.put(
        url,
        json={"sql": f'SELECT amount\nFROM "{name}"\nWHERE amount > 1'},
        headers=editor_headers,
    )
    assert bad.status_code == 422
    problem = bad.json()
    assert "WHERE is not supported" in problem["detail"]
    assert "(line 3, column 1)" in problem["detail"]
    assert problem["errors"][0] | {"message": ""} == {
        "field": "sql",
        "message": "",
        "line": 3,
        "column": 1,
    }
    wrong_key = client.put(
        url,
        json={
            "sql": "SELECT COUNT(*) OVER (PARTITION BY amount ORDER BY ts"
            " RANGE INTERVAL '1' HOUR PRECEDING) AS n"
        },
        headers=editor_headers,
    )
    assert wrong_key.status_code == 422
    assert "must be PARTITION BY user: the dataset's key" in wrong_key.json()["detail"]
    viewer = client.put(url, json={"sql": "SELECT amount"}, headers=viewer_headers)
    assert viewer.status_code == 403

    sql = SQL.format(name=f'"{name}"')
    first = client.put(url, json={"sql": sql, "reason": "velocity"}, headers=editor_headers)
    assert first.status_code == 201, first.text
    current = first.json()["current"]
    assert current["number"] == 1
    assert [o["name"] for o in current["outputs"]] == [
        "amount",
        "log_amount",
        "n_1h",
        "s_10s",
        "gap",
    ]
    assert current["horizon_ms"] == 3_600_000
    assert len(current["digest"]) == 64
    again = client.put(url, json={"sql": sql}, headers=editor_headers)
    assert again.status_code == 200
    assert again.json()["current"]["number"] == 1
    dropped = client.put(url, json={"sql": sql, "late_policy": "drop"}, headers=editor_headers)
    assert dropped.status_code == 201
    listed = client.get(url, headers=viewer_headers).json()
    assert [r["number"] for r in listed["revisions"]] == [2, 1]
    assert listed["current"]["late_policy"] == "drop"

    audits = db_session.scalars(
        select(AuditEvent)
        .where(AuditEvent.action == "dataset.features.update", AuditEvent.resource_id == name)
        .order_by(AuditEvent.id)
    ).all()
    assert [a.after["number"] for a in audits if a.after] == [1, 2]
    assert audits[0].detail == "velocity"
    assert audits[1].before is not None
    assert audits[1].before["number"] == 1

    preview = client.post(f"{url}/preview", json={"events": 50}, headers=viewer_headers)
    assert preview.status_code == 200, preview.text
    body = preview.json()
    assert body["revision"] == 2
    rows = {(r["partition"], r["offset"]): r for r in body["rows"]}
    assert len(rows) == 6
    u0 = [rows[(0, o)]["features"] for o in range(4)]
    assert [f["n_1h"] for f in u0] == [1.0, 2.0, 3.0, 4.0]  # the tie does not see its later offset
    assert [f["s_10s"] for f in u0] == [1.0, 3.0, 7.0, 15.0]
    assert [f["gap"] for f in u0] == [None, 5.0, 0.0, 0.0]
    assert rows[(0, 3)]["late"] is True  # 1 s behind: processed at the key's latest time
    assert rows[(0, 3)]["time_ms"] == BASE_MS + 5000
    u1 = rows[(1, 1)]["features"]
    assert u1["amount"] is None
    assert u1["s_10s"] is None  # the window holds only a NULL amount
    assert u1["n_1h"] == 2.0

    fast = client.post(
        f"{url}/preview", json={"events": 50, "engine": "duckdb"}, headers=viewer_headers
    )
    assert fast.status_code == 200, fast.text
    assert fast.json()["rows"] == body["rows"]  # the DuckDB fast path, on the same events

    # A run pins the dataset's current feature-set revision (its training rows use exactly it).
    version = client.post(f"/api/v1/datasets/{name}/versions", json={}, headers=editor_headers)
    assert version.status_code == 201, version.text
    run = client.post(
        "/api/v1/runs",
        json={
            "dataset": name,
            "dataset_version": 1,
            "algorithm": "autoencoder",
            "registered_model_name": f"{name}-model",
        },
        headers=editor_headers,
    )
    assert run.status_code == 201, run.text
    pinned = db_session.get(TrainingRun, run.json()["id"])
    assert pinned is not None
    assert pinned.feature_set_revision is not None
    assert pinned.feature_set_revision.number == 2

    inline = client.post(
        f"{url}/preview",
        json={"sql": "SELECT amount * 2 AS double", "events": 2},
        headers=viewer_headers,
    )
    assert inline.status_code == 200
    assert inline.json()["revision"] is None
    assert [c["name"] for c in inline.json()["columns"]] == ["double"]
    invalid = client.post(
        f"{url}/preview", json={"sql": "SELECT nope AS x"}, headers=viewer_headers
    )
    assert invalid.status_code == 422
    assert "unknown column 'nope'" in invalid.json()["detail"]


def test_features_cli_against_a_running_api(
    live_api: LiveApi, stack_settings: Settings, topic_name: str, tmp_path: Path
) -> None:
    env = {**live_api.env, "COLUMNS": "250"}
    runner = CliRunner()
    name = f"fs-cli-{uuid.uuid4().hex[:8]}"
    TopicAdmin(stack_settings.kafka_bootstrap).create_topic(topic_name, partitions=1)
    producer = Producer({"bootstrap.servers": stack_settings.kafka_bootstrap})
    for i in range(3):
        event = {"user": "u", "ts": BASE_MS + i * 1000, "amount": float(i)}
        producer.produce(topic_name, value=orjson.dumps(event))
    assert producer.flush(30) == 0
    dataset = tmp_path / "dataset.json"
    dataset.write_bytes(
        orjson.dumps(
            {
                "name": name,
                "topic": topic_name,
                "key_field": "user",
                "event_time_field": "ts",
                "features": [{"name": "amount", "type": "float"}],
                "task": "anomaly",
            }
        )
    )
    result = runner.invoke(app, ["datasets", "create", "-f", str(dataset)], env=env)
    assert result.exit_code == 0, result.stderr
    features = tmp_path / "features.sql"
    features.write_text(SQL.format(name=f'"{name}"'))
    result = runner.invoke(app, ["features", "apply", name, "-f", str(features)], env=env)
    assert result.exit_code == 0, result.stderr
    assert "revision 1 (5 features: amount, log_amount, n_1h, s_10s, gap)" in result.stdout
    result = runner.invoke(app, ["features", "preview", name, "--json"], env=env)
    assert result.exit_code == 0, result.stderr
    rows = orjson.loads(result.stdout)["rows"]
    assert [r["features"]["n_1h"] for r in rows] == [1.0, 2.0, 3.0]
    result = runner.invoke(app, ["features", "show", name], env=env)
    assert result.exit_code == 0, result.stderr
    assert "LN(amount + 1)" in result.stdout
    features.write_text("SELECT amount,\n  MEDIAN(amount) AS m")
    result = runner.invoke(app, ["features", "apply", name, "-f", str(features)], env=env)
    assert result.exit_code != 0
    assert "function MEDIAN is not supported (line 2, column 3)" in " ".join(result.stderr.split())
