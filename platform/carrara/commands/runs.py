"""Training runs: start (optionally waiting for the result), list, show, cancel."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
import yaml
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from carrara.commands.api_client import (
    ApiClient,
    console,
    err_console,
    fail,
    load_document,
    print_json,
)

app = typer.Typer(no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
FINISHED = ("succeeded", "failed", "cancelled")
EXIT_FAILED = 1
EXIT_TIMEOUT = 4


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """`k=v` pairs as a dict; values parse as YAML (`0.5` is a float, `true` a bool)."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            fail(f"--param {pair!r} must look like name=value", code=2)
        try:
            params[key] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            fail(f"--param {key}: {raw!r} is not a valid YAML value: {exc}", code=2)
    return params


@app.command("start")
def start(
    dataset: Annotated[str, typer.Option(help="Dataset name.")],
    version: Annotated[int, typer.Option(help="Dataset version (snapshot) number.")],
    algorithm: Annotated[str, typer.Option(help="See `carrara runs algorithms`.")],
    model: Annotated[str, typer.Option(help="Registered model name the result is added to.")],
    param: Annotated[
        list[str] | None,
        typer.Option("--param", "-p", help="name=value (repeatable); overrides --params-file."),
    ] = None,
    params_file: Annotated[
        str | None, typer.Option(help="YAML/JSON mapping of params (`-` for stdin).")
    ] = None,
    holdout_method: Annotated[
        str | None, typer.Option(help="hash (by key, the default) or time (latest events).")
    ] = None,
    holdout_fraction: Annotated[
        float | None, typer.Option(help="Share of events held out (default 0.2).")
    ] = None,
    holdout_seed: Annotated[int | None, typer.Option(help="Salt of the hash holdout.")] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="A CI retry with the same key gets the same run, never a second one."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the run; exit 1 if it fails or is cancelled.")
    ] = False,
    timeout: Annotated[
        float | None,
        typer.Option(min=0, help="With --wait: give up after this many seconds (exit 4)."),
    ] = None,
    poll_interval: Annotated[
        float, typer.Option(min=0.1, help="With --wait: seconds between status checks.")
    ] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """Start a training run of a dataset version; with --wait, follow it to the end."""
    params = load_document(params_file) if params_file else {}
    params.update(parse_params(param or []))
    holdout = {
        name: value
        for name, value in (
            ("method", holdout_method),
            ("fraction", holdout_fraction),
            ("seed", holdout_seed),
        )
        if value is not None
    }
    body: dict[str, Any] = {
        "dataset": dataset,
        "dataset_version": version,
        "algorithm": algorithm,
        "params": params,
        "holdout": holdout,
        "registered_model_name": model,
    }
    headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
    client = ApiClient()
    run = client.post("/runs", json=body, headers=headers)
    if not wait:
        if as_json:
            print_json(run)
        else:
            console.print(f"run {run['id']} {run['status']}")
        return
    err_console.print(f"run {run['id']} {run['status']}: waiting for it to finish")
    run = _follow(client, run, timeout, poll_interval)
    if as_json:
        print_json(run)
    if run["status"] not in FINISHED:
        fail(f"run {run['id']} is still {run['status']} after {timeout:g}s", code=EXIT_TIMEOUT)
    if run["status"] != "succeeded":
        reason = f": {run['error']}" if run.get("error") else ""
        fail(f"run {run['id']} {run['status']}{reason}", code=EXIT_FAILED)
    if not as_json:
        _print_run(run)


def _follow(
    client: ApiClient, run: dict[str, Any], timeout: float | None, interval: float
) -> dict[str, Any]:
    """Poll the run with a progress bar (on stderr) until it finishes or `timeout` passes."""
    deadline = None if timeout is None else time.monotonic() + timeout
    columns = (
        TextColumn(f"run {run['id']}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("events"),
        TextColumn("[bold]{task.fields[status]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=err_console) as progress:
        bar = progress.add_task("replay", total=run["events_total"] or None, status=run["status"])
        while True:
            progress.update(
                bar,
                completed=run["events_replayed"],
                total=run["events_total"] or None,
                status=run["status"],
            )
            if run["status"] in FINISHED:
                return run
            if deadline is not None and time.monotonic() >= deadline:
                return run
            sleep = interval if deadline is None else min(interval, deadline - time.monotonic())
            time.sleep(max(sleep, 0))
            run = client.get(f"/runs/{run['id']}")


def _print_run(run: dict[str, Any]) -> None:
    table = Table("field", "value", show_header=False)
    rows = [
        ("id", run["id"]),
        ("status", run["status"]),
        ("dataset", f"{run['dataset']} v{run['dataset_version']}"),
        ("algorithm", run["algorithm"]),
        ("params", yaml.safe_dump(run["params"], default_flow_style=True).strip()),
        ("holdout", yaml.safe_dump(run["holdout"], default_flow_style=True).strip()),
        ("model", run["registered_model_name"]),
        ("model version id", run["model_version_id"]),
        ("progress", f"{run['events_replayed']}/{run['events_total']} ({run['progress']:.0%})"),
        ("metrics", ", ".join(f"{k}={v}" for k, v in run["metrics"].items())),
        ("error", run["error"]),
        ("mlflow run", run["mlflow_run_id"]),
        ("mlflow url", run["mlflow_url"]),
        ("created", f"{run['created_at']} by {run['created_by']}"),
        ("started", run["started_at"]),
        ("finished", run["finished_at"]),
    ]
    for name, value in rows:
        table.add_row(name, "" if value is None else str(value))
    console.print(table)


@app.command("list")
def list_(
    status: Annotated[
        str | None, typer.Option(help="queued, running, succeeded, failed or cancelled.")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset name.")] = None,
    algorithm: Annotated[str | None, typer.Option(help="Algorithm name.")] = None,
    model: Annotated[str | None, typer.Option(help="Registered model name.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=500, help="Most runs to show.")] = 50,
    as_json: JsonOpt = False,
) -> None:
    """List runs, newest first."""
    query = {
        "status": status,
        "dataset": dataset,
        "algorithm": algorithm,
        "registered_model_name": model,
        "limit": limit,
    }
    page = ApiClient().get("/runs", params={k: v for k, v in query.items() if v is not None})
    if as_json:
        print_json(page["items"])
        return
    table = Table("id", "dataset", "algorithm", "model", "status", "progress", "created")
    for r in page["items"]:
        table.add_row(
            str(r["id"]),
            f"{r['dataset']} v{r['dataset_version']}",
            r["algorithm"],
            r["registered_model_name"],
            r["status"],
            f"{r['progress']:.0%}",
            r["created_at"],
        )
    console.print(table)


@app.command("show")
def show(run_id: int, as_json: JsonOpt = False) -> None:
    """Show a run: state, progress, metrics, error, MLflow run, model version."""
    run = ApiClient().get(f"/runs/{run_id}")
    if as_json:
        print_json(run)
    else:
        _print_run(run)


@app.command("cancel")
def cancel(run_id: int, as_json: JsonOpt = False) -> None:
    """Cancel a queued or running run."""
    run = ApiClient().post(f"/runs/{run_id}/cancel")
    if as_json:
        print_json(run)
    else:
        console.print(f"run {run['id']} cancelled")


@app.command("algorithms")
def algorithms(as_json: JsonOpt = False) -> None:
    """List the algorithms, the dataset tasks each supports and their params."""
    items = ApiClient().get("/runs/algorithms")
    if as_json:
        print_json(items)
        return
    table = Table("algorithm", "tasks", "params (default)")
    for a in items:
        props = a["params_schema"].get("properties", {})
        params = ", ".join(f"{k}={v.get('default', '')}" for k, v in props.items())
        table.add_row(a["name"], ", ".join(a["tasks"]), params)
    console.print(table)
