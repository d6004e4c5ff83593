"""Bodies over the limit get 413 before anything reads them; routes may allow more."""

from __future__ import annotations

import re
from collections.abc import Iterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from carrara.body_limit import BodyLimitMiddleware, RouteLimit

read: list[int] = []


async def echo(request: Request) -> JSONResponse:
    body = await request.body()
    read.append(len(body))
    return JSONResponse({"size": len(body)})


def client() -> TestClient:
    app = Starlette(
        routes=[Route("/small", echo, methods=["POST"]), Route("/upload", echo, methods=["POST"])]
    )
    app.add_middleware(
        BodyLimitMiddleware,
        max_bytes=1000,
        routes=[RouteLimit("POST", re.compile(r"/upload"), 5000)],
    )
    return TestClient(app)


def chunks(n: int, size: int = 100) -> Iterator[bytes]:
    for _ in range(n):
        yield b"x" * size


def test_a_declared_length_over_the_limit_is_refused_unread() -> None:
    read.clear()
    response = client().post("/small", content=b"x" * 1001)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert "larger than the limit of 1000 bytes" in response.json()["detail"]
    assert read == []
    assert client().post("/small", content=b"x" * 1000).json() == {"size": 1000}


def test_a_streamed_body_is_counted() -> None:
    read.clear()
    assert client().post("/small", content=chunks(11)).status_code == 413
    assert read == []
    assert client().post("/small", content=chunks(10)).json() == {"size": 1000}


def test_a_route_may_allow_more() -> None:
    assert client().post("/upload", content=b"x" * 4000).json() == {"size": 4000}
    assert client().post("/upload", content=chunks(51)).status_code == 413
    assert client().post("/small", content=b"x" * 4000).status_code == 413
