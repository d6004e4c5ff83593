"""Control-plane load benchmark (issue 19): open-loop fixed rates against the API as the stack
runs it, with the mix of dashboards, CI pipelines and scripts; 1 worker (baseline) vs N workers.

The benchmark makes a database of its own on the local stack's Postgres (migrated with Alembic),
seeds it (datasets and versions, runs, model versions, deployments made through the API, a week
of per-minute monitoring aggregates with their hourly rollup and joined outcomes), and runs
`uvicorn carrara.main:app --workers W` on it with the stack's Kafka and Redis (its own
deployments/status/alerts topics and Celery queue, so nothing reaches the stack's scorers or
workers). The load is open-loop: request i is sent at t0 + i/rate whatever earlier requests are
doing (an asyncio task per request on one aiohttp.ClientSession), and its latency is measured
from that scheduled time, so queueing in the server or the client counts. Each step also records
where the CPU went (the API processes, Postgres, the generator, everything else: /proc), since
the machine is shared. Each round runs every rate for both configurations; figures are medians
over rounds (min-max). The full run writes its section of benchmarks/RESULTS.md between markers;
everything it made (database, topics, Celery queue) is deleted at the end.

    .venv/bin/python benchmarks/api.py              # full: 3 rounds, ~12 min, writes RESULTS.md
    .venv/bin/python benchmarks/api.py --quick      # smoke test: short, 1 round, prints only

Over 450 lines because it is one script with one output: seeding, the server, the load, the CPU
accounting and the report are read together when a figure looks wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import resource
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import psycopg
from alembic import command
from alembic.config import Config
from psycopg import sql
from results_md import write_section
from sqlalchemy import make_url
from sqlalchemy.orm import Session

from carrara.auth.cache import TokenCache
from carrara.auth.roles import Role
from carrara.auth.service import authenticate, create_token
from carrara.db import libpq_conninfo, make_engine
from carrara.models import Dataset, DatasetVersion, TrainingRun
from carrara.models.monitoring import END_TO_END_EDGES_MS, LATENCY_EDGES_MS, SCORE_BINS
from carrara.monitoring.rollup import rebuild_hourly
from carrara.registry import service as registry
from carrara.settings import Settings, usable_cores
from carrara.streams.topics import TopicAdmin

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = uuid.uuid4().hex[:6]
N_DATASETS, N_RUNS, N_MODELS, N_DEPLOYMENTS, N_MONITORED = 20, 300, 10, 30, 5
# (endpoint label, weight per 100 requests); writes are marked.
MIX: list[tuple[str, int]] = [
    ("GET deployments (list of 50)", 10),
    ("GET deployments/{name}", 8),
    ("GET runs (list of 50)", 10),
    ("GET runs/{id}", 8),
    ("GET datasets (list)", 5),
    ("GET datasets/{name}", 5),
    ("GET models (list)", 5),
    ("GET models/{name}", 5),
    ("GET metrics 1 h (minute)", 12),
    ("GET metrics 7 d (hour)", 4),
    ("GET verdict", 6),
    ("GET tokens/me", 4),
    ("GET /readyz", 2),
    ("UI overview", 5),
    ("UI deployment page", 4),
    ("UI deployment live panel", 3),
    ("PUT deployment (no-op)", 2),
    ("POST runs (used Idempotency-Key)", 2),
]
CONNECTIONS = 128  # client connections at most (per configuration step)
WRITES = {"PUT deployment (no-op)", "POST runs (used Idempotency-Key)"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short steps, 1 round, prints only")
    parser.add_argument("--rates", default="50,100,200,400", help="requests/s, comma-separated")
    parser.add_argument("--baseline-rates", default="50,100", help="rates of the baseline")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per rate")
    parser.add_argument(
        "--target-rate", type=int, default=200, help="held --target-duration (N workers only)"
    )
    parser.add_argument("--target-duration", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=usable_cores(), help="default: cores")
    parser.add_argument("--baseline-workers", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.target_duration, args.rounds, args.no_write = 4.0, 6.0, 1, True
    return args


# --- the database, seeded ------------------------------------------------------------------------


@contextmanager
def bench_database(settings: Settings) -> Iterator[str]:
    name = f"carrara_bench_api_{RUN_ID}"
    admin = libpq_conninfo(settings.database_url)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    url = make_url(settings.database_url).set(database=name).render_as_string(hide_password=False)
    try:
        config = Config(str(ROOT / "alembic.ini"))
        config.attributes["url"] = url
        config.attributes["configure_logger"] = False
        command.upgrade(config, "head")
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@dataclass
class Seed:
    viewer: str
    editor: str
    datasets: list[str]
    runs: list[int]
    models: list[str]
    deployments: list[str] = field(default_factory=list)
    monitored: list[str] = field(default_factory=list)
    put_bodies: dict[str, dict[str, Any]] = field(default_factory=dict)
    run_body: dict[str, Any] = field(default_factory=dict)
    run_key: str = ""


def seed_rows(url: str) -> Seed:
    """Datasets, runs, model versions and tokens, written as the services write them."""
    engine = make_engine(url)
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        _, viewer = create_token(session, "bench-viewer", Role.viewer, created_by=None)
        _, editor = create_token(session, "bench-editor", Role.editor, created_by=None)
        versions = []
        features = [{"name": f"f{i}", "type": "float"} for i in range(20)]
        for d in range(N_DATASETS):
            ds = Dataset(
                name=f"bench-ds-{d}",
                topic=f"bench-{RUN_ID}-events-{d}",
                key_field="user_id",
                label_field="label",
                task="binary",
                features=features,
                description="benchmark dataset",
            )
            session.add(ds)
            for n in range(1, 4):
                v = DatasetVersion(
                    dataset=ds,
                    number=n,
                    offsets=[{"partition": p, "start": 0, "end": 10_000 * n} for p in range(3)],
                    event_count=30_000 * n,
                )
                session.add(v)
                versions.append(v)
        session.flush()
        runs = []
        for r in range(N_RUNS):
            run = TrainingRun(
                dataset_version_id=versions[r % len(versions)].id,
                algorithm="logistic_regression",
                params={"C": 1.0},
                holdout={"fraction": 0.2},
                registered_model_name=f"bench-model-{r % N_MODELS}",
                status="succeeded",
                started_at=now - timedelta(minutes=r + 5),
                finished_at=now - timedelta(minutes=r),
                events_replayed=90_000,
                events_total=90_000,
                metrics={"auc": 0.9, "log_loss": 0.3, "accuracy": 0.85},
                attempts=1,
                created_by="bench-editor",
            )
            session.add(run)
            runs.append(run)
        session.flush()
        for m in range(N_MODELS):
            for v in range(1, 6):
                registry.register_version(
                    session,
                    f"bench-model-{m}",
                    v,
                    runs[(m * 5 + v) % N_RUNS].id,
                    f"models:/bench-model-{m}/{v}",
                    {"auc": 0.9},
                )
        run_body = {
            "dataset": "bench-ds-0",
            "dataset_version": 1,
            "algorithm": "logistic_regression",
            "registered_model_name": "bench-model-0",
        }
        return Seed(
            viewer=viewer,
            editor=editor,
            datasets=[f"bench-ds-{d}" for d in range(N_DATASETS)],
            runs=[r.id for r in runs],
            models=[f"bench-model-{m}" for m in range(N_MODELS)],
            run_body=run_body,
        )


def seed_through_api(url: str, db_url: str, seed: Seed, topics: tuple[str, str]) -> None:
    """Deployments (PUT, as people do) and one run with an Idempotency-Key; then the monitoring
    rows of a week for the monitored deployments."""
    headers = {"Authorization": f"Bearer {seed.editor}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        for d in range(N_DEPLOYMENTS):
            name = f"bench-dep-{d}"
            model = f"bench-model-{d % N_MODELS}"
            body = {
                "input_topic": topics[0],
                "output_topic": topics[1],
                "key_field": "user_id",
                "variants": [
                    {
                        "name": "a",
                        "model": model,
                        "version": 1,
                        "weight": 90,
                    },
                    {
                        "name": "b",
                        "model": model,
                        "version": 2,
                        "weight": 10,
                    },
                ],
            }
            response = client.put(f"/api/v1/deployments/{name}", json=body)
            response.raise_for_status()
            seed.deployments.append(name)
            seed.put_bodies[name] = body
        seed.run_key = f"bench-{RUN_ID}"
        response = client.post(
            "/api/v1/runs", json=seed.run_body, headers={"Idempotency-Key": seed.run_key}
        )
        response.raise_for_status()
    seed.monitored = seed.deployments[:N_MONITORED]
    seed_monitoring(db_url, seed.monitored)


def seed_monitoring(url: str, deployments: list[str]) -> None:
    """A week of per-minute aggregates for two variants (and their hourly rollup), and joined
    outcomes since the revision."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    rng = random.Random(7)  # noqa: S311 - synthetic data
    conninfo = libpq_conninfo(url)
    with psycopg.connect(conninfo) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY variant_metrics (deployment, variant, bucket_start, shadow, model_version, "
            "predictions, dead_letters, score_sum, score_histogram, latency_histogram, "
            "end_to_end_histogram, outcomes, correct, log_loss_sum, squared_error_sum, "
            "absolute_error_sum) FROM STDIN"
        ) as copy:
            for name in deployments:
                for variant, version in (("a", 1), ("b", 2)):
                    for minute in range(7 * 24 * 60):
                        n = rng.randint(200, 600)
                        scores = [n // SCORE_BINS] * SCORE_BINS
                        latency = [0, n // 2, n // 2] + [0] * (len(LATENCY_EDGES_MS) - 2)
                        e2e = [0, 0, 0, n // 2, n // 2] + [0] * (len(END_TO_END_EDGES_MS) - 4)
                        outcomes = n // 2
                        copy.write_row(
                            (
                                name,
                                variant,
                                now - timedelta(minutes=minute),
                                False,
                                version,
                                n,
                                rng.randint(0, 3),
                                n * 0.4,
                                str(scores),
                                str(latency),
                                str(e2e),
                                outcomes,
                                int(outcomes * 0.85),
                                outcomes * 0.3,
                                outcomes * 0.1,
                                outcomes * 0.2,
                            )
                        )
        with cur.copy(
            "COPY joined_outcomes (deployment, variant, shadow, model_version, score, outcome, "
            "correct, predicted_at, observed_at) FROM STDIN"
        ) as copy:
            for name in deployments:
                for variant, version in (("a", 1), ("b", 2)):
                    for _ in range(3000):
                        score = rng.random()
                        outcome = float(rng.random() < score)
                        at = datetime.now(UTC)
                        copy.write_row(
                            (name, variant, False, version, score, outcome,
                             (score > 0.5) == (outcome == 1.0), at, at)
                        )  # fmt: skip
        conn.commit()
    # The monitor keeps the hourly rollup as it writes minutes; rows copied in bulk are summed
    # into it afterwards.
    engine = make_engine(url)
    with Session(engine) as session, session.begin():
        for name in deployments:
            rebuild_hourly(session, name)
    engine.dispose()
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("ANALYZE")


def ui_cookie(url: str, token: str) -> dict[str, str]:
    """Sign in through the UI form (CSRF token from the page) and return the session cookie."""
    with httpx.Client(base_url=url, timeout=30) as client:
        page = client.get("/ui/sign-in")
        match = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert match, "no CSRF token on the sign-in page"
        response = client.post(
            "/ui/sign-in", data={"csrf_token": match.group(1), "token": token, "next": "/ui/"}
        )
        assert response.status_code in (302, 303), response.text[:500]
        return dict(client.cookies)


# --- the API process ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ApiServer:
    url: str
    pid: int  # uvicorn's main process; its workers are its children


@contextmanager
def api_process(db_url: str, workers: int, queue: str) -> Iterator[ApiServer]:
    port = free_port()
    prefix = f"bench-{RUN_ID}"
    env = {
        **os.environ,
        "CARRARA_DATABASE_URL": db_url,
        "CARRARA_OUTBOX_RELAY_ENABLED": "true",
        "CARRARA_DEPLOYMENTS_TOPIC": f"{prefix}.deployments",
        "CARRARA_SCORER_STATUS_TOPIC": f"{prefix}.scorer-status",
        "CARRARA_ALERTS_TOPIC": f"{prefix}.alerts",
        "CARRARA_TRAINING_QUEUE": queue,
        "CARRARA_LOG_LEVEL": "WARNING",
        # As the Helm chart runs it: the console renderer's tracebacks (rich, with locals) cost
        # ~100 ms of CPU per logged error, which turned an overloaded step into a spiral.
        "CARRARA_LOG_JSON": "true",
    }
    log_path = ROOT / ".carrara" / "logs" / f"bench-api-{RUN_ID}-{workers}w.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = [str(Path(sys.executable).parent / "uvicorn"), "carrara.main:app"]
    argv += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    # Requests still queued when a step ends are not waited for past 5 s.
    argv += ["--no-access-log", "--timeout-graceful-shutdown", "5"]
    with log_path.open("ab") as log:
        # A session of its own: the workers are stopped with uvicorn, even when it must be
        # killed (a killed uvicorn leaves its workers running, and they skew the next steps).
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API did not start; see {log_path}")
            time.sleep(0.2)
        yield ApiServer(url, proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        with suppress(ProcessLookupError):  # whatever of the group is left
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


# --- where the CPU went ---------------------------------------------------------------------------

TICK_S = 1 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[str, int, float] | None:
    """(command, parent pid, CPU seconds) of a live process, from /proc."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    name = raw[raw.index("(") + 1 : raw.rindex(")")]
    fields = raw[raw.rindex(")") + 2 :].split()
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) * TICK_S


def _processes() -> dict[int, tuple[str, int, float]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def _machine() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values[:8]) - idle) * TICK_S, sum(values[:8]) * TICK_S


@dataclass
class CpuSnapshot:
    api: float  # the uvicorn processes (main + workers)
    postgres: float
    generator: float  # this process (the load generator)
    busy: float
    total: float
    postgres_pids: dict[int, float]


def cpu_snapshot(api_pid: int) -> CpuSnapshot:
    procs = _processes()
    api = sum(cpu for pid, (_, ppid, cpu) in procs.items() if api_pid in (pid, ppid))
    postgres = {pid: cpu for pid, (name, _, cpu) in procs.items() if name == "postgres"}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    busy, total = _machine()
    return CpuSnapshot(
        api, sum(postgres.values()), usage.ru_utime + usage.ru_stime, busy, total, postgres
    )


@dataclass
class CpuUse:
    """CPU spent during one step: ms per request by component, and how busy the machine was."""

    api_ms: float
    postgres_ms: float
    generator_ms: float
    machine_busy: float  # fraction of all cores
    others: float  # fraction of all cores used by processes other than these three


def cpu_use(before: CpuSnapshot, after: CpuSnapshot, requests: int) -> CpuUse:
    # Postgres backends that started during the step count whole; ones that ended are lost.
    postgres = sum(
        cpu - before.postgres_pids.get(pid, 0.0) for pid, cpu in after.postgres_pids.items()
    )
    api = after.api - before.api
    generator = after.generator - before.generator
    busy = after.busy - before.busy
    total = max(after.total - before.total, 1e-9)
    n = max(requests, 1)
    return CpuUse(
        api_ms=api / n * 1000,
        postgres_ms=postgres / n * 1000,
        generator_ms=generator / n * 1000,
        machine_busy=busy / total,
        others=max(0.0, busy - api - postgres - generator) / total,
    )


# --- the load -------------------------------------------------------------------------------------


@dataclass
class Sample:
    endpoint: str
    latency_ms: float
    ok: bool


def requests_for(seed: Seed) -> dict[str, Any]:
    """Per endpoint: a function of an RNG that returns (method, path, kwargs, expected statuses)."""
    viewer = {"Authorization": f"Bearer {seed.viewer}"}
    editor = {"Authorization": f"Bearer {seed.editor}"}
    hour = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    week = (datetime.now(UTC) - timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")

    def dep(rng: random.Random) -> str:
        return rng.choice(seed.deployments)

    def mon(rng: random.Random) -> str:
        return rng.choice(seed.monitored)

    def get(path: str, **kwargs: Any) -> tuple[str, str, dict[str, Any], tuple[int, ...]]:
        return ("GET", path, {"headers": viewer, **kwargs}, (200,))

    def ui(path: str) -> tuple[str, str, dict[str, Any], tuple[int, ...]]:
        return ("GET", path, {}, (200,))

    def put(rng: random.Random) -> tuple[str, str, dict[str, Any], tuple[int, ...]]:
        name = dep(rng)
        body = {"headers": editor, "json": seed.put_bodies[name]}
        return ("PUT", f"/api/v1/deployments/{name}", body, (200,))

    def post_run(_: random.Random) -> tuple[str, str, dict[str, Any], tuple[int, ...]]:
        headers = {**editor, "Idempotency-Key": seed.run_key}
        return ("POST", "/api/v1/runs", {"headers": headers, "json": seed.run_body}, (200,))

    return {
        "GET deployments (list of 50)": lambda r: get("/api/v1/deployments?limit=50"),
        "GET deployments/{name}": lambda r: get(f"/api/v1/deployments/{dep(r)}"),
        "GET runs (list of 50)": lambda r: get("/api/v1/runs?limit=50"),
        "GET runs/{id}": lambda r: get(f"/api/v1/runs/{r.choice(seed.runs)}"),
        "GET datasets (list)": lambda r: get("/api/v1/datasets?limit=50"),
        "GET datasets/{name}": lambda r: get(f"/api/v1/datasets/{r.choice(seed.datasets)}"),
        "GET models (list)": lambda r: get("/api/v1/models?limit=50"),
        "GET models/{name}": lambda r: get(f"/api/v1/models/{r.choice(seed.models)}"),
        "GET metrics 1 h (minute)": lambda r: get(
            f"/api/v1/deployments/{mon(r)}/metrics", params={"from": hour}
        ),
        "GET metrics 7 d (hour)": lambda r: get(
            f"/api/v1/deployments/{mon(r)}/metrics", params={"from": week, "bucket": "hour"}
        ),
        "GET verdict": lambda r: get(f"/api/v1/deployments/{mon(r)}/verdict"),
        "GET tokens/me": lambda r: get("/api/v1/tokens/me"),
        "GET /readyz": lambda r: ui("/readyz"),
        "UI overview": lambda r: ui("/ui/"),
        "UI deployment page": lambda r: ui(f"/ui/deployments/{mon(r)}"),
        "UI deployment live panel": lambda r: ui(f"/ui/deployments/{mon(r)}/live"),
        "PUT deployment (no-op)": put,
        "POST runs (used Idempotency-Key)": post_run,
    }


async def open_loop(
    url: str, rate: float, duration: float, seed: Seed, cookies: dict[str, str]
) -> tuple[list[Sample], float]:
    """Send rate x duration requests at fixed times; returns the samples and the achieved rate."""
    makers = requests_for(seed)
    names = [n for n, w in MIX for _ in range(w)]
    rng = random.Random(int(rate))  # noqa: S311 - a request mix
    samples: list[Sample] = []
    # aiohttp: a fraction of httpx's CPU per request (the generator shares the 2 cores with the
    # server; with httpx it used as much CPU as both API workers). Requests past CONNECTIONS wait
    # on a semaphore, and their wait counts (latency is measured from the scheduled time).
    slots = asyncio.Semaphore(CONNECTIONS)
    cookie = "; ".join(f"{k}={v}" for k, v in cookies.items())
    connector = aiohttp.TCPConnector(limit=CONNECTIONS)
    timeout = aiohttp.ClientTimeout(total=10.0)
    async with aiohttp.ClientSession(url, connector=connector, timeout=timeout) as client:

        async def one(name: str, due: float) -> None:
            method, path, kwargs, expected = makers[name](rng)
            if path.startswith("/ui/"):
                kwargs = {**kwargs, "headers": {**kwargs.get("headers", {}), "Cookie": cookie}}
            ok = False
            async with slots:
                # Past 10 s from its scheduled time (the wait for a slot included) a request
                # failed: one that waited that long for a slot is not sent at all, so an
                # overloaded step ends ~10 s after its last request is due.
                left = due + 10.0 - time.perf_counter()
                if left > 0:
                    try:
                        timeout = aiohttp.ClientTimeout(total=left)
                        async with client.request(
                            method, path, timeout=timeout, **kwargs
                        ) as response:
                            await response.read()
                            ok = response.status in expected
                    except (aiohttp.ClientError, TimeoutError):
                        ok = False
            latency_ms = (time.perf_counter() - due) * 1000
            samples.append(Sample(name, latency_ms, ok and latency_ms <= 10_000))

        tasks = []
        total = int(rate * duration)
        start = time.perf_counter() + 0.05
        for i in range(total):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(rng.choice(names), due)))
        sent_in = time.perf_counter() - start
        await asyncio.gather(*tasks)
    return samples, total / max(sent_in, 1e-9)


def drain(url: str, timeout: float = 60.0) -> float:
    """Wait until the server has worked off what an overloaded step left queued (requests the
    client gave up on still run): /healthz answers within 100 ms three times in a row. Returns
    the seconds waited; without this, one step's backlog would be measured in the next."""
    started = time.monotonic()
    fast = 0
    with httpx.Client(base_url=url, timeout=30) as client:
        while fast < 3 and time.monotonic() - started < timeout:
            t = time.perf_counter()
            try:
                client.get("/healthz")
                fast = fast + 1 if time.perf_counter() - t < 0.1 else 0
            except httpx.HTTPError:
                fast = 0
            time.sleep(0.2)
    return time.monotonic() - started


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Step:
    """One rate of one configuration in one round."""

    achieved: float
    by_endpoint: dict[str, list[Sample]]
    cpu: CpuUse
    load: float  # the machine's 1-minute load average at the end of the step

    def reads(self) -> list[Sample]:
        return [s for n, ss in self.by_endpoint.items() if n not in WRITES for s in ss]

    def all(self) -> list[Sample]:
        return [s for ss in self.by_endpoint.values() for s in ss]


def summarize(samples: list[Sample]) -> tuple[float, float, int, int, int]:
    """(p50, p99, errors, over 1 s, count)"""
    lat = [s.latency_ms for s in samples]
    errors = sum(1 for s in samples if not s.ok)
    slow = sum(1 for s in samples if s.latency_ms > 1000)
    return pct(lat, 0.5), pct(lat, 0.99), errors, slow, len(samples)


# --- auth cost ----------------------------------------------------------------------------------


def auth_cost_us(db_url: str, token: str) -> tuple[float, float]:
    """Microseconds per authentication: from the cache, and with the query (cache off)."""
    engine = make_engine(db_url)
    cache = TokenCache(ttl_s=60)
    results = []
    for use_cache in (True, False):
        with Session(engine) as session:
            authenticate(session, token, cache)  # warm: fills the cache, opens the connection
            n = 5000 if use_cache else 500
            t = time.perf_counter()
            for _ in range(n):
                authenticate(session, token, cache if use_cache else None)
            results.append((time.perf_counter() - t) / n * 1e6)
            session.rollback()
    engine.dispose()
    return results[0], results[1]


# --- report -------------------------------------------------------------------------------------


def fmt_range(values: list[float], one: str = "{:.1f}") -> str:
    good = [v for v in values if v == v]
    if not good:
        return "-"
    if len(good) == 1:
        return one.format(good[0])
    return (
        f"{one.format(statistics.median(good))} ({one.format(min(good))}-{one.format(max(good))})"
    )


GROUPS: dict[str, list[str]] = {
    "lists (50 items)": [
        "GET deployments (list of 50)",
        "GET runs (list of 50)",
        "GET datasets (list)",
        "GET models (list)",
    ],
    "details": [
        "GET deployments/{name}",
        "GET runs/{id}",
        "GET datasets/{name}",
        "GET models/{name}",
    ],
    "monitoring (metrics, verdict)": [
        "GET metrics 1 h (minute)",
        "GET metrics 7 d (hour)",
        "GET verdict",
    ],
    "tokens/me, /readyz": ["GET tokens/me", "GET /readyz"],
    "UI pages": ["UI overview", "UI deployment page", "UI deployment live panel"],
    "writes": sorted(WRITES),
}
# What was done for the targets, kept with the script so the section stays whole when rerun.
WHAT_WAS_DONE = (
    "What was done for these figures (issue 19): API worker processes and single-run loops "
    "elected in Postgres; a token cache; indexes for the monitoring windows; an hourly rollup of "
    "the monitor's minute aggregates, kept by the monitor in the same transaction (a week of "
    "metrics reads ~170 rows per variant instead of ~10,000: 150-300 ms of Postgres became a "
    "few ms); metrics and verdicts served from a per-process cache for "
    "`CARRARA_MONITORING_CACHE_S` (5 s, per revision; one request computes an expired answer "
    "while the others asking for it wait), and the overview's verdicts from it with their "
    "revisions in one query; joined outcomes fetched as arrays instead of thousands "
    "of rows; JSON columns decoded by msgspec; dependencies that only compute declared "
    "`async` (FastAPI ran each in its thread pool) and the token cache answered without a "
    "thread; routers included in the app directly (FastAPI 0.165 matches nested routers again "
    "per level); the query of a metrics window built once instead of ~150 expressions per "
    "request; UI sessions checked against the token cache; what a worker built to start frozen "
    "out of the garbage collector's walks (`gc.freeze`, collections less often: full collections "
    "paused workers every few seconds under load). The load generator uses aiohttp: with "
    "httpx it used as much CPU as both API workers together. The API logs JSON, as the Helm "
    "chart runs it: the console renderer's "
    "tracebacks cost ~100 ms of CPU per logged error and turned overloaded steps into a spiral. "
    "Tried and dropped: fewer request threads (6, or as many as database connections, 20, "
    "instead of 40), meant to make requests wait for a thread rather than time out waiting for "
    "a connection; requests holding a connection from a dependency (the UI's session check, a "
    "token-cache miss) then waited for a thread while threads waited for connections, and the "
    "pool's 30 s timeout answered 500."
)


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _cpu_line(steps: list[Step]) -> str:
    cpus = [s.cpu for s in steps]
    return (
        f"API {fmt_range([c.api_ms for c in cpus], '{:.2f}')} ms, Postgres "
        f"{fmt_range([c.postgres_ms for c in cpus], '{:.2f}')} ms, load generator "
        f"{fmt_range([c.generator_ms for c in cpus], '{:.2f}')} ms of CPU per request; the "
        f"machine was {fmt_range([c.machine_busy * 100 for c in cpus], '{:.0f}')}% busy, "
        f"{fmt_range([c.others * 100 for c in cpus], '{:.0f}')}% of it other processes"
    )


def render(
    args: argparse.Namespace,
    results: dict[tuple[int, int], list[Step]],
    auth: tuple[float, float],
    load: tuple[tuple[float, float, float], tuple[float, float, float]],
    elapsed: float,
) -> str:
    command = shlex.join([".venv/bin/python", "benchmarks/api.py", *sys.argv[1:]])
    cores = os.cpu_count()
    out = [
        "## Control plane under load (`benchmarks/api.py`)",
        "",
        f"Written by the script on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; rerun it rather than "
        "editing this section.",
        "",
        "```",
        command,
        "```",
        "",
        f"Machine: {cores} cores, shared with the local stack (Postgres, Kafka, MLflow, the "
        "stack's scorers and monitor), the load generator (one Python process, aiohttp) **and "
        "other agents' test runs on the same machine** while this ran: load average "
        f"{load[0][0]:.1f} / {load[0][1]:.1f} / {load[0][2]:.1f} before, {load[1][0]:.1f} / "
        f"{load[1][1]:.1f} / {load[1][2]:.1f} after (1/5/15 min); each step's load average and "
        "the share of the CPU other processes took are in the table below. The run took "
        f"{elapsed / 60:.1f} min.",
        "",
        "Open loop: request i is sent at t0 + i/rate whatever the others are doing; latency "
        "counts from that scheduled time (queueing included); a request fails on a status other "
        "than the expected one or after 10 s. Each step runs on a fresh server (after a 3 s "
        "warm-up), so an overloaded step's backlog does not spill into the next. The mix per 100 "
        "requests: "
        + ", ".join(f"{n} {w}" for n, w in MIX)
        + f". Seeded: {N_DATASETS} datasets x 3 versions, {N_RUNS} runs, {N_MODELS} models x 5 "
        f"versions, {N_DEPLOYMENTS} deployments (PUT through the API), a week of per-minute "
        f"aggregates of 2 variants (and their hourly rollup) and 3,000 joined outcomes per "
        f"variant for {N_MONITORED} of them. Each rate runs {args.duration:g} s "
        f"({args.target_rate}/s with {args.workers} workers: {args.target_duration:g} s), "
        f"{args.rounds} round(s), configurations alternating; each figure is the median over "
        "rounds (min-max). Reads: every GET (API and UI); writes: the no-op PUT and the POST.",
        "",
    ]
    top = args.workers
    out += ["### Targets of issue 19", ""]
    target = results.get((top, args.target_rate), [])
    if target:
        reads = [summarize(s.reads()) for s in target]
        alls = [summarize(s.all()) for s in target]
        p99 = statistics.median([r[1] for r in reads])
        errors = sum(a[2] for a in alls)
        slow = sum(a[3] for a in alls)
        out.append(
            f"- {args.target_rate} requests/s for {args.target_duration:g} s, {top} workers: "
            f"reads p99 {fmt_range([r[1] for r in reads])} ms (target < 50) "
            f"{_verdict(p99 < 50)}; errors {errors} of {sum(a[4] for a in alls)} (target 0) "
            f"{_verdict(errors == 0)}; over 1 s {slow} (target 0) {_verdict(slow == 0)}. "
            f"{_cpu_line(target)}."
        )
    top_rate = max((r for w, r in results if w == top), default=0)
    if top_rate > args.target_rate:
        steps = results[(top, top_rate)]
        alls = [summarize(s.all()) for s in steps]
        p99 = statistics.median([a[1] for a in alls])
        errors = sum(a[2] for a in alls)
        out.append(
            f"- {top_rate} requests/s, {top} workers: errors {errors} of "
            f"{sum(a[4] for a in alls)} (target 0) {_verdict(errors == 0)}; p99 "
            f"{fmt_range([a[1] for a in alls])} ms (target < 250) {_verdict(p99 < 250)}. "
            f"{_cpu_line(steps)}."
        )
    out += [
        f"- Authentication from the token cache: {auth[0] / 1000:.4f} ms per request (target "
        f"< 1 ms) {_verdict(auth[0] < 1000)}; with the query (cache off) {auth[1]:.0f} us.",
        "",
    ]
    # Where a target is missed, the reason in figures: CPU per request against the cores left.
    loaded = [s for (w, _), ss in results.items() if w == top for s in ss]
    if loaded:
        per_request = statistics.median(
            [s.cpu.api_ms + s.cpu.postgres_ms + s.cpu.generator_ms for s in loaded]
        )
        api_ms = statistics.median([s.cpu.api_ms for s in loaded])
        others = statistics.median([s.cpu.others for s in loaded]) * (cores or 1)
        left = max((cores or 1) - others, 0.1)
        out += [
            "Why, from these figures: the API, its Postgres queries and the load generator take "
            f"{per_request:.1f} ms of CPU per request of this mix ({api_ms:.1f} ms in the API "
            f"processes; medians over the steps with {top} workers) and other processes took "
            f"{others:.1f} of the {cores} cores, so the CPU alone would allow about "
            f"{left / per_request * 1000:.0f} requests/s. A worker runs Python on one core at a "
            f"time, though (one interpreter lock for its 40 request threads and the hand-offs "
            f"between them and the event loop): at 400/s each of the {top} workers needs "
            f"~{400 / top * api_ms / 1000:.1f} of a core with nothing to spare, and queues. The "
            "tail at lower rates is requests waiting behind work that holds a worker's "
            "interpreter: recomputing an expired metrics answer (8-30 ms of CPU), the overview's "
            "verdicts (~25 ms), garbage collections; with 2 workers on 2 cores each such "
            "stretch delays what arrives meanwhile. More workers on more cores (replicas) is "
            "what the targets need on this mix; see README, Sizing the API.",
            "",
        ]
    out += [WHAT_WAS_DONE, ""]
    out += [
        "### Every step",
        "",
        "| workers | rate (req/s) | achieved | reads p50 ms | reads p99 ms | writes p99 ms "
        "| errors | over 1 s | CPU ms/request: API / Postgres / generator | machine busy "
        "| other processes | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (workers, rate), steps in sorted(results.items()):
        reads = [summarize(s.reads()) for s in steps]
        writes = [summarize([x for x in s.all() if x.endpoint in WRITES]) for s in steps]
        alls = [summarize(s.all()) for s in steps]
        cpus = [s.cpu for s in steps]
        out.append(
            f"| {workers} | {rate} | {fmt_range([s.achieved for s in steps], '{:.0f}')} "
            f"| {fmt_range([r[0] for r in reads])} | {fmt_range([r[1] for r in reads])} "
            f"| {fmt_range([w[1] for w in writes])} "
            f"| {fmt_range([float(a[2]) for a in alls], '{:.0f}')} of {alls[0][4]} "
            f"| {fmt_range([float(a[3]) for a in alls], '{:.0f}')} "
            f"| {statistics.median([c.api_ms for c in cpus]):.2f} / "
            f"{statistics.median([c.postgres_ms for c in cpus]):.2f} / "
            f"{statistics.median([c.generator_ms for c in cpus]):.2f} "
            f"| {fmt_range([c.machine_busy * 100 for c in cpus], '{:.0f}')}% "
            f"| {fmt_range([c.others * 100 for c in cpus], '{:.0f}')}% "
            f"| {fmt_range([s.load for s in steps])} |"
        )
    rates = sorted({r for w, r in results if w == top})
    out += [
        "",
        f"### Per endpoint group, {top} workers",
        "",
        "p50 / p99 ms: medians over rounds (min-max of the p99); errors summed over rounds.",
        "",
        "| group | " + " | ".join(f"{r}/s" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for group, names in GROUPS.items():
        cells = []
        for rate in rates:
            per = [
                summarize([x for n in names for x in s.by_endpoint.get(n, [])])
                for s in results[(top, rate)]
            ]
            p50 = statistics.median([p[0] for p in per])
            p99s = [p[1] for p in per]
            errors = sum(p[2] for p in per)
            cells.append(f"{p50:.1f} / {fmt_range(p99s)}" + (f", {errors} err" if errors else ""))
        out.append(f"| {group} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"### Per endpoint, {top} workers",
        "",
        "p50 / p99 ms (medians over rounds), errors summed over rounds:",
        "",
        "| endpoint | " + " | ".join(f"{r}/s" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for name, _ in MIX:
        cells = []
        for rate in rates:
            per = [summarize(s.by_endpoint.get(name, [])) for s in results[(top, rate)]]
            p50 = statistics.median([p[0] for p in per])
            p99 = statistics.median([p[1] for p in per])
            errors = sum(p[2] for p in per)
            cells.append(f"{p50:.1f} / {p99:.1f}" + (f", {errors} err" if errors else ""))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out.append("")
    return "\n".join(out)


# --- main -----------------------------------------------------------------------------------------


def main() -> None:
    args = parse_args()
    started = time.monotonic()
    load_before = os.getloadavg()
    settings = Settings()
    rates = [int(r) for r in args.rates.split(",")]
    baseline_rates = [int(r) for r in args.baseline_rates.split(",")]
    admin = TopicAdmin(settings.kafka_bootstrap, settings)
    topics = (f"bench-{RUN_ID}-in", f"bench-{RUN_ID}-out")
    for topic in topics:
        admin.create_topic(topic, 1, exist_ok=True)
    queue = f"bench-{RUN_ID}"
    results: dict[tuple[int, int], list[Step]] = defaultdict(list)
    try:
        with bench_database(settings) as db_url:
            seed = seed_rows(db_url)
            with api_process(db_url, args.workers, queue) as server:
                seed_through_api(server.url, db_url, seed, topics)
            print(f"seeded in {time.monotonic() - started:.0f} s", flush=True)
            auth = auth_cost_us(db_url, seed.viewer)
            for round_ in range(args.rounds):
                configs = [(args.baseline_workers, baseline_rates), (args.workers, rates)]
                if round_ % 2:
                    configs.reverse()
                steps = [(w, rate) for w, config_rates in configs for rate in config_rates]
                for workers, rate in steps:
                    # The target rate is held longer on the configuration the targets are for.
                    target = rate == args.target_rate and workers == args.workers
                    duration = args.target_duration if target else args.duration
                    # A fresh server per step: an overloaded step's backlog (requests the client
                    # gave up on still run) must not be measured in the next one.
                    with api_process(db_url, workers, queue) as server:
                        cookies = ui_cookie(server.url, seed.viewer)
                        warm = 3 if not args.quick else 1
                        asyncio.run(open_loop(server.url, min(rate, 50), warm, seed, cookies))
                        drain(server.url)
                        before = cpu_snapshot(server.pid)
                        samples, achieved = asyncio.run(
                            open_loop(server.url, rate, duration, seed, cookies)
                        )
                        used = cpu_use(before, cpu_snapshot(server.pid), len(samples))
                    by_endpoint: dict[str, list[Sample]] = defaultdict(list)
                    for s in samples:
                        by_endpoint[s.endpoint].append(s)
                    step = Step(achieved, dict(by_endpoint), used, os.getloadavg()[0])
                    results[(workers, rate)].append(step)
                    p50, p99, errors, slow, n = summarize(step.reads())
                    print(
                        f"round {round_ + 1} workers {workers} rate {rate}: reads p50 "
                        f"{p50:.1f} ms p99 {p99:.1f} ms, errors {errors}, >1 s {slow} "
                        f"of {n}, achieved {achieved:.0f}/s, load {step.load:.1f}, CPU ms/req "
                        f"API {used.api_ms:.2f} Postgres {used.postgres_ms:.2f} generator "
                        f"{used.generator_ms:.2f}, machine busy {used.machine_busy:.0%} (others "
                        f"{used.others:.0%})",
                        flush=True,
                    )
    finally:
        admin.delete_topics([t for t in topics if admin.partitions(t)])
        prefix = f"bench-{RUN_ID}."
        control = [f"{prefix}deployments", f"{prefix}scorer-status", f"{prefix}alerts"]
        admin.delete_topics([t for t in control if admin.partitions(t)])
        try:
            import redis

            redis.Redis.from_url(settings.redis_url).delete(queue)
        except Exception as exc:  # the queue only holds the one benchmark task
            print(f"could not delete the Celery queue {queue}: {exc}")
    section = render(
        args, results, auth, (load_before, os.getloadavg()), time.monotonic() - started
    )
    print(section)
    if not args.no_write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", "api", "api.py", section)
        print("wrote benchmarks/RESULTS.md")


if __name__ == "__main__":
    main()
