"""The CLI's REST client: `CARRARA_API_URL` + `CARRARA_TOKEN`, problem details turned into exits.

The CLI is a client of the API like any CI pipeline; it never imports the database layer.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import httpx
import orjson
import typer
import yaml
from rich.console import Console

from carrara.settings import Settings

err_console = Console(stderr=True)
console = Console()


class ApiClient:
    def __init__(self, base_url: str | None = None, token: str | None = None) -> None:
        settings = Settings()
        self.base_url = (base_url or settings.api_url).rstrip("/")
        token = token or os.environ.get("CARRARA_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=f"{self.base_url}/api/v1", headers=headers, timeout=60)

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Call the API; on an error response print its problem detail and exit non-zero."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            fail(f"cannot reach the Carrara API at {self.base_url}: {exc}", code=3)
        if response.status_code >= 400:
            try:
                body = response.json()
                message = body.get("detail") or body.get("title") or response.text
            except ValueError:
                message = response.text
            fail(f"{response.status_code} {message}", code=2 if response.status_code < 500 else 3)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def load_document(path: str) -> dict[str, Any]:
    """A YAML or JSON file (`-` for standard input) as a dict."""
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    except OSError as exc:
        fail(f"cannot read {path}: {exc}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        fail(f"{path} is not valid YAML/JSON: {exc}")
    if not isinstance(data, dict):
        fail(f"{path} must hold a mapping at the top level")
    return data


def print_json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
