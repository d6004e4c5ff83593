"""API tokens: create (the secret is printed once, optionally expiring), list, revoke, rotate.

Needs an admin token, except to rotate the token in use.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from carrara.commands.api_client import ApiClient, console, print_json

app = typer.Typer(no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


def parse_duration(text: str | None) -> int | None:
    """`90d`, `12h`, `30m`, `45s`, `2w` or plain seconds, as seconds (None for None)."""
    if text is None:
        return None
    raw = text.strip().lower()
    unit = _UNITS.get(raw[-1:])
    number = raw[:-1] if unit else raw
    if not number.isdigit():
        raise typer.BadParameter(f"'{text}': write a duration such as 90d, 12h, 30m or 3600")
    return int(number) * (unit or 1)


ExpiresOpt = Annotated[
    str | None,
    typer.Option(
        "--expires-in",
        help="Expire the token after this long: 90d, 12h, 30m, 45s, 2w (default: never).",
    ),
]


def _print_token(token: dict, as_json: bool) -> None:
    if as_json:
        print_json(token)
        return
    expiry = f", expires {token['expires_at']}" if token.get("expires_at") else ""
    console.print(f"token {token['id']} ({token['role']}{expiry}): [bold]{token['token']}[/bold]")
    console.print("Store it now: it cannot be shown again.")


@app.command("create")
def create(
    name: str,
    role: Annotated[str, typer.Option(help="viewer, editor or admin")] = "viewer",
    expires_in: ExpiresOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token and print its secret (shown only this once)."""
    body = {"name": name, "role": role, "expires_in": parse_duration(expires_in)}
    _print_token(ApiClient().post("/tokens", json=body), as_json)


@app.command("rotate")
def rotate(token_id: int, expires_in: ExpiresOpt = None, as_json: JsonOpt = False) -> None:
    """Replace a token by a new one (same name and role) and revoke the old one at once.

    The new token expires after --expires-in, else after as long as the old one was valid for.
    """
    body = {"expires_in": parse_duration(expires_in)}
    _print_token(ApiClient().post(f"/tokens/{token_id}/rotate", json=body), as_json)


@app.command("list")
def list_(as_json: JsonOpt = False) -> None:
    """List tokens (never their secrets)."""
    page = ApiClient().get("/tokens", params={"limit": 500})
    if as_json:
        print_json(page["items"])
        return
    table = Table("id", "name", "role", "prefix", "last used", "expires", "revoked")
    for t in page["items"]:
        table.add_row(
            str(t["id"]),
            t["name"],
            t["role"],
            t["prefix"],
            t["last_used_at"] or "",
            t.get("expires_at") or "",
            t["revoked_at"] or "",
        )
    console.print(table)


@app.command("revoke")
def revoke(token_id: int) -> None:
    """Revoke a token; it stops working at once."""
    ApiClient().delete(f"/tokens/{token_id}")
    console.print(f"token {token_id} revoked")
