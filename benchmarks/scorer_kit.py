"""Building blocks of `benchmarks/scorer.py`: data, models, Kafka helpers, scorer processes.

Kept apart so each file stays readable; nothing here decides what is measured.
"""

from __future__ import annotations

import io
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import fastavro
import httpx
import numpy as np
import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, Message, Producer, TopicPartition
from confluent_kafka.schema_registry import Schema

from carrara.settings import Settings
from carrara.streams.client_config import consumer_config, producer_config
from carrara.streams.consumed import next_offsets
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec, encode_spec
from carrara.streams.schema_registry import Registry, frame

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
# In every topic, group, deployment and model name of this run, so cleanup finds only ours.
RUN_ID = uuid.uuid4().hex[:6]
LOG_APPEND = {"message.timestamp.type": "LogAppendTime"}


# --- events and models ----------------------------------------------------------------------


def make_events(count: int, seed: int = 7) -> list[tuple[bytes, bytes]]:
    """`count` (key, value) pairs (~316 bytes of JSON); the label is a noisy non-linear rule."""
    rng = random.Random(seed)  # noqa: S311 - reproducible synthetic data, not security
    events = []
    for i in range(count):
        f = [round(rng.random(), 6) for _ in FEATURES]
        label = int(f[0] + f[1] * f[2] - 0.5 * f[3] ** 2 + 0.2 * rng.random() > 0.75)
        key = f"e-{i % ENTITIES}"
        value = orjson.dumps({"entity": key, **dict(zip(FEATURES, f, strict=True)), "label": label})
        events.append((key.encode(), value))
    return events


# The same events as Avro records (the Confluent wire format, schema in the local registry).
AVRO_SCHEMA: dict[str, Any] = {
    "type": "record",
    "name": "BenchEvent",
    "namespace": "carrara.bench",
    "fields": [
        {"name": "entity", "type": "string"},
        *({"name": name, "type": "double"} for name in FEATURES),
        {"name": "label", "type": "int"},
    ],
}


def avro_events(
    settings: Settings, subject: str, events: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """`events` (from `make_events`) as Avro records framed with the id of AVRO_SCHEMA,
    registered under `subject` in the registry of `settings`."""
    registry = Registry.from_settings(settings)
    schema_id = registry.register(subject, Schema(orjson.dumps(AVRO_SCHEMA).decode(), "AVRO"))
    parsed = fastavro.parse_schema(AVRO_SCHEMA)
    out = []
    for key, value in events:
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, parsed, orjson.loads(value))
        out.append((key, frame(schema_id, buffer.getvalue())))
    return out


def avro_schema(subject: str) -> dict[str, Any]:
    """The dataset schema of the Avro events (the same fields as SCHEMA)."""
    return {**SCHEMA, "format": "avro", "subject": subject}


@dataclass(frozen=True)
class Registered:
    algorithm: str
    name: str
    version: int
    onnx: bool


def register_model(
    settings: Settings,
    algorithm: str,
    seed: int = 11,
    rows: int = 20_000,
    avro_subject: str | None = None,
) -> Registered:
    """Train `algorithm` on `rows` events and register it exactly as a Carrara training run does.

    The same algorithm registered again (another seed) becomes the next version of one model.
    With `avro_subject`, the same model (same rows, same seed) is registered as a model of its own
    whose feature spec reads Avro events of that subject.
    """
    from carrara.streams.event_codec import as_event_schema, decode_events, fit_feature_spec
    from carrara.training.algorithms import validate_params
    from carrara.training.mlflow_logging import Lineage, log_and_register
    from carrara.training.onnx_export import export_onnx
    from carrara.training.trainers import train

    values = [value for _, value in make_events(rows, seed=seed)]
    decoded = decode_events(SCHEMA, [(values, [0] * rows, list(range(rows)))])
    spec = fit_feature_spec(decoded)
    x, y = spec.transform(decoded), spec.encode_labels(decoded)
    params = validate_params(algorithm, "binary", MODEL_PARAMS[algorithm])
    model = train(algorithm, "binary", params, x, y)
    onnx = export_onnx(model, x[:1000])
    if onnx.model_bytes is None:
        print(f"  {algorithm}: no ONNX artifact ({onnx.skipped_reason})")
    name = f"bench-scorer-{RUN_ID}-{algorithm}"
    if avro_subject is not None:
        spec = replace(spec, schema=as_event_schema(avro_schema(avro_subject)))
        name += "-avro"
    logged = log_and_register(
        tracking_uri=settings.mlflow_url,
        registered_model_name=name,
        lineage=Lineage(
            "bench-scorer", 1, "synthetic", [{"partition": 0, "start": 0, "end": rows}], rows, 0
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


class Gate:
    """A backlog produced inside one open Kafka transaction: read_committed consumers (every
    scorer) see none of it until `open()` commits, then all of it at once. So several scorer
    processes can join their group and settle before the clock starts."""

    def __init__(self, bootstrap: str, topic: str, events: list[tuple[bytes, bytes]]) -> None:
        config = {"transactional.id": f"bench-{RUN_ID}-gate-{uuid.uuid4().hex[:8]}"}
        self.producer = Producer(producer_config(bootstrap, **config))
        self.producer.init_transactions(30)
        self.producer.begin_transaction()
        for i, (key, value) in enumerate(events):
            while True:
                try:
                    self.producer.produce(topic, key=key, value=value)
                    break
                except BufferError:
                    self.producer.poll(0.05)
            if i % 1000 == 0:
                self.producer.poll(0)
        if self.producer.flush(120) != 0:
            raise RuntimeError(f"not every event was delivered to {topic}")

    def open(self) -> None:
        self.producer.commit_transaction(60)


def read_topic(
    bootstrap: str, topic: str, partitions: int, expected: int, exact: bool = True
) -> list[Message]:
    """The committed records of `topic` from the start: `expected` of them (or more, unless
    `exact`: at-least-once may repeat a few after a rebalance)."""
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
    if len(records) < expected or (exact and len(records) != expected):
        raise RuntimeError(f"{topic}: read {len(records)} records, expected {expected}")
    return records


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


def pass_through(bootstrap: str, source: str, target: str, partitions: int, events: int) -> float:
    """Raw consume(1000) -> produce the same bytes -> flush -> sync commit per batch: the ceiling.

    Events/s from the output records' broker timestamps, as for the scorer.
    """
    consumer = Consumer(
        consumer_config(bootstrap, f"bench-{RUN_ID}-passthrough-{uuid.uuid4().hex[:8]}")
    )
    producer = Producer(producer_config(bootstrap))
    consumer.subscribe([source])
    count = 0
    try:
        while count < events:
            batch = [m for m in consumer.consume(num_messages=1000, timeout=0.5) if not m.error()]
            if not batch:
                continue
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
    finally:
        consumer.close()
    return rate_from_timestamps(read_topic(bootstrap, target, partitions, events))


# --- deployments ----------------------------------------------------------------------------


def variant(name: str, model: Registered, weight: int) -> VariantSpec:
    return VariantSpec(name=name, model_name=model.name, model_version=model.version, weight=weight)


def spec(
    name: str,
    revision: int,
    pool: str,
    published_at: datetime,
    input_topic: str | None = None,
    output_topic: str | None = None,
    variants: tuple[VariantSpec, ...] = (),
) -> DeploymentSpec:
    """A running deployment, or a stopped one when `input_topic` is None."""
    common: dict[str, Any] = {
        "name": name,
        "revision": revision,
        "salt": f"salt-{name}",
        "published_at": published_at,
    }
    if input_topic is None:
        return DeploymentSpec(**common, stopped=True)
    return DeploymentSpec(
        **common,
        input_topic=input_topic,
        output_topic=output_topic,
        key_field="entity",
        pool=pool,
        variants=variants,
    )


class Publisher:
    """Pushes deployment revisions on the run's deployments topic, as the control plane does."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.producer = Producer(producer_config(bootstrap, **{"linger.ms": 0}))

    def publish(self, *specs: DeploymentSpec) -> float:
        """Produce and flush `specs`; returns the wall time (s) just before the first produce."""
        published = time.time()
        for s in specs:
            self.producer.produce(self.topic, key=s.name, value=encode_spec(s))
        if self.producer.flush(10) != 0:
            raise RuntimeError("a deployment spec was not delivered")
        return published


# --- scorer processes -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ScorerProcess:
    """A real `carrara-scorer --pool POOL` process with its own /metrics port."""

    name: str
    pool: str
    mode: str
    topics: dict[str, str]
    port: int = field(default_factory=_free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return ROOT / ".carrara" / "logs" / f"bench-scorer-{RUN_ID}-{self.name}.log"

    def start(self) -> ScorerProcess:
        env = {
            **os.environ,
            "CARRARA_DEPLOYMENTS_TOPIC": self.topics["deployments"],
            "CARRARA_SCORER_STATUS_TOPIC": self.topics["status"],
            "CARRARA_SCORER_DELIVERY": self.mode,
        }
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    str(Path(sys.executable).parent / "carrara-scorer"),
                    *("--pool", self.pool, "--instance-id", f"bench-{RUN_ID}-{self.name}"),
                    *("--metrics-port", str(self.port)),
                ],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def _check_alive(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"scorer {self.name} exited ({self.process.returncode}): {self.log_path}"
            )

    def wait_up(self, timeout: float = 120) -> None:
        """Until /metrics answers (an idle scorer is not "ready": it serves no deployment)."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"scorer {self.name} not up in {timeout}s: {self.log_path}")
            time.sleep(0.2)

    def metrics(self) -> str:
        self._check_alive()
        return httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=5).text

    def series(self, metric: str, deployment: str, text: str | None = None) -> float:
        """The sum of `metric`'s series labelled with `deployment`."""
        pattern = rf'^{metric}\{{[^}}]*deployment="{re.escape(deployment)}"[^}}]*\}} (\S+)$'
        found = re.findall(pattern, text if text is not None else self.metrics(), re.MULTILINE)
        return sum(float(v) for v in found)

    def runtime(self) -> str:
        """The runtimes the scorer picked for its loaded models (onnx | native | pyfunc)."""
        found = re.findall(
            r'carrara_scorer_model_load_seconds\{[^}]*runtime="(\w+)"', self.metrics()
        )
        return "/".join(sorted(set(found))) or "?"

    def _stat(self) -> list[str]:
        assert self.process is not None
        return Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()

    def cpu_seconds(self) -> float:
        """utime + stime of the scorer process (all its threads) so far, from /proc/<pid>/stat."""
        fields = self._stat()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        assert self.process is not None
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) / 1024 if match else float("nan")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


# --- the scorer's own end-to-end histogram --------------------------------------------------

E2E = "carrara_scorer_end_to_end_seconds"


def e2e_buckets(text: str, deployment: str) -> dict[float, float]:
    """Cumulative bucket counts (upper bound in s -> count) of the deployment, variants summed."""
    pattern = rf"^{E2E}_bucket\{{([^}}]*)\}} (\S+)$"
    buckets: dict[float, float] = {}
    for labels, value in re.findall(pattern, text, re.MULTILINE):
        if f'deployment="{deployment}"' not in labels:
            continue
        le = re.search(r'le="([^"]+)"', labels)
        if le:
            bound = float("inf") if le.group(1) == "+Inf" else float(le.group(1))
            buckets[bound] = buckets.get(bound, 0.0) + float(value)
    return buckets


def histogram_quantile(q: float, before: dict[float, float], after: dict[float, float]) -> float:
    """Prometheus-style quantile (linear within a bucket), in ms, of the counts added between two
    scrapes; NaN without data."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return float("nan")
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, cumulative in zip(bounds, counts, strict=True):
        if cumulative >= rank:
            if bound == float("inf"):
                return lower * 1000
            inside = cumulative - below
            share = (rank - below) / inside if inside > 0 else 1.0
            return (lower + (bound - lower) * share) * 1000
        lower, below = bound, cumulative
    return float("nan")
