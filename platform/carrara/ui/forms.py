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


def errors_from_validation(exc: ValidationError, prefix: str = "") -> dict[str, str]:
    """Pydantic errors by form field: the first element of each error's location."""
    errors: dict[str, str] = {}
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ()) if part != "body"]
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        key = FORM
        if loc:
            key = prefix + loc[0]
            if len(loc) > 1:
                message = f"{'.'.join(loc[1:])}: {message}"
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
