"""The secured stack: Kafka on SASL_SSL (SCRAM-SHA-512 over TLS) with ACLs, MLflow with basic auth.

The module starts its own secured broker (the local stack's jars, its own home and ports, made by
`devstack` exactly as `carrara stack up --secure` makes it) and an MLflow with `--app-name
basic-auth` on a database of its own in the shared Postgres. Every Carrara process runs with the
credentials of its identity (control plane, scorer, monitor; `devstack/secure.py`).

What must hold (issue 13): a client without credentials is refused by Kafka and by MLflow; a
scorer's credentials cannot write `carrara.deployments` (TOPIC_AUTHORIZATION_FAILED); and the
whole path works with credentials: dataset -> snapshot -> train (a Celery worker) -> register ->
deploy -> a scorer scores with read-only MLflow access -> the monitor counts the predictions.
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
import numpy as np
import orjson
import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from psycopg import sql
from pydantic import SecretStr

from carrara.devstack.kafka_broker import KafkaService
from carrara.devstack.mlflow_server import MlflowService
from carrara.devstack.postgres_server import PostgresService
from carrara.devstack.processes import ProcessRegistry
from carrara.devstack.secure import KAFKA_USERS, SecureMaterial
from carrara.settings import Settings
from carrara.streams.client_config import admin_config, producer_config
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import ROOT, RUN_ID, free_port, migrated_database, running_api

BIN = Path(sys.executable).parent
TAG = f"sec-{RUN_ID}"
FEATURES = ("amount", "velocity")
# Checking a password (PBKDF2) on a loaded 2-core machine can take seconds.
MLFLOW_TIMEOUT_S = 60


@dataclass
class Secured:
    settings: Settings  # the secured broker's and MLflow's addresses
    material: SecureMaterial

    @property
    def bootstrap(self) -> str:
        return self.settings.kafka_bootstrap

    def as_user(self, identity: str) -> Settings:
        """Settings whose Kafka clients authenticate as `identity`'s user."""
        return self.material.client_settings(self.settings, KAFKA_USERS[identity])

    def env(self, identity: str) -> dict[str, str]:
        """The environment of a Carrara process running as `identity`."""
        return {
            "CARRARA_KAFKA_BOOTSTRAP": self.bootstrap,
            "CARRARA_MLFLOW_URL": self.settings.mlflow_url,
            **self.material.identity_env(identity),
        }


def _wait(what: str, check: Callable[[], Any], timeout: float, log: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except (httpx.HTTPError, OSError, KafkaException):
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, f"timed out waiting for {what}\n{log}"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def secured(stack_settings: Settings) -> Iterator[Secured]:
    home = ROOT / ".carrara" / f"secured-{RUN_ID}-{uuid.uuid4().hex[:4]}"
    kafka_port, controller_port, mlflow_port = free_port(), free_port(), free_port()
    mlflow_db = f"mlflow_secured_{RUN_ID}"
    settings = stack_settings.model_copy(
        update={
            "home": home,
            "kafka_port": kafka_port,
            "kafka_controller_port": controller_port,
            "kafka_bootstrap": f"{stack_settings.host}:{kafka_port}",
            "mlflow_port": mlflow_port,
            "mlflow_url": f"http://{stack_settings.host}:{mlflow_port}",
            "mlflow_db_name": mlflow_db,
        }
    )
    material = SecureMaterial(home, settings.host)
    kafka = KafkaService(settings, material, data_prefixes=(TAG,))
    mlflow = MlflowService(settings, material)
    # The local stack's broker jars (same version): no second Maven resolution.
    kafka.home.mkdir(parents=True)
    kafka.libs_dir.symlink_to(KafkaService(stack_settings).libs_dir)
    # MLflow's own database in the shared Postgres server (the mlflow role exists there).
    PostgresService(settings).after_healthy()
    registry = ProcessRegistry(home / "run", home / "logs")
    try:
        for service in (kafka, mlflow):  # both start at once; MLflow's first start is slow
            service.prepare()
            registry.start(service.name, service.launch_spec())
        for service in (kafka, mlflow):
            _wait(
                f"{service.label} healthy",
                service.healthy,
                180,
                log=registry.log_tail(service.name, 40),
            )
            service.after_healthy()  # ACLs; MLflow accounts
        yield Secured(settings, material)
    finally:
        registry.stop("mlflow", signal.SIGTERM, 20)
        registry.stop("kafka", signal.SIGKILL, 10)
        with PostgresService(stack_settings).connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(mlflow_db))
            )
        subprocess.run(["rm", "-rf", str(home)], check=False)


# --- refused ------------------------------------------------------------------------------------


def _auth_errors(config: dict[str, Any], seconds: float = 15) -> list[KafkaError]:
    """Errors a producer with `config` reports while it tries to connect."""
    errors: list[KafkaError] = []
    producer = Producer({**config, "error_cb": errors.append, "log_level": 0})
    deadline = time.monotonic() + seconds
    while not any(e.code() == KafkaError._AUTHENTICATION for e in errors):
        if time.monotonic() > deadline:
            break
        producer.poll(0.2)
    return errors


def test_kafka_refuses_clients_without_credentials(secured: Secured) -> None:
    # No credentials at all (plaintext): the SASL_SSL listener answers nothing.
    anonymous = AdminClient(
        {"bootstrap.servers": secured.bootstrap, "socket.timeout.ms": 3000, "log_level": 0}
    )
    with pytest.raises(KafkaException):
        anonymous.list_topics(timeout=5)

    # TLS but no valid SCRAM credentials: an authentication error.
    wrong = secured.as_user("scorer").model_copy(
        update={"kafka_sasl_password_file": None, "kafka_sasl_password": SecretStr("guessed")}
    )
    errors = _auth_errors(producer_config(secured.bootstrap, wrong))
    assert any(e.code() == KafkaError._AUTHENTICATION for e in errors), errors
    assert "guessed" not in " ".join(e.str() for e in errors)

    # The right credentials: in.
    admin = AdminClient(admin_config(secured.bootstrap, secured.as_user("scorer")))
    assert admin.list_topics(timeout=10).brokers


def test_mlflow_refuses_requests_without_credentials(secured: Secured) -> None:
    url = f"{secured.settings.mlflow_url}/api/2.0/mlflow/experiments/search"
    assert httpx.post(url, json={"max_results": 1}, timeout=MLFLOW_TIMEOUT_S).status_code == 401
    control = secured.env("control")
    scorer = secured.env("scorer")
    as_control = (control["MLFLOW_TRACKING_USERNAME"], control["MLFLOW_TRACKING_PASSWORD"])
    as_scorer = (scorer["MLFLOW_TRACKING_USERNAME"], scorer["MLFLOW_TRACKING_PASSWORD"])
    assert httpx.post(
        url, json={"max_results": 1}, auth=as_scorer, timeout=MLFLOW_TIMEOUT_S
    ).is_success
    assert (
        httpx.post(
            url, json={"max_results": 1}, auth=("carrara", "wrong"), timeout=MLFLOW_TIMEOUT_S
        ).status_code
        == 401
    )

    # The scorers' account reads only: it cannot change what the service account made.
    create = f"{secured.settings.mlflow_url}/api/2.0/mlflow/experiments/create"
    made = httpx.post(
        create, json={"name": f"{TAG}-owned"}, auth=as_control, timeout=MLFLOW_TIMEOUT_S
    )
    assert made.is_success, made.text
    experiment_id = made.json()["experiment_id"]
    rename = httpx.post(
        f"{secured.settings.mlflow_url}/api/2.0/mlflow/experiments/update",
        json={"experiment_id": experiment_id, "new_name": f"{TAG}-taken"},
        auth=as_scorer,
        timeout=MLFLOW_TIMEOUT_S,
    )
    assert rename.status_code == 403


def _deliver(settings: Settings, bootstrap: str, topic: str) -> KafkaError | None:
    """Produce one record as `settings`' user; its delivery error (None: written)."""
    outcome: list[KafkaError | None] = []
    producer = Producer(
        producer_config(bootstrap, settings, **{"message.timeout.ms": 15_000, "log_level": 0})
    )
    producer.produce(topic, key=b"forged", value=b"{}", on_delivery=lambda e, _m: outcome.append(e))
    producer.flush(20)
    assert outcome, "no delivery report"
    return outcome[0]


def test_only_the_control_plane_may_write_the_deployments_topic(secured: Secured) -> None:
    deployments = secured.settings.deployments_topic
    TopicAdmin(secured.bootstrap, secured.as_user("control")).ensure_compacted_topic(deployments)
    for identity in ("scorer", "monitor"):
        error = _deliver(secured.as_user(identity), secured.bootstrap, deployments)
        assert error is not None, f"{identity} wrote {deployments}"
        assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED, error
    # A scorer still writes its data topics, and the control plane the deployments topic.
    data = f"{TAG}-acl-probe"
    TopicAdmin(secured.bootstrap, secured.as_user("control")).create_topic(data, 1, exist_ok=True)
    assert _deliver(secured.as_user("scorer"), secured.bootstrap, data) is None
    # Outside the data prefixes the scorer may not write at all.
    outside = f"other-{RUN_ID}-acl-probe"
    TopicAdmin(secured.bootstrap, secured.as_user("control")).create_topic(
        outside, 1, exist_ok=True
    )
    error = _deliver(secured.as_user("scorer"), secured.bootstrap, outside)
    assert error is not None
    assert error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED


# --- the whole path with credentials ------------------------------------------------------------


def _events(n: int, seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    amount, velocity = rng.lognormal(3, 1, n), rng.poisson(2, n).astype(float)
    fraud = (amount * 0.02 + velocity * 0.5 + rng.normal(size=n) > 2.5).astype(int)
    return [
        {
            "card_id": f"card-{i}",
            "amount": round(float(amount[i]), 4),
            "velocity": float(velocity[i]),
            "fraud": int(fraud[i]),
        }
        for i in range(n)
    ]


def _produce(settings: Settings, bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    producer = Producer(producer_config(bootstrap, settings))
    for e in events:
        producer.produce(topic, key=e["card_id"].encode(), value=orjson.dumps(e))
    assert producer.flush(30) == 0


@dataclass
class Procs:
    running: dict[str, subprocess.Popen[bytes]]
    logs: dict[str, Path]

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> None:
        log = ROOT / ".carrara" / "logs" / f"test-secured-{RUN_ID}-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            self.running[name] = subprocess.Popen(
                argv,
                cwd=ROOT,
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.logs[name] = log

    def tail(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")[-3000:]

    def stop_all(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.running.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_dataset_to_monitor_with_each_identity_s_credentials(
    secured: Secured, stack_settings: Settings
) -> None:
    control = secured.as_user("control")
    queue = f"carrara-secured-{RUN_ID}"
    topics = {k: f"{TAG}-{k}" for k in ("events", "input", "output")}
    admin = TopicAdmin(secured.bootstrap, control)
    for name in topics.values():
        admin.create_topic(name, partitions=2, exist_ok=True)
    _produce(control, secured.bootstrap, topics["events"], _events(2000, seed=1))

    control_env = {**secured.env("control"), "CARRARA_TRAINING_QUEUE": queue}
    procs = Procs({}, {})
    with (
        migrated_database(stack_settings, f"carrara_secured_{RUN_ID}") as database_url,
        running_api(database_url, "secured", **control_env) as api,
    ):
        try:
            procs.start(
                "worker",
                [
                    str(BIN / "celery"),
                    "-A",
                    "carrara.training.worker",
                    "worker",
                    "-Q",
                    queue,
                    "--pool=solo",
                    "--loglevel=INFO",
                    f"--hostname=secured-{RUN_ID}@%h",
                ],
                {**control_env, "CARRARA_DATABASE_URL": database_url},
            )
            headers = {"Authorization": f"Bearer {api.admin_token}"}

            def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
                return httpx.request(
                    method, f"{api.url}/api/v1{path}", headers=headers, timeout=30, **kwargs
                )

            # Dataset and snapshot through the API (the control plane's credentials).
            dataset = f"{TAG}-cards"
            created = call(
                "POST",
                "/datasets",
                json={
                    "name": dataset,
                    "topic": topics["events"],
                    "key_field": "card_id",
                    "label_field": "fraud",
                    "task": "binary",
                    "features": [{"name": f, "type": "float"} for f in FEATURES],
                },
            )
            assert created.status_code == 201, created.text
            snapshot = call("POST", f"/datasets/{dataset}/versions", json={"mode": "latest"})
            assert snapshot.status_code == 201, snapshot.text

            # Train (the worker replays from the secured broker, logs to the secured MLflow).
            model = f"{TAG}-fraud"
            run = call(
                "POST",
                "/runs",
                json={
                    "dataset": dataset,
                    "dataset_version": snapshot.json()["number"],
                    "algorithm": "logistic_regression",
                    "params": {},
                    "registered_model_name": model,
                },
            )
            assert run.status_code == 201, run.text
            run_id = run.json()["id"]
            finished = _wait(
                "the run to finish",
                lambda: (
                    (r := call("GET", f"/runs/{run_id}").json())["status"]
                    in ("succeeded", "failed")
                    and r
                ),
                180,
                log=procs.tail("worker"),
            )
            assert finished["status"] == "succeeded", finished["error"]
            (registered,) = call("GET", f"/models/{model}").json()["versions"]

            # Deploy; a scorer with the scorer's credentials serves it.
            pool = f"{TAG}-pool"
            deployed = call(
                "PUT",
                f"/deployments/{TAG}-scoring",
                json={
                    "input_topic": topics["input"],
                    "output_topic": topics["output"],
                    "key_field": "card_id",
                    "pool": pool,
                    "variants": [
                        {
                            "name": "a",
                            "model": model,
                            "version": registered["version"],
                            "weight": 100,
                        }
                    ],
                },
            )
            assert deployed.status_code == 201, deployed.text
            scorer_port, monitor_port = free_port(), free_port()
            procs.start(
                "scorer",
                [
                    str(BIN / "carrara-scorer"),
                    "--pool",
                    pool,
                    "--instance-id",
                    f"{TAG}-s1",
                    "--metrics-port",
                    str(scorer_port),
                ],
                secured.env("scorer"),
            )
            procs.start(
                "monitor",
                [str(BIN / "carrara-monitor"), "--metrics-port", str(monitor_port)],
                {**secured.env("monitor"), "CARRARA_DATABASE_URL": database_url},
            )
            _wait(
                "the scorer ready",
                lambda: (
                    httpx.get(f"http://127.0.0.1:{scorer_port}/readyz", timeout=2)
                    .json()["deployments"]
                    .get(f"{TAG}-scoring")
                    == "serving"
                ),
                120,
                log=procs.tail("scorer"),
            )
            n = 1500
            _produce(control, secured.bootstrap, topics["input"], _events(n, seed=2))

            def counted() -> int:
                metrics = call("GET", f"/deployments/{TAG}-scoring/metrics").json()
                return sum(v["totals"]["predictions"] for v in metrics["variants"])

            _wait(
                "the monitor to count every prediction",
                lambda: counted() >= n,
                120,
                log=procs.tail("monitor") + procs.tail("scorer"),
            )
            assert counted() == n
            rollout = call("GET", f"/deployments/{TAG}-scoring").json()["rollout"]
            assert rollout["up_to_date"] == 1, rollout  # the status topic reached the API
        finally:
            procs.stop_all()
