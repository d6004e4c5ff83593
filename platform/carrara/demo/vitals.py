"""Scenario 2, patient vital signs: normal readings -> anomaly dataset -> autoencoder -> deployment
-> live readings with injected episodes -> alerts read from the deployment's output topic.

The bedside monitors write Avro through the Schema Registry, as hospital devices with a registry
serializer do (the Confluent wire format: each record framed with its writer schema's id); midway
through the live stream a firmware update adds the respiratory rate (schema v2: a field with a
default, BACKWARD compatible) and the scorer keeps scoring, each record read with its own schema.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from confluent_kafka.schema_registry import Schema
from rich.markup import escape

from carrara.demo.context import DemoContext
from carrara.demo.events import VITALS_FEATURES, Reading, VitalsSimulator, describe_vitals
from carrara.demo.pipeline import start_run, versions_by_run, wait_rollout, wait_runs
from carrara.demo.streaming import AvroProducer, Pacer, PredictionReader
from carrara.streams.prediction_record import Prediction
from carrara.streams.schema_registry import Registry
from carrara.streams.topics import TopicAdmin

SCENARIO = "vitals"
TITLE = "Patient vital signs"
PATIENTS = 40
HISTORY_EVENTS = 6_000
LIVE_EVENTS = 2_000
LIVE_RATE = 250
EPISODE_CHANCE = 0.04  # share of live readings with an injected episode
CONTINUOUS_RATE = 20
CONTINUOUS_EPISODE_CHANCE = 0.01
ALERT_LINES = 12  # alerts printed in full during the one-off stream; the rest are counted
PREDICTION_TIMEOUT_S = 120
# A bottleneck narrower than the 5 vitals: what a normal reading looks like must be learned.
AUTOENCODER = {
    "hidden_layers": [8, 2, 8],
    "epochs": 60,
    "target_alert_rate": 0.01,
}


# A bedside monitor's reading (v1), and after the firmware update (v2: one more field, a default).
READING_V1: dict[str, Any] = {
    "type": "record",
    "name": "VitalSigns",
    "namespace": "carrara.demo",
    "doc": "One bedside monitor reading",
    "fields": [
        {"name": "patient_id", "type": "string"},
        {"name": "ts", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "heart_rate", "type": "int"},
        {"name": "systolic_bp", "type": "int"},
        {"name": "diastolic_bp", "type": "int"},
        {"name": "spo2", "type": "int"},
        {"name": "temperature", "type": "double"},
    ],
}
READING_V2: dict[str, Any] = {
    **READING_V1,
    "fields": [
        *READING_V1["fields"],
        {"name": "respiratory_rate", "type": "int", "default": 16, "doc": "breaths per minute"},
    ],
}


def respiratory_rate(event: dict[str, Any]) -> int:
    """What the updated monitors also measure: breaths per minute, faster with a fast heart."""
    return max(8, min(40, round(14 + (int(event["heart_rate"]) - 75) / 8)))


@dataclass
class VitalsLive:
    """The running scenario: live readings in, alerts out."""

    ctx: DemoContext
    deployment: str
    topic: str
    simulator: VitalsSimulator
    producer: AvroProducer
    reader: PredictionReader
    registry: Registry
    subject: str
    alert_lines: int | None = ALERT_LINES  # None: print every alert
    sent: dict[tuple[int, int], Reading] = field(default_factory=dict)
    unresolved: list[Prediction] = field(default_factory=list)
    streamed: int = 0
    injected: int = 0
    scored: int = 0
    scored_episodes: int = 0
    flagged_episodes: int = 0
    false_alarms: int = 0
    alerts_printed: int = 0
    upgraded_at: int | None = None  # readings streamed before the monitors wrote schema v2

    def upgrade(self) -> int:
        """The firmware update: schema v2 registered, readings from now on written with it."""
        schema_id = self.registry.register(
            self.subject, Schema(orjson.dumps(READING_V2).decode(), "AVRO")
        )
        self.producer.use(schema_id, READING_V2)
        self.upgraded_at = self.streamed
        return schema_id

    def send(self, count: int, episode_chance: float) -> None:
        """Produce `count` readings now, each an episode with probability `episode_chance`."""
        now_ms = int(time.time() * 1000)
        for _ in range(count):
            reading = self.simulator.next(episode_chance, ts_ms=now_ms)
            if self.upgraded_at is not None:
                reading.event["respiratory_rate"] = respiratory_rate(reading.event)

            def remember(partition: int, offset: int, reading: Reading = reading) -> None:
                self.sent[(partition, offset)] = reading

            self.producer.send(self.topic, reading.patient_id, reading.event, remember)
            self.streamed += 1
            self.injected += reading.episode is not None
        self.producer.poll()

    def watch(self) -> None:
        """Account for new predictions and print each alert (a prediction labelled anomalous)."""
        self.producer.poll()
        pending, self.unresolved = self.unresolved + self.reader.drain(), []
        for prediction in pending:
            if prediction.shadow:
                continue
            reading = self.sent.pop((prediction.partition, prediction.offset), None)
            if reading is None:  # its delivery report has not been served yet
                self.unresolved.append(prediction)
                continue
            self.scored += 1
            alert = prediction.label is True
            if reading.episode is not None:
                self.scored_episodes += 1
                self.flagged_episodes += alert
            elif alert:
                self.false_alarms += 1
            if alert:
                self._print_alert(reading, prediction)

    def _print_alert(self, reading: Reading, prediction: Prediction) -> None:
        self.alerts_printed += 1
        if self.alert_lines is not None and self.alerts_printed > self.alert_lines:
            return
        # An anomaly detector's score is one number (a list only for multiclass models).
        score = prediction.score if isinstance(prediction.score, float) else 0.0
        why = (
            f"[dim](injected: {reading.episode})[/dim]"
            if reading.episode
            else "[yellow](false alarm: a normal reading)[/yellow]"
        )
        self.ctx.console.print(
            f"    [bold red]ALERT[/bold red]: patient {reading.patient_id} — "
            f"{escape(describe_vitals(reading.event))} — alert the doctor "
            f"[dim]score {score:.2f}[/dim] {why}"
        )

    @property
    def normal_scored(self) -> int:
        return self.scored - self.scored_episodes

    def close(self) -> None:
        self.reader.close()
        with contextlib.suppress(RuntimeError):  # undelivered leftovers do not matter now
            self.producer.flush(10)


def run(ctx: DemoContext) -> VitalsLive:
    """Every step of the scenario; raises ScenarioAborted when a step cannot go on."""
    dataset = ctx.name(SCENARIO)
    model = ctx.name(SCENARIO)
    deployment = ctx.name(SCENARIO)
    topic = ctx.topic(SCENARIO)
    scores_topic = ctx.topic(SCENARIO, "scores")
    simulator = VitalsSimulator(seed=int(ctx.run_id, 16) + 1, patients=PATIENTS)
    registry = Registry.from_settings(ctx.settings)
    subject = f"{topic}-value"

    with ctx.step(
        TITLE, "2.1", f"Create Avro dataset {dataset} (task anomaly) and topic {topic}"
    ) as step:
        # The devices' schema comes first: an Avro dataset is checked against its subject.
        schema_id = registry.register(subject, Schema(orjson.dumps(READING_V1).decode(), "AVRO"))
        created = ctx.api.post(
            "/datasets",
            json={
                "name": dataset,
                "topic": topic,
                "format": "avro",
                "key_field": "patient_id",
                "event_time_field": "ts",
                "task": "anomaly",
                "features": [{"name": n, "type": t} for n, t in VITALS_FEATURES],
                "description": "Bedside monitors (demo): heart rate, blood pressure, SpO2, "
                "temperature per patient; no label.",
                "owner": "carrara demo",
                "create_topic": {"partitions": 3},
            },
        )
        step.detail = (
            f"subject {subject} v1 (schema id {schema_id}); POST /api/v1/datasets → "
            f"{created['name']}: {', '.join(n for n, _ in VITALS_FEATURES)}; no label"
        )
    producer = AvroProducer(ctx.settings.kafka_bootstrap, schema_id, READING_V1)

    with ctx.step(
        TITLE, "2.2", f"Produce {HISTORY_EVENTS:,} normal readings of {PATIENTS} patients"
    ) as step:
        with ctx.progress() as progress:
            task = progress.add_task("readings → Kafka", total=HISTORY_EVENTS)
            for i in range(HISTORY_EVENTS):
                reading = simulator.next()
                producer.send(topic, reading.patient_id, reading.event)
                if i % 500 == 499:
                    progress.update(task, completed=i + 1)
            producer.flush()
            progress.update(task, completed=HISTORY_EVENTS)
        step.detail = f"{HISTORY_EVENTS:,} readings, {HISTORY_EVENTS // PATIENTS} per patient"

    with ctx.step(TITLE, "2.3", "Pin a snapshot of the normal readings") as step:
        version = ctx.api.post(f"/datasets/{dataset}/versions", json={"mode": "latest"})
        step.check(
            version["event_count"] == HISTORY_EVENTS,
            f"the snapshot holds {version['event_count']} events, not {HISTORY_EVENTS}",
        )
        step.detail = f"version {version['number']}: {version['event_count']:,} events"

    with ctx.step(TITLE, "2.4", "Train the autoencoder on normal data") as step:
        run_id = start_run(ctx, dataset, version["number"], "autoencoder", AUTOENCODER, model)
        finished = wait_runs(ctx, {"autoencoder": run_id})["autoencoder"]
        step.check(
            finished["status"] == "succeeded",
            f"autoencoder run {run_id} {finished['status']}: {finished['error']}",
        )
        step.abort_if_failed()
        model_version = versions_by_run(ctx, model)[run_id]
        metrics = finished["metrics"]
        threshold = (finished.get("results") or {}).get("threshold")
        step.check(threshold is not None, "the autoencoder has no alert threshold")
        step.detail = (
            f"{model} v{model_version}: reconstruction-error threshold {threshold:.2f}, "
            f"holdout alert rate {metrics.get('alert_rate', 0):.2%} (target 1%)"
            if threshold is not None
            else f"{model} v{model_version}"
        )

    with ctx.step(TITLE, "2.5", f"Deploy it: alerts go to {scores_topic}") as step:
        TopicAdmin(ctx.settings.kafka_bootstrap).create_topic(
            scores_topic, partitions=3, exist_ok=True
        )
        applied = ctx.api.put(
            f"/deployments/{deployment}",
            json={
                "input_topic": topic,
                "output_topic": scores_topic,
                "key_field": "patient_id",
                "pool": "default",
                "description": "Vital-sign anomaly alerts (carrara demo)",
                "variants": [
                    {"name": "autoencoder", "model": model, "version": model_version, "weight": 100}
                ],
                "reason": "carrara demo: alert the doctor",
            },
        )
        detail = wait_rollout(ctx, deployment)
        step.detail = (
            f"PUT /api/v1/deployments/{deployment} → revision {applied['revision']}; "
            f"{detail['rollout']['summary']}"
        )

    live = VitalsLive(
        ctx,
        deployment,
        topic,
        simulator,
        producer,
        PredictionReader(ctx.settings.kafka_bootstrap, scores_topic, deployment),
        registry,
        subject,
    )
    try:
        _stream(ctx, live)
        _count(ctx, live)
    except BaseException:
        live.close()
        raise
    return live


def _stream(ctx: DemoContext, live: VitalsLive) -> None:
    with ctx.step(
        TITLE,
        "2.6",
        f"Stream {LIVE_EVENTS:,} live readings ({LIVE_RATE}/s), {EPISODE_CHANCE:.0%} with an "
        "injected episode, Avro schema v1 then v2; alerts as they arrive",
    ) as step:
        pacer = Pacer(LIVE_RATE)
        while live.streamed < LIVE_EVENTS:
            if live.upgraded_at is None and live.streamed >= LIVE_EVENTS // 2:
                schema_id = live.upgrade()
                ctx.console.print(
                    f"    [cyan]Firmware update[/cyan]: the monitors now write schema v2 (adds "
                    f"respiratory_rate, default 16; schema id {schema_id}), mid-stream"
                )
            due = min(pacer.due(), LIVE_EVENTS - live.streamed)
            if live.upgraded_at is None:
                due = min(due, LIVE_EVENTS // 2 - live.streamed)
            live.send(due, EPISODE_CHANCE)
            live.watch()
            time.sleep(0.05)
        live.producer.flush()
        deadline = time.monotonic() + PREDICTION_TIMEOUT_S
        while live.scored < LIVE_EVENTS and time.monotonic() < deadline:
            live.watch()
            time.sleep(0.2)
        if live.alerts_printed > ALERT_LINES:
            ctx.console.print(f"    … and {live.alerts_printed - ALERT_LINES} more alerts")
        step.check(
            live.scored == LIVE_EVENTS,
            f"predictions for {live.scored} of {LIVE_EVENTS} readings after "
            f"{PREDICTION_TIMEOUT_S} s",
        )
        step.detail = (
            f"{live.streamed:,} readings ({live.injected} episodes; schema v2 from reading "
            f"{(live.upgraded_at or 0) + 1:,}) → {live.scored:,} predictions, "
            f"{live.alerts_printed} alerts"
        )


def _count(ctx: DemoContext, live: VitalsLive) -> None:
    with ctx.step(TITLE, "2.7", "Injected episodes flagged vs. false alarms") as step:
        hit_rate = live.flagged_episodes / live.scored_episodes if live.scored_episodes else 0.0
        false_rate = live.false_alarms / live.normal_scored if live.normal_scored else 0.0
        step.check(live.scored_episodes > 0, "no episode was injected")
        step.check(
            hit_rate >= 0.5 and hit_rate >= 5 * false_rate,
            f"episodes flagged at {hit_rate:.0%}, normal readings at {false_rate:.1%}: "
            "not clearly higher",
        )
        step.detail = (
            f"{live.flagged_episodes} of {live.scored_episodes} episodes flagged "
            f"({hit_rate:.0%}); {live.false_alarms} false alarms in {live.normal_scored:,} "
            f"normal readings ({false_rate:.1%})"
        )


def recent_alerts(ctx: DemoContext, deployments: list[str]) -> list[dict[str, Any]]:
    """Platform alerts (drift, automatic rollback, ...) raised for the demo's deployments."""
    found = []
    for name in deployments:
        page = ctx.api.get(
            "/alerts", params={"deployment": name, "since": ctx.started_at.isoformat()}
        )
        found.extend(page["items"])
    return sorted(found, key=lambda a: a["at"])
