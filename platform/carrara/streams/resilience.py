"""What every long-lived Kafka loop needs to survive a broker outage, and to say when it cannot.

- `CallGuard` runs a blocking client call (commit, flush, send offsets, close) on a worker thread
  with a deadline. librdkafka ignores the timeout of `send_offsets_to_transaction` while the group
  coordinator is unreachable (confluentinc/librdkafka#5456, #5511: it waited forever after a broker
  restart here); no loop may wait on such a call forever. A call past its deadline raises
  `ClientHung`: the client is then abandoned and rebuilt (its stuck worker thread is leaked,
  which is bounded by one per outage and cheaper than a stalled scorer).
- `classify` turns a `KafkaException` into what to do: retry, abort the transaction, rebuild.
- `Backoff`: capped exponential backoff with jitter between attempts.
- `LoopHealth`: when the loop last made progress (a batch done, or nothing to do), whether it is
  stalled, and the two log lines an operator reads: when the loop lost the broker and when (and
  after how long, having done what) it recovered.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Generic, Literal, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException

log = structlog.get_logger(__name__)
T = TypeVar("T")

Remedy = Literal["fatal", "abort", "retry", "fail"]

# Errors that mean "the cluster cannot be reached right now" (reported through `error_cb`).
_CONNECTION_ERRORS = frozenset(
    {KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT, KafkaError._RESOLVE}
)


class ClientHung(Exception):
    """A client call did not return within its deadline: the client must be rebuilt."""


class ClientBroken(Exception):
    """The client is unusable (fatal error, fenced, hung): rebuild it and resume from commits."""


def kafka_error(exc: BaseException) -> KafkaError | None:
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return exc.args[0]
    return None


def classify(exc: BaseException) -> Remedy:
    """What a failed client call asks for, following librdkafka's transactional API contract."""
    error = kafka_error(exc)
    if error is None:
        return "fail"
    if error.fatal():
        return "fatal"
    if error.txn_requires_abort():
        return "abort"
    if error.retriable() or error.code() in (KafkaError._TIMED_OUT, *_CONNECTION_ERRORS):
        return "retry"
    return "fail"


class CallGuard:
    """Runs blocking calls of one client on a worker thread, each with a deadline.

    After a `ClientHung` the guard is poisoned (its worker is still inside the hung call) and
    every later call raises `ClientHung` at once: build a new client and a new guard.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._work: Callable[[], None] | None = None
        self._ready = threading.Condition(self._lock)
        self._hung: str | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"guard-{name}", daemon=True)
        self._thread.start()

    def call(self, what: str, fn: Callable[..., T], *args: Any, deadline_s: float) -> T:
        """Run `fn(*args)` and wait for it: its result, its exception, or `ClientHung`."""
        return self.submit(what, fn, *args, deadline_s=deadline_s).result()

    def submit(self, what: str, fn: Callable[..., T], *args: Any, deadline_s: float) -> Pending[T]:
        """Start `fn(*args)` on the worker and return at once (the caller does other work
        meanwhile); `result()` of what it returns waits, within the same deadline.
        """
        if self._hung is not None:
            raise ClientHung(f"{self.name}: still inside {self._hung}")
        future: Future[T] = Future()

        def work() -> None:
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to the caller
                future.set_exception(exc)

        with self._ready:
            if self._work is not None:
                raise RuntimeError(f"{self.name}: a call is already waiting")
            self._work = work
            self._ready.notify()
        return Pending(self, what, future, time.monotonic() + deadline_s)

    def _poison(self, what: str) -> None:
        self._hung = what

    def close(self) -> None:
        """Let the worker thread end (unless it is stuck in a hung call: it is abandoned)."""
        with self._ready:
            self._closed = True
            self._ready.notify()

    def _serve(self) -> None:
        while True:
            with self._ready:
                while self._work is None and not self._closed:
                    self._ready.wait()
                if self._work is None:
                    return
                work, self._work = self._work, None
            work()


class Pending(Generic[T]):
    """A call running on a `CallGuard`'s worker, with its deadline."""

    def __init__(self, guard: CallGuard, what: str, future: Future[T], deadline: float) -> None:
        self.guard, self.what, self.future, self.deadline = guard, what, future, deadline

    def done(self) -> bool:
        return self.future.done()

    def settled(self) -> bool:
        """Done, or past its deadline (then `result()` says the client hung): stop waiting."""
        return self.future.done() or time.monotonic() >= self.deadline

    def wait(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` (never past the deadline); whether it is done."""
        try:
            self.future.exception(
                timeout=max(0.0, min(timeout_s, self.deadline - time.monotonic()))
            )
        except TimeoutError:
            return False
        return True

    def result(self) -> T:
        """Its result or exception; `ClientHung` (and the guard poisoned) past the deadline."""
        try:
            return self.future.result(timeout=max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            if self.future.done():
                return self.future.result()
            self.guard._poison(self.what)
            raise ClientHung(f"{self.guard.name}: {self.what} did not return in time") from None


class Backoff:
    """Capped exponential backoff with full jitter; `reset()` after a success."""

    def __init__(self, initial_s: float = 0.5, cap_s: float = 10.0) -> None:
        self.initial_s = initial_s
        self.cap_s = cap_s
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.initial_s * 2**self.attempt)
        self.attempt += 1
        return random.uniform(ceiling / 2, ceiling)  # noqa: S311 - jitter, not security

    def reset(self) -> None:
        self.attempt = 0


class LoopHealth:
    """Progress and trouble of one loop; thread-safe (written by the loop, read by probes)."""

    def __init__(self, loop: str, stall_after_s: float, **context: Any) -> None:
        self.loop = loop
        self.stall_after_s = stall_after_s
        self.context = context
        self._lock = threading.Lock()
        self._last_progress = time.monotonic()
        self._last_beat = self._last_progress
        self._trouble_since: float | None = None
        self._broker_down = False
        self._actions: dict[str, int] = {}
        self.last_error: str | None = None
        self._stalled_logged = False
        self._seen_errors: set[str] = set()

    # --- written by the loop ----------------------------------------------------------------

    def progress(self) -> None:
        """A unit of work is done (a batch committed), or the loop is caught up with nothing to do.

        Ends a period of trouble: logs once how long it lasted and what was done about it.
        """
        with self._lock:
            now = time.monotonic()
            self._last_progress = now
            if self._trouble_since is None and not self._stalled_logged:
                return
            waited = now - (self._trouble_since or now)
            actions = dict(self._actions)
            self._trouble_since = None
            self._broker_down = False
            self._actions.clear()
            self._stalled_logged = False
        log.info(
            "loop recovered",
            loop=self.loop,
            waited_s=round(waited, 1),
            actions=actions or None,
            **self.context,
        )

    def trouble(self, error: str, action: str | None = None, *, connection: bool = False) -> None:
        """Something failed (broker unreachable, transaction aborted, client rebuilt).

        The first trouble after healthy progress is logged as a warning; the rest of the
        episode only counts the actions taken, for the recovery line.
        """
        with self._lock:
            self.last_error = error[:1000]
            if action is not None:
                self._actions[action] = self._actions.get(action, 0) + 1
            first = self._trouble_since is None
            if first:
                self._trouble_since = time.monotonic()
        if first:
            event = "loop lost the broker" if connection else "loop error"
            log.warning(event, loop=self.loop, error=error, **self.context)

    def on_consumer_error(self, error: KafkaError) -> None:
        """An error event returned by `consume()`.

        Connection errors are an outage; others (a topic deleted under a subscription, say) are
        logged once per distinct message, not as trouble: they do not stop the loop's progress
        and would otherwise flap lost/recovered lines at every metadata refresh.
        """
        if error.code() == KafkaError._PARTITION_EOF:
            return
        if error.code() in _CONNECTION_ERRORS:
            self.trouble(f"consumer: {error}", connection=True)
            return
        text = str(error)
        with self._lock:
            seen = text in self._seen_errors
            if not seen and len(self._seen_errors) < 100:
                self._seen_errors.add(text)
        if not seen:
            log.warning("consumer error", loop=self.loop, error=text, **self.context)

    def on_client_error(self, error: KafkaError) -> None:
        """librdkafka's `error_cb`. Every broker down starts (or continues) an outage; a single
        failed connection is only remembered (librdkafka reconnects by itself, and such reports
        also arrive late, after a recovery); a fatal error is trouble the loop acts on.
        """
        if error.code() == KafkaError._ALL_BROKERS_DOWN:
            if _some_brokers_up(error.str()):
                return  # a late report ("0/2 brokers are down"), delivered after a recovery
            with self._lock:
                self._broker_down = True
            self.trouble(str(error), connection=True)
        elif error.fatal():
            self.trouble(str(error))
        elif error.code() in _CONNECTION_ERRORS:
            self.last_error = str(error)[:1000]

    def beat(self) -> None:
        """The loop turned (whether or not it made progress): it is not wedged in a call."""
        self._last_beat = time.monotonic()

    # --- read by probes ---------------------------------------------------------------------

    def wedged(self) -> bool:
        """The loop itself has not turned for `stall_after_s`: stuck in a call, or dead."""
        return time.monotonic() - self._last_beat > self.stall_after_s

    def report(self) -> dict[str, object]:
        """For health endpoints: stalled or not, for how long, and the last error if relevant."""
        stalled = self.is_stalled()
        return {
            "stalled": stalled,
            "wedged": self.wedged(),
            "seconds_since_progress": round(self.age_s(), 1),
            "last_error": self.last_error if stalled or self.in_trouble else None,
        }

    @property
    def broker_down(self) -> bool:
        """librdkafka reported every broker down and no progress has been made since."""
        return self._broker_down

    @property
    def in_trouble(self) -> bool:
        return self._trouble_since is not None

    def age_s(self) -> float:
        """Seconds since the last progress."""
        return time.monotonic() - self._last_progress

    def is_stalled(self) -> bool:
        """No progress for longer than `stall_after_s`: logged once as an error per episode."""
        stalled = self.age_s() > self.stall_after_s
        if stalled and not self._stalled_logged:
            self._stalled_logged = True
            log.error(
                "loop stalled",
                loop=self.loop,
                seconds_without_progress=round(self.age_s(), 1),
                last_error=self.last_error,
                **self.context,
            )
        return stalled


def _some_brokers_up(text: str) -> bool:
    """librdkafka words it "N/M brokers are down": True when N < M."""
    match = re.search(r"(\d+)/(\d+) brokers are down", text)
    return match is not None and int(match.group(1)) < int(match.group(2))


def caught_up(consumer: Consumer, topic: str | None = None, timeout_s: float = 1.0) -> bool:
    """Whether the broker answers and every assigned partition is consumed to its end.

    A consumer with nothing to read is idle, not stuck. A metadata round trip proves the broker
    answers (an empty assignment alone proves nothing: a consumer that lost its coordinator has
    none); the high watermarks are asked fresh, never from the cache.
    """
    try:
        consumer.list_topics(topic, timeout=timeout_s)
        positions = consumer.position(consumer.assignment())
        # Nothing consumed yet from a partition (no position): where the group committed is
        # where it stands; a partition assigned already read to its end has no position.
        unknown = [tp for tp in positions if tp.offset < 0]
        committed = (
            {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(unknown, timeout_s)}
            if unknown
            else {}
        )
        for tp in positions:
            offset = tp.offset if tp.offset >= 0 else committed.get((tp.topic, tp.partition), -1)
            low, high = consumer.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            if (offset < 0 and high > low) or (offset >= 0 and offset < high):
                return False
    except KafkaException:
        return False
    return True
