"""Browser tests: Playwright drives Debian's Chromium against the real running stack.

The stack is the one integration tests use (Kafka, Postgres, Redis, MLflow, checked by
`stack_settings`), plus processes started here on a database of their own: the API (which serves
the UI), a training worker on its own Celery queue, a scorer on its own pool, and the monitor.
Never `playwright install`: the browser is Debian's `chromium` (deploy/bootstrap.sh web).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from carrara.settings import Settings
from tests.integration.conftest import (
    ROOT,
    RUN_ID,
    LiveApi,
    migrated_database,
    running_api,
    stack_settings,
)

__all__ = ["stack_settings"]  # a fixture, re-exported for the tests of this folder

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying to reach the internet.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
BIN = Path(sys.executable).parent
QUEUE = f"carrara-e2e-{RUN_ID}"
POOL = f"e2e-{RUN_ID}"
API_ENV = {"CARRARA_TRAINING_QUEUE": QUEUE}
SCORER_ENV = {"CARRARA_SCORER_STATUS_INTERVAL_S": "2"}


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict[str, Any]) -> dict[str, Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"{CHROMIUM} is missing: run `deploy/bootstrap.sh web` (installs Debian's chromium)",
            pytrace=False,
        )
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "headless": True,
        "args": ARGS,
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict[str, Any]) -> dict[str, Any]:
    """Laptop width: the UI must read well at 1280 px."""
    return {**browser_context_args, "viewport": {"width": 1280, "height": 900}}


@pytest.fixture(scope="session")
def screenshots() -> Path:
    """Where the test run writes a screenshot of each page (git-ignored), for reviewers."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


def start_process(name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A platform process of the test, logging to .carrara/logs (its own session: killpg)."""
    log = ROOT / ".carrara" / "logs" / f"test-e2e-{name}-{RUN_ID}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


@dataclass(frozen=True)
class UiStack:
    """The running platform the browser talks to, and tokens of each role."""

    api: LiveApi
    settings: Settings
    database_url: str
    pool: str
    editor_token: str
    viewer_token: str

    @property
    def ui(self) -> str:
        return f"{self.api.url}/ui"

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The REST API as the admin (setup and checks the browser does not do)."""
        headers = {"Authorization": f"Bearer {self.api.admin_token}"}
        return httpx.request(
            method, f"{self.api.url}/api/v1{path}", headers=headers, timeout=30, **kwargs
        )


@pytest.fixture(scope="module")
def ui_stack(stack_settings: Settings) -> Iterator[UiStack]:
    """API + UI, a training worker, a scorer and the monitor, on a database of their own.

    Module-scoped: the processes stop when the browser tests are done, before other tests run.
    """
    with migrated_database(stack_settings, f"carrara_e2e_{RUN_ID}") as database_url:
        db_env = {"CARRARA_DATABASE_URL": database_url}
        with running_api(database_url, "e2e", **API_ENV) as api:
            processes = [
                start_process(
                    "worker",
                    [
                        str(BIN / "celery"),
                        "-A",
                        "carrara.training.worker",
                        "worker",
                        "-Q",
                        QUEUE,
                        "--concurrency=1",
                        "--loglevel=INFO",
                        f"--hostname=e2e-{uuid.uuid4().hex[:6]}@%h",
                    ],
                    {**db_env, **API_ENV},
                ),
                start_process(
                    "scorer",
                    [
                        str(BIN / "carrara-scorer"),
                        "--pool",
                        POOL,
                        "--instance-id",
                        f"e2e-scorer-{RUN_ID}",
                        "--metrics-port",
                        "0",
                    ],
                    {**db_env, **SCORER_ENV},
                ),
                start_process(
                    "monitor", [str(BIN / "carrara-monitor"), "--metrics-port", "0"], db_env
                ),
            ]
            try:
                stack = UiStack(api, stack_settings, database_url, POOL, "", "")
                tokens = {}
                for role in ("editor", "viewer"):
                    response = stack.call(
                        "POST", "/tokens", json={"name": f"e2e-{role}", "role": role}
                    )
                    assert response.status_code == 201, response.text
                    tokens[role] = response.json()["token"]
                yield UiStack(
                    api,
                    stack_settings,
                    database_url,
                    POOL,
                    tokens["editor"],
                    tokens["viewer"],
                )
            finally:
                for proc in processes:
                    stop_process(proc)
