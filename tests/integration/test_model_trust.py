"""Models that cannot run code, pinned digests and bring-your-own ONNX, end to end.

Real MLflow, Postgres (through the API) and Kafka, and real scorer processes driven by specs
published on a test deployments topic (as in test_scorer.py), whose variants carry what the
control plane puts there: the version's pinned digests and whether an admin trusted its code.
"""

from __future__ import annotations

import signal
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import onnxruntime as ort
import orjson
import pytest
from fastapi.testclient import TestClient
from mlflow import MlflowClient
from skl2onnx import to_onnx
from sklearn.linear_model import LogisticRegression
from sqlalchemy import select
from sqlalchemy.orm import Session

from carrara.models import OutboxMessage
from carrara.settings import Settings
from carrara.streams.deployment_spec import VariantSpec
from carrara.streams.prediction_record import decode_prediction
from carrara.streams.topics import TopicAdmin
from carrara.training.algorithms import validate_params
from carrara.training.mlflow_logging import Lineage, LoggedModel, log_and_register
from carrara.training.onnx_export import export_onnx
from carrara.training.trainers import train
from tests.integration.conftest import RUN_ID, LiveApi, run_cli
from tests.integration.test_scorer import SCHEMA, ScoringEnv, _event, _status_of

MODELS = "/api/v1/models"


@pytest.fixture
def scoring(stack_settings: Settings) -> Iterator[ScoringEnv]:
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    topics = {
        name: f"test-{RUN_ID}-trust-{name}-{uuid.uuid4().hex[:6]}"
        for name in ("input", "output", "deployments", "status")
    }
    admin.create_topic(topics["input"], partitions=2)
    admin.create_topic(topics["output"], partitions=2)
    admin.ensure_compacted_topic(topics["deployments"])
    admin.ensure_compacted_topic(topics["status"])
    env = ScoringEnv(stack_settings, f"trust-{RUN_ID}-{uuid.uuid4().hex[:6]}", {}, topics)
    yield env
    for instance in list(env.processes):
        env.stop_scorer(instance, signal.SIGKILL)
    # A scorer that served a revision made the dead-letter topic.
    dead_letters = [f"{topics['input']}.dead-letters"] if env.ports else []
    admin.delete_topics([*topics.values(), *dead_letters])


def _train_and_register(settings: Settings, name: str, c: float) -> tuple[LoggedModel, Any, Any]:
    from carrara.streams.event_codec import decode_events, fit_feature_spec

    rng = np.random.default_rng(int(c * 100))
    events = []
    for i in range(400):
        e = _event(i)
        e["fraud"] = int(e["amount"] * 0.02 + e["velocity"] * 0.5 + rng.normal() > 2.5)
        events.append(orjson.dumps(e))
    decoded = decode_events(SCHEMA, [(events, [0] * 400, list(range(400)))])
    spec = fit_feature_spec(decoded)
    x, y = spec.transform(decoded), spec.encode_labels(decoded)
    params = validate_params("logistic_regression", "binary", {"C": c})
    model = train("logistic_regression", "binary", params, x, y)
    logged = log_and_register(
        tracking_uri=settings.mlflow_url,
        registered_model_name=name,
        lineage=Lineage("trust-test", 1, "t", [{"partition": 0, "start": 0, "end": 400}], 400, 0),
        algorithm="logistic_regression",
        params=params,
        metrics={},
        trained=model,
        feature_names=spec.columns,
        feature_spec=spec.as_dict(),
        holdout_x=x[:50],
        holdout_y=y[:50],
        onnx=export_onnx(model, x[:50]),
    )
    return logged, model, spec


def _wait_for_error(scoring: ScoringEnv, instance: str, name: str, revision: int) -> Any:
    deadline = time.monotonic() + 90
    while True:
        status = _status_of(scoring, instance, name)
        if status and status.last_error and f"revision {revision}" in status.last_error:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


def _predictions(scoring: ScoringEnv, name: str, keys: set[str], timeout: float = 90) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        records = scoring.read(scoring.topics["output"], 0, timeout=2)
        found = [
            p
            for p in (decode_prediction(m.value()) for m in records)
            if p.deployment == name and p.key in keys
        ]
        if len({p.key for p in found}) >= len(keys) or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_an_artifact_changed_after_registration_is_refused_and_the_old_revision_serves(
    scoring: ScoringEnv, stack_settings: Settings
) -> None:
    good, _, _ = _train_and_register(stack_settings, scoring.model, 1.0)
    changed, _, _ = _train_and_register(stack_settings, scoring.model, 0.01)
    assert good.artifact_digests
    assert changed.artifact_digests
    pool, name = f"pool-{uuid.uuid4().hex[:6]}", "pinned"
    first = scoring.publish(
        [
            VariantSpec(
                name="a",
                model_name=scoring.model,
                model_version=good.version,
                weight=100,
                artifact_digests=good.artifact_digests,
            )
        ],
        pool,
        name=name,
    )
    scoring.start_scorer("trust-1", pool)
    assert scoring.wait_ready("trust-1")["deployments"] == {name: "serving"}

    # Someone with write access to MLflow swaps the second version's ONNX file for other
    # (valid) bytes after registration: the first version's model.
    client = MlflowClient(stack_settings.mlflow_url)
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(client.download_artifacts(good.mlflow_run_id, "onnx/model.onnx", tmp))
        client.log_artifact(changed.mlflow_run_id, str(other), "onnx")
    second = scoring.publish(
        [
            VariantSpec(
                name="a",
                model_name=scoring.model,
                model_version=changed.version,
                weight=100,
                artifact_digests=changed.artifact_digests,
            )
        ],
        pool,
        name=name,
    )
    status = _wait_for_error(scoring, "trust-1", name, second.revision)
    assert "does not match the digests pinned at registration" in status.last_error
    assert "onnx/model.onnx changed since the version was registered" in status.last_error
    assert status.served_revision == first.revision
    scoring.produce([orjson.dumps(_event(7, key="after-tamper"))], [b"after-tamper"])
    served = _predictions(scoring, name, {"after-tamper"})
    assert [(p.revision, p.model_version) for p in served] == [(first.revision, good.version)]


def _pickled_version(settings: Settings, name: str, card_run: LoggedModel, model: Any) -> int:
    """A version whose model is a cloudpickle file, with a Carrara card (so events decode)."""
    mlflow.set_tracking_uri(settings.mlflow_url)
    mlflow.set_experiment("carrara/trust-test")
    with mlflow.start_run():
        info = mlflow.sklearn.log_model(
            model.estimator,
            name="model",
            serialization_format="cloudpickle",
            pip_requirements=["scikit-learn"],
        )
    tags = {
        "carrara.model_card": f"runs:/{card_run.mlflow_run_id}/carrara_model.json",
        "carrara.onnx": "false",
    }
    return int(mlflow.register_model(info.model_uri, name, tags=tags).version)


def test_a_pickled_model_is_refused_until_an_admin_trusts_it(
    scoring: ScoringEnv,
    stack_settings: Settings,
    client: TestClient,
    db_session: Session,
    editor_headers: dict[str, str],
    admin_headers: dict[str, str],
) -> None:
    trained, model, spec = _train_and_register(stack_settings, scoring.model, 1.0)
    pickled = _pickled_version(stack_settings, scoring.model, trained, model)
    imported = client.post(
        f"{MODELS}/{scoring.model}/versions", json={"version": pickled}, headers=editor_headers
    )
    assert imported.status_code == 201, imported.text
    version = imported.json()
    assert version["trusted_code"] is False
    assert version["origin"] == "mlflow"
    assert "model/model.pkl" in version["artifact_digests"]

    def variant(v: dict[str, Any]) -> VariantSpec:
        return VariantSpec(
            name="a",
            model_name=scoring.model,
            model_version=v["version"],
            weight=100,
            artifact_digests=v["artifact_digests"],
            trusted_code=v["trusted_code"],
        )

    pool, name = f"pool-{uuid.uuid4().hex[:6]}", "pickled"
    refused = scoring.publish([variant(version)], pool, name=name)
    scoring.start_scorer("trust-2", pool)
    status = _wait_for_error(scoring, "trust-2", name, refused.revision)
    assert "the model is a cloudpickle file, which runs code when read" in status.last_error
    assert status.state == "failed"
    assert status.served_revision is None

    trust = f"{MODELS}/{scoring.model}/versions/{pickled}/trust"
    body = {"trusted_code": True, "reason": "reviewed by the ML platform team"}
    assert client.put(trust, json=body, headers=editor_headers).status_code == 403
    marked = client.put(trust, json=body, headers=admin_headers)
    assert marked.status_code == 200, marked.text
    assert marked.json()["trusted_code"] is True
    audit = client.get(
        "/api/v1/audit", params={"action": "model.version.trust"}, headers=admin_headers
    ).json()["items"]
    entry = next(e for e in audit if e["resource_id"] == scoring.model)
    assert entry["after"] == {"version": pickled, "trusted_code": True}
    assert entry["detail"] == "reviewed by the ML platform team"

    # The control plane puts the digests and the trust into the revision it publishes.
    deployment = {
        "input_topic": scoring.topics["input"],
        "output_topic": scoring.topics["output"],
        "key_field": "card_id",
        "pool": pool,
        "variants": [{"name": "a", "model": scoring.model, "version": pickled, "weight": 100}],
    }
    applied = client.put(
        f"/api/v1/deployments/{name}-{RUN_ID}", json=deployment, headers=editor_headers
    )
    assert applied.status_code == 201, applied.text
    message = db_session.scalars(
        select(OutboxMessage).where(OutboxMessage.key == f"{name}-{RUN_ID}")
    ).one()
    assert message.payload is not None
    (wired,) = message.payload["variants"]
    assert wired["trusted_code"] is True
    assert wired["artifact_digests"] == version["artifact_digests"]

    trusted = scoring.publish([variant(marked.json())], pool, name=name)
    deadline = time.monotonic() + 90
    while (status := _status_of(scoring, "trust-2", name)).served_revision != trusted.revision:
        assert time.monotonic() < deadline, status
        time.sleep(0.5)
    scoring.produce([orjson.dumps(_event(3, key="trusted"))], [b"trusted"])
    (served,) = _predictions(scoring, name, {"trusted"})
    rows, _ = spec.encode_values([orjson.dumps(_event(3, key="trusted"))])
    expected = model.scores(rows)
    assert served.model_version == pickled
    assert served.score == pytest.approx(float(expected[0]), rel=1e-6)


def test_an_uploaded_onnx_model_deploys_and_scores_like_onnx_runtime(
    scoring: ScoringEnv,
    stack_settings: Settings,
    client: TestClient,
    editor_headers: dict[str, str],
) -> None:
    # Recent events on the dataset's topic: the upload is checked on them.
    keys = [f"onnx-{i}" for i in range(300)]
    events = [{**_event(i, key=k), "fraud": i % 2} for i, k in enumerate(keys)]
    events[5]["velocity"] = None  # a missing value
    scoring.produce([orjson.dumps(e) for e in events[:100]], [k.encode() for k in keys[:100]])
    dataset = f"trust-{uuid.uuid4().hex[:8]}"
    created = client.post(
        "/api/v1/datasets",
        json={
            "name": dataset,
            "topic": scoring.topics["input"],
            "key_field": "card_id",
            "features": SCHEMA["features"],
            "label_field": "fraud",
            "task": "binary",
        },
        headers=editor_headers,
    )
    assert created.status_code == 201, created.text

    # A model built outside Carrara: scikit-learn + skl2onnx, input "x" = [velocity, amount].
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.poisson(2, 500), rng.lognormal(3, 1, 500)]).astype(np.float32)
    y = (x[:, 0] * 0.5 + x[:, 1] * 0.02 + rng.normal(size=500) > 2.5).astype(int)
    estimator = LogisticRegression().fit(x, y)
    onnx_bytes = to_onnx(
        estimator,
        x[:1],
        options={id(estimator): {"zipmap": False}},
        initial_types=None,
        target_opset=17,
    ).SerializeToString()
    declaration = {
        "dataset": dataset,
        "features": ["velocity", "amount"],
        "output": "probability",
        "output_name": "probabilities",
        "classes": [0, 1],
    }
    bad = client.post(
        f"{MODELS}/{scoring.model}/versions",
        files={"file": ("model.onnx", b"not onnx")},
        data={"declaration": orjson.dumps(declaration).decode()},
        headers=editor_headers,
    )
    assert bad.status_code == 422
    assert "not a valid ONNX model" in bad.json()["detail"]
    wrong = client.post(
        f"{MODELS}/{scoring.model}/versions",
        files={"file": ("model.onnx", onnx_bytes)},
        data={"declaration": orjson.dumps({**declaration, "features": ["amount"]}).decode()},
        headers=editor_headers,
    )
    assert wrong.status_code == 422
    assert "must be (rows, 1)" in wrong.json()["detail"]

    uploaded = client.post(
        f"{MODELS}/{scoring.model}/versions",
        files={"file": ("model.onnx", onnx_bytes)},
        data={"declaration": orjson.dumps(declaration).decode()},
        headers=editor_headers,
    )
    assert uploaded.status_code == 201, uploaded.text
    version = uploaded.json()
    assert version["origin"] == "upload"
    assert {"carrara_model.json", "model/MLmodel", "model/model.onnx"} <= set(
        version["artifact_digests"]
    )

    pool, name = f"pool-{uuid.uuid4().hex[:6]}", "uploaded"
    scoring.publish(
        [
            VariantSpec(
                name="a",
                model_name=scoring.model,
                model_version=version["version"],
                weight=100,
                artifact_digests=version["artifact_digests"],
            )
        ],
        pool,
        name=name,
    )
    scoring.start_scorer("trust-3", pool)
    assert scoring.wait_ready("trust-3")["deployments"] == {name: "serving"}
    fresh = list(range(100, 300))
    scoring.produce([orjson.dumps(events[i]) for i in fresh], [keys[i].encode() for i in fresh])
    served = {p.key: p for p in _predictions(scoring, name, {keys[i] for i in fresh})}
    assert len(served) == len(fresh)

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    rows = np.array([[events[i]["velocity"], events[i]["amount"]] for i in fresh], dtype=np.float32)
    (probabilities,) = session.run(["probabilities"], {"X": rows})
    for i, expected in zip(fresh, probabilities[:, 1], strict=True):
        prediction = served[keys[i]]
        assert prediction.score == pytest.approx(float(expected), abs=1e-6)
        assert prediction.label == int(expected >= 0.5)


def _tiny_regressor(tmp: Path) -> Path:
    """An ONNX model written with onnx.helper: score = 2 * amount + velocity."""
    from onnx import TensorProto, helper, save_model

    weights = helper.make_tensor("w", TensorProto.FLOAT, [2, 1], [2.0, 1.0])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w"], ["score"])],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, [None, 1])],
        [weights],
    )
    path = tmp / "tiny.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    save_model(model, str(path))
    return path


def test_the_cli_uploads_an_onnx_model_and_an_admin_trusts_a_version(
    live_api: LiveApi, scoring: ScoringEnv, tmp_path: Path
) -> None:
    scoring.produce(
        [orjson.dumps({**_event(i), "fraud": i % 2}) for i in range(30)],
        [f"card-{i}".encode() for i in range(30)],
    )
    dataset = f"cli-{uuid.uuid4().hex[:8]}"
    created = httpx.post(
        f"{live_api.url}/api/v1/datasets",
        json={
            "name": dataset,
            "topic": scoring.topics["input"],
            "key_field": "card_id",
            "features": SCHEMA["features"],
            "label_field": "fraud",
            "task": "binary",
        },
        headers={"Authorization": f"Bearer {live_api.admin_token}"},
        timeout=60,
    )
    assert created.status_code == 201, created.text
    model = f"cli-upload-{uuid.uuid4().hex[:8]}"
    args = ["models", "upload", model, str(_tiny_regressor(tmp_path)), "--dataset", dataset]
    args += ["--features", "amount,velocity", "--output", "regression"]
    uploaded = run_cli(live_api, *args, "--json")
    assert uploaded.returncode == 0, uploaded.stderr
    version = orjson.loads(uploaded.stdout)
    assert version["origin"] == "upload"
    assert version["trusted_code"] is False

    refused = run_cli(live_api, *args[:-2], "--output", "class_scores")
    assert refused.returncode == 2
    assert "class_scores needs the label of each column" in refused.stderr

    trusted = run_cli(
        live_api, "models", "trust", model, "--version", str(version["version"]), "--reason", "ok"
    )
    assert trusted.returncode == 0, trusted.stderr
    assert f"{model} v{version['version']}: trusted code" in trusted.stdout
    shown = orjson.loads(run_cli(live_api, "models", "show", model, "--json").stdout)
    assert shown["versions"][0]["trusted_code"] is True
