"""Datasets and their versions (snapshots of a topic's offsets)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from carrara.commands.api_client import ApiClient, console, load_document, print_json

app = typer.Typer(no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _all_pages(client: ApiClient, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        page = client.get(
            path, params={**params, "limit": 500, **({"cursor": cursor} if cursor else {})}
        )
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            return items


def _offsets_text(offsets: list[dict[str, int]]) -> str:
    return " ".join(f"{o['partition']}:[{o['start']},{o['end']})" for o in offsets)


@app.command("create")
def create(
    file: Annotated[str, typer.Option("--file", "-f", help="dataset.yaml (or JSON; - = stdin)")],
    as_json: JsonOpt = False,
) -> None:
    """Register a dataset; the API checks its schema against recent events of the topic."""
    dataset = ApiClient().post("/datasets", json=load_document(file))
    if as_json:
        print_json(dataset)
        return
    console.print(f"dataset [bold]{dataset['name']}[/bold] created on topic {dataset['topic']}")
    if dataset["topic_created"]:
        console.print("the topic was created")
    elif dataset["sample_size"]:
        console.print(f"schema matches the {dataset['sample_size']} most recent events")
    else:
        console.print("the topic is empty: no events to check the schema against yet")


@app.command("list")
def list_(
    name_prefix: Annotated[str | None, typer.Option(help="Only names starting with this")] = None,
    topic: Annotated[str | None, typer.Option(help="Only datasets on this topic")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List datasets, newest first."""
    params = {"name_prefix": name_prefix, "topic": topic}
    items = _all_pages(ApiClient(), "/datasets", {k: v for k, v in params.items() if v})
    if as_json:
        print_json(items)
        return
    table = Table("name", "topic", "task", "label", "features", "owner", "created")
    for d in items:
        table.add_row(
            d["name"],
            d["topic"],
            d["task"],
            d["label_field"] or "",
            str(len(d["features"])),
            d["owner"],
            d["created_at"],
        )
    console.print(table)


@app.command("show")
def show(name: str, as_json: JsonOpt = False) -> None:
    """Show a dataset and its feature schema."""
    d = ApiClient().get(f"/datasets/{name}")
    if as_json:
        print_json(d)
        return
    console.print(f"[bold]{d['name']}[/bold] ({d['task']}) on topic {d['topic']}")
    console.print(f"key: {d['key_field']}   event time: {d['event_time_field'] or '-'}")
    console.print(f"label: {d['label_field'] or '-'}   owner: {d['owner'] or '-'}")
    if d["description"]:
        console.print(escape(d["description"]))
    table = Table("feature", "type")
    for f in d["features"]:
        table.add_row(f["name"], f["type"])
    console.print(table)


@app.command("snapshot")
def snapshot(
    name: str,
    from_: Annotated[
        str | None, typer.Option("--from", help="ISO time: first event time included")
    ] = None,
    to: Annotated[str | None, typer.Option("--to", help="ISO time: first time excluded")] = None,
    description: Annotated[str, typer.Option(help="What this version is for")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Pin the topic's offsets as a new version: everything up to now, or --from/--to."""
    body: dict[str, Any] = {"mode": "latest", "description": description}
    if from_ or to:
        body.update({"mode": "time_range", "from": from_, "to": to})
    version = ApiClient().post(f"/datasets/{name}/versions", json=body)
    if as_json:
        print_json(version)
        return
    console.print(
        f"{name} v{version['number']}: {version['event_count']} events "
        f"({_offsets_text(version['offsets'])})"
    )


@app.command("versions")
def versions(name: str, as_json: JsonOpt = False) -> None:
    """List a dataset's versions, newest first."""
    items = _all_pages(ApiClient(), f"/datasets/{name}/versions", {})
    if as_json:
        print_json(items)
        return
    table = Table("version", "mode", "events", "offsets [start,end)", "by", "created")
    for v in items:
        table.add_row(
            f"v{v['number']}",
            v["mode"],
            str(v["event_count"]),
            _offsets_text(v["offsets"]),
            v["created_by"],
            v["created_at"],
        )
    console.print(table)
