"""The harness of `benchmarks/scorer.py`: the run's state, and a backlog run (deployments
scoring pre-produced topics, timed from the output records' broker timestamps)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import ConsumerGroupState
from confluent_kafka.admin import AdminClient
from scorer_kit import (
    LOG_APPEND,
    RUN_ID,
    Publisher,
    Registered,
    ScorerProcess,
    produce_all,
    rate_from_timestamps,
    read_topic,
    spec,
    variant,
)

from carrara.scoring.runner import group_id
from carrara.settings import Settings
from carrara.streams.client_config import admin_config
from carrara.streams.schema_registry import Registry
from carrara.streams.topics import TopicAdmin

MODES = ("exactly_once", "at_least_once")
SHORT = {"exactly_once": "eos", "at_least_once": "alo"}
EVENTS_IN = "carrara_scorer_events_in_total"
PHASES = ("throughput", "avro", "latency", "switch", "multi", "scale", "rss")


@dataclass
class Bench:
    settings: Settings
    args: argparse.Namespace
    admin: TopicAdmin
    topics: dict[str, str] = field(default_factory=dict)
    partitions: dict[str, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    models: list[Registered] = field(default_factory=list)
    procs: list[ScorerProcess] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    subjects: list[str] = field(default_factory=list)  # registered in the Schema Registry
    # Deployments are "published" before any backlog exists, so they start at its first event.
    published_at: datetime = field(default_factory=lambda: datetime.now(UTC) - timedelta(seconds=1))
    serial: int = 0

    @property
    def bootstrap(self) -> str:
        return self.settings.kafka_bootstrap

    def topic(self, kind: str, partitions: int, config: dict[str, str] | None = None) -> str:
        name = f"bench-scorer-{RUN_ID}-{kind}"
        self.admin.create_topic(name, partitions, config=LOG_APPEND if config is None else config)
        self.topics[kind], self.partitions[name] = name, partitions
        return name

    def backlog(self, kind: str, partitions: int, events: list[tuple[bytes, bytes]]) -> str:
        self.topic(kind, partitions)
        return self.fill(kind, events)

    def fill(self, kind: str, events: list[tuple[bytes, bytes]]) -> str:
        """Produce `events` into the run's topic `kind` (made with `topic`)."""
        name = self.topics[kind]
        produce_all(self.bootstrap, name, events)
        self.counts[name] = len(events)
        return name

    def name(self, label: str) -> str:
        self.serial += 1
        return f"bench-{RUN_ID}-{label}-{self.serial}"

    def drop(self, *kinds: str) -> None:
        """Delete topics as soon as they are read (the broker's disk is shared)."""
        names = [self.topics.pop(k) for k in kinds if k in self.topics]
        # The scorer made a dead-letter topic next to every input topic it served.
        names += [f"{n}.dead-letters" for n in names if self.admin.partitions(f"{n}.dead-letters")]
        try:
            self.admin.delete_topics(names)
        except Exception as exc:  # best effort: cleanup() retries at the end
            print(f"  could not delete {names}: {exc}")
            self.topics.update({f"undeleted-{n}": n for n in names})

    def scorer(self, label: str, pool: str, mode: str) -> ScorerProcess:
        proc = ScorerProcess(label, pool, mode, self.topics).start()
        self.procs.append(proc)
        return proc


@dataclass
class Backlog:
    rate: float  # events/s, from the output records' broker timestamps
    cores: dict[str, float]  # CPU cores used per scorer process while it scored the backlog
    split: dict[str, float]  # events consumed per scorer process
    runtime: str


def run_backlog(
    b: Bench,
    procs: list[ScorerProcess],
    model: Registered,
    inputs: list[str],
    label: str,
    ready: Callable[[list[str]], None] | None = None,
) -> Backlog:
    """New deployments (one per input topic, fresh consumer groups) score pre-produced backlogs.

    CPU: utime+stime of each process between the first and the last poll of its /metrics counters
    (every 50 ms) that saw events consumed, so start-up and model load are not counted.
    """
    pool, exact = procs[0].pool, procs[0].mode == "exactly_once"
    deployed = []
    for source in inputs:
        name = b.name(label)
        target = b.topic(f"out-{name}", b.partitions[source])
        deployed.append((name, source, target))
    publisher: Publisher = b.results["publisher"]
    publisher.publish(
        *(
            spec(name, 1, pool, b.published_at, source, target, (variant("a", model, 100),))
            for name, source, target in deployed
        )
    )
    if ready is not None:
        ready([name for name, _, _ in deployed])
    expected = sum(b.counts[source] for _, source, _ in deployed)
    first: tuple[float, dict[str, float]] | None = None
    limit = 60 + expected / 1000
    deadline = time.monotonic() + limit
    while True:
        texts = {p.name: p.metrics() for p in procs}
        now, cpu = time.monotonic(), {p.name: p.cpu_seconds() for p in procs}
        split = {
            p.name: sum(p.series(EVENTS_IN, d[0], texts[p.name]) for d in deployed) for p in procs
        }
        done = sum(split.values())
        if done > 0 and first is None:
            first = (now, cpu)
        if done >= expected:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{label}: {done:.0f} of {expected} events in {limit:.0f} s")
        time.sleep(0.05)
    assert first is not None
    elapsed = now - first[0]
    cores = {n: (cpu[n] - first[1][n]) / elapsed if elapsed > 0 else float("nan") for n in cpu}
    dead = sum(
        p.series("carrara_scorer_dead_letters_total", d[0], texts[p.name])
        for p in procs
        for d in deployed
    )
    if dead:
        raise RuntimeError(f"{label}: {dead:.0f} dead letters")
    runtime = procs[0].runtime()
    records = []
    for _, source, target in deployed:
        records += read_topic(b.bootstrap, target, b.partitions[target], b.counts[source], exact)
    rate = rate_from_timestamps(records)
    stopped = datetime.now(UTC)
    publisher.publish(*(spec(name, 2, pool, stopped) for name, _, _ in deployed))
    b.drop(*(f"out-{name}" for name, _, _ in deployed))
    return Backlog(rate, cores, split, runtime)


def rounds_of(b: Bench) -> range:
    """Round -1 is the warm-up (on the small warm topic); it is run and not counted."""
    return range(-1, b.args.rounds)


def settle(b: Bench, deployment: str, members: int, partitions: int, timeout: float = 90) -> None:
    """Until the deployment's consumer group is stable with `members` members sharing all
    `partitions` (each holding some)."""
    client = AdminClient(admin_config(b.bootstrap))
    group = group_id(deployment)
    deadline = time.monotonic() + timeout
    while True:
        found = client.describe_consumer_groups([group], request_timeout=10)[group].result()
        held = [len(m.assignment.topic_partitions) for m in found.members]
        balanced = len(held) == members and min(held, default=0) > 0 and sum(held) == partitions
        if balanced and found.state == ConsumerGroupState.STABLE:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{group}: {held} partitions per member after {timeout} s")
        time.sleep(0.1)


def loaded_models(proc: ScorerProcess) -> int:
    return proc.metrics().count("carrara_scorer_model_load_seconds{")


def wait_until(check: Any, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def wait_events(proc: ScorerProcess, deployment: str, expected: int) -> None:
    wait_until(
        lambda: proc.series(EVENTS_IN, deployment) >= expected, f"{expected} events in {deployment}"
    )


# --- main -----------------------------------------------------------------------------------


def cleanup(b: Bench, models: list[Registered]) -> None:
    """Stop our processes and delete what the run made; each step best effort."""
    for proc in b.procs:
        try:
            proc.stop()
        except Exception as exc:
            print(f"could not stop {proc.name}: {exc}")
    names = list(b.topics.values())
    names += [f"{t}.dead-letters" for t in names]
    try:
        b.admin.delete_topics([t for t in dict.fromkeys(names) if b.admin.partitions(t)])
    except Exception as exc:
        print(f"could not delete topics: {exc}")
    for subject in b.subjects:
        try:
            registry = Registry.from_settings(b.settings)
            for permanent in (False, True):  # soft-delete, then delete for good
                registry.client.delete_subject(subject, permanent=permanent)
        except Exception as exc:
            print(f"could not delete the subject {subject}: {exc}")
    client = AdminClient(admin_config(b.bootstrap))
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

        registry = MlflowClient(b.settings.mlflow_url)
        for name in dict.fromkeys(m.name for m in models):
            registry.delete_registered_model(name)
    except Exception as exc:
        print(f"could not delete the registered models: {exc}")
