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
from typing import Any, NamedTuple

import msgspec
import numpy as np

from carrara.features.plan import Aggregate, FeaturePlan, LatePolicy

_encoder = msgspec.msgpack.Encoder()


class KeyState:
    """One key's events within the horizon: times (ms, ascending) and, per stored argument, its
    values (columns, so a window's values are one slice)."""

    __slots__ = ("columns", "latest", "offset", "times")

    def __init__(self, latest: int, width: int = 0) -> None:
        self.latest = latest
        self.times: list[int] = []
        self.columns: list[list[Any]] = [[] for _ in range(width)]
        self.offset = -1  # the log offset of the last event stored (-1: not tracked)

    def to_bytes(self) -> bytes:
        return _encoder.encode([self.latest, self.times, self.columns, self.offset])

    @classmethod
    def from_bytes(cls, data: bytes) -> KeyState:
        wire = _state_decoder.decode(data)
        state = cls(wire.latest)
        state.times = wire.times
        state.columns = wire.columns
        state.offset = wire.offset
        return state


class _Wire(msgspec.Struct, array_like=True, gc=False):
    """A key's state as the changelog holds it: [latest, times, columns] (msgpack)."""

    latest: int
    times: list[int]
    columns: list[list[Any]]
    offset: int = -1


_state_decoder = msgspec.msgpack.Decoder(_Wire)


class ProcessedEvent(NamedTuple):
    """What the operator did with one event: its features, its time, and whether it was late."""

    values: list[Any]  # one per plan output: float (NaN for NULL) or a category (None)
    time_ms: int  # the event time used (after capping)
    late: bool
    stored: bool  # joined the key's state


def _number(v: Any) -> float | None:
    if v is None or isinstance(v, str):
        return None
    return float(v)


def _numbers(values: list[Any], numeric: bool) -> list[float]:
    """The non-NULL numbers of a window's values (a numeric argument holds float or None)."""
    if numeric:
        return values if None not in values else [x for x in values if x is not None]
    return [x for x in map(_number, values) if x is not None]


def _aggregate(kind: Aggregate, values: list[Any], numeric: bool = False) -> Any:
    """`kind` over a window's values (the current event's last); NULLs are skipped."""
    if kind is Aggregate.count_values:
        return float(len(values) - values.count(None))
    if kind is Aggregate.count_distinct:
        distinct = set(values)
        distinct.discard(None)
        return float(len(distinct))
    if kind in (Aggregate.min, Aggregate.max):
        present = values if None not in values else [v for v in values if v is not None]
        if not present:
            return None
        if not numeric and any(isinstance(v, str) for v in present):
            present = [v for v in present if isinstance(v, str)]
        return min(present) if kind is Aggregate.min else max(present)
    numbers = _numbers(values, numeric)
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
        self._width_index = {w: j for j, w in enumerate(self._widths)}
        self._numeric = plan.arg_numeric
        # Per window call: (aggregate, arg, index into the event's window starts, LAG offset).
        self._calls = [
            (
                c.aggregate,
                c.arg,
                -1 if c.window_ms is None else self._width_index[c.window_ms],
                c.lag_offset,
            )
            for c in plan.windows
        ]
        self._outputs = [(o.compute, o.kind == "number") for o in plan.outputs]
        self.changed: set[Any] = set()  # keys whose state changed since `take_changes`

    def process(
        self, key: Any, time_ms: int, event: Mapping[str, Any], offset: int | None = None
    ) -> ProcessedEvent:
        """The features of one event (then the event joins its key's state, per the policy).

        `offset` (scorers): the event's log offset. An event at or before the offset of the last
        event its key stored is already in the state (delivered again after a crash, at least
        once): its row is computed from the state as it is, and it is not stored twice.
        """
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
        row_args = [arg(event, time_context) for arg in plan.args]
        results: list[Any] = []
        again = offset is not None and state is not None and offset <= state.offset
        own = 0 if again else 1  # the event itself, unless the state holds it already
        if self._calls:
            if state is not None:
                self._evict(state, t)
                times, columns = state.times, state.columns
            else:
                times, columns = [], [[] for _ in row_args]
            starts = [bisect_left(times, t - w) for w in self._widths]
            numeric = self._numeric
            for aggregate, i, at, lag in self._calls:
                if aggregate is Aggregate.lag:
                    assert i is not None
                    column = columns[i]
                    back = lag + 1 - own
                    results.append(column[-back] if len(column) >= back else None)
                    continue
                if aggregate is Aggregate.count_star:
                    results.append(float(len(times) - starts[at] + own))
                    continue
                assert i is not None
                window = columns[i][starts[at] :]
                if own:
                    window.append(row_args[i])
                results.append(_aggregate(aggregate, window, numeric[i]))
        stored = not (late and self._drop_late) and not again
        if stored and self._calls:
            if state is None:
                state = self.keys[key] = KeyState(t, len(row_args))
            state.times.append(t)
            for column, value in zip(state.columns, row_args, strict=True):
                column.append(value)
            state.latest = t
            if offset is not None:
                state.offset = offset
            self.changed.add(key)
        if self.clock is None or t > self.clock:
            self.clock = t
        results.append(seconds)
        out = []
        for compute, number in self._outputs:
            value = compute(event, results)
            if number:
                value = math.nan if value is None else float(value)
            out.append(value)
        return ProcessedEvent(out, t, late, stored)

    def _evict(self, state: KeyState, t: int) -> None:
        cut = bisect_left(state.times, t - self._horizon)
        if cut:
            del state.times[:cut]
            for column in state.columns:
                del column[:cut]

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
    offsets: Sequence[int] | None = None,
) -> tuple[np.ndarray, int]:
    """Rows of events in log order through their partitions' operators: (features, late count).

    The one loop training replay and scorers share. `fields_of(i)` is row i's fields
    (`plan.decoded_fields`); a keyless event (key None) is computed against an empty history and
    joins no state: without a key it belongs to no entity. `offsets` (scorers): each event's log
    offset, so an event delivered again is not stored twice (`FeatureOperator.process`).
    """
    n = len(keys)
    rows: list[list[Any]] = []
    late = 0
    time_list = times.tolist() if isinstance(times, np.ndarray) else list(times)
    partition_list = partitions.tolist() if isinstance(partitions, np.ndarray) else partitions
    operator: FeatureOperator | None = None
    current = None
    for i in range(n):
        key = keys[i]
        time_ms = round(time_list[i])
        if key is None:
            result = FeatureOperator(plan).process(None, time_ms, fields_of(i))
        else:
            partition = partition_list[i]
            if partition != current or operator is None:
                operator, current = operator_of(int(partition)), partition
            result = operator.process(
                key, time_ms, fields_of(i), None if offsets is None else offsets[i]
            )
        rows.append(result.values)
        late += result.late
    if not rows:
        return np.full((0, len(plan.outputs)), np.nan), late
    return np.array(rows, dtype=np.float64), late


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
