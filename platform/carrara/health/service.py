"""Readiness probes of the services the control plane depends on, run concurrently."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import httpx
import redis
from sqlalchemy import text

from carrara.db import engine_for
from carrara.settings import Settings
from carrara.streams.resilience import LoopHealth
from carrara.streams.topics import TopicAdmin


@dataclass(frozen=True)
class ProbeResult:
    name: str
    ok: bool
    detail: str


def _probe_postgres(settings: Settings) -> str:
    with engine_for(settings.database_url).connect() as conn:
        revision = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    return f"schema at {revision}"


def _probe_kafka(settings: Settings) -> str:
    return f"{TopicAdmin(settings.kafka_bootstrap, settings).ping(timeout=2.0)} broker(s)"


def _probe_redis(settings: Settings) -> str:
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2, socket_connect_timeout=2)
    client.ping()
    return "PONG"


def _probe_mlflow(settings: Settings) -> str:
    response = httpx.get(f"{settings.mlflow_url}/health", timeout=2.0)
    response.raise_for_status()
    return "ok"


PROBES: dict[str, Callable[[Settings], str]] = {
    "postgres": _probe_postgres,
    "kafka": _probe_kafka,
    "redis": _probe_redis,
    "mlflow": _probe_mlflow,
}


async def _run_probe(
    name: str, probe: Callable[[Settings], str], settings: Settings
) -> ProbeResult:
    try:
        detail = await asyncio.wait_for(asyncio.to_thread(probe, settings), timeout=5.0)
    except TimeoutError:
        return ProbeResult(name, False, "timed out after 5 s")
    except Exception as exc:  # a probe's failure is data for the report, never a crash
        return ProbeResult(name, False, f"{type(exc).__name__}: {exc}"[:300])
    return ProbeResult(name, True, detail)


async def check_readiness(settings: Settings) -> list[ProbeResult]:
    """Probe every dependency; each result says whether it answered and what it said."""
    return list(
        await asyncio.gather(*(_run_probe(name, probe, settings) for name, probe in PROBES.items()))
    )


@dataclass
class ReadinessCache:
    """The last readiness results per set of dependencies, so `/readyz` probed every second by
    many clients (or an attacker) runs the checks at most once per `CARRARA_READYZ_CACHE_S`."""

    entries: dict[tuple[str, ...], tuple[float, list[ProbeResult]]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def results(self, settings: Settings) -> tuple[list[ProbeResult], float]:
        """The (possibly cached) results and their age in seconds."""
        key = (settings.database_url, settings.kafka_bootstrap, settings.redis_url)
        key += (settings.mlflow_url,)
        async with self.lock:  # concurrent requests wait for one round of checks
            cached = self.entries.get(key)
            if cached is None or time.monotonic() - cached[0] > settings.readyz_cache_s:
                cached = (time.monotonic(), await check_readiness(settings))
                self.entries = {key: cached}
            return cached[1], time.monotonic() - cached[0]


def loop_reports(loops: Mapping[str, LoopHealth]) -> dict[str, dict[str, object]]:
    """The health of the process's background Kafka loops, by name."""
    return {name: health.report() for name, health in loops.items()}
