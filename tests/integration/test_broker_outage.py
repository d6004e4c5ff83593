"""A Kafka broker restart, a long outage and a frozen broker, as an operator meets them.

These tests need a broker they may kill: each module starts its own single-node Kafka (same jars
as the local stack, its own data directory and ports) and kills it with SIGKILL, freezes it with
SIGSTOP, and starts it again, while events stream in. Everything else is real and shared: MLflow
for the models, Postgres for the API and the monitor. Scorers, the monitor and the API are real
processes pointed at that broker.

What must hold (issue 11): every input offset is answered (exactly once in exactly-once mode, read
with read_committed; at least once otherwise), the monitor counts every prediction, a deployment
published during the outage is applied after it, and a broker down longer than the watchdog makes
the scorer's /healthz fail with the deployment `stalled` until it recovers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from carrara.devstack.kafka_broker import KafkaService
from carrara.devstack.processes import ProcessRegistry
from carrara.settings import Settings
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec, encode_spec
from carrara.streams.prediction_record import decode_prediction
from carrara.streams.scorer_status import decode_status
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import (
    ROOT,
    RUN_ID,
    LiveApi,
    free_port,
    migrated_database,
    running_api,
)
from tests.integration.test_scorer import _event
from tests.integration.test_scorer import _register as register_scorer_model

BIN = Path(sys.executable).parent
# Short enough for a test, long enough that a restart (~15 s here: a JVM start) is not a stall.
STALL_TIMEOUT_S = 45
CALL_TIMEOUT_S = 8


# --- a broker of our own ----------------------------------------------------------------------


@dataclass
class Broker:
    """A single-node Kafka this module may kill, freeze and restart."""

    settings: Settings
    service: KafkaService
    registry: ProcessRegistry

    @property
    def bootstrap(self) -> str:
        return self.settings.kafka_bootstrap

    @property
    def pid(self) -> int:
        proc = self.registry.find("kafka")
        assert proc is not None, "the test broker is not running"
        return proc.pid

    def start(self) -> None:
        self.registry.start("kafka", self.service.launch_spec())
        deadline = time.monotonic() + 120
        while not self.service.healthy():
            assert time.monotonic() < deadline, self.registry.log_tail("kafka")
            time.sleep(0.3)

    def kill9(self) -> None:
        pid = self.pid
        os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.registry.find("kafka") is not None:  # gone, PID file cleared
            assert time.monotonic() < deadline
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.05)

    def answers(self) -> bool:
        """Whether the broker answers a metadata request within a second."""
        try:
            TopicAdmin(self.bootstrap).ping(timeout=1.0)
        except Exception:
            return False
        return True

    def freeze(self) -> None:
        os.killpg(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.pid, signal.SIGCONT)

    def stop(self) -> None:
        proc = self.registry.find("kafka")
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)
        self.registry.stop("kafka", signal.SIGKILL, 10)


@pytest.fixture(scope="module")
def broker(stack_settings: Settings) -> Iterator[Broker]:
    home = ROOT / ".carrara" / f"outage-{RUN_ID}-{uuid.uuid4().hex[:4]}"
    kafka_port, controller_port = free_port(), free_port()
    settings = stack_settings.model_copy(
        update={
            "home": home,
            "kafka_port": kafka_port,
            "kafka_controller_port": controller_port,
            "kafka_bootstrap": f"{stack_settings.host}:{kafka_port}",
        }
    )
    service = KafkaService(settings)
    # The local stack's broker jars (same version): no second Maven resolution.
    service.home.mkdir(parents=True)
    service.libs_dir.symlink_to(KafkaService(stack_settings).libs_dir)
    service.prepare()
    registry = ProcessRegistry(home / "run", home / "logs")
    b = Broker(settings, service, registry)
    b.start()
    yield b
    b.stop()
    subprocess.run(["rm", "-rf", str(home)], check=False)


# --- processes and helpers --------------------------------------------------------------------


def _register(settings: Settings, name: str) -> int:
    return register_scorer_model(settings, name, 1.0)[0]


@dataclass
class Procs:
    env: dict[str, str]
    running: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def start(self, name: str, argv: list[str], **env: str) -> None:
        log = ROOT / ".carrara" / "logs" / f"test-outage-{RUN_ID}-{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        port = free_port()
        with log.open("ab") as out:
            self.running[name] = subprocess.Popen(
                [*argv, "--metrics-port", str(port)],
                cwd=ROOT,
                env={**os.environ, **self.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.ports[name] = port

    def get(self, name: str, path: str) -> httpx.Response:
        assert self.running[name].poll() is None, f"{name} exited"
        return httpx.get(f"http://127.0.0.1:{self.ports[name]}{path}", timeout=5)

    def metric(self, name: str, prefix: str) -> float:
        lines = self.get(name, "/metrics").text.splitlines()
        return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix))

    def stop_all(self) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 120, every: float = 0.3) -> Any:
    """Poll `check` until it returns something truthy (visible progress), or fail naming `what`."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        assert time.monotonic() < deadline, f"timed out waiting for {what} (last: {last!r})"
        time.sleep(every)


class Stream:
    """Produces events at a steady rate in a thread, riding out the outage (long timeouts)."""

    def __init__(self, bootstrap: str, topic: str, start: int, count: int, rate: float) -> None:
        self.bootstrap, self.topic = bootstrap, topic
        self.start_index, self.count, self.rate = start, count, rate
        self.produced = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.unflushed = -1

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(600)

    def _run(self) -> None:
        producer = Producer(
            {
                "bootstrap.servers": self.bootstrap,
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.timeout.ms": 600_000,
                "log_level": 0,
            }
        )
        began = time.monotonic()
        for n in range(self.count):
            i = self.start_index + n
            while True:
                try:
                    producer.produce(
                        self.topic, key=f"card-{i}".encode(), value=orjson.dumps(_event(i))
                    )
                    break
                except BufferError:
                    producer.poll(0.1)
            self.produced += 1
            producer.poll(0)
            delay = began + n / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        self.unflushed = producer.flush(600)


class Reader:
    """Reads a topic from the start, read_committed, accumulating every record seen."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.records: list[Any] = []
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "log_level": 0,
            }
        )
        self._consumer.subscribe([topic])

    def poll(self) -> int:
        for m in self._consumer.consume(5000, timeout=0.2):
            if m.error() is None and m.value() is not None:
                self.records.append(m)
        return len(self.records)

    def close(self) -> None:
        self._consumer.close()


def predictions(reader: Reader, deployment: str) -> Counter[tuple[int, int]]:
    """How many predictions each (partition, offset) of `deployment`'s input got."""
    answered: Counter[tuple[int, int]] = Counter()
    for m in reader.records:
        p = decode_prediction(m.value())
        if p.deployment == deployment and not p.shadow:
            answered[(p.partition, p.offset)] += 1
    return answered


def input_offsets(bootstrap: str, topic: str) -> set[tuple[int, int]]:
    admin = TopicAdmin(bootstrap)
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "x", "log_level": 0})
    offsets = set()
    for p in admin.partitions(topic):
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
        offsets |= {(p, o) for o in range(low, high)}
    consumer.close()
    return offsets


# --- the tests ----------------------------------------------------------------------------------


def test_exactly_once_scorers_and_the_monitor_ride_out_a_broker_kill_and_a_freeze(
    broker: Broker, stack_settings: Settings
) -> None:
    # A database of its own: the session's database is shared with other API processes, whose
    # relays (and elected single-run loops) talk to the shared broker, not to this one.
    with migrated_database(stack_settings, f"carrara_outage_{RUN_ID}") as database_url:
        _kill_and_freeze_through_the_api(broker, stack_settings, database_url)


def _kill_and_freeze_through_the_api(
    broker: Broker, stack_settings: Settings, test_database_url: str
) -> None:
    admin = TopicAdmin(broker.bootstrap)
    tag = uuid.uuid4().hex[:6]
    topics = {k: f"outage-{tag}-{k}" for k in ("input", "output", "input2", "output2")}
    for name in topics.values():
        admin.create_topic(name, partitions=3)
    model = f"outage-{RUN_ID}-{tag}"
    version = _register(stack_settings, model)
    kafka_env = {
        "CARRARA_KAFKA_BOOTSTRAP": broker.bootstrap,
        "CARRARA_DATABASE_URL": test_database_url,
        "CARRARA_DEPLOYMENTS_TOPIC": f"outage-{tag}-deployments",
        "CARRARA_SCORER_STATUS_TOPIC": f"outage-{tag}-status",
        "CARRARA_ALERTS_TOPIC": f"outage-{tag}-alerts",
        "CARRARA_STALL_TIMEOUT_S": str(STALL_TIMEOUT_S),
        "CARRARA_KAFKA_CALL_TIMEOUT_S": str(CALL_TIMEOUT_S),
    }
    procs = Procs(kafka_env)
    with running_api(test_database_url, f"outage-{tag}", **kafka_env) as api:
        headers = {"Authorization": f"Bearer {api.admin_token}"}

        def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
            return httpx.request(
                method, f"{api.url}/api/v1{path}", headers=headers, timeout=30, **kwargs
            )

        assert call("POST", f"/models/{model}/versions", json={"version": version}).is_success
        pool = f"outage-{tag}"

        def deploy(name: str, suffix: str = "") -> httpx.Response:
            body = {
                "input_topic": topics[f"input{suffix}"],
                "output_topic": topics[f"output{suffix}"],
                "key_field": "card_id",
                "pool": pool,
                "variants": [{"name": "a", "model": model, "version": version, "weight": 100}],
            }
            return call("PUT", f"/deployments/{name}", json=body)

        first, second = f"first-{tag}", f"second-{tag}"
        assert deploy(first).status_code == 201
        assert deploy(second, "2").status_code == 201
        try:
            for name in ("s1", "s2"):
                procs.start(
                    name,
                    [str(BIN / "carrara-scorer"), "--pool", pool, "--instance-id", f"{tag}-{name}"],
                )
            procs.start("monitor", [str(BIN / "carrara-monitor")])
            for name in ("s1", "s2"):
                wait_for(f"{name} ready", lambda n=name: procs.get(n, "/readyz").status_code == 200)
            _kill_and_freeze(broker, procs, call, deploy, first, second, topics, api)
        finally:
            procs.stop_all()


def _kill_and_freeze(
    broker: Broker,
    procs: Procs,
    call: Callable[..., httpx.Response],
    deploy: Callable[..., httpx.Response],
    first: str,
    second: str,
    topics: dict[str, str],
    api: LiveApi,
) -> None:
    n = 12_000
    reader = Reader(broker.bootstrap, topics["output"])
    events_in = 'carrara_scorer_events_in_total{deployment="' + first + '"}'
    with Stream(broker.bootstrap, topics["input"], 0, n, rate=1000) as stream:
        # Kill while both scorers are scoring: predictions flowing, input still coming.
        wait_for(
            "scoring under way",
            lambda: procs.metric("s1", events_in) > 500 and procs.metric("s2", events_in) > 500,
        )
        scored_at_kill = procs.metric("s1", events_in) + procs.metric("s2", events_in)
        broker.kill9()
        assert 0 < scored_at_kill < n
        assert stream.produced < n

        # During the outage: a new revision is refused with 503 (its topics cannot be checked),
        # a stop is accepted (it waits in the outbox) ...
        assert deploy(first).status_code == 503
        assert call("DELETE", f"/deployments/{second}").status_code == 200
        wait_for(
            "the relay to report it cannot deliver",
            lambda: httpx.get(f"{api.url}/healthz", timeout=5).json()["loops"]["outbox-relay"][
                "last_error"
            ],
        )
        # ... and the scorers noticed, yet stay alive (the watchdog is longer than this outage).
        assert procs.get("s1", "/healthz").status_code == 200
        broker.start()
    assert stream.unflushed == 0

    expected = input_offsets(broker.bootstrap, topics["input"])
    assert len(expected) == n
    wait_for(
        "every event answered", lambda: reader.poll() and len(predictions(reader, first)) >= n, 240
    )
    reader.poll()
    answered = predictions(reader, first)
    assert set(answered) == expected  # every input offset answered ...
    assert max(answered.values()) == 1  # ... exactly once (read_committed)

    # The change published during the outage was applied after it: both scorers stopped it.
    def rollout() -> dict[str, Any]:
        return call("GET", f"/deployments/{second}").json()["rollout"]

    wait_for("the stop to reach the scorers", lambda: rollout()["up_to_date"] == 2, 120)
    assert rollout()["summary"] == "2/2 scorers have stopped it (revision 2)"

    # The monitor counted every prediction exactly once, through the kill.
    def monitored() -> int:
        metrics = call("GET", f"/deployments/{first}/metrics").json()
        return sum(v["totals"]["predictions"] for v in metrics["variants"])

    wait_for("the monitor's counts", lambda: monitored() >= n, 120)
    assert monitored() == n

    # A frozen broker (a long GC pause, a partition) for longer than the session timeout.
    m = 6_000
    with Stream(broker.bootstrap, topics["input"], n, m, rate=1000):
        wait_for(
            "scoring under way",
            lambda: len(predictions(reader, first)) > n + 500 if reader.poll() else False,
        )
        broker.freeze()
        frozen_at = time.monotonic()
        try:
            # Frozen (it answers nothing) for longer than the 10 s session timeout.
            wait_for(
                "the frozen broker to outlast the session timeout",
                lambda: time.monotonic() - frozen_at > 12 and not broker.answers(),
                60,
            )
        finally:
            broker.thaw()  # never leave it frozen for the next test
    wait_for(
        "every event answered",
        lambda: reader.poll() and len(predictions(reader, first)) >= n + m,
        240,
    )
    reader.poll()
    answered = predictions(reader, first)
    assert len(answered) == n + m
    assert max(answered.values()) == 1
    wait_for("the monitor's counts", lambda: monitored() >= n + m, 120)
    assert monitored() == n + m
    for name in ("s1", "s2", "monitor"):
        assert procs.get(name, "/healthz").status_code == 200
    reader.close()


def test_a_long_outage_stalls_the_scorer_visibly_and_recovery_clears_it_at_least_once(
    broker: Broker, stack_settings: Settings
) -> None:
    admin = TopicAdmin(broker.bootstrap)
    tag = uuid.uuid4().hex[:6]
    topics = {k: f"stall-{tag}-{k}" for k in ("input", "output")}
    for name in topics.values():
        admin.create_topic(name, partitions=3)
    status_topic, deployments_topic = f"stall-{tag}-status", f"stall-{tag}-deployments"
    admin.ensure_compacted_topic(status_topic)
    admin.ensure_compacted_topic(deployments_topic)
    model = f"stall-{RUN_ID}-{tag}"
    version = _register(stack_settings, model)
    name, pool = f"stall-{tag}", f"stall-{tag}"
    spec = DeploymentSpec(
        name=name,
        revision=1,
        salt="s",
        published_at=datetime.now(UTC),
        input_topic=topics["input"],
        output_topic=topics["output"],
        key_field="card_id",
        pool=pool,
        variants=(VariantSpec(name="a", model_name=model, model_version=version, weight=100),),
    )
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    producer.produce(deployments_topic, key=name, value=encode_spec(spec))
    assert producer.flush(10) == 0
    stall_after = 6
    procs = Procs(
        {
            "CARRARA_KAFKA_BOOTSTRAP": broker.bootstrap,
            "CARRARA_DEPLOYMENTS_TOPIC": deployments_topic,
            "CARRARA_SCORER_STATUS_TOPIC": status_topic,
            "CARRARA_SCORER_DELIVERY": "at_least_once",
            "CARRARA_STALL_TIMEOUT_S": str(stall_after),
            "CARRARA_KAFKA_CALL_TIMEOUT_S": str(CALL_TIMEOUT_S),
            "CARRARA_SCORER_STATUS_INTERVAL_S": "2",
        }
    )
    n = 8_000
    reader = Reader(broker.bootstrap, topics["output"])
    events_in = 'carrara_scorer_events_in_total{deployment="' + name + '"}'
    try:
        procs.start(
            "alo", [str(BIN / "carrara-scorer"), "--pool", pool, "--instance-id", f"alo-{tag}"]
        )
        wait_for("the scorer ready", lambda: procs.get("alo", "/readyz").status_code == 200)
        with Stream(broker.bootstrap, topics["input"], 0, n, rate=1000) as stream:
            wait_for("scoring under way", lambda: procs.metric("alo", events_in) > 1000)
            broker.kill9()
            assert stream.produced < n  # mid-stream

            stalled = wait_for(
                "the watchdog to fail /healthz",
                lambda: (r := procs.get("alo", "/healthz")).status_code == 503 and r.json(),
                60,
            )
            assert name in stalled["stalled"]
            assert "no progress" in stalled["stalled"][name]
            ready = procs.get("alo", "/readyz").json()
            assert ready["deployments"] == {name: "stalled"}
            assert procs.metric("alo", "carrara_scorer_last_batch_age_seconds") > stall_after
            broker.start()
            wait_for(
                "recovery to clear the stall",
                lambda: procs.get("alo", "/healthz").status_code == 200,
                120,
            )
            assert procs.get("alo", "/readyz").json()["deployments"] == {name: "serving"}
        assert stream.unflushed == 0
        expected = input_offsets(broker.bootstrap, topics["input"])
        wait_for(
            "every event answered",
            lambda: reader.poll() and set(predictions(reader, name)) >= expected,
            240,
        )
        assert set(predictions(reader, name)) == expected  # at least once: none lost

        # The status topic told the control plane: stalled (delivered once Kafka was back), then
        # serving again.
        states = _states(broker.bootstrap, status_topic, f"alo-{tag}", name)
        assert "stalled" in states
        assert states[-1] == "serving"
        assert states.index("stalled") < len(states) - 1
    finally:
        procs.stop_all()
        reader.close()


def _states(bootstrap: str, topic: str, instance: str, deployment: str) -> list[str]:
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "log_level": 0}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    states: list[str] = []
    for m in consumer.consume(100_000, timeout=3):
        if m.error() is None and m.key() == instance.encode() and m.value():
            status = decode_status(m.value())
            states += [d.state for d in status.deployments if d.name == deployment]
    consumer.close()
    return states
