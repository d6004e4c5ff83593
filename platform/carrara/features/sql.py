"""Parse the feature SQL subset (sqlglot) into a `FeaturePlan` of compiled Python expressions.

The subset (README: Features in SQL): one `SELECT` of per-event expressions and `OVER` windows
`PARTITION BY <key> ORDER BY <time> RANGE INTERVAL 'n' UNIT PRECEDING` (or `RANGE BETWEEN ... AND
CURRENT ROW`) with COUNT, SUM, AVG, MIN, MAX, COUNT(DISTINCT), STDDEV(_SAMP/_POP), and LAG without a
frame, over at most one table. Anything else is a `FeatureSqlError` naming the construct and its
line and column.

NULL semantics: NaN reads as NULL; arithmetic and functions of NULL are NULL, and so is what SQL
would raise on (division by zero, LN/LOG10 of a non-positive number, SQRT of a negative one, a
number expected but a string found at run time); comparisons with NULL are NULL, which CASE treats
as false; aggregates skip NULLs.

Why one module of ~800 lines: the parser and the expression compiler share one walk over
sqlglot's tree, and every error names a position in that walk; splitting the walk would split the
subset's one definition (a split into parse / compile is planned with the online phase).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError, TokenError

from carrara.features.plan import (
    DEFAULT_HORIZON_MS,
    RECORD_TIME,
    Aggregate,
    Compiled,
    FeaturePlan,
    FeatureSqlError,
    LatePolicy,
    Output,
    OutputKind,
    WindowCall,
)

UNIT_MS = {
    "MILLISECOND": 1,
    "SECOND": 1000,
    "MINUTE": 60_000,
    "HOUR": 3_600_000,
    "DAY": 86_400_000,
}
MAX_WINDOW_MS = 90 * 86_400_000
MAX_LAG_OFFSET = 100
MAX_OUTPUTS = 200

# Static kinds of expressions: what a value can be (a light type check before any event is seen).
NUMBER, STRING, BOOL, ANY = "number", "string", "bool", "any"


def _num(v: Any) -> float | None:
    """A value as a float for arithmetic, or None (NULL, NaN, or not a number)."""
    if v is None or isinstance(v, str):
        return None
    if isinstance(v, bool):
        return 1.0 if v else 0.0
    if isinstance(v, int | float):
        f = float(v)
        return None if math.isnan(f) else f
    return None


def read_value(v: Any) -> Any:
    """An event field's value as the SQL sees it: numbers as float, NaN as NULL."""
    if v is None or isinstance(v, str | bool):
        return v
    if isinstance(v, int | float):
        f = float(v)
        return None if math.isnan(f) else f
    return None  # objects and arrays are not values of this subset


def _truth(v: Any) -> bool | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float):
        return None if math.isnan(v) else v != 0
    return None


class _Compiler:
    def __init__(
        self,
        sql: str,
        key_field: str,
        time_field: str,
        kinds: Mapping[str, str],
        forbidden: Mapping[str, str],
        table: str | None,
    ):
        self.sql = sql
        self.key_field = key_field
        self.time_field = time_field
        self.kinds = kinds
        self.forbidden = forbidden
        self.table = table
        self.args: list[Compiled] = []
        self.arg_sql: dict[str, int] = {}
        self.arg_kinds: list[str] = []
        self.windows: list[WindowCall] = []
        self.window_sql: dict[tuple[Any, ...], int] = {}
        self.columns: dict[str, None] = {}

    # -- positions and errors ---------------------------------------------------------------

    def _position(self, node: exp.Expr, name: str | None = None) -> tuple[int, int] | None:
        starts = [
            ident.meta["start"] for ident in node.find_all(exp.Identifier) if "start" in ident.meta
        ]
        ends = [ident.meta["end"] for ident in node.find_all(exp.Identifier) if "end" in ident.meta]
        start = min(starts) if starts else None
        if name:
            upper, wanted = self.sql.upper(), name.upper()
            if start is None:
                found = upper.find(wanted)
            else:
                found = upper.rfind(wanted, max(0, start - 40), start)
                if found < 0:
                    found = upper.find(wanted, start, (max(ends) if ends else start) + 80)
            if found >= 0:
                start = found
        if start is None:
            return None
        line = self.sql.count("\n", 0, start) + 1
        column = start - (self.sql.rfind("\n", 0, start) + 1) + 1
        return line, column

    def error(self, message: str, node: exp.Expr, name: str | None = None) -> FeatureSqlError:
        where = self._position(node, name)
        if where is None:
            return FeatureSqlError(message)
        return FeatureSqlError(message, line=where[0], column=where[1])

    # -- the statement ----------------------------------------------------------------------

    def select(self, tree: exp.Expr) -> list[Output]:
        if not isinstance(tree, exp.Select):
            raise self.error(
                f"only one SELECT is supported, not {tree.key.upper()}", tree, tree.key
            )
        for clause, label in (
            ("where", "WHERE"),
            ("group", "GROUP BY"),
            ("having", "HAVING"),
            ("order", "ORDER BY"),
            ("limit", "LIMIT"),
            ("joins", "JOIN"),
            ("windows", "WINDOW"),
            ("qualify", "QUALIFY"),
            ("with_", "WITH"),
            ("distinct", "SELECT DISTINCT"),
        ):
            value = tree.args.get(clause)
            if value:
                node = value[0] if isinstance(value, list) else value
                reason = (
                    "joins across keys or topics are not supported yet"
                    if clause == "joins"
                    else "a feature set computes exactly one row per event"
                )
                raise self.error(f"{label} is not supported: {reason}", node, label.split()[0])
        source = tree.args.get("from_")
        if source is not None:
            table = source.this
            if not isinstance(table, exp.Table) or table.args.get("db"):
                raise self.error(
                    "FROM takes the dataset's name only (no subquery, no schema)", source, "FROM"
                )
            if self.table is not None and table.name != self.table:
                raise self.error(
                    f"FROM '{table.name}': this feature set belongs to dataset '{self.table}'",
                    table,
                )
        outputs: list[Output] = []
        names: set[str] = set()
        if len(tree.expressions) > MAX_OUTPUTS:
            raise self.error(f"at most {MAX_OUTPUTS} features per set", tree)
        for item in tree.expressions:
            if isinstance(item, exp.Star):
                raise self.error("SELECT * is not supported: name each feature", tree, "*")
            if isinstance(item, exp.Alias):
                name, body = item.alias, item.this
            elif isinstance(item, exp.Column):
                name, body = item.name, item
            else:
                raise self.error(f"the expression '{item.sql()}' needs a name: add AS <name>", item)
            if name in names:
                raise self.error(f"two features are named '{name}'", item)
            names.add(name)
            compute, kind = self.expr(body)
            out_kind = OutputKind.number if kind in (NUMBER, BOOL) else OutputKind.category
            if kind == BOOL:
                compute = _bool_as_number(compute)
            outputs.append(Output(name, out_kind, compute, body.sql(dialect="duckdb")))
        if not outputs:
            raise self.error("the SELECT names no feature", tree)
        return outputs

    # -- expressions ------------------------------------------------------------------------

    def column(self, node: exp.Column) -> tuple[Compiled, str]:
        if node.table and node.table != (self.table or node.table):
            raise self.error(f"unknown table '{node.table}'", node)
        name = node.name
        if name in self.forbidden:
            reason = self.forbidden[name]
            raise self.error(f"column '{name}' cannot be a feature input: {reason}", node)
        if name == self.time_field:
            # The event time (after capping), in epoch seconds: `ts - LAG(ts)` is seconds.
            self.columns.setdefault(name, None)
            return (lambda _env, w: w[-1]), NUMBER
        if name not in self.kinds:
            known = ", ".join(sorted(self.kinds)) or "none"
            raise self.error(f"unknown column '{name}' (the dataset's fields: {known})", node)
        self.columns.setdefault(name, None)
        kind = self.kinds[name]
        if kind == NUMBER:
            # A declared number reads as float or NULL, whatever the record holds (aggregates
            # rely on it: plan.arg_numeric).
            def read_number(env: Mapping[str, Any], _w: Sequence[Any]) -> Any:
                v = env.get(name)
                return None if isinstance(v, str) else read_value(v)

            return read_number, kind

        def read(env: Mapping[str, Any], _w: Sequence[Any]) -> Any:
            return read_value(env.get(name))

        return read, kind

    def expr(self, node: exp.Expr) -> tuple[Compiled, str]:
        if isinstance(node, exp.Paren):
            return self.expr(node.this)
        if isinstance(node, exp.Column):
            return self.column(node)
        if isinstance(node, exp.Literal):
            if node.is_string:
                text = node.this
                return (lambda _e, _w: text), STRING
            number = float(node.this)
            return (lambda _e, _w: number), NUMBER
        if isinstance(node, exp.Boolean):
            flag = bool(node.this)
            return (lambda _e, _w: flag), BOOL
        if isinstance(node, exp.Null):
            return (lambda _e, _w: None), ANY
        if isinstance(node, exp.Window):
            return self.window(node)
        if isinstance(node, exp.Neg):
            f = self.number_arg(node.this, "-")

            def neg(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
                v = _num(f(env, w))
                return None if v is None else -v

            return neg, NUMBER
        if isinstance(node, exp.Add | exp.Sub | exp.Mul | exp.Div | exp.Mod | exp.Pow):
            return self.arithmetic(node), NUMBER
        if isinstance(node, exp.EQ | exp.NEQ | exp.GT | exp.GTE | exp.LT | exp.LTE):
            return self.comparison(node), BOOL
        if isinstance(node, exp.And | exp.Or):
            return self.logic(node), BOOL
        if isinstance(node, exp.Not):
            f, _ = self.expr(node.this)

            def negate(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
                t = _truth(f(env, w))
                return None if t is None else not t

            return negate, BOOL
        if isinstance(node, exp.Is):
            if not isinstance(node.expression, exp.Null):
                raise self.error("IS takes NULL only (IS NULL, IS NOT NULL)", node, "IS")
            f, _ = self.expr(node.this)
            return (lambda env, w: f(env, w) is None), BOOL
        if isinstance(node, exp.Between):
            return self.expr(
                exp.and_(
                    exp.GTE(this=node.this.copy(), expression=node.args["low"].copy()),
                    exp.LTE(this=node.this.copy(), expression=node.args["high"].copy()),
                )
            )
        if isinstance(node, exp.In):
            if node.args.get("query") or not node.expressions:
                raise self.error("IN takes a list of values only", node, "IN")
            return self.in_list(node), BOOL
        if isinstance(node, exp.Case):
            return self.case(node)
        if isinstance(node, exp.Func):
            return self.function(node)
        raise self.error(f"'{node.sql(dialect='duckdb')}' is not supported in a feature", node)

    def number_arg(self, node: exp.Expr, where: str) -> Compiled:
        f, kind = self.expr(node)
        if kind == STRING:
            raise self.error(f"{where} expects a number, got the string '{node.sql()}'", node)
        return f

    def string_arg(self, node: exp.Expr, where: str) -> Compiled:
        f, kind = self.expr(node)
        if kind in (NUMBER, BOOL):
            raise self.error(f"{where} expects a string, got the number '{node.sql()}'", node)
        return f

    def arithmetic(self, node: exp.Expr) -> Compiled:
        op = {
            exp.Add: "+",
            exp.Sub: "-",
            exp.Mul: "*",
            exp.Div: "/",
            exp.Mod: "%",
            exp.Pow: "POWER",
        }[type(node)]
        left = self.number_arg(node.this, op)
        right = self.number_arg(node.expression, op)

        def apply(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
            a = _num(left(env, w))
            b = _num(right(env, w))
            if a is None or b is None:
                return None
            try:
                if op == "+":
                    r = a + b
                elif op == "-":
                    r = a - b
                elif op == "*":
                    r = a * b
                elif op == "/":
                    r = a / b
                elif op == "%":
                    r = math.fmod(a, b)
                else:
                    r = math.pow(a, b)
            except (ZeroDivisionError, ValueError, OverflowError):
                return None
            return None if math.isnan(r) else r

        return apply

    def comparison(self, node: exp.Expr) -> Compiled:
        left, lk = self.expr(node.this)
        right, rk = self.expr(node.expression)
        if {lk, rk} == {NUMBER, STRING}:
            raise self.error(f"'{node.sql()}' compares a number with a string", node)
        op = type(node)

        def compare(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
            a, b = left(env, w), right(env, w)
            if a is None or b is None:
                return None
            if isinstance(a, bool):
                a = float(a)
            if isinstance(b, bool):
                b = float(b)
            if isinstance(a, str) != isinstance(b, str):
                return None
            if op is exp.EQ:
                return a == b
            if op is exp.NEQ:
                return a != b
            if op is exp.GT:
                return a > b
            if op is exp.GTE:
                return a >= b
            if op is exp.LT:
                return a < b
            return a <= b

        return compare

    def logic(self, node: exp.Expr) -> Compiled:
        left, _ = self.expr(node.this)
        right, _ = self.expr(node.expression)
        is_and = isinstance(node, exp.And)

        def combine(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
            a, b = _truth(left(env, w)), _truth(right(env, w))
            if is_and:
                if a is False or b is False:
                    return False
                return None if a is None or b is None else True
            if a is True or b is True:
                return True
            return None if a is None or b is None else False

        return combine

    def in_list(self, node: exp.In) -> Compiled:
        f, _ = self.expr(node.this)
        values = [self.expr(v)[0] for v in node.expressions]

        def member(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
            a = f(env, w)
            if a is None:
                return None
            seen_null = False
            for g in values:
                b = g(env, w)
                if b is None:
                    seen_null = True
                elif isinstance(a, str) == isinstance(b, str) and a == b:
                    return True
            return None if seen_null else False

        return member

    def case(self, node: exp.Case) -> tuple[Compiled, str]:
        subject = node.this
        branches: list[tuple[Compiled, Compiled]] = []
        kinds: set[str] = set()
        for branch in node.args.get("ifs") or []:
            cond = branch.this
            if subject is not None:
                cond = exp.EQ(this=subject.copy(), expression=cond.copy())
            c, _ = self.expr(cond)
            v, k = self.expr(branch.args["true"])
            branches.append((c, v))
            kinds.add(k)
        default = node.args.get("default")
        otherwise: Compiled = lambda _e, _w: None  # noqa: E731
        if default is not None:
            otherwise, k = self.expr(default)
            kinds.add(k)
        if len(kinds) > 1:
            kinds.discard(ANY)
        if NUMBER in kinds and STRING in kinds:
            raise self.error("CASE mixes numbers and strings in its results", node, "CASE")
        kind = kinds.pop() if len(kinds) == 1 else ANY

        def choose(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
            for c, v in branches:
                if _truth(c(env, w)):
                    return v(env, w)
            return otherwise(env, w)

        return choose, kind

    def function(self, node: exp.Func) -> tuple[Compiled, str]:
        name = node.sql_name()
        unary: dict[type, Callable[[float], float]] = {
            exp.Ln: math.log,
            exp.Abs: abs,
            exp.Sqrt: math.sqrt,
            exp.Exp: math.exp,
            exp.Floor: math.floor,
            exp.Ceil: math.ceil,
            exp.Sign: lambda x: float((x > 0) - (x < 0)),
        }
        if type(node) in unary:
            if node.args.get("decimals") or node.args.get("to") or node.args.get("expression"):
                raise self.error(f"{name} takes one argument here", node, name)
            fn = unary[type(node)]
            f = self.number_arg(node.this, name)

            def apply1(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
                v = _num(f(env, w))
                if v is None:
                    return None
                try:
                    return float(fn(v))
                except (ValueError, OverflowError):
                    return None

            return apply1, NUMBER
        if isinstance(node, exp.Log):
            base_node, value_node = node.this, node.expression
            if value_node is None:  # LOG(x): base 10 in DuckDB
                base_node, value_node = exp.Literal.number(10), node.this
            base = self.number_arg(base_node, "LOG")
            value = self.number_arg(value_node, "LOG")

            def log(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
                b, v = _num(base(env, w)), _num(value(env, w))
                if b is None or v is None or v <= 0 or b <= 0 or b == 1:
                    return None
                return math.log10(v) if b == 10 else math.log(v, b)

            return log, NUMBER
        if isinstance(node, exp.Round):
            f = self.number_arg(node.this, "ROUND")
            digits_node = node.args.get("decimals")
            if digits_node is not None and not (
                isinstance(digits_node, exp.Literal) and not digits_node.is_string
            ):
                raise self.error("ROUND's digits must be a number literal", node, "ROUND")
            digits = int(float(digits_node.this)) if digits_node is not None else 0

            def rnd(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
                v = _num(f(env, w))
                return None if v is None or math.isinf(v) else float(round(v, digits))

            return rnd, NUMBER
        if isinstance(node, exp.Least | exp.Greatest):
            parts = [self.number_arg(a, name) for a in [node.this, *node.expressions]]
            pick = min if isinstance(node, exp.Least) else max

            def extreme(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
                vals = [v for v in (_num(p(env, w)) for p in parts) if v is not None]
                return pick(vals) if vals else None  # NULLs are skipped (DuckDB, PostgreSQL)

            return extreme, NUMBER
        if isinstance(node, exp.Coalesce):
            compiled = [self.expr(a) for a in [node.this, *node.expressions]]
            kinds = {k for _, k in compiled} - {ANY}
            if NUMBER in kinds and STRING in kinds:
                raise self.error("COALESCE mixes numbers and strings", node, "COALESCE")
            parts = [c for c, _ in compiled]

            def coalesce(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
                for p in parts:
                    v = p(env, w)
                    if v is not None:
                        return v
                return None

            return coalesce, (kinds.pop() if len(kinds) == 1 else ANY)
        if isinstance(node, exp.Nullif):
            a, kind = self.expr(node.this)
            b, _ = self.expr(node.expression)

            def nullif(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
                x, y = a(env, w), b(env, w)
                return None if x is not None and y is not None and x == y else x

            return nullif, kind
        if isinstance(node, exp.Lower | exp.Upper | exp.Length):
            f = self.string_arg(node.this, name)
            if isinstance(node, exp.Length):
                return (lambda env, w: _length(f(env, w))), NUMBER
            up = isinstance(node, exp.Upper)

            def case_fold(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
                v = f(env, w)
                if not isinstance(v, str):
                    return None
                return v.upper() if up else v.lower()

            return case_fold, STRING
        windowed = (exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max, exp.Stddev, exp.Lag)
        if isinstance(node, (*windowed, exp.StddevSamp, exp.StddevPop)):
            raise self.error(
                f"{name} needs an OVER (PARTITION BY {self.key_field} ORDER BY "
                f"{self.time_field} RANGE INTERVAL 'n' UNIT PRECEDING) window: a feature set "
                "computes one row per event",
                node,
                name,
            )
        raise self.error(f"function {name} is not supported", node, name)

    # -- windows ----------------------------------------------------------------------------

    def window(self, node: exp.Window) -> tuple[Compiled, str]:
        func = node.this
        fname = func.sql_name() if isinstance(func, exp.Func) else func.sql()
        if node.args.get("alias") or (isinstance(node.this, exp.Identifier)):
            raise self.error("named windows (OVER w) are not supported", node, "OVER")
        partition = node.args.get("partition_by") or []
        if (
            len(partition) != 1
            or not isinstance(partition[0], exp.Column)
            or partition[0].name != self.key_field
        ):
            raise self.error(
                f"{fname} OVER must be PARTITION BY {self.key_field}: the dataset's key (the "
                "Kafka message key), so each key's state stays with its partition",
                partition[0] if partition else node,
                None if partition else "OVER",
            )
        order = node.args.get("order")
        ordered = order.expressions if order is not None else []
        if (
            len(ordered) != 1
            or not isinstance(ordered[0].this, exp.Column)
            or ordered[0].this.name != self.time_field
            or ordered[0].args.get("desc")
        ):
            raise self.error(
                f"{fname} OVER must be ORDER BY {self.time_field} (ascending): the dataset's "
                "event time"
                + (" (the record timestamp)" if self.time_field == RECORD_TIME else ""),
                ordered[0] if ordered else node,
                None if ordered else "OVER",
            )
        spec = node.args.get("spec")
        if isinstance(func, exp.Lag):
            if spec is not None:
                raise self.error("LAG takes no frame (ROWS/RANGE)", node, spec.args.get("kind"))
            return self.lag(func, node)
        supported = (exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max, exp.Stddev)
        if not isinstance(func, (*supported, exp.StddevSamp, exp.StddevPop)):
            raise self.error(
                f"window function {fname} is not supported (COUNT, SUM, AVG, MIN, MAX, "
                "COUNT(DISTINCT), STDDEV, LAG are)",
                node,
                fname,
            )
        window_ms = self.frame(spec, node, fname)
        if isinstance(func, exp.Count):
            inner = func.this
            if isinstance(inner, exp.Star):
                return _slot(self.add_window(Aggregate.count_star, None, window_ms, node)), NUMBER
            if isinstance(inner, exp.Distinct):
                if len(inner.expressions) != 1:
                    raise self.error("COUNT(DISTINCT ...) takes one expression", node, "DISTINCT")
                arg = self.add_arg(inner.expressions[0])
                index = self.add_window(Aggregate.count_distinct, arg, window_ms, node)
                return _slot(index), NUMBER
            arg = self.add_arg(inner)
            return _slot(self.add_window(Aggregate.count_values, arg, window_ms, node)), NUMBER
        aggregates = {
            exp.Sum: Aggregate.sum,
            exp.Avg: Aggregate.avg,
            exp.Min: Aggregate.min,
            exp.Max: Aggregate.max,
            exp.Stddev: Aggregate.stddev_samp,
            exp.StddevSamp: Aggregate.stddev_samp,
            exp.StddevPop: Aggregate.stddev_pop,
        }
        aggregate = aggregates.get(type(func))
        if aggregate is None:
            raise self.error(
                f"window function {fname} is not supported (COUNT, SUM, AVG, MIN, MAX, "
                "COUNT(DISTINCT), STDDEV, LAG are)",
                node,
                fname,
            )
        if isinstance(func.this, exp.Distinct):
            raise self.error(f"{fname}(DISTINCT ...) is not supported", node, "DISTINCT")
        if func.expressions:
            raise self.error(f"{fname} takes one argument", node, fname)
        if aggregate in (Aggregate.min, Aggregate.max):
            arg = self.add_arg(func.this)
            kind = self.arg_kinds[arg]
        else:
            arg = self.add_arg(func.this, numeric=fname)
            kind = NUMBER
        index = self.add_window(aggregate, arg, window_ms, node)
        return _slot(index), (kind if kind != BOOL else NUMBER)

    def frame(self, spec: exp.Expr | None, node: exp.Window, fname: str) -> int:
        if spec is None:
            raise self.error(
                f"{fname} OVER needs a frame: RANGE INTERVAL 'n' UNIT PRECEDING (an unbounded "
                "window would keep state forever)",
                node,
                "OVER",
            )
        kind = str(spec.args.get("kind") or "").upper()
        if kind != "RANGE":
            raise self.error(
                f"{kind or 'this'} frames are not supported: use RANGE INTERVAL 'n' UNIT "
                "PRECEDING (time windows)",
                node,
                kind or "OVER",
            )
        end = spec.args.get("end")
        if end is not None and str(end).upper() != "CURRENT ROW":
            raise self.error("a window must end at CURRENT ROW", node, "AND")
        start = spec.args.get("start")
        if str(spec.args.get("start_side") or "").upper() != "PRECEDING" or not isinstance(
            start, exp.Interval
        ):
            raise self.error(
                "the frame must start at INTERVAL 'n' UNIT PRECEDING (UNBOUNDED and "
                "FOLLOWING are not supported)",
                node,
                "RANGE",
            )
        return self.interval(start, node)

    def interval(self, start: exp.Interval, node: exp.Window) -> int:
        amount = start.this
        unit = start.args.get("unit")
        text = str(amount.this) if isinstance(amount, exp.Literal) else ""
        unit_text = unit.name.upper() if unit is not None else ""
        if not unit_text and " " in text:  # INTERVAL '2 hours'
            text, unit_text = text.split(None, 1)
            unit_text = unit_text.upper()
        unit_text = unit_text.removesuffix("S") if unit_text.endswith("S") else unit_text
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if unit_text not in UNIT_MS or not value > 0:
            raise self.error(
                f"the interval '{start.sql()}' is not supported: a positive number of "
                "MILLISECOND, SECOND, MINUTE, HOUR or DAY",
                node,
                "INTERVAL",
            )
        ms = value * UNIT_MS[unit_text]
        if ms != int(ms) or ms > MAX_WINDOW_MS:
            raise self.error(
                f"the interval '{start.sql()}' must be whole milliseconds and at most 90 days",
                node,
                "INTERVAL",
            )
        return int(ms)

    def lag(self, func: exp.Lag, node: exp.Window) -> tuple[Compiled, str]:
        offset_node = func.args.get("offset")
        offset = 1
        if offset_node is not None:
            if not (isinstance(offset_node, exp.Literal) and not offset_node.is_string):
                raise self.error("LAG's offset must be a whole number literal", node, "LAG")
            value = float(offset_node.this)
            if value != int(value) or not 1 <= value <= MAX_LAG_OFFSET:
                raise self.error(f"LAG's offset must be 1 to {MAX_LAG_OFFSET}", node, "LAG")
            offset = int(value)
        arg = self.add_arg(func.this)
        index = self.add_window(Aggregate.lag, arg, None, node, offset)
        default_node = func.args.get("default")
        lag_kind = self.arg_kinds[arg]
        if default_node is None:
            return _slot(index), lag_kind
        default, _ = self.expr(default_node)

        def with_default(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
            v = w[index]
            return default(env, w) if v is None else v

        return with_default, lag_kind

    def add_arg(self, node: exp.Expr, numeric: str | None = None) -> int:
        if any(isinstance(n, exp.Window) for n in node.walk()):
            raise self.error("a window function cannot take another window function", node)
        if numeric:
            compiled, kind = self.number_arg(node, numeric), NUMBER
        else:
            compiled, kind = self.expr(node)
        key = node.sql(dialect="duckdb")
        if key in self.arg_sql:
            return self.arg_sql[key]
        self.args.append(compiled)
        self.arg_kinds.append(kind)
        self.arg_sql[key] = len(self.args) - 1
        return len(self.args) - 1

    def add_window(
        self,
        aggregate: Aggregate,
        arg: int | None,
        window_ms: int | None,
        node: exp.Window,
        offset: int = 1,
    ) -> int:
        key = (aggregate, arg, window_ms, offset)
        if key not in self.window_sql:
            self.windows.append(
                WindowCall(aggregate, arg, window_ms, offset, node.sql(dialect="duckdb"))
            )
            self.window_sql[key] = len(self.windows) - 1
        return self.window_sql[key]


def _bool_as_number(inner: Compiled) -> Compiled:
    def as_number(env: Mapping[str, Any], w: Sequence[Any]) -> Any:
        v = inner(env, w)
        return None if v is None else (1.0 if v else 0.0)

    return as_number


def _slot(index: int) -> Compiled:
    return lambda _env, w: w[index]


def _length(v: Any) -> Any:
    return float(len(v)) if isinstance(v, str) else None


def parse_feature_sql(
    sql: str,
    *,
    key_field: str,
    time_field: str | None,
    fields: Mapping[str, str],
    label_field: str | None = None,
    dataset: str | None = None,
    late_policy: LatePolicy = LatePolicy.cap,
    allowed_lateness_ms: int = 0,
) -> FeaturePlan:
    """The plan of `sql` over a dataset, or `FeatureSqlError` naming what is outside the subset.

    `fields` maps the dataset's field names to their declared type (`float`, `int`, `bool`,
    `category`, `string`); the key field is readable too. `time_field` None: windows order by the
    record timestamp, written `_timestamp`. The label may not be read (it is not known when
    scoring). `dataset`, if given, is the only name FROM accepts.
    """
    if not sql.strip():
        raise FeatureSqlError("the feature SQL is empty")
    if allowed_lateness_ms < 0:
        raise FeatureSqlError("allowed_lateness_ms must be 0 or more")
    try:
        statements = sqlglot.parse(sql, read="duckdb")
    except ParseError as exc:
        first = exc.errors[0] if exc.errors else {}
        raise FeatureSqlError(
            f"not valid SQL: {first.get('description', str(exc))}"
            + (f" near '{first.get('highlight')}'" if first.get("highlight") else ""),
            line=first.get("line"),
            column=first.get("col"),
        ) from exc
    except TokenError as exc:
        raise FeatureSqlError(f"not valid SQL: {exc}") from exc
    statements = [s for s in statements if s is not None]
    if len(statements) != 1:
        raise FeatureSqlError(f"expected one SELECT statement, got {len(statements)}")
    kind_of = {"float": NUMBER, "int": NUMBER, "bool": BOOL, "category": ANY, "string": STRING}
    kinds = {name: kind_of.get(str(t), ANY) for name, t in fields.items()}
    kinds.setdefault(key_field, ANY)
    time_name = time_field or RECORD_TIME
    forbidden: dict[str, str] = {}
    if label_field and label_field != key_field:
        forbidden[label_field] = "it is the label, which is not known when an event is scored"
        kinds.pop(label_field, None)
    compiler = _Compiler(sql, key_field, time_name, kinds, forbidden, dataset)
    outputs = compiler.select(statements[0])
    windows = tuple(compiler.windows)
    widths = [w.window_ms for w in windows if w.window_ms is not None]
    return FeaturePlan(
        sql=sql,
        key_field=key_field,
        time_field=time_name,
        outputs=tuple(outputs),
        args=tuple(compiler.args),
        arg_numeric=tuple(k == NUMBER for k in compiler.arg_kinds),
        windows=windows,
        columns=tuple(compiler.columns),
        horizon_ms=max(widths) if widths else DEFAULT_HORIZON_MS,
        late_policy=late_policy,
        allowed_lateness_ms=allowed_lateness_ms,
    )
