"""Server-side administration (runs where the control plane's database is reachable)."""

from __future__ import annotations

from typing import Annotated

import typer

from carrara.commands.api_client import console
from carrara.commands.tokens import ExpiresOpt, parse_duration

app = typer.Typer(no_args_is_help=True)


@app.command("bootstrap")
def bootstrap(
    name: Annotated[str, typer.Option(help="Name of the first admin token.")] = "admin",
    expires_in: ExpiresOpt = None,
) -> None:
    """Create the first admin token if no active admin token exists, and print it once.

    Unlike every other command this one talks to the database directly (there is no token yet
    to call the API with), so it runs next to the control plane, like a migration.
    """
    from datetime import timedelta

    from carrara.auth.service import bootstrap_admin
    from carrara.db import get_sessionmaker

    seconds = parse_duration(expires_in)
    expires = timedelta(seconds=seconds) if seconds else None
    with get_sessionmaker()() as session, session.begin():
        secret = bootstrap_admin(session, name, expires)
    if secret is None:
        console.print(
            "an active admin token already exists; create more with `carrara tokens create`"
        )
        raise typer.Exit(1)
    console.print(secret)
