"""Carrara's own processes run by the local stack for `make demo`: the API and a worker."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import httpx

from carrara.devstack.processes import LaunchSpec
from carrara.devstack.service import Service, StackError
from carrara.settings import Settings


def _script(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def project_root() -> Path:
    """The checkout this package was installed from in editable mode (holds alembic.ini)."""
    return Path(__file__).resolve().parents[3]


# Carrara's processes and what each needs running first.
NEEDS_ALL_INFRASTRUCTURE = ("postgres", "redis", "kafka", "schema-registry", "mlflow")


class ApiService(Service):
    name = "api"
    label = "Control plane (API + UI)"
    # Migrations and every request need Postgres; the outbox relays to Redis (Celery) and Kafka;
    # model registration talks to MLflow.
    requires = NEEDS_ALL_INFRASTRUCTURE

    @property
    def port(self) -> int:
        return self.settings.api_port

    @property
    def endpoint(self) -> str:
        return self.settings.api_url

    def prepare(self) -> None:
        """Migrate the database to head: the app never creates tables itself."""
        self.home.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(
            [_script("alembic"), "upgrade", "head"],
            cwd=project_root(),
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"database migration failed:\n{result.stderr[-3000:]}")

    def launch_spec(self) -> LaunchSpec:
        return LaunchSpec(
            argv=[
                _script("uvicorn"),
                "carrara.main:app",
                "--host",
                self.settings.host,
                "--port",
                str(self.port),
                # Worker processes share the port; one of them (elected) runs the single-run loops.
                "--workers",
                str(self.settings.api_workers),
                "--no-access-log",
            ],
            cwd=project_root(),
        )

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.endpoint}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False


class WorkerService(Service):
    name = "worker"
    label = "Training worker (Celery)"
    # Tasks come from Redis; a run replays Kafka, logs to MLflow and records its state in Postgres.
    requires = NEEDS_ALL_INFRASTRUCTURE

    @property
    def port(self) -> int:
        return 0  # a worker listens on nothing; it pulls tasks from Redis

    @property
    def endpoint(self) -> str:
        return f"celery on {self.settings.redis_url}"

    def port_in_use(self) -> bool:
        return False

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    def launch_spec(self) -> LaunchSpec:
        return LaunchSpec(
            argv=[
                _script("celery"),
                "-A",
                "carrara.training.worker",
                "worker",
                "--loglevel=INFO",
                "--concurrency=1",
                f"--hostname=carrara-worker@{self.settings.host}",
            ],
            cwd=project_root(),
        )

    def healthy(self) -> bool:
        from carrara.training.worker import ping_workers

        return ping_workers(timeout=1.0) > 0


class ScorerService(Service):
    """A streaming scorer of the `default` pool; the demo runs two (one consumer group)."""

    label = "Scorer"
    # Deployments and events come from Kafka, models from MLflow; a scorer never uses Postgres.
    requires = ("kafka", "schema-registry", "mlflow")

    def __init__(self, settings: Settings, index: int) -> None:
        super().__init__(settings)
        self.index = index
        self.name = f"scorer-{index}"
        self.label = f"Scorer {index} (pool default)"

    @property
    def port(self) -> int:
        return self.settings.scorer_metrics_port + self.index

    @property
    def endpoint(self) -> str:
        return f"http://{self.settings.host}:{self.port}/metrics"

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    def launch_spec(self) -> LaunchSpec:
        return LaunchSpec(
            argv=[
                _script("carrara-scorer"),
                "--pool",
                "default",
                "--instance-id",
                f"{socket.gethostname()}-{self.name}",
                "--metrics-port",
                str(self.port),
            ],
            cwd=project_root(),
            # Probes on the stack's address only (containers keep the 0.0.0.0 default).
            env={"CARRARA_PROBES_HOST": self.settings.host},
            stop_timeout=60.0,
        )

    def healthy(self) -> bool:
        try:
            return (
                httpx.get(f"http://{self.settings.host}:{self.port}/healthz", timeout=2).status_code
                == 200
            )
        except httpx.HTTPError:
            return False


class MonitorService(Service):
    name = "monitor"
    label = "Monitor (outcomes, live metrics, drift)"
    # Reads Kafka; aggregates, offsets and deployment revisions live in Postgres.
    requires = ("postgres", "kafka")

    @property
    def port(self) -> int:
        return self.settings.monitor_metrics_port

    @property
    def endpoint(self) -> str:
        return f"http://{self.settings.host}:{self.port}/metrics"

    def prepare(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)

    def launch_spec(self) -> LaunchSpec:
        return LaunchSpec(
            argv=[_script("carrara-monitor"), "--metrics-port", str(self.port)],
            cwd=project_root(),
            env={"CARRARA_PROBES_HOST": self.settings.host},
        )

    def healthy(self) -> bool:
        try:
            url = f"http://{self.settings.host}:{self.port}/healthz"
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False
