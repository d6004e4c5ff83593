"""carrara-scorer vs. a raw Kafka pass-through and vs. the per-event pyfunc loop, side by side.

One fresh 3-partition input topic of N synthetic JSON events (entity key, 20 float features, a 0/1
label; ~320 bytes) is produced before anything is timed. Then, on the same broker and in one run:

(a) raw confluent-kafka pass-through: `consume(num_messages=1000)` -> produce the same bytes ->
    flush -> commit, as the scorer's at-least-once mode does (client_config's tuned settings,
    producer linger 5 ms): the ceiling. Run before and after the scorers; the mean is the ceiling.
(b) the naive loop from MLflow's docs, per event: json.loads -> 1-row DataFrame ->
    `mlflow.pyfunc` predict -> produce, on a small slice (`--naive-events`), the same model
    version loaded with `mlflow.pyfunc.load_model`.
(c) `carrara-scorer`, one process, exactly-once (default) and at-least-once, per model.

Topics use `message.timestamp.type=LogAppendTime`, so record timestamps are the broker's. The
throughput of (a) and (c) is measured from the first to the last output record's timestamp (the
process start and group join are not counted). Then each scorer is moved (a new deployment
revision) to a fresh latency topic fed at half of its measured rate: broker-to-broker latency is
the output record's timestamp minus its input record's; "visible" latency is when a read_committed
consumer of the output receives it (for exactly-once, only after the transaction commits).
Every topic, consumer group and registered model made here is deleted at the end (the MLflow runs
stay, in the experiment `carrara/bench-scorer`). Scorer logs: .carrara/logs/bench-scorer-*.log.

    .venv/bin/python benchmarks/scorer.py [--events 200000] [--naive-events 2000]
        [--models logistic_regression,lightgbm] [--latency-seconds 10]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from carrara.settings import Settings
from carrara.streams.client_config import admin_config, consumer_config, producer_config
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec, encode_spec
from carrara.streams.prediction_record import decode_prediction
from carrara.streams.topics import TopicAdmin

ROOT = Path(__file__).resolve().parents[1]
FEATURES = [f"f{i}" for i in range(20)]
ENTITIES = 10_000
SCHEMA = {
    "key_field": "entity",
    "label_field": "label",
    "task": "binary",
    "features": [{"name": name, "type": "float"} for name in FEATURES],
}
# Algorithm -> params: a 100-tree GBDT (no early stopping, so it keeps all 100 trees).
MODEL_PARAMS: dict[str, dict[str, Any]] = {
    "logistic_regression": {},
    "lightgbm": {"n_estimators": 100},
    "hist_gradient_boosting": {"max_iter": 100, "early_stopping": False},
}
MODES = ("exactly_once", "at_least_once")
# In every topic, group, deployment and model name of this run, so cleanup finds only ours.
RUN_ID = uuid.uuid4().hex[:6]
TIMESTAMPED = {"message.timestamp.type": "LogAppendTime"}


# --- events and models ----------------------------------------------------------------------


def make_events(count: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """`count` (key, value) pairs; the label is a noisy non-linear function of the features."""
    rng = random.Random(seed)  # noqa: S311 - reproducible synthetic data, not security
    events = []
    for i in range(count):
        f = [round(rng.random(), 6) for _ in FEATURES]
        label = int(f[0] + f[1] * f[2] - 0.5 * f[3] ** 2 + 0.2 * rng.random() > 0.75)
        key = f"e-{i % ENTITIES}"
        value = orjson.dumps({"entity": key, **dict(zip(FEATURES, f, strict=True)), "label": label})
        events.append((key.encode(), value))
    return events


@dataclass(frozen=True)
class Registered:
    algorithm: str
    name: str
    version: int
    onnx: bool


def register_model(settings: Settings, algorithm: str) -> Registered:
    """Train `algorithm` on 20,000 events and register it exactly as a Carrara training run does."""
    from carrara.streams.event_codec import decode_events, fit_feature_spec
    from carrara.training.algorithms import validate_params
    from carrara.training.mlflow_logging import Lineage, log_and_register
    from carrara.training.onnx_export import export_onnx
    from carrara.training.trainers import train

    n = 20_000
    values = [value for _, value in make_events(n, seed=11)]
    decoded = decode_events(SCHEMA, [(values, [0] * n, list(range(n)))])
    spec = fit_feature_spec(decoded)
    x, y = spec.transform(decoded), spec.encode_labels(decoded)
    params = validate_params(algorithm, "binary", MODEL_PARAMS[algorithm])
    model = train(algorithm, "binary", params, x, y)
    onnx = export_onnx(model, x[:1000])
    if onnx.model_bytes is None:
        print(f"  {algorithm}: no ONNX artifact ({onnx.skipped_reason})")
    name = f"bench-scorer-{RUN_ID}-{algorithm}"
    logged = log_and_register(
        tracking_uri=settings.mlflow_url,
        registered_model_name=name,
        lineage=Lineage(
            "bench-scorer", 1, "synthetic", [{"partition": 0, "start": 0, "end": n}], n, 0
        ),
        algorithm=algorithm,
        params=params,
        metrics={},
        trained=model,
        feature_names=spec.columns,
        feature_spec=spec.as_dict(),
        holdout_x=x[:1000],
        holdout_y=y[:1000],
        onnx=onnx,
    )
    return Registered(algorithm, name, logged.version, logged.onnx)


# --- Kafka helpers --------------------------------------------------------------------------


def produce_all(bootstrap: str, topic: str, events: list[tuple[bytes, bytes]]) -> None:
    producer = Producer(producer_config(bootstrap))
    for i, (key, value) in enumerate(events):
        while True:
            try:
                producer.produce(topic, key=key, value=value)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.05)
        if i % 1000 == 0:
            producer.poll(0)
    if producer.flush(120) != 0:
        raise RuntimeError(f"not every event was delivered to {topic}")


def read_topic(bootstrap: str, topic: str, expected: int, partitions: int = 3) -> list[Message]:
    """The committed records of `topic` from the start: `expected` of them, plus any extra."""
    consumer = Consumer(consumer_config(bootstrap, f"bench-{RUN_ID}-reader-{uuid.uuid4().hex[:8]}"))
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(partitions)])
    records: list[Message] = []
    deadline = time.monotonic() + 120
    try:
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(m for m in consumer.consume(1000, timeout=0.5) if m.error() is None)
        # A little longer, so duplicates beyond the expected count are seen too.
        records.extend(m for m in consumer.consume(1000, timeout=0.5) if m.error() is None)
    finally:
        consumer.close()
    if len(records) != expected:
        raise RuntimeError(f"{topic}: read {len(records)} records, expected {expected}")
    return records


def next_offsets(batch: list[Message]) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for m in batch:
        position = (m.topic(), m.partition())
        last[position] = max(last.get(position, -1), m.offset())
    return [TopicPartition(t, p, o + 1) for (t, p), o in last.items()]


def rate_from_timestamps(records: list[Message]) -> float:
    """Records per second between the first and the last record's broker timestamp.

    Records stamped in the first millisecond are not counted: they were written before the clock
    started, so the rate is not inflated by one batch.
    """
    stamps = np.fromiter((m.timestamp()[1] for m in records), dtype=np.int64, count=len(records))
    first, last = int(stamps.min()), int(stamps.max())
    if last <= first:
        raise RuntimeError("all outputs share one timestamp: too few events to measure")
    return float(np.count_nonzero(stamps > first)) / ((last - first) / 1000)


# --- (a) raw pass-through -------------------------------------------------------------------


def pass_through(bootstrap: str, source: str, target: str, events: int) -> tuple[float, float]:
    """Consume -> produce -> flush -> commit per batch; (events/s by timestamps, wall events/s)."""
    consumer = Consumer(
        consumer_config(bootstrap, f"bench-{RUN_ID}-passthrough-{uuid.uuid4().hex[:8]}")
    )
    producer = Producer(producer_config(bootstrap))
    consumer.subscribe([source])
    count = 0
    started = 0.0
    try:
        while count < events:
            batch = [m for m in consumer.consume(num_messages=1000, timeout=0.5) if not m.error()]
            if not batch:
                continue
            if not started:
                started = time.perf_counter()
            for m in batch:
                while True:
                    try:
                        producer.produce(target, key=m.key(), value=m.value())
                        break
                    except BufferError:
                        producer.poll(0.05)
            if producer.flush(60) != 0:
                raise RuntimeError("pass-through outputs were not delivered")
            consumer.commit(offsets=next_offsets(batch), asynchronous=False)
            count += len(batch)
        wall = count / (time.perf_counter() - started)
    finally:
        consumer.close()
    outputs = read_topic(bootstrap, target, events)
    return rate_from_timestamps(outputs), wall


# --- (b) the naive per-event pyfunc loop ----------------------------------------------------


def naive_pyfunc_loop(
    settings: Settings, model: Registered, source: str, target: str, events: int
) -> float:
    """What a user writes from MLflow's docs: one json.loads, DataFrame and predict per event."""
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(settings.mlflow_url)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{model.name}/{model.version}")
    pyfunc.predict(pd.DataFrame([dict.fromkeys(FEATURES, 0.5)]))  # warm up, not timed
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"bench-{RUN_ID}-naive-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
        }
    )
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    consumer.subscribe([source])
    count = 0
    started = 0.0
    try:
        while count < events:
            message = consumer.poll(1.0)
            if message is None or message.error():
                continue
            if not started:
                started = time.perf_counter()
            event = json.loads(message.value())
            frame = pd.DataFrame([{name: event[name] for name in FEATURES}])
            prediction = pyfunc.predict(frame)
            output = {"entity": event["entity"], "prediction": np.asarray(prediction).tolist()[0]}
            producer.produce(target, key=message.key(), value=json.dumps(output))
            producer.poll(0)
            count += 1
        producer.flush(30)
        return count / (time.perf_counter() - started)
    finally:
        consumer.close()


# --- (c) carrara-scorer ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Scorer:
    """One carrara-scorer process serving one benchmark deployment."""

    settings: Settings
    topics: dict[str, str]
    model: Registered
    mode: str
    deployment: str
    log_path: Path
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None
    revision: int = 0

    def publish(self, input_topic: str, output_topic: str, published_at: datetime) -> None:
        """A new revision of the deployment (the reconciler applies it without a restart)."""
        self.revision += 1
        spec = DeploymentSpec(
            name=self.deployment,
            revision=self.revision,
            salt=f"salt-{self.deployment}",
            published_at=published_at,
            input_topic=input_topic,
            output_topic=output_topic,
            key_field="entity",
            pool=self.deployment,
            variants=(
                VariantSpec(
                    name="a",
                    model_name=self.model.name,
                    model_version=self.model.version,
                    weight=100,
                ),
            ),
        )
        producer = Producer(producer_config(self.settings.kafka_bootstrap))
        producer.produce(self.topics["deployments"], key=self.deployment, value=encode_spec(spec))
        if producer.flush(10) != 0:
            raise RuntimeError("the deployment spec was not delivered")

    def start(self) -> None:
        env = {
            **os.environ,
            "CARRARA_DEPLOYMENTS_TOPIC": self.topics["deployments"],
            "CARRARA_SCORER_STATUS_TOPIC": self.topics["status"],
            "CARRARA_SCORER_DELIVERY": self.mode,
        }
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "carrara-scorer"),
                    "--pool",
                    self.deployment,
                    "--instance-id",
                    f"bench-{self.deployment}",
                    "--metrics-port",
                    str(self.port),
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the scorer exited with {self.process.returncode}: see {self.log_path}"
                )
            try:
                response = httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2)
                if response.status_code == 200 and response.json()["deployments"]:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the scorer was not ready in {timeout}s: see {self.log_path}")
            time.sleep(0.2)

    def counter(self, metric: str) -> float:
        pattern = rf'^{metric}\{{[^}}]*deployment="{re.escape(self.deployment)}"[^}}]*\}} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, self.metrics(), re.MULTILINE))

    def cpu_seconds(self) -> float:
        """User + system CPU time of the scorer process so far (Linux /proc)."""
        assert self.process is not None
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def wait_events_in(self, expected: int, timeout: float = 300) -> float:
        """Wait until `expected` events are scored and committed; returns CPU cores used meanwhile.

        CPU is counted from the first scored events on, so process start and model load are not.
        """
        deadline = time.monotonic() + timeout
        first: tuple[float, float, float] | None = None  # (events, cpu seconds, wall time)
        while True:
            count = self.counter("carrara_scorer_events_in_total")
            if count > 0 and first is None:
                first = (count, self.cpu_seconds(), time.monotonic())
            if count >= expected:
                break
            assert self.process is not None
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the scorer did not consume {expected} events: see {self.log_path}"
                )
            time.sleep(0.25)
        assert first is not None
        elapsed = time.monotonic() - first[2]
        return (self.cpu_seconds() - first[1]) / elapsed if elapsed > 0 else float("nan")

    def runtime(self) -> str:
        """The runtime the scorer picked for the model (onnx | native | pyfunc)."""
        match = re.search(
            r'carrara_scorer_model_load_seconds\{[^}]*runtime="(\w+)"', self.metrics()
        )
        return match.group(1) if match else "?"

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@dataclass
class Latency:
    rate: float
    events: int
    broker_p50: float
    broker_p99: float
    visible_p50: float
    visible_p99: float


class OutputWatcher(threading.Thread):
    """A read_committed consumer of an output topic noting when each record became visible."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        super().__init__(daemon=True)
        self.consumer = Consumer(
            consumer_config(
                bootstrap,
                f"bench-{RUN_ID}-watch-{uuid.uuid4().hex[:8]}",
                **{"fetch.min.bytes": 1, "fetch.wait.max.ms": 5},
            )
        )
        self.consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in range(3)])
        self.seen: list[tuple[float, Message]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            batch = self.consumer.consume(num_messages=1000, timeout=0.1)
            received = time.time() * 1000
            self.seen.extend((received, m) for m in batch if m.error() is None)
        self.consumer.close()


def measure_latency(
    scorer: Scorer,
    admin: TopicAdmin,
    values: list[tuple[bytes, bytes]],
    rate: float,
    seconds: float,
    warmup: float = 2.0,
) -> Latency:
    """Move the scorer to a fresh topic, feed it at `rate` events/s, and time every event."""
    bootstrap = scorer.settings.kafka_bootstrap
    source, target = (
        scorer.topics[f"latency-in-{scorer.deployment}"],
        scorer.topics[f"latency-out-{scorer.deployment}"],
    )
    admin.create_topic(source, 3, config=TIMESTAMPED)
    admin.create_topic(target, 3, config=TIMESTAMPED)
    watcher = OutputWatcher(bootstrap, target)
    watcher.start()
    scorer.publish(source, target, datetime.now(UTC))
    producer = Producer(producer_config(bootstrap))
    # The delivery report of a LogAppendTime topic carries the broker's timestamp of the record.
    arrived: dict[tuple[int, int], int] = {}

    def on_delivery(error: KafkaError | None, message: Message) -> None:
        if error is None:
            arrived[(message.partition(), message.offset())] = message.timestamp()[1]

    # Probe until the new runner has its partitions, so the timed stream starts on a warm scorer.
    probes = 0
    deadline = time.monotonic() + 60
    while not watcher.seen:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the scorer never answered on {source}: see {scorer.log_path}")
        key, value = values[probes % len(values)]
        producer.produce(source, key=key, value=value, on_delivery=on_delivery)
        producer.flush(5)
        probes += 1
        time.sleep(0.2)
    total = int(rate * (warmup + seconds))
    started = time.perf_counter()
    timed_from_ms = time.time() * 1000 + warmup * 1000
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            key, value = values[sent % len(values)]
            try:
                producer.produce(source, key=key, value=value, on_delivery=on_delivery)
            except BufferError:
                producer.poll(0.01)
                continue
            sent += 1
        producer.poll(0)
        time.sleep(0.001)
    if producer.flush(60) != 0:
        raise RuntimeError("latency events were not delivered")
    achieved = total / (time.perf_counter() - started)
    expected = probes + total
    deadline = time.monotonic() + 60
    while len(watcher.seen) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    watcher.stop_event.set()
    watcher.join(10)
    if len(watcher.seen) != expected or len(arrived) != expected:
        raise RuntimeError(
            f"{len(arrived)} latency events delivered, {len(watcher.seen)} outputs, "
            f"expected {expected}"
        )
    broker, visible = [], []
    for received, message in watcher.seen:
        prediction = decode_prediction(message.value())
        if prediction.topic != source:
            raise RuntimeError(f"a prediction for {prediction.topic} on {target}")
        arrived_ms = arrived[(prediction.partition, prediction.offset)]
        if arrived_ms < timed_from_ms:
            continue
        broker.append(message.timestamp()[1] - arrived_ms)
        visible.append(received - arrived_ms)
    b50, b99 = np.percentile(broker, [50, 99])
    v50, v99 = np.percentile(visible, [50, 99])
    return Latency(achieved, len(broker), float(b50), float(b99), float(v50), float(v99))


@dataclass
class ScorerResult:
    model: str
    mode: str
    runtime: str
    rate: float
    cores: float  # CPU of the scorer process while it scored the backlog
    latency: Latency | None = None


def run_scorer(
    settings: Settings,
    admin: TopicAdmin,
    topics: dict[str, str],
    model: Registered,
    mode: str,
    events: list[tuple[bytes, bytes]],
    published_at: datetime,
    latency_seconds: float,
) -> ScorerResult:
    """Throughput over the pre-produced topic, then latency at half that rate."""
    short = {"exactly_once": "eos", "at_least_once": "alo"}[mode]
    deployment = f"bench-{RUN_ID}-{model.algorithm.replace('_', '-')}-{short}"
    for kind in ("out", "latency-in", "latency-out"):
        topics[f"{kind}-{deployment}"] = f"bench-scorer-{RUN_ID}-{kind}-{model.algorithm}-{short}"
    admin.create_topic(topics[f"out-{deployment}"], 3, config=TIMESTAMPED)
    log_path = ROOT / ".carrara" / "logs" / f"bench-scorer-{RUN_ID}-{model.algorithm}-{short}.log"
    scorer = Scorer(settings, topics, model, mode, deployment, log_path)
    # Published "before" the events: a new deployment starts at its publication time.
    scorer.publish(topics["input"], topics[f"out-{deployment}"], published_at)
    scorer.start()
    try:
        scorer.wait_ready()
        cores = scorer.wait_events_in(len(events))
        outputs = read_topic(settings.kafka_bootstrap, topics[f"out-{deployment}"], len(events))
        dead = scorer.counter("carrara_scorer_dead_letters_total")
        if dead:
            raise RuntimeError(f"{dead:.0f} dead letters: see {log_path}")
        result = ScorerResult(
            model.algorithm, mode, scorer.runtime(), rate_from_timestamps(outputs), cores
        )
        print(
            f"  (c) scorer {model.algorithm} {mode} [{result.runtime}]: "
            f"{result.rate:,.0f} events/s using {cores:.2f} CPU cores"
        )
        if latency_seconds > 0:
            result.latency = measure_latency(
                scorer, admin, events, result.rate / 2, latency_seconds
            )
            lat = result.latency
            print(
                f"      latency at {lat.rate:,.0f} events/s ({lat.events} events): "
                f"broker-to-broker p50 {lat.broker_p50:.0f} ms p99 {lat.broker_p99:.0f} ms; "
                f"visible p50 {lat.visible_p50:.0f} ms p99 {lat.visible_p99:.0f} ms"
            )
        return result
    finally:
        scorer.stop()


# --- main -----------------------------------------------------------------------------------


def cleanup(
    settings: Settings, admin: TopicAdmin, topics: dict[str, str], models: list[Registered]
) -> None:
    """Delete what the run made; each step is best effort so one failure does not leak the rest."""
    names = list(topics.values())
    names += [f"{t}.dead-letters" for t in (topics.get("input"), *topics.values()) if t]
    existing = [t for t in dict.fromkeys(names) if admin.partitions(t)]
    try:
        admin.delete_topics(existing)
    except Exception as exc:  # report and go on cleaning
        print(f"could not delete topics: {exc}")
    # Keep the client referenced until its futures are done: a destroyed client drops them.
    client = AdminClient(admin_config(settings.kafka_bootstrap))
    try:
        listed = client.list_consumer_groups(request_timeout=10).result()
        groups = [g.group_id for g in listed.valid if f"bench-{RUN_ID}-" in g.group_id]
        if groups:
            for future in client.delete_consumer_groups(groups, request_timeout=10).values():
                future.result()
    except Exception as exc:
        print(f"could not delete the consumer groups: {exc}")
    try:
        from mlflow import MlflowClient

        registry = MlflowClient(settings.mlflow_url)
        for model in models:
            registry.delete_registered_model(model.name)
    except Exception as exc:
        print(f"could not delete the registered models: {exc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000, help="events in the input topic")
    parser.add_argument("--naive-events", type=int, default=2000, help="events for (b)")
    parser.add_argument(
        "--models",
        default="logistic_regression,lightgbm",
        help=f"comma-separated, from: {', '.join(MODEL_PARAMS)}",
    )
    parser.add_argument(
        "--latency-seconds", type=float, default=10, help="timed latency window (0 = skip)"
    )
    args = parser.parse_args()
    algorithms = [a.strip() for a in args.models.split(",") if a.strip()]
    unknown = [a for a in algorithms if a not in MODEL_PARAMS]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODEL_PARAMS)}")

    # tqdm bars of MLflow's artifact downloads would bury the results.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    settings = Settings()
    bootstrap = settings.kafka_bootstrap
    admin = TopicAdmin(bootstrap)
    topics = {
        kind: f"bench-scorer-{RUN_ID}-{kind}"
        for kind in ("input", "deployments", "status", "passthrough-1", "passthrough-2")
    }
    models: list[Registered] = []
    started = time.perf_counter()
    try:
        admin.create_topic(topics["input"], 3, config=TIMESTAMPED)
        admin.ensure_compacted_topic(topics["deployments"])
        admin.ensure_compacted_topic(topics["status"])
        for name in ("passthrough-1", "passthrough-2"):
            admin.create_topic(topics[name], 3, config=TIMESTAMPED)

        for algorithm in algorithms:
            models.append(register_model(settings, algorithm))
            m = models[-1]
            print(f"registered {m.name} v{m.version} (ONNX artifact: {m.onnx})")

        events = make_events(args.events)
        mean_size = sum(len(v) for _, v in events) // len(events)
        published_at = datetime.now(UTC)
        time.sleep(0.01)
        t0 = time.perf_counter()
        produce_all(bootstrap, topics["input"], events)
        print(
            f"produced {len(events):,} events (~{mean_size} bytes) to {topics['input']} "
            f"in {time.perf_counter() - t0:.1f}s"
        )

        ceiling = []
        first, wall = pass_through(bootstrap, topics["input"], topics["passthrough-1"], len(events))
        ceiling.append(first)
        print(f"(a) pass-through: {first:,.0f} events/s (wall clock {wall:,.0f})")

        naive: dict[str, float] = {}
        for model in models:
            topics[f"naive-{model.algorithm}"] = f"bench-scorer-{RUN_ID}-naive-{model.algorithm}"
            admin.create_topic(topics[f"naive-{model.algorithm}"], 3)
            naive[model.algorithm] = naive_pyfunc_loop(
                settings,
                model,
                topics["input"],
                topics[f"naive-{model.algorithm}"],
                args.naive_events,
            )
            print(
                f"(b) naive pyfunc loop {model.algorithm}: {naive[model.algorithm]:,.0f} events/s"
            )

        results: list[ScorerResult] = []
        for model in models:
            for mode in MODES:
                results.append(
                    run_scorer(
                        settings,
                        admin,
                        topics,
                        model,
                        mode,
                        events,
                        published_at,
                        args.latency_seconds,
                    )
                )

        second, wall = pass_through(
            bootstrap, topics["input"], topics["passthrough-2"], len(events)
        )
        ceiling.append(second)
        print(f"(a) pass-through again: {second:,.0f} events/s (wall clock {wall:,.0f})")
        report(ceiling, naive, results, len(events), args.naive_events)
    finally:
        cleanup(settings, admin, topics, models)
        print(f"total time {time.perf_counter() - started:.0f}s")


def fmt(value: float) -> str:
    return f"{value:,.0f}"


def report(
    ceiling: list[float],
    naive: dict[str, float],
    results: list[ScorerResult],
    events: int,
    naive_events: int,
) -> None:
    """The summary table (markdown, as pasted into RESULTS.md)."""
    a = sum(ceiling) / len(ceiling)
    print()
    print(
        f"(a) raw pass-through, {events:,} events: {' / '.join(map(fmt, ceiling))} "
        f"-> mean {fmt(a)} events/s"
    )
    print()
    print(
        "| model | delivery | runtime | (c) events/s | scorer CPU | c/a | (b) events/s | c/b "
        "| latency at events/s | broker p50 / p99 ms | visible p50 / p99 ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    by_key = {(r.model, r.mode): r for r in results}
    for r in results:
        b = naive[r.model]
        lat = r.latency
        latency = (
            f"{fmt(lat.rate)} | {lat.broker_p50:.0f} / {lat.broker_p99:.0f} | "
            f"{lat.visible_p50:.0f} / {lat.visible_p99:.0f}"
            if lat
            else "- | - | -"
        )
        print(
            f"| {r.model} | {r.mode} | {r.runtime} | {fmt(r.rate)} | {r.cores:.2f} cores "
            f"| {r.rate / a:.2f}x | "
            f"{fmt(b)} | {r.rate / b:.0f}x | {latency} |"
        )
    print()
    for model in dict.fromkeys(r.model for r in results):
        eos, alo = by_key.get((model, "exactly_once")), by_key.get((model, "at_least_once"))
        if eos and alo:
            print(
                f"exactly-once cost, {model}: {1 - eos.rate / alo.rate:.0%} of the "
                "at-least-once throughput"
            )
    print(f"targets: c >= 0.5x a, c >= 100x b ((b) on {naive_events:,} events)")


if __name__ == "__main__":
    main()
