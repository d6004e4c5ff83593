"""API tokens: create (the secret is printed once), list, revoke. Needs an admin token."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from carrara.commands.api_client import ApiClient, console, print_json

app = typer.Typer(no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@app.command("create")
def create(
    name: str,
    role: Annotated[str, typer.Option(help="viewer, editor or admin")] = "viewer",
    as_json: JsonOpt = False,
) -> None:
    """Create a token and print its secret (shown only this once)."""
    token = ApiClient().post("/tokens", json={"name": name, "role": role})
    if as_json:
        print_json(token)
    else:
        console.print(f"token {token['id']} ({token['role']}): [bold]{token['token']}[/bold]")
        console.print("Store it now: it cannot be shown again.")


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List tokens (never their secrets)."""
    page = ApiClient().get("/tokens", params={"limit": 500})
    if as_json:
        print_json(page["items"])
        return
    table = Table("id", "name", "role", "prefix", "last used", "revoked")
    for t in page["items"]:
        table.add_row(
            str(t["id"]),
            t["name"],
            t["role"],
            t["prefix"],
            t["last_used_at"] or "",
            t["revoked_at"] or "",
        )
    console.print(table)


@app.command("revoke")
def revoke(token_id: int) -> None:
    """Revoke a token; it stops working at once."""
    ApiClient().delete(f"/tokens/{token_id}")
    console.print(f"token {token_id} revoked")
