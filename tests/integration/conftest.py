"""Fixtures that talk to the real local stack (Kafka, Postgres, Redis, MLflow).

A missing service fails the run loudly with what to do; nothing is ever skipped.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from alembic import command
from alembic.config import Config
from fastapi.testclient import TestClient
from psycopg import sql
from sqlalchemy import Engine
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from carrara.auth.roles import Role
from carrara.auth.service import create_token
from carrara.db import get_session, make_engine
from carrara.settings import Settings, get_settings
from carrara.streams.topics import TopicAdmin

ROOT = Path(__file__).resolve().parents[2]
RUN_ID = uuid.uuid4().hex[:8]


def _require(name: str, probe: Callable[[], object]) -> None:
    try:
        probe()
    except Exception as exc:
        pytest.fail(
            f"{name} is not reachable ({type(exc).__name__}: {exc}). Integration tests need the "
            "real local stack: run `make test`, or `carrara stack up` first.",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def stack_settings() -> Settings:
    """Settings of the running local stack, after checking every service answers."""
    settings = Settings()
    _require("Kafka", lambda: TopicAdmin(settings.kafka_bootstrap).ping(timeout=5))
    _require("Redis", lambda: redis.Redis.from_url(settings.redis_url, socket_timeout=3).ping())
    _require(
        "MLflow", lambda: httpx.get(f"{settings.mlflow_url}/health", timeout=5).raise_for_status()
    )
    _require(
        "PostgreSQL",
        lambda: psycopg.connect(_libpq(settings.database_url), connect_timeout=3).close(),
    )
    return settings


def _libpq(url: str) -> str:
    """A SQLAlchemy URL as a libpq connection string."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def migrated_database(settings: Settings, name: str) -> Iterator[str]:
    """Create database `name`, migrate it to head with Alembic, drop it afterwards."""
    admin_url = _libpq(settings.database_url)
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(settings.database_url).set(database=name).render_as_string(hide_password=False)
    try:
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["url"] = url
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture(scope="session")
def test_database_url(stack_settings: Settings) -> Iterator[str]:
    """A database created for this test session and migrated to head with Alembic."""
    with migrated_database(stack_settings, f"carrara_test_{RUN_ID}") as url:
        yield url


@pytest.fixture(scope="session")
def engine(test_database_url: str) -> Iterator[Engine]:
    eng = make_engine(test_database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def db_session(engine: Engine) -> Iterator[Session]:
    """A session in a transaction rolled back after the test (commits become savepoints)."""
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint")
    try:
        yield session
    finally:
        session.close()
        transaction.rollback()
        connection.close()


@pytest.fixture
def test_settings(stack_settings: Settings, test_database_url: str) -> Settings:
    # The background relay would use its own connections, which cannot see the test's
    # uncommitted transaction: tests drive the relay explicitly with `OutboxRelay.run_once`.
    return stack_settings.model_copy(
        update={"database_url": test_database_url, "outbox_relay_enabled": False}
    )


@pytest.fixture
def client(db_session: Session, test_settings: Settings) -> Iterator[TestClient]:
    """The API bound to the test transaction and settings (no token: add `headers=`)."""
    from carrara.main import create_app

    app = create_app(test_settings)

    def _session() -> Iterator[Session]:
        yield db_session
        db_session.flush()

    app.dependency_overrides[get_session] = _session
    app.dependency_overrides[get_settings] = lambda: test_settings
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def topic_name(request: pytest.FixtureRequest, stack_settings: Settings) -> Iterator[str]:
    """A Kafka topic name unique to this test; the topic is deleted afterwards if created."""
    safe = "".join(c if c.isalnum() else "-" for c in request.node.name)[:80]
    name = f"test-{RUN_ID}-{safe}-{uuid.uuid4().hex[:6]}"
    yield name
    admin = TopicAdmin(stack_settings.kafka_bootstrap)
    if admin.partitions(name):
        admin.delete_topics([name])


def _created_topics(settings: Settings, *names: str) -> Iterator[tuple[str, ...]]:
    admin = TopicAdmin(settings.kafka_bootstrap)
    for name in names:
        admin.create_topic(name, 1)
    yield names
    admin.delete_topics([n for n in names if admin.partitions(n)])


@pytest.fixture
def io_topics(topic_name: str, stack_settings: Settings) -> Iterator[tuple[str, ...]]:
    """Real input and output topics (one partition each) unique to the test, deleted afterwards."""
    yield from _created_topics(stack_settings, f"{topic_name}-in", f"{topic_name}-out")


@pytest.fixture
def monitored_topics(topic_name: str, stack_settings: Settings) -> Iterator[tuple[str, ...]]:
    """Real input, output and outcomes topics unique to the test, deleted afterwards."""
    yield from _created_topics(
        stack_settings, f"{topic_name}-in", f"{topic_name}-out", f"{topic_name}-outcomes"
    )


@pytest.fixture(scope="session")
def mlflow_experiment(stack_settings: Settings) -> str:
    """An MLflow experiment for this test session, on the real tracking server."""
    import mlflow

    mlflow.set_tracking_uri(stack_settings.mlflow_url)
    name = f"carrara-tests-{RUN_ID}"
    mlflow.set_experiment(name)
    return name


@pytest.fixture(scope="session")
def celery_worker_queue(stack_settings: Settings) -> Iterator[str]:
    """A real Celery worker process consuming a queue unique to this session."""
    queue = f"carrara-test-{RUN_ID}"
    log_path = ROOT / ".carrara" / "logs" / f"test-worker-{RUN_ID}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("wb")
    env = {**os.environ, "CARRARA_REDIS_URL": stack_settings.redis_url}
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "celery"),
            "-A",
            "carrara.training.worker",
            "worker",
            "-Q",
            queue,
            "--pool=solo",
            "--loglevel=INFO",
            f"--hostname=test-{RUN_ID}@%h",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while b"ready." not in log_path.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"celery worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    yield queue
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _token_headers(session: Session, role: Role, name: str) -> dict[str, str]:
    _, secret = create_token(session, name, role, created_by=None)
    session.flush()
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
def admin_headers(db_session: Session) -> dict[str, str]:
    return _token_headers(db_session, Role.admin, "test-admin")


@pytest.fixture
def editor_headers(db_session: Session) -> dict[str, str]:
    return _token_headers(db_session, Role.editor, "test-editor")


@pytest.fixture
def viewer_headers(db_session: Session) -> dict[str, str]:
    return _token_headers(db_session, Role.viewer, "test-viewer")


@dataclass(frozen=True)
class LiveApi:
    """A real uvicorn process serving the API on the session's test database."""

    url: str
    admin_token: str
    env: dict[str, str]  # CARRARA_API_URL + CARRARA_TOKEN (admin), for CLI calls
    log: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_api(database_url: str, label: str, **env_overrides: str) -> Iterator[LiveApi]:
    """Run uvicorn serving the API on `database_url`, with a committed admin token."""
    engine = make_engine(database_url)
    with Session(engine) as session, session.begin():
        _, secret = create_token(session, f"{label}-admin-{RUN_ID}", Role.admin, created_by=None)
    engine.dispose()
    port = free_port()
    env = {
        **os.environ,
        "CARRARA_DATABASE_URL": database_url,
        "CARRARA_API_PORT": str(port),
        "CARRARA_OUTBOX_RELAY_ENABLED": "true",
        **env_overrides,
    }
    log_path = ROOT / ".carrara" / "logs" / f"test-{label}-{RUN_ID}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "uvicorn"),
                "carrara.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the API did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield LiveApi(
            url=url,
            admin_token=secret,
            env={"CARRARA_API_URL": url, "CARRARA_TOKEN": secret},
            log=log_path,
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="session")
def live_api(test_database_url: str, stack_settings: Settings) -> Iterator[LiveApi]:
    """The API in its own process (as CI pipelines and the CLI see it), with an admin token.

    Its data is committed to the session's test database (not rolled back per test), so tests using
    it create uniquely named resources.
    """
    with running_api(test_database_url, "api") as api:
        yield api


def run_cli(
    live: LiveApi, *args: str, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real `carrara` command against `live` (as a CI pipeline would)."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "carrara"), *args],
        cwd=ROOT,
        env={**os.environ, **live.env, "COLUMNS": "200"},
        input=input_text,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
