"""Feature sets: a dataset's derived features in SQL (README: Features in SQL)."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from carrara.commands.api_client import ApiClient, console, fail, print_json

app = typer.Typer(no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
FileOpt = Annotated[str, typer.Option("--file", "-f", help="features.sql (- = stdin)")]


def _read_sql(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")


@app.command("apply")
def apply(
    dataset: Annotated[str, typer.Argument(help="The dataset the features belong to")],
    file: FileOpt,
    late_policy: Annotated[str, typer.Option(help="cap or drop (late events)")] = "cap",
    allowed_lateness_ms: Annotated[int, typer.Option(help="Lateness before `late`")] = 0,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log)")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Store the SQL as the dataset's next feature-set revision (unchanged SQL stores nothing)."""
    body = {
        "sql": _read_sql(file),
        "late_policy": late_policy,
        "allowed_lateness_ms": allowed_lateness_ms,
        "reason": reason,
    }
    result = ApiClient().put(f"/datasets/{dataset}/features", json=body)
    if as_json:
        print_json(result)
        return
    current = result["current"]
    names = ", ".join(o["name"] for o in current["outputs"])
    console.print(
        f"dataset [bold]{escape(dataset)}[/bold] feature set: revision {current['number']} "
        f"({len(current['outputs'])} features: {escape(names)})"
    )


@app.command("show")
def show(
    dataset: Annotated[str, typer.Argument(help="The dataset")],
    as_json: JsonOpt = False,
) -> None:
    """The current feature-set revision's SQL and the revisions."""
    result = ApiClient().get(f"/datasets/{dataset}/features")
    if as_json:
        print_json(result)
        return
    if result["current"] is None:
        console.print(f"dataset {escape(dataset)} has no feature set")
        return
    console.print(escape(result["current"]["sql"]))
    table = Table("revision", "features", "late policy", "digest", "by", "created")
    for r in result["revisions"]:
        table.add_row(
            str(r["number"]),
            str(len(r["outputs"])),
            r["late_policy"],
            r["digest"][:12],
            escape(r["created_by"]),
            r["created_at"],
        )
    console.print(table)


@app.command("preview")
def preview(
    dataset: Annotated[str, typer.Argument(help="The dataset")],
    file: Annotated[
        str | None, typer.Option("--file", "-f", help="SQL to try (default: the current one)")
    ] = None,
    events: Annotated[int, typer.Option(help="The newest N events")] = 20,
    as_json: JsonOpt = False,
) -> None:
    """The features of the topic's newest events (windows see only these events)."""
    body: dict[str, Any] = {"events": events}
    if file is not None:
        body["sql"] = _read_sql(file)
    result = ApiClient().post(f"/datasets/{dataset}/features/preview", json=body)
    if as_json:
        print_json(result)
        return
    names = [c["name"] for c in result["columns"]]
    table = Table("partition", "offset", "key", *names)
    for row in result["rows"]:
        values = row["features"] or {}
        cells = [escape(str(values.get(n, ""))) for n in names]
        if row["problem"]:
            cells = [escape(row["problem"])] + [""] * (len(names) - 1)
        table.add_row(str(row["partition"]), str(row["offset"]), escape(str(row["key"])), *cells)
    console.print(table)
    console.print(f"[dim]{escape(result['note'])}[/dim]")
