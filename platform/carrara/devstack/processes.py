"""PID-file tracking of the processes the local stack starts.

A PID file stores the PID *and* the kernel's start time of that process, so a recycled PID that now
belongs to some other program is never mistaken for ours (and never signalled).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson


def _process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited; it only waits to be reaped
        return None
    return int(fields[19])


@dataclass(frozen=True)
class LaunchSpec:
    """How to start one service process."""

    argv: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)
    user: str | None = None  # run as this user (PostgreSQL refuses to run as root)
    stop_signal: signal.Signals = signal.SIGTERM
    stop_timeout: float = 30.0


@dataclass(frozen=True)
class TrackedProcess:
    """A process recorded in a PID file."""

    pid: int
    start_ticks: int

    def alive(self) -> bool:
        """True while the very process we started is still running."""
        return _process_start_ticks(self.pid) == self.start_ticks


class ProcessRegistry:
    """Starts, finds and stops the stack's processes through PID files in `run_dir`."""

    def __init__(self, run_dir: Path, log_dir: Path) -> None:
        self.run_dir = run_dir
        self.log_dir = log_dir

    def pid_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.pid"

    def log_file(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def find(self, name: str) -> TrackedProcess | None:
        """The live process recorded for `name`; a stale PID file is removed."""
        path = self.pid_file(name)
        try:
            data = orjson.loads(path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        proc = TrackedProcess(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]))
        if proc.alive():
            return proc
        path.unlink(missing_ok=True)
        return None

    def start(self, name: str, spec: LaunchSpec) -> TrackedProcess:
        """Start `spec` detached in its own session (so Ctrl-C in a terminal does not reach it)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_file(name)
        with log.open("ab") as out:
            out.write(f"\n--- starting {name} at {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
            out.flush()
            popen = subprocess.Popen(
                spec.argv,
                cwd=spec.cwd,
                env={**os.environ, **spec.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=spec.user,
            )
        ticks = _process_start_ticks(popen.pid)
        if ticks is None:
            raise RuntimeError(f"{name} exited immediately; see {log}")
        proc = TrackedProcess(pid=popen.pid, start_ticks=ticks)
        payload = {"pid": proc.pid, "start_ticks": proc.start_ticks, "argv": spec.argv[:1]}
        self.pid_file(name).write_bytes(orjson.dumps(payload))
        return proc

    def stop(self, name: str, sig: signal.Signals, timeout: float) -> bool:
        """Stop the process group of `name`: `sig`, then SIGKILL after `timeout`. False if none."""
        proc = self.find(name)
        if proc is None:
            return False
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        deadline = time.monotonic() + timeout
        while proc.alive() and time.monotonic() < deadline:
            _reap(proc.pid)
            time.sleep(0.1)
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            while proc.alive():
                _reap(proc.pid)
                time.sleep(0.05)
        _reap(proc.pid)
        self.pid_file(name).unlink(missing_ok=True)
        return True

    def log_tail(self, name: str, lines: int = 20) -> str:
        """The last lines of a service's log, to explain a failed start."""
        try:
            return "\n".join(self.log_file(name).read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _reap(pid: int) -> None:
    """Collect the exit status if `pid` is our own child, so it does not linger as a zombie."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
