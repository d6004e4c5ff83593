"""The report of `benchmarks/scorer.py`: markdown tables, and its section of RESULTS.md."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


@dataclass
class Stat:
    """One figure over the counted rounds."""

    values: list[float]

    @property
    def median(self) -> float:
        good = [v for v in self.values if not math.isnan(v)]
        return statistics.median(good) if good else float("nan")

    def fmt(self, one: Callable[[float], str] = lambda v: f"{v:,.0f}") -> str:
        good = [v for v in self.values if not math.isnan(v)]
        if not good:
            return "-"
        missing = f", {len(self.values) - len(good)} n/a" if len(good) < len(self.values) else ""
        if len(good) == 1:
            return one(good[0]) + missing
        return f"{one(self.median)} ({one(min(good))}-{one(max(good))}{missing})"


def ms(v: float) -> str:
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def ratio(v: float) -> str:
    return f"{v:.2f}x"


def cores(v: float) -> str:
    return f"{v:.2f}"


def _versions() -> str:
    import confluent_kafka

    parts = [f"Python {platform.python_version()}"]
    librdkafka = confluent_kafka.libversion()[0]
    parts.append(f"confluent-kafka {version('confluent-kafka')} (librdkafka {librdkafka})")
    for package in ("onnxruntime", "lightgbm", "scikit-learn", "mlflow"):
        with contextlib.suppress(PackageNotFoundError):
            parts.append(f"{package} {version(package)}")
    return ", ".join(parts)


def _commit() -> str:
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "platform"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown commit"
    return f"commit {head}" + (" with uncommitted changes under platform/" if dirty else "")


def render(
    results: dict[str, Any],
    args: argparse.Namespace,
    elapsed: float,
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
    models: list[Any],
) -> str:
    command = shlex.join([".venv/bin/python", "benchmarks/scorer.py", *sys.argv[1:]])
    rounds = args.rounds
    out = [
        "## Streaming scorer (`benchmarks/scorer.py`)",
        "",
        f"Written by the script on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC ({_commit()}); rerun it "
        "rather than editing this section.",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {os.cpu_count()} cores (`os.cpu_count()`), shared with the local stack (the "
        "Kafka "
        "broker, MLflow and Postgres run on the same cores) and with anything else running; load "
        f"average {load_before[0]:.1f} before, {load_after[0]:.1f} after. {_versions()}. "
        f"The run took {elapsed / 60:.1f} min.",
        "",
        f"Each figure: median of {rounds} round{'s' if rounds != 1 else ''} (min-max), after an "
        "uncounted warm-up. Scorers are real `carrara-scorer` processes with default settings; "
        "deployments are records on a run-specific deployments topic; backlogs are "
        f"{args.events:,} "
        "synthetic JSON events (entity key, 20 float features, a label; ~316 bytes). Models: "
        + ", ".join(f"{m.algorithm} (`{m.name}` v{m.version}, ONNX {m.onnx})" for m in models)
        + "; lightgbm has 100 trees.",
    ]
    if "throughput" in results:
        t = results["throughput"]
        out += [
            "",
            "### Throughput: one scorer process vs. the raw pass-through",
            "",
            "Per round: the raw pass-through (`consume(1000)` -> produce the same bytes -> flush "
            "-> "
            "synchronous commit, per batch, with `consumer_config`/`producer_config`), then one "
            "scorer process per delivery mode scoring the same 3-partition backlog from a fresh "
            "consumer group. Events/s from the first to the last output record's broker "
            "timestamp (`LogAppendTime`), so process start and group join are not counted; the "
            "ratio is taken within each round. Scorer CPU: utime+stime from `/proc/<pid>/stat` "
            "(all threads) over the interval in which its `/metrics` showed it consuming, in "
            "cores.",
            "",
            f"Raw pass-through: {t['passthrough'].fmt()} events/s.",
            "",
            "| model | delivery | runtime | scorer events/s | scorer / pass-through "
            "| scorer CPU, cores |",
            "|---|---|---|---|---|---|",
        ]
        for (model, mode), row in t["rows"].items():
            out.append(
                f"| {model} | {mode} | {t['runtimes'][(model, mode)]} | {row['rate'].fmt()} | "
                f"{row['ratio'].fmt(ratio)} | {row['cores'].fmt(cores)} |"
            )
    if "avro" in results:
        a = results["avro"]
        rates, used, per_core = a["rates"], a["cores"], a["per_core"]
        out += [
            "",
            "### Avro input: the same model on the same events, JSON vs. Avro",
            "",
            f"One exactly-once scorer process, {a['algorithm']}: per round, the backlog above as "
            "JSON and the same events as Avro records (the Confluent wire format, schema "
            "registered in the local Schema Registry, ~170 bytes) on a second 3-partition topic, "
            "each scored by a fresh deployment of the same model (trained once; the Avro copy's "
            "feature spec reads the Avro dataset). The order alternates between rounds; the "
            "ratio is taken within each round. Events per CPU-second (events/s over the "
            "scorer's cores) say what each format costs the scorer, less disturbed than events/s "
            "by other processes on the shared cores. Avro batches are decoded column by column "
            "(`streams/avro_columns.py`).",
            "",
            "| input | scorer events/s | scorer CPU, cores | events per CPU-second |",
            "|---|---|---|---|",
            f"| JSON | {rates['json'].fmt()} | {used['json'].fmt(cores)} "
            f"| {per_core['json'].fmt()} |",
            f"| Avro | {rates['avro'].fmt()} | {used['avro'].fmt(cores)} "
            f"| {per_core['avro'].fmt()} |",
            "",
            f"Avro / JSON: {rates['ratio'].fmt(ratio)} in events/s, "
            f"{per_core['ratio'].fmt(ratio)} in events per CPU-second.",
        ]
    if "latency" in results:
        out += [
            "",
            "### End-to-end latency versus rate (read_committed)",
            "",
            "One scorer process per delivery mode, one deployment (the first model) on a fresh "
            "3-partition topic. An open-loop producer (a paced loop: event i is due at start + "
            "i/rate, whatever the scorer does; `linger.ms` 1) stamps each input record's "
            "CreateTime with its send time; a read_committed consumer in a separate process "
            "(`fetch.min.bytes` 1, `fetch.wait.max.ms` 5) blocks in `poll()` for one record, "
            "notes the time, and drains the rest with `consume(n, timeout=0)`. Latency = receive "
            "time - send time, per event, so it includes the producer's linger and, for "
            f"exactly-once, the transaction commit. Per rate: {args.latency_warmup:g} s of lead-in "
            f"(not counted), then {args.latency_seconds:g} s measured; rates are interleaved "
            "within each round. \"max\" is that mode's median throughput above. The scorer's own "
            "`carrara_scorer_end_to_end_seconds` (input timestamp -> prediction committed, "
            "scraped before and after the window; quantiles interpolated within buckets) is the "
            "cross-check.",
            "",
            "| delivery | rate | achieved events/s | p50 ms | p99 ms "
            "| scorer histogram p50 / p99 ms | events per round "
            "| producer behind schedule, max ms |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for (mode, label), row in results["latency"].items():
            out.append(
                f"| {mode} | {label} | {row['rate'].fmt()} | {row['p50'].fmt(ms)} | "
                f"{row['p99'].fmt(ms)} | {row['h50'].fmt(ms)} / {row['h99'].fmt(ms)} | "
                f"{row['n'].fmt()} | {row['lag'].fmt(ms)} |"
            )
    if "scale" in results:
        s = results["scale"]
        out += [
            "",
            "### Scale-out: 1 and 2 scorer processes, one pool, one consumer group",
            "",
            "Exactly-once, the first model, a 6-partition backlog, a fresh deployment (consumer "
            "group) per round; the second process joins the pool after the 1-process rounds and "
            "is warmed up on a small topic. Events/s as above; CPU summed over the processes.",
            "",
            "| processes | events/s | CPU, cores (sum) |",
            "|---|---|---|",
            f"| 1 | {s['one'].fmt()} | {s['cores_one'].fmt(cores)} |",
            f"| 2 | {s['two'].fmt()} | {s['cores_two'].fmt(cores)} |",
            "",
            f"2 processes / 1 process: {s['ratio'].fmt(ratio)}. The smaller process's share of "
            f"the events: {s['share'].fmt(lambda v: f'{v:.0%}')}.",
        ]
    if "multi" in results:
        m = results["multi"]
        out += [
            "",
            "### Several deployments in one process",
            "",
            "One exactly-once process, the first model: 1 deployment on the 3-partition backlog "
            "vs. "
            "4 deployments (4 runner threads, 4 consumer groups) on 4 topics holding a quarter of "
            "the events each, published together. Total events/s from the first to the last "
            "output record over all output topics.",
            "",
            "| deployments | total events/s |",
            "|---|---|",
            f"| 1 | {m['one'].fmt()} |",
            f"| 4 | {m['four'].fmt()} |",
            "",
            f"4 / 1: {m['ratio'].fmt(ratio)}.",
        ]
    if "rss" in results:
        r = results["rss"]
        out += [
            "",
            "### Scorer memory",
            "",
            "A fresh exactly-once scorer process per round: VmRSS (`/proc/<pid>/status`) idle, "
            f"then serving one deployment with 1 model version after scoring 2,000 events, then "
            f"the same deployment with {r['versions']} variants of {r['versions']} distinct "
            "versions (20% each) after scoring 2,000 more.",
            "",
            "| model versions loaded | RSS, MB |",
            "|---|---|",
            f"| 0 (idle) | {r['idle'].fmt()} |",
            f"| 1 | {r['one'].fmt()} |",
            f"| {r['versions']} | {r['five'].fmt()} |",
        ]
    if "switch" in results:
        w = results["switch"]
        out += [
            "",
            "### Weight-change switch under load",
            "",
            f"One exactly-once process, one deployment with two live variants (both models, both "
            f"loaded, weights 100/0) under {w['rate']:,.0f} events/s from the probe's producer. "
            "Each round publishes a revision that only swaps the weights (no model load). Switch "
            "time: from just before the revision record is produced on the deployments topic to "
            "the first prediction of that revision received by the read_committed reader, on the "
            "last of the 3 input partitions. The record is pushed directly, so the API and the "
            "outbox relay (PUT -> topic) are not included. Lost / duplicated: input records with "
            "no / more than one prediction over the whole phase.",
            "",
            f"Switch time: {w['seconds'].fmt(lambda v: f'{v * 1000:.0f} ms')}; lost {w['lost']}, "
            f"duplicated {w['duplicated']}.",
        ]
    return "\n".join(out) + "\n"
