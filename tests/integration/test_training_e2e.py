"""Training end to end: real Kafka, Postgres, Redis, a real Celery worker process and MLflow.

Events are produced to a topic, a dataset and snapshot are created through the API, runs are
started through the API, the API process's outbox relay sends the task to Redis, and a worker
process trains, evaluates and registers the model in MLflow.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import orjson
import pytest
from confluent_kafka import Producer
from mlflow import MlflowClient
from sqlalchemy import create_engine, text

from carrara.settings import Settings
from carrara.streams.client_config import producer_config
from carrara.streams.topics import TopicAdmin
from carrara.training.onnx_export import OnnxScorer
from tests.integration.conftest import ROOT, RUN_ID, LiveApi, migrated_database, running_api

QUEUE = f"carrara-train-{RUN_ID}"
# Short heartbeat settings so a killed worker is noticed within seconds, not a minute.
WORKER_ENV = {
    "CARRARA_TRAINING_QUEUE": QUEUE,
    "CARRARA_RUN_HEARTBEAT_INTERVAL_S": "1",
    "CARRARA_RUN_HEARTBEAT_TIMEOUT_S": "15",
}
FEATURES = [f"f{i}" for i in range(5)]


@dataclass
class TrainingStack:
    api: LiveApi
    settings: Settings
    database_url: str
    worker: subprocess.Popen[bytes] | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api.admin_token}"}

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, f"{self.api.url}/api/v1{path}", headers=self.headers, timeout=30, **kwargs
        )

    def start_worker(self) -> None:
        log = ROOT / ".carrara" / "logs" / f"test-train-worker-{RUN_ID}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.worker = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "celery"),
                    "-A",
                    "carrara.training.worker",
                    "worker",
                    "-Q",
                    QUEUE,
                    "--concurrency=1",
                    "--loglevel=INFO",
                    f"--hostname=train-{uuid.uuid4().hex[:6]}@%h",
                ],
                cwd=ROOT,
                env={**os.environ, **WORKER_ENV, "CARRARA_DATABASE_URL": self.database_url},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # so kill -9 can take the pool processes with it
            )

    def kill_worker(self) -> None:
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait(timeout=30)
        self.worker = None

    def stop_worker(self) -> None:
        if self.worker is not None:
            os.killpg(self.worker.pid, signal.SIGTERM)
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker = None

    def wait_for(self, run_id: int, states: set[str], timeout: float = 240) -> dict[str, Any]:
        return self.wait_until(run_id, lambda run: run["status"] in states, timeout)

    def wait_until(
        self, run_id: int, seen: Callable[[dict[str, Any]], bool], timeout: float = 240
    ) -> dict[str, Any]:
        """The run as the API shows it, once `seen(run)` holds."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.call("GET", f"/runs/{run_id}").json()
            if seen(run):
                return run
            assert time.monotonic() < deadline, f"run {run_id} still {run['status']}: {run}"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def stack(stack_settings: Settings) -> Iterator[TrainingStack]:
    # A database of its own: the session's is shared with other API processes, and the one
    # elected to run the lost-run reaper there would re-queue this stack's runs on its own
    # (default) training queue, with its own heartbeat timeout.
    with (
        migrated_database(stack_settings, f"carrara_train_{RUN_ID}") as database_url,
        running_api(database_url, "train", **WORKER_ENV) as api,
    ):
        training = TrainingStack(api, stack_settings, database_url)
        training.start_worker()
        try:
            yield training
        finally:
            training.stop_worker()


def _events(n: int, seed: int) -> list[dict[str, Any]]:
    """Card-like events: the label depends on two features and a category (learnable)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(FEATURES)))
    merchants = rng.choice(["grocery", "travel", "online"], size=n)
    logit = 2.0 * x[:, 0] - 1.5 * x[:, 1] + np.where(merchants == "online", 1.0, -0.5)
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    base = 1_700_000_000_000
    return [
        {
            "card_id": f"card-{i % 500}",
            "ts": base + i * 1000,
            **{name: round(float(x[i, j]), 6) for j, name in enumerate(FEATURES)},
            "merchant": str(merchants[i]),
            "fraud": int(label[i]),
        }
        for i in range(n)
    ]


def _produce(settings: Settings, topic: str, values: list[bytes], keys: list[str]) -> None:
    producer = Producer(producer_config(settings.kafka_bootstrap))
    for key, value in zip(keys, values, strict=True):
        producer.produce(topic, key=key, value=value)
    assert producer.flush(30) == 0


def _dataset(stack: TrainingStack, topic: str, events: list[dict[str, Any]]) -> str:
    TopicAdmin(stack.settings.kafka_bootstrap).create_topic(topic, partitions=3)
    _produce(
        stack.settings, topic, [orjson.dumps(e) for e in events], [e["card_id"] for e in events]
    )
    name = f"cards-{uuid.uuid4().hex[:8]}"
    body = {
        "name": name,
        "topic": topic,
        "key_field": "card_id",
        "event_time_field": "ts",
        "label_field": "fraud",
        "task": "binary",
        "features": [{"name": f, "type": "float"} for f in FEATURES]
        + [{"name": "merchant", "type": "category"}],
    }
    response = stack.call("POST", "/datasets", json=body)
    assert response.status_code == 201, response.text
    return name


def _snapshot(stack: TrainingStack, dataset: str) -> int:
    response = stack.call("POST", f"/datasets/{dataset}/versions", json={"mode": "latest"})
    assert response.status_code == 201, response.text
    return int(response.json()["number"])


def _start(stack: TrainingStack, dataset: str, version: int, algorithm: str, **params: Any) -> int:
    response = stack.call(
        "POST",
        "/runs",
        json={
            "dataset": dataset,
            "dataset_version": version,
            "algorithm": algorithm,
            "params": params,
            "registered_model_name": f"{dataset}-{algorithm}",
        },
    )
    assert response.status_code == 201, response.text
    return int(response.json()["id"])


def test_a_run_trains_registers_and_replays_identically(
    stack: TrainingStack, topic_name: str
) -> None:
    events = _events(3000, seed=1)
    dataset = _dataset(stack, topic_name, events)
    version = _snapshot(stack, dataset)
    # Events produced after the snapshot must not change what the run sees.
    extra = _events(500, seed=9)
    _produce(stack.settings, topic_name, [orjson.dumps(e) for e in extra], ["late"] * 500)

    first_id = _start(stack, dataset, version, "lightgbm", n_estimators=60)
    first = stack.wait_for(first_id, {"succeeded", "failed"})
    assert first["status"] == "succeeded", first["error"]
    metrics = first["metrics"]
    assert metrics["auc"] > metrics["baseline_auc"] + 0.2
    assert first["events_replayed"] == first["events_total"] == 3000
    assert first["results"]["bad_events"]["count"] == 0
    assert first["results"]["onnx"]["exported"] is True
    assert first["model_version_id"] is not None

    client = MlflowClient(stack.settings.mlflow_url)
    name = f"{dataset}-lightgbm"
    model = stack.call("GET", f"/models/{name}").json()
    (registered,) = model["versions"]
    mlflow_version = client.get_model_version(name, str(registered["version"]))
    run = client.get_run(first["mlflow_run_id"])
    assert run.data.tags["carrara.dataset"] == dataset
    assert run.data.tags["carrara.dataset_version"] == str(version)
    assert run.data.tags["carrara.topic"] == topic_name
    assert run.data.tags["carrara.offsets"].count(":") == 3  # one range per partition
    assert run.data.metrics["auc"] == pytest.approx(metrics["auc"])

    # Native and ONNX artifacts, both fetched over HTTP from the server, score alike.
    mlflow.set_tracking_uri(stack.settings.mlflow_url)
    native = mlflow.lightgbm.load_model(f"models:/{name}/{registered['version']}")
    onnx_path = mlflow.artifacts.download_artifacts(mlflow_version.tags["carrara.onnx_artifact"])
    onnx = OnnxScorer(Path(onnx_path).read_bytes(), "binary")
    rows = np.array(
        [
            [e[f] for f in FEATURES] + [{"grocery": 0, "online": 1, "travel": 2}[e["merchant"]]]
            for e in events[:200]
        ],
        dtype=np.float64,
    )
    native_scores = native.predict_proba(rows.astype(np.float32).astype(np.float64))[:, 1]
    np.testing.assert_allclose(onnx.scores(rows), native_scores, atol=1e-5)

    # The training distribution is stored with the version, for drift monitoring.
    engine = create_engine(stack.database_url)
    with engine.connect() as conn:
        profile = conn.execute(
            text("SELECT feature_profile FROM model_versions WHERE id = :id"),
            {"id": first["model_version_id"]},
        ).scalar_one()
    engine.dispose()
    assert profile["task"] == "binary"
    assert set(profile["features"]) == {*FEATURES, "merchant"}
    assert profile["features"]["merchant"]["kind"] == "category"
    assert abs(sum(profile["features"]["f0"]["shares"]) - 1) < 1e-6

    second_id = _start(stack, dataset, version, "lightgbm", n_estimators=60)
    second = stack.wait_for(second_id, {"succeeded", "failed"})
    assert second["status"] == "succeeded", second["error"]
    assert second["metrics"] == metrics  # a run is a pure function of snapshot + params


def test_bad_events_are_counted_and_fail_the_run_above_the_threshold(
    stack: TrainingStack, topic_name: str
) -> None:
    events = _events(1000, seed=2)
    dataset = _dataset(stack, topic_name, events)
    bad = [b"not json", b'{"card_id": "c", "f0": "high"}', b"[1, 2]"] * 20  # 60 bad of 1060
    _produce(stack.settings, topic_name, bad, ["bad"] * len(bad))
    version = _snapshot(stack, dataset)

    failed = stack.wait_for(
        _start(stack, dataset, version, "logistic_regression"), {"succeeded", "failed"}
    )
    assert failed["status"] == "failed"
    assert "60 of 1060 events" in failed["error"]
    assert "above the threshold of 1.00%" in failed["error"]

    tolerant = stack.wait_for(
        _start(stack, dataset, version, "logistic_regression", bad_event_threshold=0.1),
        {"succeeded", "failed"},
    )
    assert tolerant["status"] == "succeeded", tolerant["error"]
    assert tolerant["results"]["bad_events"]["count"] == 60
    reasons = " ".join(s["reason"] for s in tolerant["results"]["bad_events"]["samples"])
    assert "f0" in reasons


def test_automl_produces_a_leaderboard_and_registers_the_best(
    stack: TrainingStack, topic_name: str
) -> None:
    dataset = _dataset(stack, topic_name, _events(1500, seed=3))
    version = _snapshot(stack, dataset)
    run = stack.wait_for(
        _start(stack, dataset, version, "auto", time_budget_s=10, max_trials=4),
        {"succeeded", "failed"},
    )
    assert run["status"] == "succeeded", run["error"]
    board = run["results"]["leaderboard"]
    assert 1 <= len(board) <= 4
    scores = [t["validation_auc"] for t in board if t["validation_auc"] is not None]
    assert scores == sorted(scores, reverse=True)
    assert run["results"]["best"]["algorithm"] == board[0]["algorithm"]
    children = MlflowClient(stack.settings.mlflow_url).search_runs(
        [MlflowClient(stack.settings.mlflow_url).get_run(run["mlflow_run_id"]).info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{run['mlflow_run_id']}'",
    )
    assert len(children) == len(board)  # every trial is an MLflow child run


def test_a_worker_killed_mid_run_never_leaves_the_run_running(
    stack: TrainingStack, topic_name: str
) -> None:
    dataset = _dataset(stack, topic_name, _events(3000, seed=4))
    version = _snapshot(stack, dataset)
    # Enough trees to take several seconds, so the kill lands mid-training.
    run_id = _start(stack, dataset, version, "random_forest", n_estimators=1500)
    running = stack.wait_for(run_id, {"running", "succeeded", "failed"}, timeout=120)
    assert running["status"] == "running", running
    # Visible progress first: the snapshot is replayed and the worker has beaten since, so it is
    # training (1500 trees take seconds) when it is killed.
    replayed = stack.wait_until(
        run_id, lambda r: r["events_replayed"] == r["events_total"] > 0 or r["status"] != "running"
    )
    stack.wait_until(
        run_id, lambda r: r["heartbeat_at"] != replayed["heartbeat_at"] or r["status"] != "running"
    )
    stack.kill_worker()
    at_kill = stack.call("GET", f"/runs/{run_id}").json()
    # The kill landed mid-run: replayed, not finished, still held by the dead worker.
    assert at_kill["status"] == "running", at_kill
    assert at_kill["events_replayed"] == at_kill["events_total"]
    assert at_kill["finished_at"] is None

    requeued = stack.wait_for(run_id, {"queued", "failed", "succeeded"}, timeout=90)
    assert requeued["status"] == "queued", requeued
    assert "stopped sending heartbeats" in requeued["error"]

    stack.start_worker()
    finished = stack.wait_for(run_id, {"succeeded", "failed"}, timeout=240)
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["attempts"] == 2
    assert finished["error"] is None


def test_the_example_ci_pipeline_runs_end_to_end(stack: TrainingStack, topic_name: str) -> None:
    """examples/ci-pipeline.sh (shown in the README) against the real API, worker and MLflow."""
    rng = np.random.default_rng(11)
    events = []
    for i in range(1500):
        amount, velocity = float(rng.lognormal(3, 1)), float(rng.poisson(2))
        merchant = str(rng.choice(["grocery", "travel", "online"]))
        risk = 0.02 * amount + 0.8 * velocity + (2.0 if merchant == "online" else 0.0) - 6
        fraud = int(rng.random() < 1 / (1 + np.exp(-risk)))
        events.append(
            {
                "card_id": f"card-{i % 300}",
                "ts": 1_700_000_000_000 + i,
                "amount": amount,
                "hour": int(rng.integers(0, 24)),
                "velocity": velocity,
                "merchant": merchant,
                "fraud": fraud,
            }
        )
    admin = TopicAdmin(stack.settings.kafka_bootstrap)
    admin.create_topic(topic_name, partitions=3)
    output_topic = f"{topic_name}-out"
    admin.create_topic(output_topic, partitions=3)
    try:
        _produce(
            stack.settings,
            topic_name,
            [orjson.dumps(e) for e in events],
            [e["card_id"] for e in events],
        )
        suffix = uuid.uuid4().hex[:8]
        result = subprocess.run(
            [str(ROOT / "examples" / "ci-pipeline.sh")],
            cwd=ROOT,
            env={
                **os.environ,
                **stack.api.env,
                "CARRARA": str(Path(sys.executable).parent / "carrara"),
                "DATASET": f"payments-{suffix}",
                "TOPIC": topic_name,
                "OUTPUT_TOPIC": output_topic,
                "MODEL": f"payments-fraud-{suffix}",
                "COLUMNS": "200",
            },
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "AUC" in result.stdout
        deployment = stack.call("GET", f"/deployments/payments-{suffix}-scoring").json()
        assert deployment["status"] == "running"
        (variant,) = deployment["spec"]["variants"]
        assert variant["model"] == f"payments-fraud-{suffix}"
        assert variant["version"] == 1
        aliases = MlflowClient(stack.settings.mlflow_url).get_model_version_by_alias(
            f"payments-fraud-{suffix}", "champion"
        )
        assert aliases.version == "1"
    finally:
        admin.delete_topics([output_topic])
