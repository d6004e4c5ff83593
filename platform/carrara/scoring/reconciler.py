"""Reconcile this scorer with the deployments topic: the control plane pushes, scorers converge.

On start the whole compacted topic is read up to its end, keeping the latest revision of each
deployment; only then are models loaded (older revisions are never loaded for nothing). After
that every new record is applied as it arrives. For a revision of a deployment in our pool:
load every variant's model version (cached by version), validate it, build the serving state and
hand it to the deployment's runner, which switches between two micro-batches. If any variant fails
to load or validate, the revision is reported failed and the previous one keeps serving.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition

from carrara.scoring import metrics
from carrara.scoring.batch import ServingState, build_state
from carrara.scoring.feature_state import changelog_topic
from carrara.scoring.runner import DeploymentRunner, dead_letter_topic
from carrara.secret_keys import deployment_signing_keys
from carrara.settings import Settings
from carrara.streams.client_config import connection_config, producer_config
from carrara.streams.consumed import position
from carrara.streams.deployment_spec import DeploymentSpec, decode_spec
from carrara.streams.event_codec import FeatureSpec
from carrara.streams.record_signing import header_value, record_problem
from carrara.streams.resilience import Backoff
from carrara.streams.scorer_status import (
    DeploymentStatus,
    ScorerStatus,
    encode_status,
)
from carrara.streams.topics import TopicAdmin

log = structlog.get_logger(__name__)


@dataclass
class Tracked:
    """What the scorer knows about one deployment."""

    desired: DeploymentSpec
    state: str = "loading"  # loading | serving | stalled | failed | stopped
    last_error: str | None = None
    runner: DeploymentRunner | None = None


class Reconciler:
    def __init__(self, settings: Settings, pool: str, instance_id: str, cache: Any) -> None:
        self.settings = settings
        self.pool = pool
        self.instance_id = instance_id
        self.cache = cache
        self.tracked: dict[str, Tracked] = {}
        self.caught_up = threading.Event()
        self.stop_event = threading.Event()
        self.started_at = datetime.now(UTC)
        self._admin = TopicAdmin(settings.kafka_bootstrap, settings)
        self._status_producer = Producer(producer_config(settings.kafka_bootstrap, settings))
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._last_status = 0.0
        self._status_topic = settings.scorer_status_topic
        # The reconciler loop's own heartbeat: a loop stuck in a call is a dead scorer.
        self._beat = time.monotonic()
        # Records are accepted only if keyed by their deployment's name and, with signing keys
        # configured, signed by the control plane (`_accept`).
        self._signing_keys = deployment_signing_keys(settings)
        self._refused: dict[str, str] = {}  # deployment -> why its latest record was refused

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def healthy(self) -> tuple[bool, dict[str, object]]:
        """Liveness: the reconciler loop turns and no deployment's scoring loop is stalled.

        A stalled loop (events waiting, nothing completed for `stall_timeout_s`) fails it, so the
        orchestrator restarts the process; the detail says which and why.
        """
        beat_age = time.monotonic() - self._beat
        stalled = {
            name: t.last_error
            for name, t in self.tracked.items()
            if t.state == "stalled" and t.runner is not None
        }
        reconciler_ok = self.alive and beat_age <= self.settings.stall_timeout_s
        detail: dict[str, object] = {"reconciler": reconciler_ok, "stalled": stalled}
        return reconciler_ok and not stalled, detail

    def stop(self) -> None:
        """Stop reconciling, let every runner finish and commit its batch, say goodbye."""
        self.stop_event.set()
        self._thread.join(30)
        for tracked in self.tracked.values():
            if tracked.runner is not None:
                tracked.runner.stop()
        self._publish_status(stopping=True)
        self._status_producer.produce(self._status_topic, key=self.instance_id, value=None)
        self._status_producer.flush(10)

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready once caught up with the topic and every deployment of the pool is serving."""
        states = {name: t.state for name, t in self.tracked.items()}
        ready = self.caught_up.is_set() and all(
            s in ("serving", "stopped", "stalled") for s in states.values()
        )
        return ready, {"caught_up": self.caught_up.is_set(), "deployments": states}

    # --- the loop ---------------------------------------------------------------------------

    def _consumer(self) -> tuple[Consumer, dict[int, int]]:
        consumer = Consumer(
            {
                **connection_config(self.settings.kafka_bootstrap, self.settings),
                "group.id": f"carrara-scorer-reconciler-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
            }
        )
        topic = self.settings.deployments_topic
        self._admin.ensure_compacted_topic(topic)
        partitions = self._admin.partitions(topic)
        ends = {}
        for p in partitions:
            ends[p] = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        return consumer, ends

    def _run(self) -> None:
        backoff = Backoff(initial_s=1.0, cap_s=10.0)
        while not self.stop_event.is_set():
            self._beat = time.monotonic()
            try:
                self._follow()
            except KafkaException as exc:  # Kafka unreachable (at start, or mid-way): retry
                self._check_runners()  # stall detection goes on while the broker is away
                log.warning(
                    "reconciler cannot read the deployments topic; retrying", error=str(exc)
                )
                self.stop_event.wait(backoff.next_delay())
            except Exception:
                log.exception("reconciler error; retrying")
                self.stop_event.wait(backoff.next_delay())

    def _follow(self) -> None:
        consumer, ends = self._consumer()
        try:
            latest: dict[str, DeploymentSpec] = {}
            pending = {p for p, end in ends.items() if end > 0}
            while pending and not self.stop_event.is_set():
                for message in consumer.consume(500, timeout=0.5):
                    if message.error() is not None:
                        continue
                    spec = self._accept(message)
                    if spec is not None:
                        latest[spec.name] = spec
                    _, partition, offset = position(message)
                    if offset + 1 >= ends.get(partition, 0):
                        pending.discard(partition)
            for spec in latest.values():
                self.apply(spec)
            self._report_refused()
            self.caught_up.set()
            self._publish_status()
            while not self.stop_event.is_set():
                self._beat = time.monotonic()
                # A revision is applied the moment it arrives: `poll` returns on the first record
                # (`consume(n, timeout)` would wait for n records or the whole timeout).
                first = consumer.poll(0.5)
                polled = [first, *consumer.consume(99, timeout=0)] if first is not None else []
                for message in polled:
                    if message.error() is None:
                        spec = self._accept(message)
                        if spec is not None:
                            self.apply(spec)
                        self._report_refused()
                        self._publish_status()
                self._check_runners()
                if time.monotonic() - self._last_status > self.settings.scorer_status_interval_s:
                    self._publish_status()
        finally:
            consumer.close()

    # --- accepting a record -------------------------------------------------------------------

    def _accept(self, message: Any) -> DeploymentSpec | None:
        """The record's spec, or None: malformed, or refused (not keyed by its deployment's name,
        unsigned or mis-signed while signing keys are configured). A refusal is logged, counted
        (`carrara_scorer_rejected_records_total`) and shown as the deployment's `last_error`;
        whatever was accepted before keeps serving."""
        raw = message.value()
        spec = _decode(raw)
        if spec is None:
            return None
        problem = record_problem(
            self._signing_keys,
            message.key(),
            raw,
            header_value(message.headers()),
            spec.name,
        )
        if problem is None:
            self._refused.pop(spec.name, None)
            return spec
        reason = "key" if problem.startswith("record key") else "signature"
        metrics.REJECTED_RECORDS.labels(reason).inc()
        log.error(
            "deployment record refused",
            deployment=spec.name,
            revision=spec.revision,
            problem=problem,
        )
        self._refused[spec.name] = f"refused revision {spec.revision}: {problem}"[:1000]
        return None

    def _report_refused(self) -> None:
        for name, problem in self._refused.items():
            tracked = self.tracked.get(name)
            if tracked is not None:
                tracked.last_error = problem

    # --- applying a revision -------------------------------------------------------------------

    def apply(self, spec: DeploymentSpec) -> None:
        tracked = self.tracked.get(spec.name)
        ours = not spec.stopped and spec.pool == self.pool
        if not ours:
            if tracked is not None:
                self._stop_runner(tracked)
                tracked.desired = spec
                tracked.state = "stopped"
                tracked.last_error = None
            return
        if (
            tracked is not None
            and tracked.runner is not None
            and tracked.runner.served_revision >= spec.revision
            and tracked.state == "serving"
        ):
            return
        if tracked is None:
            tracked = self.tracked[spec.name] = Tracked(desired=spec)
        tracked.desired = spec
        if tracked.state not in ("serving", "stalled"):
            tracked.state = "loading"
        try:
            state = self._build(spec)
        except Exception as exc:
            tracked.last_error = f"revision {spec.revision}: {type(exc).__name__}: {exc}"[:1000]
            tracked.state = "failed" if tracked.runner is None else tracked.state
            log.error(
                "revision rejected; the previous one keeps serving",
                deployment=spec.name,
                revision=spec.revision,
                error=tracked.last_error,
            )
            return
        runner = tracked.runner
        if runner is not None and runner.alive and runner.input_topic == spec.input_topic:
            runner.swap(state)
        else:
            if runner is not None:
                runner.stop()
            self._ensure_dead_letter_topic(spec)
            tracked.runner = DeploymentRunner(state, self.settings, self.instance_id)
            tracked.runner.start()
        tracked.state = "serving"
        tracked.last_error = None
        self._retain_models()
        log.info("revision applied", deployment=spec.name, revision=spec.revision)

    def _build(self, spec: DeploymentSpec) -> ServingState:
        models: dict[str, Any] = {}
        specs: dict[str, FeatureSpec] = {}
        for variant in spec.variants:
            # The spec pins the files' digests and says whether the version may run code.
            model = self.cache.get(
                variant.model_name,
                variant.model_version,
                digests=variant.artifact_digests,
                trusted_code=variant.trusted_code,
            )
            if model.feature_spec is None:
                raise ValueError(
                    f"{variant.model_name}/{variant.model_version} has no Carrara feature spec; "
                    "only models trained by or uploaded to Carrara can score events"
                )
            models[variant.name] = model
            specs[variant.name] = FeatureSpec.from_dict(model.feature_spec)
            metrics.MODEL_LOAD_SECONDS.labels(
                variant.model_name, str(variant.model_version), model.runtime
            ).set(model.load_seconds)
        assert spec.input_topic is not None
        state = build_state(
            spec,
            models,
            specs,
            dead_letter_topic=dead_letter_topic(spec.input_topic),
            max_event_bytes=self.settings.scorer_max_event_bytes,
        )
        self._ensure_changelogs(spec, state)
        return state

    def _ensure_changelogs(self, spec: DeploymentSpec, state: ServingState) -> None:
        """Each feature set's changelog: compacted, partition for partition with the input."""
        digests = {r.plan.digest for r in (*state.live, *state.shadows) if r.plan is not None}
        if not digests:
            return
        assert spec.input_topic is not None
        partitions = max(1, len(self._admin.partitions(spec.input_topic)))
        for digest in sorted(digests):
            self._admin.create_topic(
                changelog_topic(spec.name, digest),
                partitions,
                config={"cleanup.policy": "compact"},
                exist_ok=True,
            )

    def _ensure_dead_letter_topic(self, spec: DeploymentSpec) -> None:
        assert spec.input_topic is not None
        partitions = max(1, len(self._admin.partitions(spec.input_topic)))
        self._admin.create_topic(dead_letter_topic(spec.input_topic), partitions, exist_ok=True)

    def _stop_runner(self, tracked: Tracked) -> None:
        if tracked.runner is not None:
            tracked.runner.stop()
            metrics.forget_deployment(tracked.runner.name)
            tracked.runner = None

    def _retain_models(self) -> None:
        keep = {
            (v.model_name, v.model_version)
            for t in self.tracked.values()
            if t.runner is not None
            for v in t.runner.state.deployment.variants
        }
        for t in self.tracked.values():
            if t.runner is not None:
                keep |= {(v.model_name, v.model_version) for v in t.desired.variants}
        self.cache.retain(keep)

    def _check_runners(self) -> None:
        """Notice dead and stalled scoring loops (and their recovery); publish what changed."""
        changed = False
        for name, tracked in self.tracked.items():
            runner = tracked.runner
            if runner is None:
                continue
            if not runner.alive and not runner.stop_event.is_set():
                tracked.state = "failed"
                tracked.last_error = runner.error or "the scoring loop stopped"
                tracked.runner = None
                changed = True
                continue
            metrics.LAST_BATCH_AGE.labels(name).set(runner.health.age_s())
            if runner.health.is_stalled():
                if tracked.state != "stalled":
                    tracked.state = "stalled"
                    tracked.last_error = (
                        f"no progress for {runner.health.age_s():.0f} s with events waiting "
                        f"(last error: {runner.health.last_error or 'none'})"
                    )[:1000]
                    changed = True
            elif tracked.state == "stalled":
                tracked.state = "serving"
                tracked.last_error = None
                changed = True
        if changed:
            self._publish_status()

    # --- status ---------------------------------------------------------------------------------

    def status(self, stopping: bool = False) -> ScorerStatus:
        deployments = []
        for name, t in sorted(self.tracked.items()):
            runner = t.runner
            deployments.append(
                DeploymentStatus(
                    name=name,
                    served_revision=runner.served_revision if runner else None,
                    desired_revision=t.desired.revision,
                    state=t.state,  # type: ignore[arg-type]
                    loaded_versions=tuple(
                        f"{v.model_name}/{v.model_version}"
                        for v in runner.state.deployment.variants
                    )
                    if runner
                    else (),
                    last_error=t.last_error,
                    events_scored=runner.events_scored if runner else 0,
                    dead_letters=runner.dead_letters if runner else 0,
                )
            )
        return ScorerStatus(
            instance_id=self.instance_id,
            pool=self.pool,
            host=socket.gethostname(),
            started_at=self.started_at,
            updated_at=datetime.now(UTC),
            interval_s=self.settings.scorer_status_interval_s,
            deployments=tuple(deployments),
            stopping=stopping,
        )

    def _publish_status(self, stopping: bool = False) -> None:
        self._last_status = time.monotonic()
        try:
            self._status_producer.produce(
                self._status_topic, key=self.instance_id, value=encode_status(self.status(stopping))
            )
            self._status_producer.poll(0)
        except (KafkaException, BufferError):
            log.warning("could not publish status")


def _decode(raw: bytes | None) -> DeploymentSpec | None:
    if raw is None:
        return None
    try:
        return decode_spec(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        log.warning("skipping a malformed deployment record", error=str(exc))
        return None
