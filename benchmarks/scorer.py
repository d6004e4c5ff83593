"""carrara-scorer benchmarks: throughput against a raw pass-through, latency versus rate,
scale-out, several deployments per process, memory, and the weight-change switch time.

Every scorer here is a real `carrara-scorer` process; deployments are records on a run-specific
deployments topic (as the control plane publishes them), models are registered in the local
MLflow as a Carrara training run registers them. Each figure is measured `--rounds` times after a
warm-up that is not counted, and reported as median (min-max). The full run writes its section of
benchmarks/RESULTS.md (between markers; other sections are kept), with what each table measures
and how. Everything made here (topics, groups, registered models) is deleted at the end; scorer
logs stay in .carrara/logs/bench-scorer-*.log. The pieces: scorer_bench.py (run state, backlog
runs), scorer_phases.py (the figures), scorer_probe.py (the end-to-end latency probe),
scorer_kit.py (data, models, Kafka, scorer processes), scorer_report.py (tables, RESULTS.md).

    .venv/bin/python benchmarks/scorer.py            # full: ~10-15 min, writes RESULTS.md
    .venv/bin/python benchmarks/scorer.py --quick    # smoke test: small sizes, 1 round, prints only
    .venv/bin/python benchmarks/scorer.py --phases latency,switch --rounds 5 --no-write
    .venv/bin/python benchmarks/scorer.py --phases avro --rounds 3 --no-write  # Avro vs JSON
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from results_md import write_section
from scorer_bench import MODES, PHASES, SHORT, Bench, cleanup
from scorer_kit import (
    MODEL_PARAMS,
    ROOT,
    RUN_ID,
    Publisher,
    Registered,
    avro_events,
    make_events,
    register_model,
)
from scorer_phases import (
    phase_avro,
    phase_latency,
    phase_multi,
    phase_rss,
    phase_scale,
    phase_switch,
    phase_throughput,
)
from scorer_report import render

from carrara.settings import Settings
from carrara.streams.topics import TopicAdmin


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 1 round (smoke test)")
    parser.add_argument("--events", type=int, help="backlog events (default 200,000; quick 20,000)")
    parser.add_argument("--rounds", type=int, help="counted rounds per figure (default 3; quick 1)")
    parser.add_argument(
        "--models", default="logistic_regression,lightgbm", help=f"from {', '.join(MODEL_PARAMS)}"
    )
    parser.add_argument(
        "--phases", default=",".join(PHASES), help=f"comma-separated, from {', '.join(PHASES)}"
    )
    parser.add_argument(
        "--latency-seconds", type=float, help="measured window per rate (default 5; quick 1.5)"
    )
    parser.add_argument(
        "--latency-warmup", type=float, help="unmeasured lead-in per rate (default 1; quick 0.5)"
    )
    parser.add_argument(
        "--max-rate", type=float, default=40_000, help="'max' rate when throughput is not run"
    )
    parser.add_argument(
        "--switch-rate", type=float, default=2000, help="load during the switch rounds"
    )
    parser.add_argument(
        "--switch-interval", type=float, default=2.0, help="seconds between switches"
    )
    parser.add_argument(
        "--results",
        type=Path,
        help="file to write (default: benchmarks/RESULTS.md, not with --quick)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    quick = args.quick
    args.events = args.events or (20_000 if quick else 200_000)
    args.rounds = args.rounds or (1 if quick else 3)
    args.latency_seconds = args.latency_seconds or (1.5 if quick else 5.0)
    args.latency_warmup = args.latency_warmup or (0.5 if quick else 1.0)
    args.algorithms = [a.strip() for a in args.models.split(",") if a.strip()]
    args.phase_list = [p.strip() for p in args.phases.split(",") if p.strip()]
    if unknown := [a for a in args.algorithms if a not in MODEL_PARAMS] + [
        p for p in args.phase_list if p not in PHASES
    ]:
        parser.error(f"unknown models or phases: {unknown}")
    if args.results is None and not quick and not args.no_write:
        args.results = ROOT / "benchmarks" / "RESULTS.md"
    args.throughput_models = len(args.algorithms)
    return args


def main() -> None:
    args = parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    settings = Settings()
    b = Bench(settings, args, TopicAdmin(settings.kafka_bootstrap))
    started, load_before = time.perf_counter(), os.getloadavg()
    models: list[Registered] = []
    phases = args.phase_list
    try:
        b.topic("deployments", 1, {"cleanup.policy": "compact"})
        b.topic("status", 1, {"cleanup.policy": "compact"})
        b.results["publisher"] = Publisher(b.bootstrap, b.topics["deployments"])
        procs = {
            mode: b.scorer(SHORT[mode], f"bench-{RUN_ID}-{SHORT[mode]}", mode) for mode in MODES
        }
        rows = 5000 if args.quick else 20_000
        for i, algorithm in enumerate(args.algorithms):
            models.append(register_model(settings, algorithm, seed=11 + i, rows=rows))
            print(f"registered {models[-1].name} v{models[-1].version} (ONNX: {models[-1].onnx})")
        b.models = list(models)
        extra: list[Registered] = []
        avro_model: Registered | None = None
        if "rss" in phases:  # more versions of the last model, so 5 distinct versions exist
            for seed in range(max(0, 5 - len(models))):
                extra.append(
                    register_model(settings, args.algorithms[-1], seed=31 + seed, rows=rows)
                )
            models += extra
        n = args.events
        events = make_events(n)
        t0 = time.perf_counter()
        b.backlog("input", 3, events)
        b.backlog("warm", 6, events[: max(2000, n // 10)])
        if "avro" in phases:  # the same events as Avro, their schema in the local registry
            for kind, count in (("input-avro", n), ("warm-avro", max(2000, n // 10))):
                subject = f"{b.topic(kind, 3 if kind == 'input-avro' else 6)}-value"
                b.subjects.append(subject)
                b.fill(kind, avro_events(settings, subject, events[:count]))
            avro_model = register_model(
                settings, args.algorithms[0], seed=11, rows=rows, avro_subject=b.subjects[0]
            )
            models.append(avro_model)
        if "multi" in phases:
            for i in range(4):
                b.backlog(f"multi-{i}", 3, events[i * n // 4 : (i + 1) * n // 4])
        print(f"produced the backlogs ({n:,} events each) in {time.perf_counter() - t0:.1f}s")
        for proc in procs.values():
            proc.wait_up()
        if "throughput" in phases:
            print("throughput: one scorer process vs. the raw pass-through")
            phase_throughput(b, procs)
        if avro_model is not None:
            print("Avro input: the same model and events, Avro vs JSON, one exactly-once process")
            phase_avro(b, procs["exactly_once"], b.models[0], avro_model)
        if "latency" in phases:
            print("latency versus rate (read_committed, end to end)")
            phase_latency(b, procs, events)
        if "switch" in phases:
            print("weight-change switch under load")
            phase_switch(b, procs["exactly_once"], events)
        if "multi" in phases:
            print("several deployments in one process")
            phase_multi(b, procs["exactly_once"])
        procs["at_least_once"].stop()
        if "scale" in phases:
            print("scale-out: 1 and 2 processes, one consumer group, 6 partitions")
            phase_scale(b, procs["exactly_once"], events)
        procs["exactly_once"].stop()
        if "rss" in phases:
            print("scorer memory with 1 and 5 model versions")
            phase_rss(b, extra)
    finally:
        cleanup(b, models)
    elapsed = time.perf_counter() - started
    markdown = render(b.results, args, elapsed, load_before, os.getloadavg(), b.models)
    print()
    print(markdown)
    if args.results and not args.no_write:
        write_section(args.results, "scorer", "scorer.py", markdown)
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
