"""What a feature set computes: the plan `sql.parse_feature_sql` builds, and its errors."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# A per-event expression, compiled: (the event's fields, context) -> value, where context is the
# window results followed by the event time in epoch seconds (the last item).
# Values are None (SQL NULL; NaN reads as NULL), float, str or bool.
Compiled = Callable[[Mapping[str, Any], Sequence[Any]], Any]

# The pseudo-column of the Kafka record timestamp, for datasets without an event time field.
RECORD_TIME = "_timestamp"
# A model's input column of a derived feature is `sql.<name>` (a feature may repeat a raw field).
COLUMN_PREFIX = "sql."
# LAG's horizon when a feature set has no RANGE window (state must expire somewhere).
DEFAULT_HORIZON_MS = 24 * 3600 * 1000


class FeatureSqlError(ValueError):
    """The SQL is outside the supported subset; names the construct and where it is."""

    def __init__(self, message: str, *, line: int | None = None, column: int | None = None):
        self.message = message
        self.line = line
        self.column = column
        where = f" (line {line}, column {column})" if line is not None else ""
        super().__init__(f"{message}{where}")

    def as_dict(self) -> dict[str, Any]:
        return {"message": self.message, "line": self.line, "column": self.column}


class LatePolicy(StrEnum):
    """What an event older than its key's latest time (beyond the allowed lateness) does."""

    cap = "cap"  # its time is raised to the key's latest time; it joins the state there
    drop = "drop"  # its row is computed at the key's latest time, but it never joins the state


class Aggregate(StrEnum):
    count_star = "count_star"
    count_values = "count"
    count_distinct = "count_distinct"
    sum = "sum"
    avg = "avg"
    min = "min"
    max = "max"
    stddev_samp = "stddev_samp"
    stddev_pop = "stddev_pop"
    lag = "lag"


class OutputKind(StrEnum):
    number = "number"  # float64; NULL is NaN
    category = "category"  # a string (or integer) category; NULL is missing


@dataclass(frozen=True)
class WindowCall:
    """One windowed function: its aggregate over one stored argument and one window."""

    aggregate: Aggregate
    arg: int | None  # index into FeaturePlan.args (None: COUNT(*))
    window_ms: int | None  # RANGE width; None for LAG
    lag_offset: int = 1
    sql: str = ""


@dataclass(frozen=True)
class Output:
    name: str
    kind: OutputKind
    compute: Compiled = field(compare=False, repr=False)
    sql: str = ""


@dataclass(frozen=True)
class FeaturePlan:
    """A parsed feature set: outputs over per-event expressions and windowed functions."""

    sql: str
    key_field: str
    time_field: str  # the dataset's event time field, or RECORD_TIME
    outputs: tuple[Output, ...]
    args: tuple[Compiled, ...] = field(compare=False, repr=False)  # stored per event in state
    # Per arg: statically a number (its values are float or None), so aggregates skip the checks.
    arg_numeric: tuple[bool, ...] = field(compare=False, repr=False)
    windows: tuple[WindowCall, ...]
    columns: tuple[str, ...]  # the event fields the SQL reads
    horizon_ms: int  # the longest window (or DEFAULT_HORIZON_MS): how long state lives
    late_policy: LatePolicy = LatePolicy.cap
    allowed_lateness_ms: int = 0

    @property
    def names(self) -> list[str]:
        return [o.name for o in self.outputs]

    @property
    def digest(self) -> str:
        """sha256 of what defines the results: the SQL and the late-event policy."""
        text = f"{self.sql}\n--late={self.late_policy.value}:{self.allowed_lateness_ms}"
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def stateful(self) -> bool:
        return bool(self.windows)

    def describe(self) -> list[dict[str, Any]]:
        """The outputs as data (the API's and the model spec's view)."""
        return [{"name": o.name, "kind": o.kind.value, "sql": o.sql} for o in self.outputs]


def decoded_fields(decoded: Any) -> Callable[[int], dict[str, Any]]:
    """Row i of decoded events (`streams.event_codec.DecodedEvents`) as the fields the SQL reads.

    Training and scorers both read a feature set's inputs through this, from the same decoded
    columns: declared numeric fields as float (NaN = NULL), categories as their raw values.
    """
    numeric_names = [
        f.name for f in decoded.schema.features if str(f.type) in ("float", "int", "bool")
    ]
    numeric = decoded.numeric
    # Python lists once per batch: a row is then one dict of plain values.
    columns = [(name, numeric[:, j].tolist()) for j, name in enumerate(numeric_names)]
    columns += list(decoded.categories.items())

    def row(i: int) -> dict[str, Any]:
        return {name: values[i] for name, values in columns}

    return row
