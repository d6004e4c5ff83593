"""The reference incremental operator: a feature set computed event by event with per-key state.

One `FeatureOperator` holds the state of one Kafka partition (a key's events all live in one
partition). Training replay, previews and scorers all run this code, so a feature is computed the
same way offline and online. The semantics (README: Features in SQL), event by event in log order:

1. **Expiry**: if the partition clock (the largest event time processed so far in the partition)
   is more than the horizon H (the longest window) past the key's latest time, the key's state is
   forgotten first, as if the key had never been seen.
2. **Event time**: the dataset's time field (or the record timestamp) in epoch ms, capped at the
   key's latest time: an older event is processed at the key's latest time (out-of-order input
   never moves a key's clock backwards).
3. **Late events**: an event more than `allowed_lateness_ms` older than its key's latest time is
   late. Policy `cap` (default): it joins the state at the capped time like any other event.
   Policy `drop`: its own row is computed (at the capped time, itself included), but it never joins
   the state, so later events do not see it.
4. **Windows**: the event's window of width W is [t - W, t] over the key's events already seen in
   log order plus the event itself; an event sharing a timestamp with a later offset does not see
   it. Aggregates skip NULLs (NaN is NULL): COUNT(*) counts events, COUNT(x) non-NULL values,
   SUM/AVG/MIN/MAX/STDDEV are NULL over no values (STDDEV_SAMP over fewer than two).
   LAG(x, n) is x of the key's n-th previous event still within H, else NULL (or the default).
5. Results depend only on the events inside the window, never on how the state got there: sums
   are exactly rounded (`math.fsum`), so a replay that warmed up from H earlier and a scorer that
   restored its state from a changelog give bit-identical features.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np

from carrara.features.plan import Aggregate, FeaturePlan, LatePolicy

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class KeyState:
    """One key's events within the horizon: times (ms, ascending) and stored argument values."""

    __slots__ = ("latest", "times", "values")

    def __init__(self, latest: int) -> None:
        self.latest = latest
        self.times: list[int] = []
        self.values: list[tuple[Any, ...]] = []

    def to_bytes(self) -> bytes:
        return _encoder.encode([self.latest, self.times, [list(v) for v in self.values]])

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyState:
        latest, times, values = _decoder.decode(data)
        state = cls(int(latest))
        state.times = [int(t) for t in times]
        state.values = [tuple(v) for v in values]
        return state


@dataclass(frozen=True)
class ProcessedEvent:
    """What the operator did with one event: its features, its time, and whether it was late."""

    values: list[Any]  # one per plan output: float (NaN for NULL) or a category (None)
    time_ms: int  # the event time used (after capping)
    late: bool
    stored: bool  # joined the key's state


def _number(v: Any) -> float | None:
    if v is None or isinstance(v, str):
        return None
    return float(v)


def _aggregate(kind: Aggregate, values: list[Any]) -> Any:
    if kind is Aggregate.count_values:
        return float(sum(1 for v in values if v is not None))
    if kind is Aggregate.count_distinct:
        return float(len({v for v in values if v is not None}))
    if kind in (Aggregate.min, Aggregate.max):
        present = [v for v in values if v is not None]
        if not present:
            return None
        if any(isinstance(v, str) for v in present):
            present = [v for v in present if isinstance(v, str)]
        return min(present) if kind is Aggregate.min else max(present)
    numbers = [x for x in map(_number, values) if x is not None]
    n = len(numbers)
    if kind is Aggregate.sum:
        return math.fsum(numbers) if n else None
    if kind is Aggregate.avg:
        return math.fsum(numbers) / n if n else None
    needed = 2 if kind is Aggregate.stddev_samp else 1
    if n < needed:
        return None
    if any(math.isinf(x) for x in numbers):
        return None
    mean = math.fsum(numbers) / n
    squares = math.fsum((x - mean) * (x - mean) for x in numbers)
    return math.sqrt(squares / (n - 1 if kind is Aggregate.stddev_samp else n))


class FeatureOperator:
    """A feature set over one partition's events, in log order."""

    def __init__(self, plan: FeaturePlan) -> None:
        self.plan = plan
        self.keys: dict[Any, KeyState] = {}
        self.clock: int | None = None  # the largest event time processed (ms)
        self._horizon = plan.horizon_ms
        self._drop_late = plan.late_policy is LatePolicy.drop
        self._lateness = plan.allowed_lateness_ms
        self._widths = sorted({w.window_ms for w in plan.windows if w.window_ms is not None})
        self.changed: set[Any] = set()  # keys whose state changed since `take_changes`

    def process(self, key: Any, time_ms: int, event: Mapping[str, Any]) -> ProcessedEvent:
        """The features of one event (then the event joins its key's state, per the policy)."""
        plan = self.plan
        state = self.keys.get(key)
        if (
            state is not None
            and self.clock is not None
            and self.clock - state.latest > (self._horizon)
        ):
            state = None  # expired: as if the key had never been seen
            del self.keys[key]
            self.changed.add(key)
        late = False
        t = time_ms
        if state is not None and time_ms < state.latest:
            late = state.latest - time_ms > self._lateness
            t = state.latest
        seconds = t / 1000.0
        time_context = [seconds]
        row_args = tuple(arg(event, time_context) for arg in plan.args)
        results: list[Any] = []
        if plan.windows:
            if state is not None:
                self._evict(state, t)
                times, values = state.times, state.values
            else:
                times, values = [], []
            starts = {w: bisect_left(times, t - w) for w in self._widths}
            for call in plan.windows:
                if call.aggregate is Aggregate.lag:
                    n, i = call.lag_offset, call.arg
                    assert i is not None
                    results.append(values[-n][i] if len(values) >= n else None)
                    continue
                assert call.window_ms is not None
                start = starts[call.window_ms]
                if call.aggregate is Aggregate.count_star:
                    results.append(float(len(times) - start + 1))
                    continue
                assert call.arg is not None
                i = call.arg
                column = [v[i] for v in values[start:]]
                column.append(row_args[i])
                results.append(_aggregate(call.aggregate, column))
        stored = not (late and self._drop_late)
        if stored and plan.windows:
            if state is None:
                state = self.keys[key] = KeyState(t)
            state.times.append(t)
            state.values.append(row_args)
            state.latest = t
            self.changed.add(key)
        if self.clock is None or t > self.clock:
            self.clock = t
        results.append(seconds)
        out = []
        for output in plan.outputs:
            value = output.compute(event, results)
            if output.kind == "number":
                value = math.nan if value is None else float(value)
            out.append(value)
        return ProcessedEvent(out, t, late, stored)

    def _evict(self, state: KeyState, t: int) -> None:
        cut = bisect_left(state.times, t - self._horizon)
        if cut:
            del state.times[:cut]
            del state.values[:cut]

    # -- state: expiry, changelog, restore --------------------------------------------------

    def expire(self) -> list[Any]:
        """Forget keys idle for more than the horizon (invisible in results); the keys dropped."""
        if self.clock is None:
            return []
        limit = self.clock - self._horizon
        gone = [k for k, s in self.keys.items() if s.latest < limit]
        for k in gone:
            del self.keys[k]
        self.changed.update(gone)
        return gone

    def take_changes(self) -> dict[Any, bytes | None]:
        """The state of each key changed since the last call (None: deleted), for a changelog."""
        changes = {k: (s.to_bytes() if (s := self.keys.get(k)) else None) for k in self.changed}
        self.changed.clear()
        return changes

    def restore(self, items: Iterable[tuple[Any, bytes | None]]) -> None:
        """Load keys' state (a changelog read in order; None deletes), and the clock from it."""
        for key, data in items:
            if data is None:
                self.keys.pop(key, None)
                continue
            state = KeyState.from_bytes(data)
            self.keys[key] = state
            if self.clock is None or state.latest > self.clock:
                self.clock = state.latest
        self.changed.clear()

    def state_bytes(self) -> int:
        """An estimate of the state's size: the serialised bytes of every key."""
        return sum(len(s.to_bytes()) for s in self.keys.values())


def process_rows(
    operator_of: Callable[[int], FeatureOperator],
    plan: FeaturePlan,
    partitions: Sequence[int] | Any,
    keys: Sequence[Any],
    times: Sequence[float] | Any,
    fields_of: Callable[[int], Mapping[str, Any]],
) -> tuple[np.ndarray, int]:
    """Rows of events in log order through their partitions' operators: (features, late count).

    The one loop training replay and scorers share. `fields_of(i)` is row i's fields
    (`plan.decoded_fields`); a keyless event (key None) is computed against an empty history and
    joins no state: without a key it belongs to no entity.
    """
    n = len(keys)
    out = np.full((n, len(plan.outputs)), np.nan)
    late = 0
    for i in range(n):
        key = keys[i]
        time_ms = round(float(times[i]))
        if key is None:
            result = FeatureOperator(plan).process(None, time_ms, fields_of(i))
        else:
            result = operator_of(int(partitions[i])).process(key, time_ms, fields_of(i))
        out[i] = result.values
        late += result.late
    return out, late


class PartitionedOperator:
    """One `FeatureOperator` per partition (training replay reads every partition at once)."""

    def __init__(self, plan: FeaturePlan) -> None:
        self.plan = plan
        self.partitions: dict[int, FeatureOperator] = {}

    def of(self, partition: int) -> FeatureOperator:
        op = self.partitions.get(partition)
        if op is None:
            op = self.partitions[partition] = FeatureOperator(self.plan)
        return op

    def process(
        self, partition: int, key: Any, time_ms: int, event: Mapping[str, Any]
    ) -> ProcessedEvent:
        return self.of(partition).process(key, time_ms, event)


# Epoch numbers below this are seconds (as the training decoder reads event times).
_SECONDS_BELOW = 1e11


def event_time_ms(value: Any) -> int | None:
    """An event time field's value (ISO 8601 text or an epoch number) in epoch ms, or None."""
    from datetime import UTC, datetime

    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        if math.isnan(value) or math.isinf(value):
            return None
        ms = value * 1000.0 if abs(value) < _SECONDS_BELOW else float(value)
        return round(ms)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return round(moment.timestamp() * 1000.0)
    return None
