"""Features in SQL (issue 15): what a feature set costs a scorer, how fast state restores, and
replay speed with features. Writes its section of benchmarks/RESULTS.md itself.

1. **Scorer CPU per event**: a real `carrara-scorer` process (exactly-once) scores the same
   backlog of payment events (10,000 cards) with two models trained on the same snapshot by the
   training pipeline: raw fields only, and raw fields plus a feature set of 5 windowed features
   (COUNT 1 h, AVG 24 h, COUNT DISTINCT 10 min, SUM 1 h, time since the previous event).
   CPU is utime+stime of the process per event consumed, rounds alternate.
2. **Restore**: a changelog of 1,000,000 keys (each with 5 events in its window) read back into
   a partition's operator, as a scorer does when it is assigned the partition.
3. **Replay**: the training path over the snapshot, replay + decode with and without the feature
   set computed by the operator (warm-up included).

    .venv/bin/python benchmarks/features.py [--events 200000] [--keys 1000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from confluent_kafka import Producer

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_md import write_section
from scorer_kit import Publisher, ScorerProcess

from carrara.features.operator import KeyState
from carrara.features.sql import parse_feature_sql
from carrara.scoring.feature_state import FeatureStore
from carrara.settings import Settings
from carrara.streams.client_config import producer_config
from carrara.streams.deployment_spec import DeploymentSpec, VariantSpec
from carrara.streams.topics import TopicAdmin
from carrara.training import pipeline
from carrara.training.algorithms import validate_params

ROOT = Path(__file__).resolve().parents[1]
RUN = uuid.uuid4().hex[:6]
CARDS = 10_000
SQL = """SELECT
  COUNT(*) OVER (PARTITION BY card ORDER BY ts RANGE INTERVAL '1' HOUR PRECEDING) AS txn_1h,
  AVG(amount) OVER (PARTITION BY card ORDER BY ts RANGE INTERVAL '24' HOUR PRECEDING) AS avg_24h,
  COUNT(DISTINCT merchant) OVER (PARTITION BY card ORDER BY ts RANGE INTERVAL '10' MINUTE PRECEDING)
    AS merchants_10m,
  SUM(amount) OVER (PARTITION BY card ORDER BY ts RANGE INTERVAL '1' HOUR PRECEDING) AS sum_1h,
  ts - LAG(ts) OVER (PARTITION BY card ORDER BY ts) AS secs_since_last
FROM {name}"""
SCHEMA: dict[str, Any] = {
    "key_field": "card",
    "event_time_field": "ts",
    "label_field": "fraud",
    "task": "binary",
    "features": [
        {"name": "amount", "type": "float"},
        {"name": "merchant", "type": "category"},
        {"name": "hour", "type": "float"},
    ],
    "format": "json",
    "subject": None,
}


class Beat:
    progress = 0

    def beat(self) -> None:
        pass

    def check(self) -> None:
        pass


def fmt(values: list[float], one: Any = lambda v: f"{v:,.0f}") -> str:
    if len(values) == 1:
        return one(values[0])
    return f"{one(statistics.median(values))} ({one(min(values))}-{one(max(values))})"


def produce_payments(bootstrap: str, topic: str, count: int, base_ms: int) -> None:
    """`count` payments of 10,000 cards, ~2.5 per card per hour, timestamped with their event
    time; fraud comes in bursts on a card (what the velocity features see)."""
    rng = np.random.default_rng(11)
    producer = Producer(producer_config(bootstrap))
    cards = rng.integers(0, CARDS, count)
    amounts = rng.lognormal(3, 1, count)
    merchants = rng.integers(0, 40, count)
    for i in range(count):
        card = int(cards[i])
        ts = base_ms + i * 144  # 10,000 cards x 2.5/h
        event = {
            "card": f"card-{card}",
            "ts": ts,
            "amount": round(float(amounts[i]), 2),
            "merchant": f"m{merchants[i]}",
            "hour": float((ts // 3_600_000) % 24),
            "fraud": int(card % 50 == 0 and amounts[i] > 30),
        }
        while True:
            try:
                producer.produce(topic, key=event["card"], value=orjson.dumps(event), timestamp=ts)
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    if producer.flush(60):
        raise RuntimeError("events not delivered")


def train(settings: Settings, topic: str, events: int, name: str, plan: Any | None) -> Any:
    job = pipeline.Job(
        run_id=1,
        attempt=1,
        algorithm="logistic_regression",
        params=validate_params("logistic_regression", "binary", {}),
        holdout={"method": "hash", "fraction": 0.2, "seed": 0},
        registered_model_name=f"bench-features-{RUN}-{'fs' if plan else 'raw'}",
        dataset=name,
        dataset_version=1,
        topic=topic,
        offsets=[{"partition": 0, "start": 0, "end": events}],
        event_count=events,
        schema=SCHEMA,
        feature_set=None
        if plan is None
        else {
            "number": 1,
            "sql": plan.sql,
            "late_policy": "cap",
            "allowed_lateness_ms": 0,
            "digest": plan.digest,
        },
    )
    return job, pipeline.execute(job, settings, Beat())


def scorer_cpu(
    settings: Settings, topics: dict[str, str], model: str, version: int, events: int, label: str
) -> tuple[float, float]:
    """A fresh deployment scores the whole input topic: (CPU us per event, events/s)."""
    pool = f"bench-fs-{RUN}-{label}"
    name = f"bench-fs-{RUN}-{label}"
    admin = TopicAdmin(settings.kafka_bootstrap)
    output = f"bench-fs-{RUN}-{label}-out"
    admin.create_topic(output, 1)
    proc = ScorerProcess(label, pool, "exactly_once", topics).start()
    try:
        proc.wait_up()
        Publisher(settings.kafka_bootstrap, topics["deployments"]).publish(
            DeploymentSpec(
                name=name,
                revision=1,
                salt="bench",
                published_at=datetime(2000, 1, 1, tzinfo=UTC),
                input_topic=topics["input"],
                output_topic=output,
                key_field="card",
                pool=pool,
                variants=(
                    VariantSpec(name="a", model_name=model, model_version=version, weight=100),
                ),
            )
        )
        first: tuple[float, float, float] | None = None
        last = first
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            consumed = proc.series("carrara_scorer_events_in_total", name)
            now = (consumed, proc.cpu_seconds(), time.monotonic())
            if consumed > 0 and first is None:
                first = now
            if consumed >= events:
                last = now
                break
            time.sleep(0.05)
        if first is None or last is None:
            raise RuntimeError(f"{label}: the backlog was not scored")
        n = last[0] - first[0]
        return (last[1] - first[1]) / n * 1e6, n / (last[2] - first[2])
    finally:
        proc.stop()
        admin.delete_topics([output])


def write_changelog(settings: Settings, plan: Any, keys: int) -> str:
    """A changelog of `keys` keys (5 events each in the window), as a scorer writes it."""
    topic = f"carrara.features.bench-{RUN}.{plan.digest[:16]}.changelog"
    TopicAdmin(settings.kafka_bootstrap).create_topic(
        topic, 1, config={"cleanup.policy": "compact"}, exist_ok=True
    )
    producer = Producer(producer_config(settings.kafka_bootstrap, **{"linger.ms": 20}))
    base = int(time.time() * 1000)
    for k in range(keys):
        state = KeyState(base, len(plan.args))
        for j in range(5):
            state.times.append(base - (5 - j) * 60_000)
            for c, column in enumerate(state.columns):
                column.append(float(j * 3 + c) if plan.arg_numeric[c] else f"m{j}")
        while True:
            try:
                producer.produce(
                    topic, key=f"card-{k}".encode(), value=state.to_bytes(), partition=0
                )
                break
            except BufferError:
                producer.poll(0.1)
    if producer.flush(120):
        raise RuntimeError("changelog not written")
    return topic


def restore_seconds(settings: Settings, plan: Any, topic: str) -> tuple[float, int]:
    """Time a partition's restore from `topic`, as a scorer assigned the partition does it."""
    store = FeatureStore(f"bench-{RUN}", settings.kafka_bootstrap, restore_timeout_s=600)
    store._topics[plan.digest] = topic
    started = time.perf_counter()
    op = store._restore(plan, 0)
    seconds = time.perf_counter() - started
    store.close()
    return seconds, len(op.keys)


def replay_rate(settings: Settings, job: Any, with_features: bool) -> float:
    started = time.perf_counter()
    decoded = pipeline._replay(job, settings, Beat())
    if with_features:
        pipeline._derive(job, settings, Beat(), decoded)
    return decoded.rows / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    settings = Settings()
    load_before = os.getloadavg()
    started = time.monotonic()
    admin = TopicAdmin(settings.kafka_bootstrap)
    topics = {k: f"bench-fs-{RUN}-{k}" for k in ("input", "deployments", "status")}
    admin.create_topic(topics["input"], 1)
    admin.ensure_compacted_topic(topics["deployments"])
    admin.ensure_compacted_topic(topics["status"])
    base_ms = int((datetime.now(UTC) - timedelta(hours=12)).timestamp() * 1000)
    results: dict[str, list[float]] = {}
    try:
        produce_payments(settings.kafka_bootstrap, topics["input"], args.events, base_ms)
        name = f"bench_fs_{RUN}"
        plan = parse_feature_sql(
            SQL.format(name=name),
            key_field="card",
            time_field="ts",
            fields={"amount": "float", "merchant": "category", "hour": "float"},
            label_field="fraud",
        )
        train_events = min(args.events, 50_000)
        _, raw = train(settings, topics["input"], train_events, name, None)
        job, with_fs = train(settings, topics["input"], train_events, name, plan)
        print(f"trained raw v{raw.version} and feature-set v{with_fs.version}")
        for r in range(args.rounds):
            for label, outcome in (("raw", raw), ("features", with_fs)):
                cpu, rate = scorer_cpu(
                    settings,
                    topics,
                    outcome.registered_model_name,
                    outcome.version,
                    args.events,
                    f"{label}-{r}",
                )
                results.setdefault(f"cpu_{label}", []).append(cpu)
                results.setdefault(f"rate_{label}", []).append(rate)
                print(f"round {r + 1}: {label}: {cpu:.1f} us CPU per event, {rate:,.0f} events/s")
            raw_cpu, fs_cpu = results["cpu_raw"][-1], results["cpu_features"][-1]
            results.setdefault("share", []).append((fs_cpu - raw_cpu) / fs_cpu * 100)
        changelog = write_changelog(settings, plan, args.keys)
        topics["changelog"] = changelog
        for r in range(args.rounds):
            seconds, keys = restore_seconds(settings, plan, changelog)
            results.setdefault("restore", []).append(seconds)
            print(f"round {r + 1}: restored {keys:,} keys in {seconds:.1f} s")
        job_all = pipeline.Job(
            **{**job.__dict__, "offsets": [{"partition": 0, "start": 0, "end": args.events}]}
        )
        for r in range(args.rounds):
            plain = replay_rate(settings, job_all, False)
            featured = replay_rate(settings, job_all, True)
            results.setdefault("replay_plain", []).append(plain)
            results.setdefault("replay_features", []).append(featured)
            print(f"round {r + 1}: replay {plain:,.0f} events/s, with features {featured:,.0f}")
    finally:
        admin.delete_topics([t for t in topics.values() if admin.partitions(t)])
    section = render(results, args, time.monotonic() - started, load_before, os.getloadavg())
    print(section)
    if not args.no_write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", "features", "features.py", section)


def render(
    r: dict[str, list[float]],
    args: argparse.Namespace,
    elapsed: float,
    before: tuple[float, ...],
    after: tuple[float, ...],
) -> str:
    us = lambda v: f"{v:.1f} us"  # noqa: E731
    rate = lambda v: f"{v:,.0f}/s"  # noqa: E731
    command = ".venv/bin/python benchmarks/features.py"
    if (args.events, args.keys, args.rounds) != (200_000, 1_000_000, 3):
        command += f" --events {args.events} --keys {args.keys} --rounds {args.rounds}"
    cpu = (fmt(r["cpu_raw"], us), fmt(r["cpu_features"], us))
    speed = (fmt(r["rate_raw"], rate), fmt(r["rate_features"], rate))
    replay = (fmt(r["replay_plain"], rate), fmt(r["replay_features"], rate))
    load = f"load average {before[0]:.1f} before, {after[0]:.1f} after"
    return f"""## Features in SQL (`benchmarks/features.py`)

```
{command}
```

{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores (shared with the local stack and
anything else running; {load}), {elapsed / 60:.1f} min. Medians of {args.rounds} rounds
(min-max). {args.events:,} payments of 10,000 cards; the feature set: COUNT 1 h, AVG 24 h,
COUNT DISTINCT 10 min, SUM 1 h, seconds since the previous event (about 2.5 events per card per
hour, so ~60 events per card in the 24 h window). One model each (logistic regression, ONNX),
trained by the training pipeline on the first 50,000 events.

| figure | raw fields only | with the feature set |
|---|---|---|
| scorer CPU per event (exactly-once, one process) | {cpu[0]} | {cpu[1]} |
| scorer throughput | {speed[0]} | {speed[1]} |
| training replay + decode (+ features) | {replay[0]} | {replay[1]} |

- The feature set's share of the scorer's CPU per event: {fmt(r["share"], lambda v: f"{v:.0f}%")}
  (target <= 30%).
- Restoring a partition's state of {args.keys:,} keys (5 events each) from its changelog:
  {fmt(r["restore"], lambda v: f"{v:.1f} s")}.

Where a feature set's CPU goes (in-process profile of `score_batch`, same events): about half is
the operator itself, exact per-event Python (a window's aggregates are recomputed from its values
with `math.fsum`, so a result never depends on how the state got there: restored, warmed up or
expired); the other half is the changelog, one record per key changed in the batch holding that
key's whole window (~60 events, ~2 KB here) encoded, compressed and produced in the transaction.
Tried: state as columns per argument (a window is one slice; counts, sums and distinct counts in
C), -20% operator time; the GC paused and the restored state frozen out of its scans, 5x faster
restores. Not done: a compiled operator with the same semantics, and a changelog of per-event
deltas (smaller writes, at the price of restores that read every event in the windows).
"""


if __name__ == "__main__":
    main()
