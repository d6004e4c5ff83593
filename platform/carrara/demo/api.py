"""A small client of Carrara's public REST API, as a CI pipeline would use it."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx


class ApiError(Exception):
    """The API answered with an error (its problem detail) or could not be reached."""


class DemoApi:
    """Calls `/api/v1` with a bearer token; errors become `ApiError` with the problem detail."""

    def __init__(self, base_url: str, token: str, timeout: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(
            base_url=f"{self.base_url}/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The decoded JSON answer; raises ApiError naming the call and the problem detail."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"{method} {path}: cannot reach the API: {exc}") from exc
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail") or response.text
            except ValueError:
                detail = response.text
            raise ApiError(f"{method} {path} → {response.status_code}: {detail}")
        return response.json() if response.content else None

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> Any:
        return self.request("POST", path, **kwargs)

    def put(self, path: str, **kwargs: Any) -> Any:
        return self.request("PUT", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> Any:
        return self.request("DELETE", path, **kwargs)

    def poll(
        self,
        path: str,
        done: Callable[[Any], bool],
        *,
        timeout: float,
        interval: float = 1.0,
        on_update: Callable[[Any], None] | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """GET `path` until `done(answer)` or the timeout; the last answer (check it again)."""
        deadline = time.monotonic() + timeout
        while True:
            answer = self.get(path, params=params)
            if on_update is not None:
                on_update(answer)
            if done(answer) or time.monotonic() > deadline:
                return answer
            time.sleep(interval)
