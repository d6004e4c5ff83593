"""`carrara demo` brings up the control plane and a worker on the stack, and Ctrl-C stops them.

These are the quick checks (`--no-scenarios`); tests/e2e/test_demo_once.py runs the scenarios.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson

from carrara.settings import Settings
from tests.conftest import ROOT

CARRARA = str(Path(sys.executable).parent / "carrara")


def _status() -> dict[str, dict[str, object]]:
    result = subprocess.run(
        [CARRARA, "stack", "status", "--json"], cwd=ROOT, capture_output=True, check=False
    )
    return {s["name"]: s for s in orjson.loads(result.stdout)}


def _running(pid: object, grace_s: float = 10.0) -> bool:
    """Whether `pid` still runs; a zombie waiting for init to reap it has stopped."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False
        if "State:\tZ" in state:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


def test_demo_once_prints_endpoints_and_is_ready(stack_settings: Settings) -> None:
    result = subprocess.run(
        [CARRARA, "demo", "--once", "--no-scenarios"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for where in ("/docs", stack_settings.mlflow_url, stack_settings.kafka_bootstrap, "Redis"):
        assert where in result.stdout
    assert "GET /readyz → 200" in result.stdout
    status = _status()
    assert status["api"]["pid"] is None
    assert status["worker"]["pid"] is None
    assert status["kafka"]["healthy"]  # infrastructure it did not start is left running


def test_ctrl_c_stops_every_process_the_demo_started(stack_settings: Settings) -> None:
    demo = subprocess.Popen(
        [CARRARA, "demo", "--no-scenarios"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 180
    while not any("Carrara is running" in line for line in lines):
        line = demo.stdout.readline()
        assert line or demo.poll() is None, "".join(lines)
        lines.append(line)
        assert time.monotonic() < deadline, "".join(lines)
    assert httpx.get(f"{stack_settings.api_url}/readyz", timeout=10).status_code == 200
    started = {name: _status()[name]["pid"] for name in ("api", "worker")}
    assert all(started.values())

    demo.send_signal(signal.SIGINT)
    assert demo.wait(timeout=120) == 0
    for pid in started.values():
        assert not Path(f"/proc/{pid}").exists()
    status = _status()
    assert status["api"]["pid"] is None
    assert status["worker"]["pid"] is None
    assert status["postgres"]["healthy"]


def test_sigterm_mid_scenario_stops_every_process_the_demo_started(
    stack_settings: Settings,
) -> None:
    demo = subprocess.Popen(
        [CARRARA, "demo"],
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 180
    # Training is the longest step: stop the demo while its runs are queued or running.
    while not any(line.startswith("1.4 ") for line in lines):
        line = demo.stdout.readline()
        assert line or demo.poll() is None, "".join(lines)
        lines.append(line)
        assert time.monotonic() < deadline, "".join(lines)
    started = {name: _status()[name]["pid"] for name in ("api", "worker", "scorer-1", "monitor")}
    assert all(started.values())

    demo.send_signal(signal.SIGTERM)
    output, _ = demo.communicate(timeout=180)
    assert demo.returncode == 0, "".join(lines) + output
    assert "interrupted" in output
    assert "✗ interrupted" in output  # the training step reports it was cut short
    for name, pid in started.items():
        assert not _running(pid), f"{name} (pid {pid}) still runs:\n{output}"
    status = _status()
    assert all(status[name]["pid"] is None for name in started)
    assert status["kafka"]["healthy"]
