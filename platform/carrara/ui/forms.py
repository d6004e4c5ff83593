"""Between HTML forms and the API's request bodies: parsing posted fields, naming errors per field.

Pure functions. Validation stays the API's: these only reshape form fields into the dicts the
API's pydantic bodies validate, and turn the errors those bodies (or the services) raise into
messages shown next to the right input.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import ImmutableMultiDict

from carrara.streams.event_schema import FeatureType
from carrara.training.algorithms import CommonParams

# Where an error that names no field of the form is shown.
FORM = "_form"
# Params every algorithm takes (bad-event threshold, seed): listed after the algorithm's own.
COMMON_PARAMS = frozenset(CommonParams.model_fields)
_RANGE_LINE = re.compile(r"^\s*(?P<partition>\d+)\s*:\s*(?P<start>\d+)\s*-\s*(?P<end>\d+)\s*$")


class FormInvalid(ValueError):
    """Fields of a form that cannot become a request body; `errors` maps field -> message."""

    def __init__(self, errors: dict[str, str]) -> None:
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
        self.errors = errors


def text(form: Mapping[str, Any], name: str) -> str:
    """A text field, stripped ('' when absent)."""
    value = form.get(name)
    return value.strip() if isinstance(value, str) else ""


def optional(form: Mapping[str, Any], name: str) -> str | None:
    """A text field, or None when left empty."""
    return text(form, name) or None


def checked(form: Mapping[str, Any], name: str) -> bool:
    """Whether a checkbox was ticked."""
    return text(form, name) in ("on", "true", "1", "yes")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")
_LINE_BREAK = re.compile(r"[\r\n\t]")
_MAX_REPEAT = re.compile(r"\{[01],(\d+)\}")
# What each input pattern of the API's schemas allows, in words.
PATTERN_WORDS = {
    r"^[a-z0-9][a-z0-9._-]{0,99}$": (
        "use lowercase letters, digits, '.', '_' and '-', starting with a letter or a digit "
        "(e.g. card-fraud)"
    ),
    r"^[A-Za-z0-9._-]{1,249}$": "use letters, digits, '.', '_' and '-' only (no spaces)",
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$": (
        "use letters, digits, '.', '_' and '-', starting with a letter or a digit"
    ),
    r"^[a-z][a-z0-9_-]{0,99}$": (
        "use lowercase letters, digits, '_' and '-', starting with a letter (e.g. champion)"
    ),
    r"^[^\x00-\x1f\x7f]+$": "must not contain control characters",
    r"^[^\x00]*$": "must not contain control characters",
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$": (
        "a field name or a dotted path of them, e.g. payment.amount"
    ),
}


def human_pattern(pattern: str) -> str:
    """What an input `pattern` of the API's schemas allows, in words."""
    return PATTERN_WORDS.get(pattern, "is not in the expected format")


def human_message(error: Mapping[str, Any]) -> str:
    """One pydantic error as a person would say it: no patterns, types or indexes."""
    kind = str(error.get("type", ""))
    ctx = error.get("ctx") or {}
    value = error.get("input")
    size = len(value) if isinstance(value, str) else None
    if kind == "missing" or (size == 0 and kind.startswith("string_")):
        return "required"
    if kind == "string_too_long":
        return f"too long: at most {ctx.get('max_length')} characters (this has {size})"
    if kind == "string_too_short":
        return f"too short: at least {ctx.get('min_length')} characters"
    if kind == "string_pattern_mismatch":
        pattern = str(ctx.get("pattern", ""))
        bound = _MAX_REPEAT.search(pattern)
        if bound is not None and size is not None:
            limit = int(bound.group(1)) + (1 if "{0," in bound.group(0) else 0)
            if size > limit:
                return f"too long: at most {limit} characters (this has {size})"
        if isinstance(value, str) and _CONTROL.search(value):
            return "must not contain control characters"
        return PATTERN_WORDS.get(pattern, "is not in the expected format")
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return "a whole number"
    if kind in ("float_parsing", "float_type"):
        return "a number"
    if kind == "greater_than":
        return f"must be greater than {ctx.get('gt')}"
    if kind == "greater_than_equal":
        return f"must be at least {ctx.get('ge')}"
    if kind == "less_than":
        return f"must be less than {ctx.get('lt')}"
    if kind == "less_than_equal":
        return f"must be at most {ctx.get('le')}"
    if kind == "too_short":
        return "add at least one"
    message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
    return message.replace("Input should be", "should be")


def control_problem(value: str, multiline: bool = False) -> str | None:
    """Why `value` cannot be stored as typed (control characters), or None."""
    if _CONTROL.search(value) or (not multiline and _LINE_BREAK.search(value)):
        return "must not contain control characters (tabs, line breaks or invisible characters)"
    return None


def text_problems(
    form: Mapping[str, Any], limits: Mapping[str, int], multiline: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Errors of posted text fields: control characters, or longer than their limit.

    Over-long text is refused, never cut: the inputs carry no `maxlength` (a browser would cut
    a paste silently), so the limit is checked here and said in the message.
    """
    errors: dict[str, str] = {}
    for name, limit in limits.items():
        value = form.get(name)
        if not isinstance(value, str):
            continue
        problem = control_problem(value, multiline=name in multiline)
        if problem is None and len(value.strip()) > limit:
            problem = f"too long: at most {limit} characters (this has {len(value.strip())})"
        if problem is not None:
            errors[name] = problem
    return errors


# The API's wording of a request body, and what the form shows for it instead.
_FORM_WORDS = (
    (
        "pass `create_topic: {partitions: N}` to have it created",
        "tick “Create the topic” to have it created",
    ),
    ("leave out `create_topic` to use it", "untick “Create the topic” to use it"),
)


def form_words(message: str) -> str:
    """An API message as a form's user reads it: the form's controls, not the body's fields."""
    for api, form in _FORM_WORDS:
        message = message.replace(api, form)
    return message


def errors_from_validation(
    exc: ValidationError, prefix: str = "", fields: Iterable[str] = ()
) -> dict[str, str]:
    """Pydantic errors by form field (the first element of each location), in words.

    A rule across fields whose message starts with one of `fields` ("label_field is required
    for a binary task") goes on that field's input.
    """
    names = set(fields)
    errors: dict[str, str] = {}
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        message = human_message(error)
        key = FORM
        head = message.split(" ", 1)[0]
        if not loc and head in names and " " in message:
            errors.setdefault(prefix + head, message.split(" ", 1)[1])
            continue
        if loc:
            key = prefix + loc[0]
            rest = [str(int(p) + 1) if p.isdigit() else p.replace("_", " ") for p in loc[1:]]
            if rest:
                message = f"{' '.join(rest)}: {message}"
        errors.setdefault(key, message)
    return errors


def errors_from_problem(extra_errors: Iterable[Mapping[str, Any]] | None, detail: str) -> dict:
    """A domain error's `errors` list (field/message) as form errors, else its detail."""
    errors: dict[str, str] = {}
    for item in extra_errors or []:
        name = str(item.get("field", FORM))
        errors.setdefault(name, str(item.get("message", detail)))
    if not errors:
        errors[FORM] = detail
    return errors


# --- datasets ---------------------------------------------------------------------------------


def _feature_line(line: str) -> tuple[str, str] | None:
    """`name: type` or `name type` as (name, type); None if the line is neither.

    A scan from the end, in linear time: a regex with a lazy name followed by optional spaces
    around the separator backtracked cubically (2,000 spaces took 18 s).
    """
    stripped = line.strip()
    start = len(stripped)
    while start > 0 and "a" <= stripped[start - 1] <= "z":
        start -= 1
    feature_type, head = stripped[start:], stripped[:start]
    name = head.rstrip()
    if name.endswith(":"):
        name = name[:-1].rstrip()
    elif name == head:
        return None  # no separator between the name and the type
    if not feature_type or not name or ":" in name:
        return None
    return name, feature_type


def parse_features(raw: str) -> list[dict[str, str]]:
    """`name: type` per line (or `name type`) as feature specs; FormInvalid names the bad line."""
    types = ", ".join(t.value for t in FeatureType)
    features = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip() or line.strip().startswith("#"):
            continue
        parsed = _feature_line(line)
        if parsed is None or parsed[1] not in {t.value for t in FeatureType}:
            raise FormInvalid(
                {"features": f"line {number} ('{line.strip()}'): write `name: type` ({types})"}
            )
        features.append({"name": parsed[0], "type": parsed[1]})
    if not features:
        raise FormInvalid({"features": f"declare at least one feature, one per line ({types})"})
    return features


# Text inputs of the dataset form and their limits (the API's), checked before the body is.
DATASET_TEXT_LIMITS = {
    "name": 100,
    "topic": 249,
    "key_field": 200,
    "event_time_field": 200,
    "label_field": 200,
    "owner": 200,
    "description": 10_000,
    "features": 100_000,
}


def dataset_form(form: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """(body, errors) of the new-dataset form: every problem the form itself can see at once.

    The body is complete enough for the API's model to report its own errors next to these.
    """
    multiline = frozenset({"features", "description"})
    errors = text_problems(form, DATASET_TEXT_LIMITS, multiline=multiline)
    try:
        body = dataset_body(form)
    except FormInvalid as exc:
        errors = {**exc.errors, **errors}
        # The other fields still go through the API's model: a stand-in for what failed here.
        body = dataset_body({**form, "features": "placeholder: float", "partitions": "1"})
    return body, errors


def dataset_body(form: Mapping[str, Any]) -> dict[str, Any]:
    """The body of `POST /api/v1/datasets` from the new-dataset form."""
    body: dict[str, Any] = {
        "name": text(form, "name"),
        "topic": text(form, "topic"),
        "key_field": text(form, "key_field"),
        "event_time_field": optional(form, "event_time_field"),
        "label_field": optional(form, "label_field"),
        "task": text(form, "task"),
        "description": text(form, "description"),
        "owner": text(form, "owner"),
    }
    errors: dict[str, str] = {}
    try:
        body["features"] = parse_features(text(form, "features"))
    except FormInvalid as exc:
        errors.update(exc.errors)
    if checked(form, "create_topic"):
        partitions = text(form, "partitions") or "1"
        if not partitions.isdigit():
            errors["partitions"] = "a whole number of partitions, 1 to 1000"
        else:
            body["create_topic"] = {"partitions": int(partitions)}
    if errors:
        raise FormInvalid(errors)
    return body


def parse_offsets(raw: str) -> list[dict[str, int]]:
    """`partition: start-end` per line as explicit offset ranges."""
    ranges = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        match = _RANGE_LINE.match(line)
        if match is None:
            raise FormInvalid(
                {"offsets": f"line {number} ('{line.strip()}'): write `partition: start-end`"}
            )
        ranges.append({k: int(v) for k, v in match.groupdict().items()})
    return ranges


def snapshot_body(form: Mapping[str, Any]) -> dict[str, Any]:
    """The body of `POST /api/v1/datasets/{name}/versions` from the snapshot form.

    Times come from `datetime-local` inputs and are read as UTC (the API reads naive times so).
    """
    mode = text(form, "mode") or "latest"
    body: dict[str, Any] = {"mode": mode, "description": text(form, "description")}
    if mode == "time_range":
        body["from"] = optional(form, "from")
        body["to"] = optional(form, "to")
    elif mode == "explicit":
        body["offsets"] = parse_offsets(text(form, "offsets"))
    return body


# --- run params, generated from the algorithms' JSON schemas --------------------------------


@dataclass(frozen=True)
class ParamField:
    """One input of an algorithm's params form, derived from its JSON schema property."""

    name: str
    label: str
    kind: str  # integer | number | boolean | choice | integer_list
    default: Any
    help: str
    nullable: bool
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    choices: tuple[str, ...] = ()

    @property
    def default_text(self) -> str:
        """The default as the input shows it ('' for none)."""
        if self.default is None:
            return ""
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        if isinstance(self.default, list):
            return ", ".join(str(v) for v in self.default)
        return str(self.default)

    @property
    def bounds(self) -> str:
        """The allowed range in words, e.g. '> 0 and ≤ 1'."""
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '≥'} {_plain(self.minimum)}")
        if self.maximum is not None:
            parts.append(f"≤ {_plain(self.maximum)}")
        return " and ".join(parts)


def _plain(value: float) -> str:
    """A bound for people: 4,294,967,295 and 1,000,000 rather than 4.29e+09 and 1e+06."""
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:g}"


def param_fields(schema: Mapping[str, Any]) -> list[ParamField]:
    """The inputs of a params form: the algorithm's own params first, then the common ones."""
    fields = []
    for name, prop in (schema.get("properties") or {}).items():
        options = prop.get("anyOf") or [prop]
        nullable = any(o.get("type") == "null" for o in options)
        concrete = next((o for o in options if o.get("type") != "null"), {})
        kind = concrete.get("type", "string")
        choices: tuple[str, ...] = ()
        if "const" in concrete or "enum" in concrete:
            kind = "choice"
            choices = tuple(str(c) for c in concrete.get("enum", [concrete.get("const")]))
        elif kind == "array":
            kind = "integer_list"
            concrete = concrete.get("items", {})
        minimum = concrete.get("minimum", concrete.get("exclusiveMinimum"))
        fields.append(
            ParamField(
                name=name,
                label=str(prop.get("title") or name),
                kind=kind,
                default=prop.get("default"),
                help=str(prop.get("description") or ""),
                nullable=nullable,
                minimum=minimum,
                maximum=concrete.get("maximum"),
                exclusive_minimum="exclusiveMinimum" in concrete,
                choices=choices,
            )
        )
    return sorted(fields, key=lambda f: f.name in COMMON_PARAMS)


def params_from_form(fields: list[ParamField], form: Mapping[str, Any]) -> dict[str, Any]:
    """The params a form sets: blank inputs are left out (the algorithm's default applies).

    Values stay text except for lists and booleans: the API's params model converts and bounds
    them, and its errors name the parameter.
    """
    params: dict[str, Any] = {}
    for f in fields:
        key = f"param.{f.name}"
        if f.kind == "boolean":
            # A posted form repeats a checkbox's name (hidden "false", then "true" if ticked).
            multi = isinstance(form, ImmutableMultiDict)
            values: list[Any] = form.getlist(key) if multi else [form.get(key)]
            if values and values[-1] is not None:
                params[f.name] = values[-1] == "true"
            continue
        raw = text(form, key)
        if raw == "":
            continue
        if f.kind == "choice" and raw == "none":
            params[f.name] = None
        elif f.kind == "integer_list":
            params[f.name] = [part.strip() for part in raw.strip("[]").split(",") if part.strip()]
        else:
            params[f.name] = raw
    return params


def param_errors(errors: dict[str, str]) -> dict[str, str]:
    """The API's `params.<name>` error fields as the form's `param.<name>` inputs."""
    return {
        (f"param.{k.removeprefix('params.').split('.')[0]}" if k.startswith("params.") else k): v
        for k, v in errors.items()
    }
