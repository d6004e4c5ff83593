"""`carrara stack` is idempotent, reports the running stack and stops only its own processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

from tests.conftest import ROOT
from tests.integration.conftest import free_port

CARRARA = str(Path(sys.executable).parent / "carrara")


def _carrara(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CARRARA, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_status_json_reports_every_infrastructure_service_healthy() -> None:
    result = _carrara("stack", "status", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    services = {s["name"]: s for s in orjson.loads(result.stdout)}
    for name in ("postgres", "redis", "kafka", "mlflow"):
        assert services[name]["healthy"], services[name]
        assert services[name]["pid"] is not None


def test_up_is_idempotent_on_a_running_stack() -> None:
    before = {
        s["name"]: s["pid"] for s in orjson.loads(_carrara("stack", "status", "--json").stdout)
    }
    result = _carrara("stack", "up")
    assert result.returncode == 0, result.stderr
    after = {
        s["name"]: s["pid"] for s in orjson.loads(_carrara("stack", "status", "--json").stdout)
    }
    assert after == before
    assert "starting" not in result.stderr


def test_an_isolated_stack_starts_once_and_stops_only_its_own_process(tmp_path: Path) -> None:
    env = {"CARRARA_HOME": str(tmp_path / "home"), "CARRARA_REDIS_PORT": str(free_port())}
    first = _carrara("stack", "up", "redis", env=env)
    assert first.returncode == 0, first.stderr
    pid_file = tmp_path / "home" / "run" / "redis.pid"
    pid = orjson.loads(pid_file.read_bytes())["pid"]
    assert Path(f"/proc/{pid}").exists()

    second = _carrara("stack", "up", "redis", env=env)
    assert second.returncode == 0
    assert orjson.loads(pid_file.read_bytes())["pid"] == pid  # not started twice

    down = _carrara("stack", "down", env=env)
    assert down.returncode == 0
    assert "redis" in down.stdout
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert not pid_file.exists()
    # The shared stack's processes were left alone.
    shared = {s["name"]: s for s in orjson.loads(_carrara("stack", "status", "--json").stdout)}
    assert shared["redis"]["healthy"]


def test_a_port_taken_by_a_foreign_process_is_reported_not_stolen(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        env = {"CARRARA_HOME": str(tmp_path / "home"), "CARRARA_REDIS_PORT": str(port)}
        result = _carrara("stack", "up", "redis", env=env)
    assert result.returncode == 1
    assert f"port {port} is already in use" in result.stderr
    assert "CARRARA_REDIS_PORT" in result.stderr


def test_up_of_an_app_service_starts_what_it_needs_first() -> None:
    """`stack up api worker` with no Postgres running starts Postgres (then Redis, ...) before
    the API's migration, instead of failing with the migration's traceback.

    Redis's port is held by a foreign process, so the start stops right after Postgres: cheap, and
    it shows the order (Postgres first and healthy, the API never prepared).
    """
    # Postgres runs as the `postgres` user, who cannot enter pytest's private tmp_path.
    home = Path(tempfile.mkdtemp(prefix="carrara-stack-home-"))
    home.chmod(0o755)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        redis_port = squatter.getsockname()[1]
        env = {
            "CARRARA_HOME": str(home),
            "CARRARA_PG_PORT": str(free_port()),
            "CARRARA_REDIS_PORT": str(redis_port),
            "CARRARA_KAFKA_PORT": str(free_port()),
            "CARRARA_MLFLOW_PORT": str(free_port()),
            "CARRARA_API_PORT": str(free_port()),
        }
        try:
            result = _carrara("stack", "up", "api", "worker", env=env)
            assert result.returncode == 1, result.stdout + result.stderr
            assert "PostgreSQL is up" in result.stderr, result.stderr
            assert f"port {redis_port} is already in use" in result.stderr
            assert "migration" not in result.stderr
            assert "Traceback" not in result.stderr
            status = {
                s["name"]: s
                for s in orjson.loads(_carrara("stack", "status", "--json", env=env).stdout)
            }
            assert status["postgres"]["healthy"]
            assert not status["api"]["running"]
            assert not status["worker"]["running"]
        finally:
            down = _carrara("stack", "down", env=env)
            shutil.rmtree(home, ignore_errors=True)
    assert down.returncode == 0, down.stderr
    assert "postgres" in down.stdout
