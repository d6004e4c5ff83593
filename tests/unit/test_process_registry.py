"""PID files track exactly the processes we started, and never a recycled PID."""

from __future__ import annotations

import signal
from pathlib import Path

import orjson

from carrara.devstack.processes import LaunchSpec, ProcessRegistry


def test_start_find_and_stop_a_process(tmp_path: Path) -> None:
    registry = ProcessRegistry(tmp_path / "run", tmp_path / "logs")
    proc = registry.start("sleeper", LaunchSpec(argv=["sleep", "300"], cwd=tmp_path))
    assert registry.find("sleeper") == proc
    assert registry.stop("sleeper", signal.SIGTERM, timeout=5)
    assert not proc.alive()
    assert registry.find("sleeper") is None
    assert not registry.pid_file("sleeper").exists()
    assert registry.stop("sleeper", signal.SIGTERM, timeout=5) is False


def test_a_recycled_pid_is_not_ours(tmp_path: Path) -> None:
    registry = ProcessRegistry(tmp_path / "run", tmp_path / "logs")
    registry.run_dir.mkdir(parents=True)
    # PID 1 exists, but with a different start time than the one recorded: not our process.
    registry.pid_file("ghost").write_bytes(orjson.dumps({"pid": 1, "start_ticks": 999_999_999}))
    assert registry.find("ghost") is None
    assert not registry.pid_file("ghost").exists()  # the stale file is cleaned up


def test_stop_escalates_to_sigkill_when_the_process_ignores_the_signal(tmp_path: Path) -> None:
    registry = ProcessRegistry(tmp_path / "run", tmp_path / "logs")
    stubborn = ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"]
    proc = registry.start("stubborn", LaunchSpec(argv=stubborn, cwd=tmp_path))
    assert registry.stop("stubborn", signal.SIGTERM, timeout=0.5)
    assert not proc.alive()
