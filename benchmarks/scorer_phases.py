"""The phases of `benchmarks/scorer.py`; each stores its figures in `Bench.results`."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import numpy as np
from scorer_bench import (
    MODES,
    SHORT,
    Backlog,
    Bench,
    loaded_models,
    rounds_of,
    run_backlog,
    settle,
    wait_events,
    wait_until,
)
from scorer_kit import (
    RUN_ID,
    Gate,
    Publisher,
    Registered,
    ScorerProcess,
    e2e_buckets,
    histogram_quantile,
    make_events,
    pass_through,
    produce_all,
    spec,
    variant,
)
from scorer_probe import Probe, latencies_ms
from scorer_report import Stat


def phase_throughput(b: Bench, procs: dict[str, ScorerProcess]) -> None:
    """Per round: the raw pass-through, then each model x delivery mode on the same backlog."""
    source = b.topics["input"]
    passthrough: list[float] = []
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    runtimes: dict[tuple[str, str], str] = {}
    for r in rounds_of(b):
        if r >= 0:
            target = b.topic(f"passthrough-{r}", b.partitions[source])
            passthrough.append(pass_through(b.bootstrap, source, target, 3, b.counts[source]))
            b.drop(f"passthrough-{r}")
            print(f"  round {r + 1}: pass-through {passthrough[-1]:,.0f} events/s")
        for model in b.models[: b.args.throughput_models]:
            for mode in MODES:
                inputs = [b.topics["warm"] if r < 0 else source]
                run = run_backlog(b, [procs[mode]], model, inputs, f"tp-{SHORT[mode]}")
                if r < 0:
                    continue
                row = rows.setdefault(
                    (model.algorithm, mode), {"rate": [], "ratio": [], "cores": []}
                )
                row["rate"].append(run.rate)
                row["ratio"].append(run.rate / passthrough[-1])
                row["cores"].append(next(iter(run.cores.values())))
                runtimes[(model.algorithm, mode)] = run.runtime
                print(
                    f"  round {r + 1}: {model.algorithm} {mode} [{run.runtime}] {run.rate:,.0f} "
                    f"events/s, {row['ratio'][-1]:.2f}x, {row['cores'][-1]:.2f} cores"
                )
    b.results["throughput"] = {
        "passthrough": Stat(passthrough),
        "rows": {k: {m: Stat(v) for m, v in row.items()} for k, row in rows.items()},
        "runtimes": runtimes,
    }


def phase_avro(
    b: Bench, proc: ScorerProcess, json_model: Registered, avro_model: Registered
) -> None:
    """Per round, the same model scoring the same events as JSON and as Avro (registry-framed),
    one exactly-once process; the order alternates between rounds, the ratio is per round."""
    rows: dict[str, list[float]] = {"json": [], "avro": [], "ratio": []}
    cpu: dict[str, list[float]] = {"json": [], "avro": []}
    # Events per CPU-second of the scorer: what each format costs, less sensitive than events/s
    # to other processes taking the cores (the machine is shared).
    per_core: dict[str, list[float]] = {"json": [], "avro": [], "ratio": []}
    for r in rounds_of(b):
        rates: dict[str, float] = {}
        order = ("json", "avro") if r % 2 == 0 else ("avro", "json")
        for fmt in order:
            model = json_model if fmt == "json" else avro_model
            kind = ("warm" if r < 0 else "input") + ("-avro" if fmt == "avro" else "")
            run = run_backlog(b, [proc], model, [b.topics[kind]], f"fmt-{fmt}")
            rates[fmt] = run.rate
            if r >= 0:
                used = next(iter(run.cores.values()))
                rows[fmt].append(run.rate)
                cpu[fmt].append(used)
                per_core[fmt].append(run.rate / used if used > 0 else float("nan"))
        if r < 0:
            continue
        rows["ratio"].append(rates["avro"] / rates["json"])
        per_core["ratio"].append(per_core["avro"][-1] / per_core["json"][-1])
        print(
            f"  round {r + 1}: {json_model.algorithm} JSON {rates['json']:,.0f} events/s "
            f"({per_core['json'][-1]:,.0f} per CPU-second), Avro {rates['avro']:,.0f} events/s "
            f"({per_core['avro'][-1]:,.0f} per CPU-second), Avro / JSON "
            f"{rows['ratio'][-1]:.2f}x ({per_core['ratio'][-1]:.2f}x per CPU-second)"
        )
    b.results["avro"] = {
        "algorithm": json_model.algorithm,
        "rates": {k: Stat(v) for k, v in rows.items()},
        "cores": {k: Stat(v) for k, v in cpu.items()},
        "per_core": {k: Stat(v) for k, v in per_core.items()},
    }


def phase_latency(
    b: Bench, procs: dict[str, ScorerProcess], values: list[tuple[bytes, bytes]]
) -> None:
    """Per delivery mode, one deployment on fresh topics (CreateTime); per round, each rate."""
    model = b.models[0]
    publisher: Publisher = b.results["publisher"]
    table: dict[tuple[str, str], dict[str, list[float]]] = {}
    for mode in MODES:
        proc = procs[mode]
        rates = {"1k": 1000.0, "5k": 5000.0, "20k": 20_000.0}
        tp = b.results.get("throughput", {}).get("rows", {}).get((model.algorithm, mode))
        rates["max"] = tp["rate"].median if tp else b.args.max_rate
        name = b.name(f"lat-{SHORT[mode]}")
        source = b.topic(f"lat-in-{name}", 3, config={})  # CreateTime: the producer's send time
        target = b.topic(f"lat-out-{name}", 3)
        publisher.publish(
            spec(name, 1, proc.pool, datetime.now(UTC), source, target, (variant("a", model, 100),))
        )
        probe = Probe(b.bootstrap, source, target, 3, RUN_ID)
        try:
            probe.warm(values)
            for r in range(b.args.rounds):
                for label, rate in rates.items():
                    row = table.setdefault(
                        (mode, label),
                        {k: [] for k in ("rate", "p50", "p99", "h50", "h99", "n", "lag")},
                    )
                    marks: dict[str, Any] = {}

                    def mark(
                        marks: dict[str, Any] = marks, proc: ScorerProcess = proc, name: str = name
                    ) -> None:
                        marks["skip"] = time.time()
                        marks["before"] = e2e_buckets(proc.metrics(), name)

                    warm, secs = b.args.latency_warmup, b.args.latency_seconds
                    sent, lag = probe.send(values, rate, warm + secs, at={warm: mark})
                    lat = latencies_ms(probe, marks["skip"])
                    after = e2e_buckets(proc.metrics(), name)
                    measured = [t for t in sent if t >= marks["skip"]]
                    row["rate"].append((len(measured) - 1) / max(measured[-1] - measured[0], 1e-9))
                    row["p50"].append(float(np.percentile(lat, 50)))
                    row["p99"].append(float(np.percentile(lat, 99)))
                    row["h50"].append(histogram_quantile(0.5, marks["before"], after))
                    row["h99"].append(histogram_quantile(0.99, marks["before"], after))
                    row["n"].append(len(lat))
                    row["lag"].append(lag * 1000)
                    print(
                        f"  round {r + 1}: {mode} at {row['rate'][-1]:,.0f}/s ({label}): p50 "
                        f"{row['p50'][-1]:.1f} ms, p99 {row['p99'][-1]:.1f} ms; scorer histogram "
                        f"p50 {row['h50'][-1]:.1f}, p99 {row['h99'][-1]:.1f}; {len(lat)} events"
                    )
        finally:
            probe.close()
            publisher.publish(spec(name, 2, proc.pool, datetime.now(UTC)))
    b.results["latency"] = {k: {m: Stat(v) for m, v in row.items()} for k, row in table.items()}


def phase_switch(b: Bench, proc: ScorerProcess, values: list[tuple[bytes, bytes]]) -> None:
    """Two live variants, both loaded (weights 100/0); each round publishes a revision that only
    swaps the weights, under load. Switch time: from just before the revision is produced to
    the first prediction of that revision received (read_committed) on every input partition."""
    a, other = b.models[0], (b.models[1] if len(b.models) > 1 else b.models[0])
    publisher: Publisher = b.results["publisher"]
    name = b.name("switch")
    source = b.topic(f"sw-in-{name}", 3, config={})
    target = b.topic(f"sw-out-{name}", 3)
    revision = 1

    def weights(first: int) -> tuple[Any, ...]:
        return (variant("a", a, first), variant("b", other, 100 - first))

    publisher.publish(
        spec(name, revision, proc.pool, datetime.now(UTC), source, target, weights(100))
    )
    published: list[tuple[int, float]] = []

    def switch() -> None:
        nonlocal revision
        revision += 1
        change = spec(
            name,
            revision,
            proc.pool,
            datetime.now(UTC),
            source,
            target,
            weights(100 if revision % 2 else 0),
        )
        published.append((revision, publisher.publish(change)))

    probe = Probe(b.bootstrap, source, target, 3, RUN_ID)
    try:
        probe.warm(values)
        gap, switches = b.args.switch_interval, b.args.rounds + 1  # the first one is a warm-up
        at = {1.0 + i * gap: switch for i in range(switches)}
        probe.send(values, b.args.switch_rate, 1.0 + switches * gap, at=at)
        got = probe.wait_for(set(probe.sent), timeout=30, strict=False)
        positions = list(zip(got.partition.tolist(), got.offset.tolist(), strict=True))
        lost = len(set(probe.sent) - set(positions))
        duplicated = len(positions) - len(set(positions))
    finally:
        probe.close()
        publisher.publish(spec(name, revision + 1, proc.pool, datetime.now(UTC)))
    times = []
    for rev, t in published:
        firsts = [got.received[(got.partition == p) & (got.revision >= rev)] for p in range(3)]
        times.append(
            max(float(f.min()) for f in firsts) - t if all(len(f) for f in firsts) else float("nan")
        )
    print(
        "  switch times (first is the warm-up): "
        f"{', '.join(f'{t * 1000:.0f} ms' for t in times)}; lost {lost}, duplicated {duplicated}"
    )
    b.results["switch"] = {
        "seconds": Stat(times[1:]),
        "lost": lost,
        "duplicated": duplicated,
        "rate": b.args.switch_rate,
    }


def phase_multi(b: Bench, proc: ScorerProcess) -> None:
    """The same total events: 1 deployment on one topic vs. 4 deployments on 4 topics."""
    one, four = [], []
    for r in range(b.args.rounds):
        one.append(run_backlog(b, [proc], b.models[0], [b.topics["input"]], "multi1").rate)
        four.append(
            run_backlog(
                b, [proc], b.models[0], [b.topics[f"multi-{i}"] for i in range(4)], "multi4"
            ).rate
        )
        print(
            f"  round {r + 1}: 1 deployment {one[-1]:,.0f}, 4 deployments {four[-1]:,.0f} events/s"
        )
    b.results["multi"] = {
        "one": Stat(one),
        "four": Stat(four),
        "ratio": Stat([f / o for f, o in zip(four, one, strict=True)]),
    }


def phase_scale(b: Bench, first: ScorerProcess, events: list[tuple[bytes, bytes]]) -> None:
    """One then two processes of one pool (one consumer group) on a fresh 6-partition backlog
    per round. The backlog is held back in an open transaction (`Gate`) until the group is
    stable with every process holding partitions, so joining does not eat into the figure."""

    def scale_round(procs: list[ScorerProcess], count: int) -> Backlog:
        kind = f"scale-{b.serial}"
        source = b.topic(kind, 6)
        gate = Gate(b.bootstrap, source, events[:count])
        b.counts[source] = count

        def ready(names: list[str]) -> None:
            settle(b, names[0], len(procs), 6)
            gate.open()

        try:
            return run_backlog(b, procs, b.models[0], [source], f"scale{len(procs)}", ready)
        finally:
            b.drop(kind)

    warm = max(2000, len(events) // 10)
    one: list[Backlog] = []
    for r in rounds_of(b):
        run = scale_round([first], warm if r < 0 else len(events))
        if r >= 0:
            one.append(run)
            print(f"  round {r + 1}: 1 process {run.rate:,.0f} events/s, {run.cores} cores")
    second = b.scorer("scale-2", first.pool, first.mode)
    second.wait_up()
    two: list[Backlog] = []
    for r in rounds_of(b):
        run = scale_round([first, second], warm if r < 0 else len(events))
        if r >= 0:
            two.append(run)
            print(
                f"  round {r + 1}: 2 processes {run.rate:,.0f} events/s, "
                f"split {run.split}, cores {run.cores}"
            )
    second.stop()
    ratio = [t.rate / o.rate for t, o in zip(two, one, strict=True)]
    b.results["scale"] = {
        "one": Stat([x.rate for x in one]),
        "two": Stat([x.rate for x in two]),
        "ratio": Stat(ratio),
        "cores_one": Stat([sum(x.cores.values()) for x in one]),
        "cores_two": Stat([sum(x.cores.values()) for x in two]),
        "share": Stat([min(x.split.values()) / max(sum(x.split.values()), 1) for x in two]),
    }


def phase_rss(b: Bench, extra: list[Registered]) -> None:
    """RSS (VmRSS) of a fresh scorer: idle, serving 1 model version, then 5 (5 variants)."""
    publisher: Publisher = b.results["publisher"]
    events = make_events(2000, seed=5)
    source = b.backlog("rss", 3, events)
    procs = [
        b.scorer(f"rss-{r}", f"bench-{RUN_ID}-rss-{r}", "exactly_once")
        for r in range(b.args.rounds)
    ]
    five = (b.models[0], *extra, *b.models[1:])[:5]
    rows: dict[str, list[float]] = {"idle": [], "one": [], "five": []}
    for r, proc in enumerate(procs):
        proc.wait_up()
        rows["idle"].append(proc.rss_mb())
        name = b.name("rss")
        target = b.topic(f"out-{name}", 3)
        publisher.publish(
            spec(
                name,
                1,
                proc.pool,
                b.published_at,
                source,
                target,
                (variant("v0", b.models[-1], 100),),
            )
        )
        wait_events(proc, name, b.counts[source])
        rows["one"].append(proc.rss_mb())
        variants = tuple(variant(f"v{i}", m, 20) for i, m in enumerate(five))
        publisher.publish(spec(name, 2, proc.pool, b.published_at, source, target, variants))
        # The runner swaps to a revision at its next batch, once the reconciler loaded its models.
        wait_until(lambda proc=proc: loaded_models(proc) >= len(five), f"{len(five)} models loaded")
        produce_all(b.bootstrap, source, events)
        b.counts[source] += len(events)
        wait_events(proc, name, b.counts[source])
        if proc.series("carrara_scorer_revision", name) < 2:
            print("  warning: the events were scored before the 5-version revision took over")
        rows["five"].append(proc.rss_mb())
        loaded = loaded_models(proc)
        print(
            f"  round {r + 1}: RSS idle {rows['idle'][-1]:.0f} MB, 1 version "
            f"{rows['one'][-1]:.0f} MB, 5 versions {rows['five'][-1]:.0f} MB "
            f"({loaded} model-load series)"
        )
        publisher.publish(spec(name, 3, proc.pool, datetime.now(UTC)))
        proc.stop()
        b.drop(f"out-{name}")
    b.results["rss"] = {k: Stat(v) for k, v in rows.items()} | {"versions": len(five)}
