"""What every local-stack service provides: preparation, a launch spec and a health probe."""

from __future__ import annotations

import socket
from abc import ABC, abstractmethod
from pathlib import Path

from carrara.devstack.processes import LaunchSpec
from carrara.settings import Settings


class StackError(RuntimeError):
    """A service could not be installed, prepared or started; the message says what to do."""


class Service(ABC):
    """One process of the local stack."""

    name: str
    label: str
    # Services that must be healthy before this one starts (`stack up api` starts them first).
    requires: tuple[str, ...] = ()

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def home(self) -> Path:
        return self.settings.home / self.name

    @property
    @abstractmethod
    def port(self) -> int: ...

    @property
    @abstractmethod
    def endpoint(self) -> str:
        """Where clients reach this service (printed by `stack up` and `stack status`)."""

    @abstractmethod
    def prepare(self) -> None:
        """Install and initialise what the service needs; idempotent and safe to repeat."""

    @abstractmethod
    def launch_spec(self) -> LaunchSpec: ...

    @abstractmethod
    def healthy(self) -> bool:
        """A quick, non-raising probe: does the service answer real requests?"""

    def after_healthy(self) -> None:  # noqa: B027 - optional hook
        """Runs once the service answers (e.g. create databases); idempotent."""

    def port_in_use(self) -> bool:
        """True when something already listens on our port (maybe not a process of ours)."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            return sock.connect_ex((self.settings.host, self.port)) == 0
