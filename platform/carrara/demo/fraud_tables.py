"""The fraud scenario's live tables: per-variant metrics and the A/B verdict (API answers)."""

from __future__ import annotations

from typing import Any

from rich.table import Table


def metrics_table(metrics: dict[str, Any], deployment: dict[str, Any]) -> Table:
    """Per-variant totals as a table: traffic, latency and the live quality metrics."""
    spec: dict[str, Any] = deployment.get("spec") or {"variants": []}
    variants = {v["name"]: v for v in spec["variants"]}
    champion = (spec.get("monitoring") or {}).get("champion")
    table = Table(
        title=f"{deployment['name']} — live metrics since the demo started", title_justify="left"
    )
    table.add_column("variant")
    table.add_column("role")
    for column in ("model", "traffic", "predictions", "outcomes", "p99 latency"):
        table.add_column(column, justify="right")
    for column in ("AUC", "accuracy", "log loss"):
        table.add_column(column, justify="right")
    for v in metrics["variants"]:
        if v["variant"] == "-":
            continue
        t = v["totals"]
        weight = variants.get(v["variant"], {}).get("weight")
        if v["shadow"]:
            role, traffic = "shadow", "copy"
        else:
            role = "champion" if v["variant"] == champion else "challenger"
            traffic = "?" if weight is None else f"{weight}%"
        table.add_row(
            v["variant"],
            role,
            f"v{v['model_version']}",
            traffic,
            f"{t['predictions']:,}",
            f"{t['outcomes']:,}",
            _num(t["p99_latency_ms"], "{:.1f} ms"),
            _num(t["auc"], "{:.3f}"),
            _num(t["accuracy"], "{:.2%}"),
            _num(t["log_loss"], "{:.4f}"),
        )
    return table


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def verdict_table(verdict: dict[str, Any]) -> Table:
    """Each challenger against the champion, by the always-valid sequential test."""
    metric = verdict["metric"].replace("_", " ")
    better = "higher" if verdict["higher_is_better"] else "lower"
    table = Table(
        title=f"A/B verdict vs. champion {verdict['champion']}: mean {metric} per outcome "
        f"({better} is better), alpha {verdict['alpha']}",
        title_justify="left",
    )
    for column in ("variant", "outcomes", f"{metric}", "verdict"):
        table.add_column(column)
    champion = verdict["champion"]
    for c in verdict["comparisons"]:
        table.add_row(
            c["challenger"],
            f"{c['n_challenger']:,} vs. {c['n_champion']:,} ({champion})",
            f"{_num(c['mean_challenger'], '{:.4f}')} vs. {_num(c['mean_champion'], '{:.4f}')}",
            c["verdict"],
        )
    return table
