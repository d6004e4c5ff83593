"""The `carrara` command.

`carrara stack ...` and `carrara demo` manage local processes; every other command group is a REST
client of the control plane (like any CI pipeline) and never imports the database layer.
"""

from __future__ import annotations

import importlib
import signal
import subprocess
import sys
import threading
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from carrara.devstack.manager import APPLICATION, INFRASTRUCTURE, ServiceStatus, Stack, as_dicts
from carrara.devstack.service import StackError
from carrara.settings import Settings

app = typer.Typer(help="Carrara: a Kafka-native ML platform.", no_args_is_help=True)
stack_app = typer.Typer(help="Manage the local stack (no Docker needed).", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
for _name, _module in (
    ("datasets", "carrara.commands.datasets"),
    ("runs", "carrara.commands.runs"),
    ("models", "carrara.commands.models"),
    ("deployments", "carrara.commands.deployments"),
    ("tokens", "carrara.commands.tokens"),
    ("admin", "carrara.commands.admin"),
):
    _group = importlib.import_module(_module)
    app.add_typer(_group.app, name=_name, help=_group.__doc__)
app.command("deploy")(importlib.import_module("carrara.commands.deployments").deploy_command)

console = Console()
err_console = Console(stderr=True)

ServiceNames = Annotated[
    list[str] | None,
    typer.Argument(
        help=f"Services (default: {' '.join(INFRASTRUCTURE)}; also {' '.join(APPLICATION)})"
    ),
]


def _stack() -> Stack:
    return Stack(Settings(), report=lambda msg: err_console.print(f"[dim]·[/dim] {msg}"))


def _print_table(statuses: list[ServiceStatus]) -> None:
    table = Table(title="Carrara local stack")
    for column in ("service", "state", "pid", "endpoint"):
        table.add_column(column)
    for s in statuses:
        state = (
            "[green]healthy" if s.healthy else ("[yellow]starting" if s.running else "[red]down")
        )
        table.add_row(s.label, state, str(s.pid or ""), s.endpoint)
    console.print(table)


def _fail(exc: StackError) -> None:
    err_console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1) from exc


@stack_app.command("up")
def stack_up(services: ServiceNames = None) -> None:
    """Start the stack's services that are not running and wait until each is healthy."""
    try:
        statuses = _stack().up(services)
    except StackError as exc:
        _fail(exc)
    _print_table(statuses)


@stack_app.command("down")
def stack_down(services: ServiceNames = None) -> None:
    """Stop the processes this project started (all of them unless services are named)."""
    try:
        stopped = _stack().down(services)
    except StackError as exc:
        _fail(exc)
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@stack_app.command("status")
def stack_status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show each service: running, healthy, PID and endpoint. Exit 1 if an infra service is down."""
    statuses = _stack().status()
    if as_json:
        sys.stdout.write(orjson.dumps(as_dicts(statuses), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    else:
        _print_table(statuses)
    infra_down = [s for s in statuses if s.name in INFRASTRUCTURE and not s.healthy]
    raise typer.Exit(1 if infra_down else 0)


@stack_app.command(
    "exec", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def stack_exec(ctx: typer.Context) -> None:
    """Run a command with the stack up; stop afterwards only what this call had to start."""
    if not ctx.args:
        err_console.print("usage: carrara stack exec -- COMMAND [ARGS...]")
        raise typer.Exit(2)
    stack = _stack()
    try:
        statuses = stack.up()
    except StackError as exc:
        stack.down(INFRASTRUCTURE)
        _fail(exc)
    started = [s.name for s in statuses if s.started_now]
    try:
        code = subprocess.call(ctx.args)
    finally:
        if started:
            stack.down(started)
    raise typer.Exit(code)


@app.command()
def demo(
    once: Annotated[
        bool, typer.Option("--once", help="Bring everything up, check readiness, stop, exit.")
    ] = False,
) -> None:
    """Start the platform in the foreground and print where everything listens; Ctrl-C stops it."""
    stack = _stack()
    settings = stack.settings
    started: list[str] = []
    try:
        for name in (*INFRASTRUCTURE, *APPLICATION):
            status = stack.up([name])[0]
            if status.started_now:
                started.append(name)
        _print_endpoints(settings)
        _print_admin_token(settings)
        ready = _readiness(settings)
        if once:
            raise typer.Exit(0 if ready else 1)
        console.print(
            "[bold]Carrara is running.[/bold] Press Ctrl-C to stop what this demo started."
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            while not stop.wait(1.0):
                pass
        except KeyboardInterrupt:
            pass
    except StackError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        if started:
            console.print("stopping what the demo started ...")
            stack.down(started)


def _print_endpoints(settings: Settings) -> None:
    table = Table(title="Carrara endpoints")
    table.add_column("what")
    table.add_column("where")
    table.add_row("API (OpenAPI docs)", f"{settings.api_url}/docs")
    table.add_row("Readiness", f"{settings.api_url}/readyz")
    table.add_row("MLflow UI", settings.mlflow_url)
    table.add_row("Kafka bootstrap", settings.kafka_bootstrap)
    table.add_row(
        "PostgreSQL", f"postgresql://{settings.db_user}@{settings.host}:{settings.pg_port}"
    )
    table.add_row("Redis", settings.redis_url)
    table.add_row("Data and logs", str(settings.home))
    console.print(table)


def _print_admin_token(settings: Settings) -> None:
    """Create the first admin token on a new stack; keep it (mode 0600) under the stack's home."""
    from sqlalchemy.orm import Session

    from carrara.auth.service import bootstrap_admin
    from carrara.db import engine_for

    token_file = settings.home / "admin-token"
    with Session(engine_for(settings.database_url)) as session, session.begin():
        secret = bootstrap_admin(session, "demo-admin")
    if secret is not None:
        token_file.write_text(secret + "\n")
        token_file.chmod(0o600)
    if token_file.exists():
        console.print(
            f"Admin token (also in {token_file}): [bold]{token_file.read_text().strip()}[/bold]"
        )
        console.print(f"  export CARRARA_TOKEN=$(cat {token_file})")
    else:
        console.print("An admin token exists already; create more with `carrara tokens create`.")


def _readiness(settings: Settings) -> bool:
    import httpx

    response = httpx.get(f"{settings.api_url}/readyz", timeout=15)
    colour = "green" if response.status_code == 200 else "red"
    console.print(f"[{colour}]GET /readyz → {response.status_code}[/{colour}] {response.text}")
    return response.status_code == 200


if __name__ == "__main__":
    app()
