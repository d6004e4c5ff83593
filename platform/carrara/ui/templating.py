"""Where the UI's templates and assets are, the Jinja2 environment, and page rendering."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import orjson
import structlog
from fastapi import Request
from fastapi.responses import HTMLResponse
from markupsafe import Markup

log = structlog.get_logger(__name__)

# platform/carrara/ui/templating.py -> the checkout's root, which holds web/.
WEB_DIR = Path(__file__).resolve().parents[3] / "web"
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"
# Copied from web/node_modules by `npm run vendor` (see web/scripts/vendor.mjs); never committed.
VENDOR_ASSETS = (
    "htmx.min.js",
    "chart.umd.min.js",
    "swagger-ui-bundle.js",
    "swagger-ui.css",
    "redoc.standalone.js",
)
SETUP_HINT = "run `deploy/bootstrap.sh web` (npm ci + npm run vendor in web/)"


class AssetsMissing(RuntimeError):
    """The UI's templates or vendored JavaScript are not where the pages load them from."""


def missing_assets() -> list[str]:
    """Paths of the UI's files that are missing (empty when the UI can be served)."""
    required = [TEMPLATES_DIR / "base.html", STATIC_DIR / "app.css", STATIC_DIR / "app.js"]
    required += [STATIC_DIR / "vendor" / name for name in VENDOR_ASSETS]
    return [str(path) for path in required if not path.is_file()]


def assets_problem() -> str | None:
    """Why the UI cannot be served, or None when every file is in place."""
    missing = missing_assets()
    if not missing:
        return None
    return f"the web UI's files are missing ({', '.join(missing)}): {SETUP_HINT}"


@lru_cache
def asset_version() -> str:
    """A short hash of the UI's own CSS and JS, appended to their URLs to bust browser caches."""
    digest = hashlib.sha256()
    for name in ("app.css", "app.js"):
        path = STATIC_DIR / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def _when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(moment: datetime | None, now: datetime | None = None) -> str:
    """`moment` relative to now, e.g. "3 min ago"."""
    if moment is None:
        return "—"
    seconds = ((now or datetime.now(UTC)) - moment).total_seconds()
    if seconds < 0:
        return "just now"
    for limit, unit, size in (
        (60, "s", 1),
        (3600, "min", 60),
        (86_400, "h", 3600),
        (math.inf, "d", 86_400),
    ):
        if seconds < limit:
            return f"{int(seconds // size)} {unit} ago" if seconds >= 5 else "just now"
    return _when(moment)  # pragma: no cover - the loop always returns


def _number(value: Any, digits: int = 4) -> str:
    """A metric for people: thousands separators for ints, `digits` significant digits else."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "—"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.1f}"
    return str(value)


def _percent(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value * 100:.{digits}f}%"


def _json(value: Any) -> Markup:
    """`value` as JSON safe to embed in HTML (a <script type="application/json"> or attribute)."""
    text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    # `<`, `>` and `&` escaped as JSON unicode escapes: the text can never close a <script>.
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    return Markup(text)  # noqa: S704 - escaped above; JSON has no other HTML-active characters


def _confidence(value: float | None) -> str:
    """A verdict's confidence as the monitoring rules word it (rounded down)."""
    if value is None or not math.isfinite(value):
        return "—"
    from carrara.monitoring.statistics import confidence_percent

    return confidence_percent(value)


def _pretty_json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


@lru_cache
def environment() -> jinja2.Environment:
    """The Jinja2 environment of the UI's templates (autoescaped; undefined names are errors)."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        when=_when,
        ago=_ago,
        number=_number,
        percent=_percent,
        json=_json,
        pretty=_pretty_json,
        confidence=_confidence,
    )
    env.globals["asset_version"] = asset_version
    return env


@dataclass(frozen=True)
class Flash:
    """A one-time message shown on the next page (after a redirect)."""

    kind: str  # success | error | info
    text: str


def flash(request: Request, kind: str, text: str) -> None:
    """Queue a message for the next page this browser renders."""
    request.session.setdefault("flash", []).append([kind, text])
    request.session.update(flash=request.session["flash"])  # mark the session modified


def pop_flashes(request: Request) -> list[Flash]:
    if "flash" not in request.session:
        return []
    return [Flash(kind, text) for kind, text in request.session.pop("flash")]


def is_htmx(request: Request) -> bool:
    """Whether HTMX made the request (it wants a fragment, not a whole page)."""
    return request.headers.get("HX-Request") == "true"


def render(
    request: Request,
    template: str,
    context: dict[str, Any] | None = None,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
) -> HTMLResponse:
    """Render `template` with the page context (signed-in user, CSRF token, flashes)."""
    problem = assets_problem()
    if problem is not None:
        raise AssetsMissing(problem)
    from carrara.ui.security import can_edit, csrf_token, signed_in_user

    user = signed_in_user(request)
    values: dict[str, Any] = {
        "request": request,
        "user": user,
        "can_edit": can_edit(user),
        "csrf_token": csrf_token(request),
        "flashes": pop_flashes(request) if not is_htmx(request) else [],
        "nav": "",
    }
    values.update(context or {})
    body = environment().get_template(template).render(values)
    return HTMLResponse(body, status_code=status_code, headers=headers)
