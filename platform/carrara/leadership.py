"""One process at a time runs the control plane's single-run loops, elected through Postgres.

Every API process (a uvicorn worker, a replica) runs a `Leadership` thread with a dedicated
database connection that waits for a session-level advisory lock (`pg_advisory_lock`, with a
`lock_timeout` so the thread keeps turning). The process that holds the lock starts the loops;
the others wait on the lock. When the holder dies (SIGKILL, OOM, a lost node) its connection
closes, Postgres releases the lock, and a waiting process gets it at once and starts the loops.

Postgres notices a vanished client through TCP keepalives, which the connection sets on both ends
(`KEEPALIVE_OPTIONS`: about 20 s when the network goes away without a FIN); the holder checks its
connection every `check_s` and stops its loops as soon as the connection fails, which is before
the server gives the lock away. The loops stay correct even if two ran for a moment (outbox rows
and lost runs are claimed with `FOR UPDATE SKIP LOCKED`, scorer status is upserted in order):
the election saves the duplicate work, Kafka connections and consumers of N processes.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable

import psycopg
import structlog
from psycopg import errors

from carrara.streams.resilience import Backoff, LoopHealth

log = structlog.get_logger(__name__)

# The advisory lock's key: any fixed 64-bit number, the same in every API process of a database.
SINGLE_RUN_LOCK = 0x6361_7272_6172_6101  # "carrara" + 1


def single_run_key(kafka_bootstrap: str, deployments_topic: str, status_topic: str) -> int:
    """The lock key of one installation: the same database *and* the same Kafka topics.

    API processes that share a database but relay to different Kafka clusters or topics (a
    second installation on one Postgres server's database, or tests) must not elect one process
    for all of them: each would leave the others' outbox and scorer status unattended.
    """
    digest = hashlib.blake2b(
        f"{SINGLE_RUN_LOCK}\x00{kafka_bootstrap}\x00{deployments_topic}\x00{status_topic}".encode(),
        digest_size=8,
    ).digest()
    return int.from_bytes(digest, "big", signed=True)  # Postgres bigint


# Server side: a client gone without closing its socket is noticed after ~10 + 3 x 3 s.
KEEPALIVE_OPTIONS = (
    "-c tcp_keepalives_idle=10 -c tcp_keepalives_interval=3 -c tcp_keepalives_count=3"
)

# Starts the loops; returns the function that stops them.
StartLoops = Callable[[], Callable[[], None]]


class Leadership:
    """A thread that takes the advisory lock when it is free and runs `start` while it holds it."""

    def __init__(
        self,
        conninfo: str,
        start: StartLoops,
        *,
        key: int = SINGLE_RUN_LOCK,
        wait_s: float = 2.0,
        check_s: float = 1.0,
        stall_after_s: float = 60.0,
        label: str = "carrara-api",
        health: LoopHealth | None = None,
    ) -> None:
        self._conninfo = conninfo
        self._start_loops = start
        self._key = key
        self._wait_ms = int(wait_s * 1000)
        self._check_s = check_s
        self._label = label
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="leader-election", daemon=True)
        # Set while this process holds the lock and its loops run.
        self.leader = threading.Event()
        # Progress: a lock attempt answered (held by another, or taken) or a check of the lock.
        self.health = health or LoopHealth("leader-election", stall_after_s)

    @property
    def application_name(self) -> str:
        """How the lock's connection shows in `pg_stat_activity` (with this process's id)."""
        return f"{self._label}-election-{os.getpid()}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the loops (if this process runs them), then release the lock."""
        self._stop.set()
        self._thread.join(timeout=45)

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=5,
            application_name=self.application_name,
            options=f"{KEEPALIVE_OPTIONS} -c lock_timeout={self._wait_ms}",
            # Client side: a dead server or network fails the check instead of hanging.
            keepalives=1,
            keepalives_idle=10,
            keepalives_interval=3,
            keepalives_count=3,
            tcp_user_timeout=20_000,
        )

    def _loop(self) -> None:
        backoff = Backoff(initial_s=1.0, cap_s=10.0)
        while not self._stop.is_set():
            self.health.beat()
            try:
                with self._connect() as conn:
                    backoff.reset()
                    if self._acquire(conn):
                        self._lead(conn)
                # Leaving the block closes the connection: the lock is free for another process.
            except psycopg.Error as exc:
                self.health.trouble(f"{type(exc).__name__}: {exc}", connection=True)
                self._stop.wait(backoff.next_delay())

    def _acquire(self, conn: psycopg.Connection[tuple[object, ...]]) -> bool:
        """Wait for the lock (returns as soon as its holder lets go); False when stopping."""
        while not self._stop.is_set():
            self.health.beat()
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (self._key,))
            except errors.LockNotAvailable:
                self.health.progress()  # another process leads; keep waiting
                continue
            return True
        return False

    def _lead(self, conn: psycopg.Connection[tuple[object, ...]]) -> None:
        log.info("leader election: this process runs the single-run loops", pid=os.getpid())
        stop_loops = self._start_loops()
        self.leader.set()
        try:
            while not self._stop.is_set():
                self.health.beat()
                # The lock lives as long as this session: a working connection means it is held.
                conn.execute("SELECT 1")
                self.health.progress()
                self._stop.wait(self._check_s)
        finally:
            self.leader.clear()
            stop_loops()
            log.info("leader election: the single-run loops stopped here", pid=os.getpid())
