"""Scenario 1, card-payment fraud: history -> dataset -> three runs on the raw fields -> velocity
features in SQL -> a run with them on the same snapshot (AUC with and without) -> A/B/shadow
deployment with monitoring, its champion computing the features online -> live payments with
delayed outcomes -> live metrics (the gain again, on the same payments) and the A/B verdict.

Why one module of ~500 lines: it is one scenario script, read top to bottom as the demo runs it
(the feature set's SQL and its tables are in `demo.fraud_features`, the live tables in
`demo.fraud_tables`).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rich.markup import escape

from carrara.demo import fraud_features
from carrara.demo.context import DemoContext
from carrara.demo.events import FRAUD_FEATURES, FraudSimulator
from carrara.demo.fraud_tables import metrics_table, verdict_table
from carrara.demo.pipeline import (
    check_run,
    start_run,
    versions_by_run,
    wait_rollout,
    wait_runs,
)
from carrara.demo.streaming import DelayedOutcomes, JsonProducer, Pacer, PredictionReader
from carrara.streams.prediction_record import Prediction
from carrara.streams.topics import TopicAdmin

SCENARIO = "fraud"
TITLE = "Card-payment fraud"
HISTORY_EVENTS = 30_000
LIVE_EVENTS = 4_000  # streamed once, fast, so the verdict has enough outcomes per arm
LIVE_RATE = 250  # events/s of that first stream
CONTINUOUS_RATE = 30  # events/s while the demo keeps running
OUTCOME_DELAY_S = 3.0
JOIN_TIMEOUT_S = 120
COUNT_MARGIN = 300  # payments; see FraudLive.release
FIRST_PAYMENTS = 10  # sent before the others, until the monitor watches the deployment
# Small trees and a slow learning rate: ~1.5% positives overfit deeper trees.
LIGHTGBM = {
    "n_estimators": 400,
    "num_leaves": 7,
    "min_child_samples": 50,
    "learning_rate": 0.03,
    "subsample": 0.8,
    "colsample_bytree": 0.8,
}
AUTOML = {"time_budget_s": 20, "max_trials": 6}
# Variant names (the verdict reads "challenger logreg vs. champion lightgbm-sql"): the champion
# is LightGBM with the velocity features; a shadow scores every payment with LightGBM on the raw
# fields, so the live metrics compare both on the same payments.
CHAMPION, CHALLENGER, SHADOW, RAW = "lightgbm-sql", "logreg", "automl", "lightgbm-raw"
FEATURED = "LightGBM + velocity SQL"  # the run with the feature set
RECENT_PREDICTIONS = 20_000
MIN_GAIN = 0.02  # AUC the velocity features must add over LightGBM on the raw fields


@dataclass
class FraudLive:
    """The running scenario: what keeps producing payments and outcomes after the steps."""

    ctx: DemoContext
    deployment: str
    payments_topic: str
    simulator: FraudSimulator
    producer: JsonProducer
    outcomes: DelayedOutcomes
    reader: PredictionReader
    streamed: int = 0
    frauds: int = 0
    watermark: int = 0  # outcomes of payments numbered below it may be produced
    # The newest predictions read (bounded: the demo may stream for hours).
    recent: deque[Prediction] = field(default_factory=lambda: deque(maxlen=RECENT_PREDICTIONS))
    _last_check: float = 0.0

    def send(self, count: int) -> None:
        """Produce `count` payments now; their outcomes follow OUTCOME_DELAY_S later.

        Their event time continues the history's (the simulation's clock): the scorer's per-card
        windows see the pace of payments the model was trained on.
        """
        for _ in range(count):
            payment = self.simulator.next(busy=self.outcomes.in_flight)
            self.producer.send(self.payments_topic, payment.card_id, payment.event)
            self.outcomes.add(
                payment.card_id,
                {"card_id": payment.card_id, "fraud": payment.fraud, "ts": payment.event["ts"]},
                payment.fraud,
            )
            self.streamed += 1
            self.frauds += payment.fraud
        self.release()

    def release(self) -> None:
        """Produce due outcomes of the payments whose predictions the monitor has counted."""
        if time.monotonic() - self._last_check > 1.0:
            self._last_check = time.monotonic()
            counted = served_counted(self.ctx, self.deployment)
            # The monitor reads partitions side by side, not in production order: an event a
            # little older than the count may still be uncounted, so keep a margin.
            self.watermark = (
                self.streamed if counted >= self.streamed else max(0, counted - COUNT_MARGIN)
            )
        self.outcomes.release(self.watermark)
        self.recent.extend(self.reader.drain())
        self.producer.poll()

    def close(self) -> None:
        self.reader.close()
        with contextlib.suppress(RuntimeError):  # undelivered leftovers do not matter now
            self.producer.flush(10)


def run(ctx: DemoContext) -> FraudLive:
    """Every step of the scenario; raises ScenarioAborted when a step cannot go on."""
    dataset = ctx.name(SCENARIO)
    model = ctx.name(SCENARIO)
    deployment = ctx.name(SCENARIO)
    history_topic = ctx.topic(SCENARIO, "history")
    topics = {role: ctx.topic(SCENARIO, role) for role in ("payments", "outcomes", "scores")}
    simulator = FraudSimulator(seed=int(ctx.run_id, 16))
    producer = JsonProducer(ctx.settings.kafka_bootstrap)

    with ctx.step(TITLE, "1.1", f"Create dataset {dataset} and its topic {history_topic}") as step:
        created = ctx.api.post(
            "/datasets",
            json={
                "name": dataset,
                "topic": history_topic,
                "key_field": "card_id",
                "event_time_field": "ts",
                "label_field": "fraud",
                "task": "binary",
                "features": [{"name": n, "type": t} for n, t in FRAUD_FEATURES],
                "description": "Card payments (demo): amount, merchant category, hour, "
                "amount vs. the card's usual, distance, card present; label = confirmed fraud. "
                "Per-card velocity: its feature set in SQL.",
                "owner": "carrara demo",
                "create_topic": {"partitions": 3},
            },
        )
        step.detail = (
            f"POST /api/v1/datasets → {created['name']}: {len(FRAUD_FEATURES)} features, "
            f"label `fraud`, topic created: {created['topic_created']}"
        )

    with ctx.step(TITLE, "1.2", f"Produce {HISTORY_EVENTS:,} historical card payments") as step:
        frauds = 0
        with ctx.progress() as progress:
            task = progress.add_task("payments → Kafka", total=HISTORY_EVENTS)
            for i in range(HISTORY_EVENTS):
                payment = simulator.next()
                producer.send(
                    history_topic, payment.card_id, {**payment.event, "fraud": payment.fraud}
                )
                frauds += payment.fraud
                if i % 500 == 499:
                    progress.update(task, completed=i + 1)
            producer.flush()
            progress.update(task, completed=HISTORY_EVENTS)
        step.detail = (
            f"{HISTORY_EVENTS:,} payments of {len(simulator.card_ids):,} cards, {frauds} fraud "
            f"({frauds / HISTORY_EVENTS:.2%})"
        )

    with ctx.step(
        TITLE, "1.3", "Pin a snapshot of the topic (the exact offsets to train on)"
    ) as step:
        version = ctx.api.post(f"/datasets/{dataset}/versions", json={"mode": "latest"})
        step.check(
            version["event_count"] == HISTORY_EVENTS,
            f"the snapshot holds {version['event_count']} events, not {HISTORY_EVENTS}",
        )
        step.detail = f"version {version['number']}: {version['event_count']:,} events"

    with ctx.step(
        TITLE, "1.4", "Train on the raw fields: logistic regression, LightGBM, an AutoML search"
    ) as step:
        # Queued before the dataset has a feature set: these runs see the payments' own fields.
        runs = {
            "logistic regression": start_run(
                ctx, dataset, version["number"], "logistic_regression", {}, model
            ),
            "LightGBM": start_run(ctx, dataset, version["number"], "lightgbm", LIGHTGBM, model),
            "AutoML": start_run(ctx, dataset, version["number"], "auto", AUTOML, model),
        }
        step.detail = "queued runs " + ", ".join(f"{k} #{v}" for k, v in runs.items())

    with ctx.step(
        TITLE, "1.5", "Write per-card velocity features in SQL (PUT …/features) and preview them"
    ) as step:
        feature_set = fraud_features.define(ctx, step, dataset)

    with ctx.step(
        TITLE, "1.6", "Train LightGBM with the velocity features on the same snapshot"
    ) as step:
        runs[FEATURED] = start_run(
            ctx, dataset, version["number"], "lightgbm", LIGHTGBM, model, key="-velocity"
        )
        finished = wait_runs(ctx, runs)
        for label, result in finished.items():
            check_run(step, label, result, "auc", margin=0.1)
        if any(r["status"] != "succeeded" for r in finished.values()):
            step.abort_if_failed()
        versions = versions_by_run(ctx, model)
        version_of = {label: versions[r["id"]] for label, r in finished.items()}
        pinned = (finished[FEATURED].get("results") or {}).get("feature_set") or {}
        step.check(
            pinned.get("digest") == feature_set["digest"],
            f"the {FEATURED} run did not pin feature-set revision {feature_set['number']}",
        )
        step.check(
            "feature_set" not in (finished["LightGBM"].get("results") or {}),
            "the LightGBM run on the raw fields computed a feature set",
        )
        ctx.console.print(
            fraud_features.offline_table(finished, version_of, FEATURED, raw="LightGBM")
        )
        without, with_, gain = fraud_features.gain(finished["LightGBM"], finished[FEATURED])
        step.check(
            gain >= MIN_GAIN,
            f"the velocity features add {gain:+.3f} AUC to LightGBM ({without:.3f} → "
            f"{with_:.3f}), less than {MIN_GAIN}",
        )
        best = (finished["AutoML"].get("results") or {}).get("best", {}).get("algorithm")
        step.detail = (
            ", ".join(
                f"{label} v{version_of[label]} AUC {r['metrics']['auc']:.3f}"
                for label, r in finished.items()
            )
            + f"; velocity features {gain:+.3f} AUC (AutoML picked {best}; baseline AUC 0.5)"
        )

    with ctx.step(
        TITLE,
        "1.7",
        "Set aliases: champion = LightGBM + velocity SQL, challenger = logistic regression",
    ) as step:
        for alias, label in (("champion", FEATURED), ("challenger", "logistic regression")):
            ctx.api.put(f"/models/{model}/aliases/{alias}", json={"version": version_of[label]})
        step.detail = (
            f"{model}@champion → v{version_of[FEATURED]}, "
            f"@challenger → v{version_of['logistic regression']}"
        )

    with ctx.step(
        TITLE,
        "1.8",
        "Deploy champion 90% / challenger 10% + raw-field LightGBM and AutoML shadows, monitored",
    ) as step:
        admin = TopicAdmin(ctx.settings.kafka_bootstrap)
        for topic in topics.values():
            admin.create_topic(topic, partitions=3, exist_ok=True)
        applied = ctx.api.put(
            f"/deployments/{deployment}",
            json={
                "input_topic": topics["payments"],
                "output_topic": topics["scores"],
                "key_field": "card_id",
                "pool": "default",
                "description": "Card fraud scoring (carrara demo)",
                "variants": [
                    {"name": CHAMPION, "model": model, "alias": "champion", "weight": 90},
                    {"name": CHALLENGER, "model": model, "alias": "challenger", "weight": 10},
                    {
                        "name": RAW,
                        "model": model,
                        "version": version_of["LightGBM"],
                        "weight": 0,
                        "shadow": True,
                    },
                    {
                        "name": SHADOW,
                        "model": model,
                        "version": version_of["AutoML"],
                        "weight": 0,
                        "shadow": True,
                    },
                ],
                "monitoring": {
                    "outcomes_topic": topics["outcomes"],
                    "outcome_field": "fraud",
                    "join_by": "key",
                    "window_s": 3600,
                    "metric": "log_loss",
                    "champion": CHAMPION,
                },
                "policy": {"auto_rollback": True, "min_outcomes": 1000},
                # The champion's input vectors (with the features computed online) go out with
                # its predictions.
                "include_features": True,
                "reason": "carrara demo: LightGBM with velocity SQL vs. logistic regression",
            },
        )
        detail = wait_rollout(ctx, deployment)
        step.detail = (
            f"PUT /api/v1/deployments/{deployment} → revision {applied['revision']}; "
            f"{detail['rollout']['summary']}"
        )

    live = FraudLive(
        ctx,
        deployment,
        topics["payments"],
        simulator,
        producer,
        DelayedOutcomes(producer, topics["outcomes"], OUTCOME_DELAY_S),
        PredictionReader(ctx.settings.kafka_bootstrap, topics["scores"], deployment),
    )
    try:
        _stream(ctx, live)
        _metrics(ctx, live)
        _verdict(ctx, live)
    except BaseException:
        live.close()
        raise
    return live


def _wait_for_monitor(ctx: DemoContext, live: FraudLive) -> None:
    """Send the first payments and wait until the monitor counts them: from then on it follows
    the deployment live, instead of catching up on a backlog (topics read in no set order)."""
    with ctx.progress(bar=False) as progress:
        progress.add_task(
            f"first payments; waiting for the monitor to watch {live.deployment}", total=None
        )
        live.send(FIRST_PAYMENTS)
        live.producer.flush()
        counted = ctx.api.poll(
            f"/deployments/{live.deployment}/metrics",
            lambda m: (
                sum(v["totals"]["predictions"] for v in m["variants"] if not v["shadow"])
                >= FIRST_PAYMENTS
            ),
            timeout=JOIN_TIMEOUT_S,
            params={"from": ctx.started_at.isoformat(), "bucket": "hour"},
        )
    if sum(v["totals"]["predictions"] for v in counted["variants"] if not v["shadow"]) == 0:
        raise TimeoutError(f"the monitor counted no prediction of {live.deployment}")


def _stream(ctx: DemoContext, live: FraudLive) -> None:
    with ctx.step(
        TITLE,
        "1.9",
        f"Stream {LIVE_EVENTS:,} live payments ({LIVE_RATE}/s); outcomes follow "
        f"{OUTCOME_DELAY_S:.0f} s later",
    ) as step:
        _wait_for_monitor(ctx, live)
        pacer = Pacer(LIVE_RATE)
        with ctx.progress() as progress:
            sent = progress.add_task("payments → Kafka", total=LIVE_EVENTS)
            scored = progress.add_task("predictions ← Kafka", total=LIVE_EVENTS)
            shadowed = progress.add_task("shadow predictions ← Kafka", total=LIVE_EVENTS)
            outcomes = progress.add_task("outcomes → Kafka", total=LIVE_EVENTS)

            def show() -> None:
                live.release()
                progress.update(sent, completed=live.streamed)
                progress.update(scored, completed=len(live.reader.served))
                progress.update(shadowed, completed=len(live.reader.shadowed))
                progress.update(outcomes, completed=live.outcomes.produced)

            while live.streamed < LIVE_EVENTS:
                live.send(min(pacer.due(), LIVE_EVENTS - live.streamed))
                show()
                time.sleep(0.05)
            live.producer.flush()
            complete = live.reader.wait_for(LIVE_EVENTS, LIVE_EVENTS, JOIN_TIMEOUT_S, show)
            deadline = time.monotonic() + JOIN_TIMEOUT_S
            while live.outcomes.pending and time.monotonic() < deadline:
                show()
                time.sleep(0.2)
            live.producer.flush()
            show()
        step.check(
            complete,
            f"predictions for {len(live.reader.served)} of {LIVE_EVENTS} events "
            f"({len(live.reader.shadowed)} shadow) after {JOIN_TIMEOUT_S} s",
        )
        step.check(
            not live.outcomes.pending,
            f"{live.outcomes.pending} outcomes still wait for the monitor to count the "
            "predictions of their payments",
        )
        live.release()
        vectors = fraud_features.burst_vectors(list(live.recent), CHAMPION)
        if vectors is not None:
            ctx.console.print(vectors)
        step.check(
            vectors is not None,
            f"no prediction of {CHAMPION} shows a burst in the features the scorer computed",
        )
        step.detail = (
            f"{live.streamed:,} payments ({live.frauds} fraud) → {len(live.reader.served):,} "
            f"predictions + {len(live.reader.shadowed):,} shadow; "
            f"{live.outcomes.produced:,} outcomes"
        )


def metrics_since_start(ctx: DemoContext, deployment: str) -> dict[str, Any]:
    """GET …/metrics over the whole demo run (the default window is the last hour)."""
    return ctx.api.get(
        f"/deployments/{deployment}/metrics",
        params={"from": ctx.started_at.isoformat(), "bucket": "hour"},
    )


def served_counted(ctx: DemoContext, deployment: str) -> int:
    """Predictions of live (non-shadow) variants the monitor has counted so far."""
    metrics = metrics_since_start(ctx, deployment)
    return sum(v["totals"]["predictions"] for v in metrics["variants"] if not v["shadow"])


def _totals(metrics: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["variant"]: v["totals"] for v in metrics["variants"] if v["variant"] != "-"}


def _metrics(ctx: DemoContext, live: FraudLive) -> None:
    with ctx.step(TITLE, "1.10", "Live per-variant metrics (GET …/metrics)") as step:
        path = f"/deployments/{live.deployment}/metrics"
        with ctx.progress() as progress:
            task = progress.add_task("outcomes joined by the monitor", total=live.outcomes.produced)

            def show(m: dict[str, Any]) -> None:
                progress.update(task, completed=m["outcome_stats"]["matched"])

            metrics = ctx.api.poll(
                path,
                lambda m: (
                    m["outcome_stats"]["matched"] >= live.outcomes.produced
                    and sum(t["predictions"] for t in _totals(m).values()) >= 3 * live.streamed
                ),
                timeout=JOIN_TIMEOUT_S,
                on_update=show,
                params={"from": ctx.started_at.isoformat(), "bucket": "hour"},
            )
        ctx.console.print(
            metrics_table(metrics, live.ctx.api.get(f"/deployments/{live.deployment}"))
        )
        totals = _totals(metrics)
        stats = metrics["outcome_stats"]
        served = sum(t["predictions"] for name, t in totals.items() if name not in (SHADOW, RAW))
        step.check(
            stats["matched"] == live.outcomes.produced,
            f"{stats['matched']} of {live.outcomes.produced} outcomes joined "
            f"(unmatched {stats['unmatched']}, late {stats['late']}, invalid {stats['invalid']})",
        )
        step.check(
            served == live.streamed,
            f"the monitor counted {served} served predictions for {live.streamed} payments",
        )
        for shadow in (RAW, SHADOW):
            step.check(
                totals.get(shadow, {}).get("predictions") == live.streamed,
                f"the monitor counted {totals.get(shadow, {}).get('predictions')} {shadow} "
                f"predictions for {live.streamed} payments",
            )
        # A 10% arm sees few fraud bursts (a burst stays on one card, hence one arm): its AUC
        # may still be undefined; the arms with most of the traffic must have one.
        for name in (CHAMPION, RAW, SHADOW):
            step.check(totals.get(name, {}).get("auc") is not None, f"{name} has no live AUC yet")
        with_, without = totals.get(CHAMPION, {}).get("auc"), totals.get(RAW, {}).get("auc")
        gain = ""
        if with_ is not None and without is not None:
            gain = (
                f"; live, on the same payments: velocity features AUC {with_:.3f} vs. raw "
                f"fields {without:.3f} ({with_ - without:+.3f})"
            )
            ctx.console.print(f"    {gain[2:]}")
            step.check(
                with_ > without,
                f"live, {CHAMPION} (velocity features) has AUC {with_:.3f}, not above "
                f"{RAW}'s {without:.3f} on the same payments",
            )
        step.detail = (
            f"{stats['matched']:,} outcomes joined; "
            + ", ".join(
                f"{name} AUC {t['auc']:.3f}" for name, t in totals.items() if t["auc"] is not None
            )
            + gain
        )


def _verdict(ctx: DemoContext, live: FraudLive) -> None:
    with ctx.step(
        TITLE, "1.11", "A/B verdict (GET …/verdict) and rollout (GET deployment)"
    ) as step:
        verdict = ctx.api.get(f"/deployments/{live.deployment}/verdict")
        deployment = ctx.api.get(f"/deployments/{live.deployment}")
        ctx.console.print(verdict_table(verdict))
        ctx.console.print(f"    rollout: {escape(deployment['rollout']['summary'])}")
        for comparison in verdict["comparisons"]:
            step.check(
                min(comparison["n_champion"], comparison["n_challenger"])
                >= verdict["min_outcomes"],
                f"{comparison['challenger']}: {comparison['verdict']}",
            )
        step.check(
            len(verdict["comparisons"]) == 3, "expected the challenger's and two shadows' verdicts"
        )
        step.check(
            deployment["rollout"]["up_to_date"] >= ctx.scorers,
            f"rollout: {deployment['rollout']['summary']}",
        )
        step.detail = "; ".join(
            f"{c['challenger']}: {c['verdict']}" for c in verdict["comparisons"]
        )
