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


@app.command("republish-deployments")
def republish_deployments() -> None:
    """Publish every deployment's current revision again (signed, when a signing key is set).

    Run it after configuring CARRARA_DEPLOYMENT_SIGNING_KEY on the API and before configuring
    it on the scorers: the records already on the deployments topic are unsigned, and scorers
    that verify would refuse them. Runs next to the control plane, like `bootstrap`.
    """
    from carrara.db import get_sessionmaker
    from carrara.deployments.revisions import republish
    from carrara.deployments.service import publishing
    from carrara.settings import get_settings

    with get_sessionmaker()() as session, session.begin():
        count = republish(session, publishing(get_settings()))
    console.print(f"{count} deployment revision(s) queued; the API's outbox relay publishes them")
