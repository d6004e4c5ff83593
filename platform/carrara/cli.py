"""The `carrara` command.

`carrara stack ...` and `carrara demo` manage local processes; every other command group is a REST
client of the control plane (like any CI pipeline) and never imports the database layer.
"""

from __future__ import annotations

import importlib
import os
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
from carrara.devstack.secure import profile_env
from carrara.devstack.service import StackError
from carrara.settings import Settings, get_settings

app = typer.Typer(help="Carrara: a Kafka-native ML platform.", no_args_is_help=True)
stack_app = typer.Typer(help="Manage the local stack (no Docker needed).", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
for _name, _module in (
    ("datasets", "carrara.commands.datasets"),
    ("features", "carrara.commands.features"),
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
        help=f"Services (default: {' '.join(INFRASTRUCTURE)}; also {' '.join(APPLICATION)}). "
        "`up` starts what the named services need first."
    ),
]


SecureOption = Annotated[
    bool,
    typer.Option(
        "--secure",
        help="The secured stack: its own home (.carrara/secure) and ports (+100), Kafka on "
        "SASL_SSL (SCRAM-SHA-512, TLS) with ACLs, MLflow with basic auth.",
    ),
]


def _stack(secure: bool = False) -> Stack:
    stack = Stack(
        Settings(), report=lambda msg: err_console.print(f"[dim]·[/dim] {msg}"), secure=secure
    )
    if secure:
        # Health probes in this process (e.g. the Celery ping) must find the secured stack.
        os.environ.update(profile_env(stack.settings))
        get_settings.cache_clear()
    return stack


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
def stack_up(services: ServiceNames = None, secure: SecureOption = False) -> None:
    """Start the stack's services that are not running and wait until each is healthy."""
    stack = _stack(secure)
    try:
        statuses = stack.up(services)
        env_files = stack.write_identity_env_files()
    except StackError as exc:
        _fail(exc)
    _print_table(statuses)
    if env_files:
        console.print(
            "Credentials and ports of each identity (mode 0600), to `set -a; . FILE; set +a` "
            "before running a process or the CLI against this stack:\n  " + "\n  ".join(env_files)
        )


@stack_app.command("down")
def stack_down(services: ServiceNames = None, secure: SecureOption = False) -> None:
    """Stop the processes this project started (all of them unless services are named)."""
    try:
        stopped = _stack(secure).down(services)
    except StackError as exc:
        _fail(exc)
    console.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@stack_app.command("status")
def stack_status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    secure: SecureOption = False,
) -> None:
    """Show each service: running, healthy, PID and endpoint. Exit 1 if an infra service is down."""
    statuses = _stack(secure).status()
    if as_json:
        sys.stdout.write(orjson.dumps(as_dicts(statuses), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    else:
        _print_table(statuses)
    infra_down = [s for s in statuses if s.name in INFRASTRUCTURE and not s.healthy]
    raise typer.Exit(1 if infra_down else 0)


@stack_app.command("acls")
def stack_acls_command(
    data_prefix: Annotated[
        list[str] | None,
        typer.Option(
            "--data-prefix",
            help="Topic prefix scorers and the monitor may use (repeat; default: any topic).",
        ),
    ] = None,
) -> None:
    """Create the ACLs of Carrara's identities (devstack/secure.py) on the Kafka cluster the
    environment points at, authenticating with its CARRARA_KAFKA_* settings (an admin's)."""
    from carrara.devstack.secure import apply_acls, stack_acls

    settings = Settings()
    acls = stack_acls(settings, tuple(data_prefix or ()))
    try:
        apply_acls(settings.kafka_bootstrap, settings, acls)
    except StackError as exc:
        _fail(exc)
    console.print(f"{len(acls)} ACL bindings in place on {settings.kafka_bootstrap}")


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
        bool,
        typer.Option(
            "--once",
            help="Run both scenarios to completion, stop what was started, exit 0 only if every "
            "step worked.",
        ),
    ] = False,
    no_scenarios: Annotated[
        bool,
        typer.Option(
            "--no-scenarios",
            help="Only start the platform and check readiness (with --once: then stop).",
        ),
    ] = False,
    keep_deployments: Annotated[
        bool,
        typer.Option("--keep-deployments", help="Leave the demo's deployments running at the end."),
    ] = False,
) -> None:
    """Start the platform, run the fraud and vital-signs scenarios, keep streaming until Ctrl-C."""
    stack = _stack()
    settings = stack.settings
    started: list[str] = []
    # SIGTERM stops the demo like Ctrl-C does, wherever it is (starting, training, streaming).
    signal.signal(signal.SIGTERM, _interrupt)
    ok = True
    try:
        for name in (*INFRASTRUCTURE, *APPLICATION):
            started += [s.name for s in stack.up([name]) if s.started_now]
        _print_endpoints(settings)
        token = _admin_token(settings)
        ready = _readiness(settings)
        if not ready:
            raise typer.Exit(1)
        if not no_scenarios:
            from carrara.demo.runner import run_demo

            scorers = sum(1 for name in APPLICATION if name.startswith("scorer-"))
            ok = run_demo(
                settings,
                token,
                once=once,
                console=console,
                scorers=scorers,
                keep_deployments=keep_deployments,
            )
        elif not once:
            console.print(
                "[bold]Carrara is running.[/bold] Press Ctrl-C to stop what this demo started."
            )
            _wait_for_interrupt()
    except KeyboardInterrupt:
        console.print("interrupted")
        ok = not once  # stopping the endless demo is how it ends; a cut-short --once failed
    except StackError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1) from exc
    finally:
        # Let the clean-up finish: a second Ctrl-C must not leave processes behind.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if started:
            console.print("stopping what the demo started ...")
            stack.down(started)
    raise typer.Exit(0 if ok else 1)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def _wait_for_interrupt() -> None:
    stop = threading.Event()
    while not stop.wait(1.0):
        pass


def _print_endpoints(settings: Settings) -> None:
    table = Table(title="Carrara endpoints")
    table.add_column("what")
    table.add_column("where")
    table.add_row("UI", f"{settings.api_url}/")
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


def _admin_token(settings: Settings) -> str:
    """An admin token for the demo: the one kept under the stack's home if it still works,
    else a new one (the first admin token on a new stack), kept there with mode 0600.

    Like `carrara admin bootstrap`, this runs server-side: there is no token yet to call the API
    with. Everything else the demo does goes through the public API.
    """
    from sqlalchemy.orm import Session

    from carrara.auth.roles import Role
    from carrara.auth.service import authenticate, bootstrap_admin, create_token
    from carrara.db import engine_for
    from carrara.errors import Unauthorized
    from carrara.secret_keys import replace_private_file

    token_file = settings.home / "admin-token"
    secret = token_file.read_text().strip() if token_file.exists() else ""
    with Session(engine_for(settings.database_url)) as session, session.begin():
        try:
            usable = bool(secret) and authenticate(session, secret).role is Role.admin
        except Unauthorized:
            usable = False
        if not usable:
            secret = bootstrap_admin(session, "demo-admin") or ""
            if not secret:  # admins exist, but this stack's token file is gone or revoked
                _, secret = create_token(session, "demo", Role.admin, created_by=None)
    if not usable:
        # Created with mode 0600 and moved into place: never readable by others, never partial.
        replace_private_file(token_file, secret + "\n")
    console.print(f"Admin token (also in {token_file}): [bold]{secret}[/bold]")
    console.print(f"  export CARRARA_TOKEN=$(cat {token_file})")
    return secret


def _readiness(settings: Settings) -> bool:
    import httpx

    response = httpx.get(f"{settings.api_url}/readyz", timeout=15)
    colour = "green" if response.status_code == 200 else "red"
    console.print(f"[{colour}]GET /readyz → {response.status_code}[/{colour}] {response.text}")
    return response.status_code == 200


if __name__ == "__main__":
    app()
