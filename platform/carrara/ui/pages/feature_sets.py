"""A dataset's feature set: its SQL, outputs and horizon, the revisions, an editor and a preview.

The same service calls as `/api/v1/datasets/{name}/features` (`feature_sets.service`, which
audits every new revision): saving stores the SQL as the next revision (an unchanged definition
stores nothing), and the parser's error is shown next to the editor with its line and column.
A preview computes the SQL in the editor (or the current revision's) on the topic's newest events.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Query, Request, Response
from pydantic import ValidationError
from sqlalchemy.orm import Session

from carrara.datasets.schemas import DatasetOut
from carrara.deps import DatasetName, SettingsDep
from carrara.errors import DomainError
from carrara.feature_sets import service
from carrara.feature_sets.schemas import (
    MAX_PREVIEW_EVENTS,
    MAX_SQL,
    FeatureOutput,
    FeaturePreviewIn,
    FeaturePreviewOut,
    FeaturePreviewRow,
    FeatureSetPut,
    FeatureSetRevisionOut,
)
from carrara.features.plan import LatePolicy
from carrara.ui.forms import FORM, FormInvalid, errors_from_validation, text, text_problems
from carrara.ui.pages import page_router, redirect, rolled_back
from carrara.ui.security import FormDep, PageEditor, PageSession, PageViewer, check_csrf
from carrara.ui.templating import flash, render

router = page_router()
PREVIEW_EVENTS = 20
TEXT_LIMITS = {"sql": MAX_SQL, "reason": 1000}
# The SQL a dataset without a feature set starts from: its key and time, one window, to edit.
STARTER = (
    "SELECT COUNT(*) OVER (PARTITION BY {key} ORDER BY {time}\n"
    "                      RANGE INTERVAL '1' HOUR PRECEDING) AS events_1h\n"
    "FROM {dataset}"
)


def duration(ms: int) -> str:
    """A horizon in the largest unit that divides it, e.g. `24 h`, `10 min`, `1,500 ms`."""
    for size, unit in ((86_400_000, "d"), (3_600_000, "h"), (60_000, "min"), (1000, "s")):
        if ms >= size and ms % size == 0:
            return f"{ms // size:,} {unit}"
    return f"{ms:,} ms"


def event_time(ms: int | None) -> str:
    if ms is None:
        return "—"
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _quoted(name: str) -> str:
    return name if name.replace("_", "").isalnum() else f'"{name}"'


def starter_sql(dataset: DatasetOut) -> str:
    time = dataset.event_time_field or "_timestamp"
    return STARTER.format(key=dataset.key_field, time=time, dataset=_quoted(dataset.name))


def normalized_sql(form: Any) -> str:
    """The editor's SQL as typed, with the browser's CRLF line ends made LF (one digest)."""
    value = form.get("sql")
    return value.replace("\r\n", "\n").replace("\r", "\n") if isinstance(value, str) else ""


def sql_error(exc: DomainError, sql: str) -> dict[str, Any] | None:
    """The parser's error on the SQL with its line, column and that line of the SQL."""
    for item in exc.extra.get("errors") or []:
        if item.get("field") != "sql" or item.get("line") is None:
            continue
        line, column = int(item["line"]), max(1, int(item.get("column") or 1))
        lines = sql.split("\n")
        source = lines[line - 1] if 0 < line <= len(lines) else ""
        return {
            "line": line,
            "column": column,
            "message": str(item.get("message", exc.detail)),
            "source": source,
            "caret": " " * min(column - 1, len(source)) + "^",
        }
    return None


def _problem_errors(exc: DomainError, sql: str) -> tuple[dict[str, str], dict[str, Any] | None]:
    """Form errors of a refused SQL: on the editor with its position, else at the form's top."""
    where = sql_error(exc, sql)
    if where is not None:
        message = f"line {where['line']}, column {where['column']}: {where['message']}"
        return {"sql": message}, where
    return {FORM: exc.detail}, None


class View:
    """What the page shows of a dataset's feature set (the API's shapes)."""

    def __init__(self, session: Session, name: str, number: int | None) -> None:
        dataset = service.get_dataset(session, name)
        self.dataset = DatasetOut.model_validate(dataset)
        self.revisions = [
            FeatureSetRevisionOut.model_validate(r)
            for r in service.list_revisions(session, dataset)
        ]
        self.current = self.revisions[0] if self.revisions else None
        self.shown = self.current
        if number is not None:
            self.shown = FeatureSetRevisionOut.model_validate(
                service.get_revision(session, name, number)
            )

    def values(self) -> dict[str, Any]:
        """The editor's inputs showing the revision viewed (a starter query without one)."""
        shown = self.shown
        return {
            "sql": shown.sql if shown else starter_sql(self.dataset),
            "late_policy": shown.late_policy if shown else LatePolicy.cap.value,
            "allowed_lateness_ms": str(shown.allowed_lateness_ms if shown else 0),
            "reason": "",
            "events": str(PREVIEW_EVENTS),
        }


def _page(
    request: Request,
    view: View,
    *,
    values: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    where: dict[str, Any] | None = None,
    preview: FeaturePreviewOut | None = None,
    preview_problem: str | None = None,
    status: int = 200,
) -> Response:
    context = {
        "nav": "datasets",
        "dataset": view.dataset,
        "revisions": view.revisions,
        "current": view.current,
        "shown": view.shown,
        "values": values or view.values(),
        "errors": errors or {},
        "sql_error": where,
        "preview": preview,
        "preview_problem": preview_problem,
        "late_policies": [p.value for p in LatePolicy],
        "max_events": MAX_PREVIEW_EVENTS,
        "duration": duration,
        "event_time": event_time,
    }
    return render(request, "datasets/features.html", context, status_code=status)


@router.get("/datasets/{name}/features")
def feature_set_page(
    name: DatasetName,
    request: Request,
    session: PageSession,
    user: PageViewer,
    revision: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    """The current revision (or `?revision=N`), every revision, the editor and the preview."""
    return _page(request, View(session, name, revision))


def _form_values(form: Any) -> dict[str, Any]:
    values = {k: v for k, v in form.items() if isinstance(v, str)}
    values["sql"] = normalized_sql(form)
    return values


@router.post("/datasets/{name}/features")
def save_feature_set(
    name: DatasetName, request: Request, session: PageSession, user: PageEditor, form: FormDep
) -> Response:
    """Store the editor's SQL as the next revision, as `PUT …/features` does (audited)."""
    values = _form_values(form)
    where = None
    status = 422
    try:
        problems = text_problems(form, TEXT_LIMITS, multiline=frozenset({"sql"}))
        if problems:
            raise FormInvalid(problems)
        body = FeatureSetPut.model_validate(
            {
                "sql": values["sql"],
                "late_policy": text(form, "late_policy") or LatePolicy.cap.value,
                "allowed_lateness_ms": text(form, "allowed_lateness_ms") or "0",
                "reason": text(form, "reason"),
            }
        )
        applied = service.put_feature_set(session, name, body, user)
    except FormInvalid as exc:
        errors = exc.errors
    except ValidationError as exc:
        errors = errors_from_validation(exc)
    except DomainError as exc:
        rolled_back(request)
        errors, where = _problem_errors(exc, values["sql"])
        status = exc.status
    else:
        number = applied.revision.number
        if applied.changed:
            outputs = len(applied.revision.outputs)
            flash(
                request,
                "success",
                f"Revision {number} saved: {outputs} feature(s), horizon "
                f"{duration(applied.revision.horizon_ms)}. New training runs on {name} compute it.",
            )
        else:
            flash(
                request,
                "info",
                f"Unchanged: this is revision {number}'s definition, so nothing was stored.",
            )
        return redirect(f"/datasets/{name}/features")
    return _page(
        request, View(session, name, None), values=values, errors=errors, where=where, status=status
    )


def _events(form: Any) -> int:
    raw = text(form, "events") or str(PREVIEW_EVENTS)
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PREVIEW_EVENTS:
        raise FormInvalid({"events": f"a whole number of events, 1 to {MAX_PREVIEW_EVENTS:,}"})
    return int(raw)


@router.post("/datasets/{name}/features/preview")
def preview_feature_set(
    name: DatasetName,
    request: Request,
    session: PageSession,
    user: PageViewer,
    form: FormDep,
    settings: SettingsDep,
) -> Response:
    """The features of the topic's newest N events: the editor's SQL, or the current revision's
    (what `POST …/features/preview` computes; nothing is stored)."""
    check_csrf(request, form)
    view = View(session, name, None)
    values = {**view.values(), **_form_values(form)} if "sql" in form else view.values()
    values["events"] = text(form, "events") or str(PREVIEW_EVENTS)
    sql = values["sql"] if "sql" in form else None
    try:
        problems = text_problems(form, TEXT_LIMITS, multiline=frozenset({"sql"}))
        if problems:
            raise FormInvalid(problems)
        events = _events(form)
        if sql is not None and not sql.strip():
            raise FormInvalid({"sql": "required: write the SELECT to preview"})
        if sql is None and view.current is None:
            raise FormInvalid({FORM: f"dataset '{name}' has no feature set yet: write one first"})
        body = FeaturePreviewIn.model_validate(
            {
                "sql": sql,
                "late_policy": (text(form, "late_policy") or None) if sql is not None else None,
                "allowed_lateness_ms": (text(form, "allowed_lateness_ms") or None)
                if sql is not None
                else None,
                "events": events,
            }
        )
        result = service.preview(session, settings.kafka_bootstrap, name, body)
    except FormInvalid as exc:
        return _page(request, view, values=values, errors=exc.errors, status=422)
    except ValidationError as exc:
        return _page(request, view, values=values, errors=errors_from_validation(exc), status=422)
    except DomainError as exc:
        rolled_back(request)
        errors, where = _problem_errors(exc, values["sql"])
        if where is None:  # Kafka, the topic or the format: a problem of the preview itself
            return _page(
                request, view, values=values, preview_problem=exc.detail, status=exc.status
            )
        return _page(request, view, values=values, errors=errors, where=where, status=exc.status)
    preview = FeaturePreviewOut(
        dataset=name,
        revision=result.revision,
        columns=[FeatureOutput(**o) for o in result.plan.describe()],
        rows=[FeaturePreviewRow(**asdict(r)) for r in result.rows],
        note=service.PREVIEW_NOTE,
    )
    return _page(request, view, values=values, preview=preview)
