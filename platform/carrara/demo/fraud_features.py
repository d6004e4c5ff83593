"""The fraud scenario's velocity features, written in SQL and attached to its dataset, and how
much they add: AUC with and without them, offline (the same snapshot) and live (the same payments).

A payment's own fields cannot tell a burst on a taken-over card from the cardholder's habits
(`demo.events`); a card's history can. The feature set computes it per card, by event time, with
the platform's one operator: in the training replay, and in the scorers serving the model.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table

from carrara.demo.context import DemoContext, Step
from carrara.features.plan import COLUMN_PREFIX
from carrara.streams.prediction_record import Prediction

# `{dataset}` is the dataset's name (quoted: demo names hold '-').
FEATURE_SQL = """\
SELECT
  COUNT(*) OVER (PARTITION BY card_id ORDER BY ts
                 RANGE INTERVAL '1' HOUR PRECEDING) AS txn_1h,
  AVG(amount) OVER (PARTITION BY card_id ORDER BY ts
                    RANGE INTERVAL '24' HOUR PRECEDING) AS avg_amount_24h,
  COUNT(DISTINCT merchant_category) OVER (PARTITION BY card_id ORDER BY ts
                    RANGE INTERVAL '10' MINUTE PRECEDING) AS merchants_10m,
  ts - LAG(ts) OVER (PARTITION BY card_id ORDER BY ts) AS secs_since_last
FROM "{dataset}"
"""
PREVIEW_EVENTS = 1000
PREVIEW_SHOWN = 8


def define(ctx: DemoContext, step: Step, dataset: str) -> dict[str, Any]:
    """PUT the feature set (revision 1), then preview it on the topic's newest payments."""
    applied = ctx.api.put(
        f"/datasets/{dataset}/features",
        json={
            "sql": FEATURE_SQL.format(dataset=dataset),
            "reason": "carrara demo: per-card velocity, computed in training and scoring alike",
        },
    )
    current = applied["current"]
    step.check(current is not None, "PUT …/features stored no revision")
    preview = ctx.api.post(f"/datasets/{dataset}/features/preview", json={"events": PREVIEW_EVENTS})
    rows = preview["rows"]
    bursts = [r for r in rows if ((r["features"] or {}).get("txn_1h") or 0) >= 2]
    ctx.console.print(
        preview_table(
            preview,
            (bursts or rows)[-PREVIEW_SHOWN:],
            f"{len(bursts)} of the newest {len(rows):,} payments come in a burst (txn_1h ≥ 2)",
        )
    )
    names = [o["name"] for o in current["outputs"]]
    step.detail = (
        f"PUT /api/v1/datasets/{dataset}/features → revision {current['number']}: "
        f"{', '.join(names)} (horizon {current['horizon_ms'] // 3_600_000} h, digest "
        f"{current['digest'][:12]}); previewed on the newest {len(rows):,} payments, "
        f"{len(bursts)} in a burst"
    )
    return current


def preview_table(preview: dict[str, Any], rows: list[dict[str, Any]], title: str) -> Table:
    """Rows of POST …/features/preview as a table: one per event, one column per feature."""
    table = Table(
        title=f"Feature preview (revision {preview['revision']}): {title}",
        caption=preview["note"],
        title_justify="left",
    )
    table.add_column("partition/offset")
    table.add_column("card")
    names = [c["name"] for c in preview["columns"]]
    for name in names:
        table.add_column(name, justify="right")
    for row in rows:
        values = row["features"] or {}
        table.add_row(
            f"p{row['partition']}/{row['offset']}",
            str(row["key"]),
            *(_value(values.get(name)) for name in names),
        )
    return table


def _value(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if value.is_integer() else f"{value:,.2f}"
    return str(value)


def gain(raw: dict[str, Any], featured: dict[str, Any]) -> tuple[float, float, float]:
    """(AUC on raw fields, AUC with the feature set, the gain) of two finished runs."""
    without, with_ = float(raw["metrics"]["auc"]), float(featured["metrics"]["auc"])
    return without, with_, with_ - without


def offline_table(
    finished: dict[str, dict[str, Any]], version_of: dict[str, int], featured: str, raw: str
) -> Table:
    """Every run's holdout AUC on the same snapshot, and what the velocity features add."""
    table = Table(
        title="Holdout AUC on the same snapshot (the same held-out cards)", title_justify="left"
    )
    for column in ("run", "model", "inputs", "AUC", "vs. baseline"):
        table.add_column(column, justify="left" if column in ("run", "inputs") else "right")
    for label, run in finished.items():
        metrics = run.get("metrics") or {}
        auc, baseline = metrics.get("auc"), metrics.get("baseline_auc")
        table.add_row(
            label,
            f"v{version_of[label]}",
            "raw fields + velocity SQL" if label == featured else "raw fields",
            "-" if auc is None else f"{auc:.3f}",
            "-" if auc is None or baseline is None else f"{auc - baseline:+.3f}",
        )
    without, with_, delta = gain(finished[raw], finished[featured])
    table.caption = f"velocity features: AUC {without:.3f} → {with_:.3f} ({delta:+.3f})"
    return table


def burst_vectors(predictions: list[Prediction], champion: str, limit: int = 5) -> Table | None:
    """Live predictions whose input shows a burst (a second payment of the card within the
    hour), with the features the scorer computed for them (`include_features`)."""
    rows = [
        p
        for p in predictions
        if p.variant == champion
        and p.features is not None
        and (p.features.get(COLUMN_PREFIX + "txn_1h") or 0) >= 2
    ]
    if not rows:
        return None
    table = Table(
        title="Live payments in a burst: the features the scorer computed (include_features)",
        title_justify="left",
    )
    names = ("txn_1h", "secs_since_last", "merchants_10m", "avg_amount_24h")
    table.add_column("card")
    for name in names:
        table.add_column(name, justify="right")
    table.add_column("fraud score", justify="right")
    for p in sorted(rows, key=lambda p: -float(p.score if isinstance(p.score, float) else 0))[
        :limit
    ]:
        features = p.features or {}
        score = p.score if isinstance(p.score, float) else None
        table.add_row(
            str(p.key),
            *(_value(features.get(COLUMN_PREFIX + name)) for name in names),
            "-" if score is None else f"{score:.3f}",
        )
    return table
