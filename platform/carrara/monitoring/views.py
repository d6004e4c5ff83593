"""What the API and the UI show of monitoring, remembered for a few seconds per process.

A deployment's metrics and verdict are read by every dashboard that shows it (each polls every
5-30 s), by the overview (one verdict per running deployment) and by scripts: the same answer
computed again and again. `ViewCache` keeps each answer for `ttl_s` seconds
(`CARRARA_MONITORING_CACHE_S`, default 5; 0 turns it off), so:

- an answer is at most `ttl_s` seconds older than the monitor's last write (the monitor commits
  its aggregates every few seconds anyway);
- a new revision (a PUT, a rollback, a stop) is seen at once: the key holds the revision the
  answer was computed for, looked up on every request (one indexed query);
- a window given without `to` ("the last hour") ends when the answer was computed.

Keys are (view, deployment, revision, the parameters as given). At most `max_entries` answers are
kept; the cache starts over when full. Errors (unknown deployment, invalid window) are not kept.
One caller computes a key while the others asking for it wait (no stampede when it expires).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import distinct_on
from sqlalchemy.orm import Session

from carrara.deployments import service as deployments
from carrara.errors import DomainError, NotFound
from carrara.models import Deployment, DeploymentRevision
from carrara.monitoring.metrics import metrics
from carrara.monitoring.queries import DEFAULT_WINDOW, last_running_revision
from carrara.monitoring.schemas import MetricsOut, VerdictOut
from carrara.monitoring.verdict import verdict_of

T = TypeVar("T")


class _Flight:
    """One computation of a key in progress; callers asking for the key meanwhile wait for it."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: object = None
        self.failed = False


class ViewCache:
    """Answers by key for `ttl_s` seconds (thread-safe: endpoints run in a thread pool).

    A key is computed by one caller at a time: the others asking for it meanwhile wait for that
    answer (under load, an expired key used to be computed by every request that asked for it
    until one finished). Each answer lives a little less than `ttl_s` (up to 20% less, at
    random), so keys computed together do not all expire together.
    """

    def __init__(self, ttl_s: float, max_entries: int = 2_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[Hashable, tuple[float, object]] = {}  # key -> (expires at, answer)
        self._flights: dict[Hashable, _Flight] = {}
        self._lock = threading.Lock()

    def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The answer remembered for `key` if younger than its TTL, else `compute()` (kept)."""
        if self.ttl_s <= 0:
            return compute()
        entry = self._entries.get(key)
        if entry is not None and time.monotonic() < entry[0]:
            return entry[1]  # type: ignore[return-value]  # stored by this key's compute
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and time.monotonic() < entry[0]:
                return entry[1]  # type: ignore[return-value]
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if not leader:
            flight.done.wait()
            if not flight.failed:
                return flight.value  # type: ignore[return-value]
            return compute()  # the leader's error is not shared: this caller gets its own
        started = time.monotonic()  # an answer's age counts from before it was computed
        try:
            value = compute()
            flight.value = value
        except BaseException:
            flight.failed = True
            raise
        finally:
            with self._lock:
                del self._flights[key]
                if not flight.failed:
                    if len(self._entries) >= self.max_entries:
                        self._entries.clear()
                    lifetime = self.ttl_s * (1 - 0.2 * random.random())  # noqa: S311 - jitter
                    self._entries[key] = (started + lifetime, flight.value)
            flight.done.set()
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def _cached(cache: ViewCache | None, key: Hashable, compute: Callable[[], T]) -> T:
    return compute() if cache is None else cache.get_or_compute(key, compute)


def metrics_view(
    session: Session,
    name: str,
    start: datetime | None,
    end: datetime | None,
    bucket: str,
    cache: ViewCache | None = None,
    *,
    default: timedelta = DEFAULT_WINDOW,
) -> MetricsOut:
    """`metrics` as the API shows it, from `cache` when it was computed for this revision less
    than its TTL ago. Without `start`, the window is the last `default` up to `end` (or now)."""
    key = ("metrics", name, _revision_id(session, name), start, end, bucket, default)
    return _cached(
        cache,
        key,
        lambda: MetricsOut.model_validate(
            metrics(session, name, start, end, bucket, default=default)
        ),
    )


def verdict_view(session: Session, name: str, cache: ViewCache | None = None) -> VerdictOut:
    """`verdict` as the API shows it, from `cache` as `metrics_view` says."""

    def compute() -> VerdictOut:
        deployment, _ = deployments.get_deployment(session, name)
        return VerdictOut.model_validate(
            verdict_of(session, name, last_running_revision(session, deployment))
        )

    return _cached(cache, ("verdict", name, _revision_id(session, name)), compute)


def _revision_id(session: Session, name: str) -> int:
    """The id of the last revision of `name` that had a spec (one indexed query: what a cached
    answer is checked against); NotFound as `get_deployment` says when there is none."""
    found = session.scalar(
        select(DeploymentRevision.id)
        .join(Deployment, Deployment.id == DeploymentRevision.deployment_id)
        .where(Deployment.name == name, func.jsonb_typeof(DeploymentRevision.spec) == "object")
        .order_by(DeploymentRevision.number.desc())
        .limit(1)
    )
    if found is None:
        deployments.get_deployment(session, name)  # raises NotFound with the usual message
        raise NotFound(f"deployment '{name}' never had a spec")
    return found


def _verdict(
    session: Session, name: str, revision: DeploymentRevision, cache: ViewCache | None
) -> VerdictOut:
    return _cached(
        cache,
        ("verdict", name, revision.id),
        lambda: VerdictOut.model_validate(verdict_of(session, name, revision)),
    )


def verdict_views(
    session: Session, names: Sequence[str], cache: ViewCache | None = None
) -> dict[str, VerdictOut | DomainError]:
    """The verdict of each of `names` (an overview's lines): their revisions in one query, then
    each verdict from `cache` or computed; a deployment's error is its entry."""
    latest = (
        select(DeploymentRevision, Deployment.name)
        .join(Deployment, Deployment.id == DeploymentRevision.deployment_id)
        .where(
            Deployment.name.in_(names),
            func.jsonb_typeof(DeploymentRevision.spec) == "object",
        )
        .order_by(Deployment.name, DeploymentRevision.number.desc())
        .ext(distinct_on(Deployment.name))
    )
    revisions = {str(n): r for r, n in session.execute(latest)} if names else {}
    found: dict[str, VerdictOut | DomainError] = {}
    for name in names:
        revision = revisions.get(name)
        try:
            if revision is None:
                raise NotFound(f"deployment '{name}' not found")
            found[name] = _verdict(session, name, revision, cache)
        except DomainError as exc:
            found[name] = exc
    return found
