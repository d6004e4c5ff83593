"""Redis from Debian's `redis-server` package: the Celery broker and result backend."""

from __future__ import annotations

import shutil

import redis

from carrara.devstack.processes import LaunchSpec
from carrara.devstack.service import Service, StackError


class RedisService(Service):
    name = "redis"
    label = "Redis"

    @property
    def port(self) -> int:
        return self.settings.redis_port

    @property
    def endpoint(self) -> str:
        return self.settings.redis_url

    def prepare(self) -> None:
        if shutil.which("redis-server") is None:
            raise StackError(
                "redis-server is not installed: run `deploy/bootstrap.sh` (apt package)"
            )
        self.home.mkdir(parents=True, exist_ok=True)

    def launch_spec(self) -> LaunchSpec:
        # No persistence: Redis is only a broker/result backend here, the truth lives in Postgres.
        return LaunchSpec(
            argv=[
                "redis-server",
                "--bind",
                self.settings.host,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.home),
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            cwd=self.home,
        )

    def healthy(self) -> bool:
        try:
            client = redis.Redis(host=self.settings.host, port=self.port, socket_timeout=1)
            return bool(client.ping())
        except redis.RedisError:
            return False
