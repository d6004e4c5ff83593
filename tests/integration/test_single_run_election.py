"""The single-run loops (outbox relay + listener, lost-run reaper, scorer-status consumer) run in
exactly one API process, elected through a Postgres advisory lock, and move to another process
when the holder is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from carrara.db import libpq_conninfo
from carrara.leadership import Leadership
from carrara.models import OutboxMessage
from carrara.outbox.service import enqueue_kafka
from carrara.settings import Settings
from carrara.streams.topics import TopicAdmin
from tests.integration.conftest import RUN_ID, free_port, migrated_database

ROOT = Path(__file__).resolve().parents[2]

HOLDERS = """
SELECT a.pid, a.application_name, l.granted
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.database = (
    SELECT oid FROM pg_database WHERE datname = current_database())
"""


def wait_for(what: str, check: Callable[[], object], timeout: float = 60.0) -> object:
    """Poll `check` until it returns something truthy (no fixed sleeps); fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def lock_holders(conninfo: str) -> list[tuple[int, str, bool]]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        return [(int(r[0]), str(r[1]), bool(r[2])) for r in conn.execute(HOLDERS).fetchall()]


@pytest.fixture
def election_database(stack_settings: Settings) -> Iterator[str]:
    """A database of this test's own: no other API process of the session takes part."""
    with migrated_database(stack_settings, f"carrara_elect_{RUN_ID}_{uuid.uuid4().hex[:4]}") as url:
        yield url


def test_one_process_holds_the_lock_and_another_takes_over_when_its_connection_drops(
    election_database: str,
) -> None:
    conninfo = libpq_conninfo(election_database)
    running: dict[str, bool] = {}
    started = {"a": threading.Event(), "b": threading.Event()}

    def loops(name: str) -> Callable[[], Callable[[], None]]:
        def start() -> Callable[[], None]:
            running[name] = True
            started[name].set()

            def stop() -> None:
                running[name] = False

            return stop

        return start

    a = Leadership(conninfo, loops("a"), wait_s=0.5, check_s=0.2, label="elect-a")
    a.start()
    try:
        assert started["a"].wait(10)
        b = Leadership(conninfo, loops("b"), wait_s=0.5, check_s=0.2, label="elect-b")
        b.start()
        try:
            # b waits on the lock (a lock wait shows as not granted) and runs nothing.
            wait_for(
                "b to wait on the lock", lambda: any(not g for _, _, g in lock_holders(conninfo))
            )
            assert running == {"a": True}
            assert not b.leader.is_set()
            # a's session ends (as when its process dies): b takes over, a stops its loops.
            with psycopg.connect(conninfo, autocommit=True) as conn:
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name LIKE 'elect-a-%'"
                )
            assert started["b"].wait(10)
            wait_for("a to stop its loops", lambda: running["a"] is False)
            holders = [h for h in lock_holders(conninfo) if h[2]]
            assert len(holders) == 1
            assert holders[0][1].startswith("elect-b-")
        finally:
            b.stop()
    finally:
        a.stop()
    assert running == {"a": False, "b": False}


def _healthz(url: str) -> dict[str, object] | None:
    # A new connection each time, so the kernel hands it to any of the workers.
    try:
        with httpx.Client(timeout=5) as client:
            return client.get(f"{url}/healthz", headers={"Connection": "close"}).json()
    except httpx.HTTPError:
        return None  # not listening yet


def _leader_and_standbys(url: str, workers: int) -> tuple[int, set[int]] | None:
    """Ask /healthz until every worker answered; (leader pid, other pids) if exactly one leads."""
    seen: dict[int, list[str]] = {}
    deadline = time.monotonic() + 30
    while len(seen) < workers and time.monotonic() < deadline:
        body = _healthz(url)
        if body is None:
            time.sleep(0.1)
            continue
        seen[int(body["pid"])] = list(body["single_run"])  # type: ignore[arg-type]
    leaders = [pid for pid, loops in seen.items() if loops]
    if len(seen) < workers or len(leaders) != 1:
        return None
    assert set(seen[leaders[0]]) >= {"outbox-relay", "scorer-status", "lost-run-reaper"}
    return leaders[0], set(seen) - {leaders[0]}


def _relayed(engine_url: str, topic: str) -> Callable[[], bool]:
    """Enqueue an outbox message now; the returned check is true once a relay delivered it."""
    engine = create_engine(engine_url)
    with Session(engine) as session, session.begin():
        row_id = enqueue_kafka(session, topic, f"k-{uuid.uuid4().hex}", {"n": 1}).id

    def check() -> bool:
        with Session(engine) as session:
            published = session.scalar(
                select(OutboxMessage.published_at).where(OutboxMessage.id == row_id)
            )
        return published is not None

    return check


def test_the_loops_run_in_one_uvicorn_worker_and_move_when_it_is_killed(
    election_database: str, stack_settings: Settings, topic_name: str
) -> None:
    TopicAdmin(stack_settings.kafka_bootstrap).create_topic(topic_name, 1)
    conninfo = libpq_conninfo(election_database)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "CARRARA_DATABASE_URL": election_database,
        "CARRARA_OUTBOX_RELAY_ENABLED": "true",
    }
    log_path = ROOT / ".carrara" / "logs" / f"test-election-{RUN_ID}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    uvicorn = str(Path(sys.executable).parent / "uvicorn")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                uvicorn,
                "carrara.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "3",
                "--no-access-log",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # Exactly one worker holds the lock and runs the loops; the other two wait on it.
        found = wait_for("one leader among 3 workers", lambda: _leader_and_standbys(url, 3), 90)
        leader, standbys = found  # type: ignore[misc]
        holders = lock_holders(conninfo)
        assert [h[1] for h in holders if h[2]] == [f"carrara-api-election-{leader}"]
        assert len([h for h in holders if not h[2]]) == 2
        wait_for("the leader to relay a message", _relayed(election_database, topic_name))

        os.kill(leader, signal.SIGKILL)

        def new_leader() -> int | None:
            granted = [h for h in lock_holders(conninfo) if h[2]]
            if len(granted) != 1 or granted[0][0] == 0:
                return None
            pid = int(granted[0][1].rsplit("-", 1)[1])
            return pid if pid in standbys else None

        took_over = wait_for("a standby to take the lock", new_leader, 30)
        # Visible progress: the new leader relays what is committed after the kill.
        wait_for("the new leader to relay a message", _relayed(election_database, topic_name))
        # uvicorn replaces the killed worker; the new one waits, the lock stays where it is.
        after = wait_for("one leader again", lambda: _leader_and_standbys(url, 3), 90)
        assert after[0] == took_over  # type: ignore[index]
        assert leader not in after[1]  # type: ignore[index]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
