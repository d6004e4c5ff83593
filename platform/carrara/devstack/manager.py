"""Bring the local stack up and down, idempotently, and report its state."""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from carrara.devstack.app_processes import (
    ApiService,
    MonitorService,
    ScorerService,
    WorkerService,
)
from carrara.devstack.kafka_broker import KafkaService
from carrara.devstack.mlflow_server import MlflowService
from carrara.devstack.postgres_server import PostgresService
from carrara.devstack.processes import LaunchSpec, ProcessRegistry
from carrara.devstack.redis_server import RedisService
from carrara.devstack.schema_registry import SchemaRegistryService
from carrara.devstack.secure import SecureMaterial, profile_env, secure_profile
from carrara.devstack.service import Service, StackError
from carrara.settings import Settings

INFRASTRUCTURE = ("postgres", "redis", "kafka", "schema-registry", "mlflow")
APPLICATION = ("api", "worker", "scorer-1", "scorer-2", "monitor")
START_TIMEOUT = {
    "postgres": 60,
    "redis": 20,
    "kafka": 120,
    "schema-registry": 120,
    "mlflow": 180,
    "api": 60,
    "worker": 90,
    "scorer-1": 60,
    "scorer-2": 60,
    "monitor": 30,
}


@dataclass
class ServiceStatus:
    name: str
    label: str
    endpoint: str
    pid: int | None
    running: bool
    healthy: bool
    started_now: bool
    log: str


# Which identity (devstack/secure.py) each of Carrara's processes runs as in the secured stack.
IDENTITY = {"api": "control", "worker": "control", "monitor": "monitor"}


class Stack:
    """The local stack's services, in start order.

    `secure`: the secured stack (`carrara stack up --secure`): its own home (`<home>/secure`) and
    ports (the plain stack's + 100), Kafka on SASL_SSL with ACLs, MLflow with basic auth, and
    Carrara's processes started with their identity's credentials. Both stacks can run at once.
    """

    def __init__(
        self,
        settings: Settings,
        report: Callable[[str], None] = lambda _: None,
        *,
        secure: bool = False,
    ) -> None:
        if secure:
            settings = secure_profile(settings)
        self.settings = settings
        self.report = report
        self.material = SecureMaterial(settings.home, settings.host) if secure else None
        self.registry = ProcessRegistry(settings.home / "run", settings.home / "logs")
        classes: list[type[Service]] = [
            PostgresService,
            RedisService,
            SchemaRegistryService,
            ApiService,
            WorkerService,
        ]
        self.services: dict[str, Service] = {cls.name: cls(settings) for cls in classes}
        self.services["kafka"] = KafkaService(settings, self.material)
        self.services["mlflow"] = MlflowService(settings, self.material)
        order = ("postgres", "redis", "kafka", "schema-registry", "mlflow", "api", "worker")
        self.services = {name: self.services[name] for name in order}
        for index in (1, 2):
            scorer = ScorerService(settings, index)
            self.services[scorer.name] = scorer
        self.services["monitor"] = MonitorService(settings)

    def select(self, names: Iterable[str] | None) -> list[Service]:
        """Services by name in start order; the infrastructure when no names are given."""
        wanted = list(names) if names else list(INFRASTRUCTURE)
        unknown = sorted(set(wanted) - set(self.services))
        if unknown:
            known = ", ".join(self.services)
            raise StackError(f"unknown service(s) {', '.join(unknown)}; known: {known}")
        return [svc for name, svc in self.services.items() if name in wanted]

    def with_requirements(self, names: Iterable[str] | None) -> list[Service]:
        """`select(names)` plus every service they need (transitively), in start order."""
        wanted = {svc.name for svc in self.select(names)}
        pending = list(wanted)
        while pending:
            for required in self.services[pending.pop()].requires:
                if required not in wanted:
                    wanted.add(required)
                    pending.append(required)
        return self.select(wanted)

    def status_of(self, svc: Service, started_now: bool = False) -> ServiceStatus:
        proc = self.registry.find(svc.name)
        return ServiceStatus(
            name=svc.name,
            label=svc.label,
            endpoint=svc.endpoint,
            pid=proc.pid if proc else None,
            running=proc is not None,
            healthy=svc.healthy() if proc else False,
            started_now=started_now,
            log=str(self.registry.log_file(svc.name)),
        )

    def status(self, names: Iterable[str] | None = None) -> list[ServiceStatus]:
        return [self.status_of(svc) for svc in self.select(names or self.services)]

    def up(self, names: Iterable[str] | None = None) -> list[ServiceStatus]:
        """Start what is not running yet, the services the named ones need first, and wait until
        every one answers. Returns the status of each service started or checked, in start order.
        """
        return [self._up_one(svc) for svc in self.with_requirements(names)]

    def _up_one(self, svc: Service) -> ServiceStatus:
        started = False
        proc = self.registry.find(svc.name)
        if proc is None:
            if svc.port_in_use():
                raise StackError(
                    f"{svc.label}: port {svc.port} is already in use by a process carrara did not "
                    f"start; stop it or set CARRARA_{svc.name.upper()}_PORT"
                )
            self.report(f"preparing {svc.label}")
            svc.prepare()
            self.report(f"starting {svc.label}")
            proc = self.registry.start(svc.name, self._identified(svc, svc.launch_spec()))
            started = True
        deadline = time.monotonic() + START_TIMEOUT.get(svc.name, 60)
        while not svc.healthy():
            if not proc.alive():
                self.registry.pid_file(svc.name).unlink(missing_ok=True)
                raise StackError(
                    f"{svc.label} exited during start; last log lines "
                    f"({self.registry.log_file(svc.name)}):\n{self.registry.log_tail(svc.name)}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"{svc.label} did not become healthy in {START_TIMEOUT.get(svc.name, 60)} s; "
                    f"see {self.registry.log_file(svc.name)}"
                )
            time.sleep(0.3)
        svc.after_healthy()
        self.report(f"{svc.label} is up at {svc.endpoint}")
        return self.status_of(svc, started_now=started)

    def _identified(self, svc: Service, spec: LaunchSpec) -> LaunchSpec:
        """Secured: the stack's ports and, for Carrara's processes, their identity's credentials."""
        if self.material is None:
            return spec
        env = {**profile_env(self.settings), **spec.env}
        identity = "scorer" if svc.name.startswith("scorer-") else IDENTITY.get(svc.name)
        if identity is not None:
            env |= self.material.identity_env(identity)
        return dataclasses.replace(spec, env=env)

    def write_identity_env_files(self) -> list[str]:
        """Secured: `secrets/<identity>.env` for running processes or the CLI by hand."""
        if self.material is None:
            return []
        return [str(p) for p in self.material.write_env_files(self.settings)]

    def down(self, names: Iterable[str] | None = None) -> list[str]:
        """Stop the services this project started, in reverse start order; returns their names."""
        chosen = self.select(names or self.services)
        stopped = []
        for svc in reversed(chosen):
            spec_signal, timeout = _stop_policy(svc)
            if self.registry.stop(svc.name, spec_signal, timeout):
                self.report(f"stopped {svc.label}")
                stopped.append(svc.name)
        return stopped


def _stop_policy(svc: Service) -> tuple[signal.Signals, float]:
    """Signal and grace period from the launch spec, without preparing anything."""
    try:
        spec = svc.launch_spec()
    except StackError:
        return signal.SIGTERM, 30.0
    return spec.stop_signal, spec.stop_timeout


def as_dicts(statuses: Iterable[ServiceStatus]) -> list[dict[str, object]]:
    return [asdict(s) for s in statuses]
