"""What the demo's steps share: the API client, the console, and the record of every step."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from carrara.demo.api import DemoApi
from carrara.settings import Settings


class ScenarioAborted(Exception):
    """A step failed in a way the following steps of its scenario cannot recover from."""


@dataclass
class Step:
    """One step of a scenario: what it did, whether it worked, the numbers worth showing."""

    scenario: str
    number: str
    title: str
    ok: bool = True
    detail: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def check(self, condition: bool, problem: str) -> bool:
        """Record `problem` (the step fails, the scenario goes on) unless `condition` holds."""
        if not condition:
            self.problems.append(problem)
        return condition

    def abort_if_failed(self) -> None:
        """Stop the scenario here if a check of this step failed."""
        if self.problems:
            raise ScenarioAborted("; ".join(self.problems))


@dataclass
class DemoContext:
    settings: Settings
    api: DemoApi
    console: Console
    run_id: str
    once: bool
    scorers: int  # scorers of the `default` pool a deployment must reach
    stop: threading.Event = field(default_factory=threading.Event)
    steps: list[Step] = field(default_factory=list)
    alerts_seen: set[int] = field(default_factory=set)  # platform alerts already printed
    # Floored to the minute: live metrics are kept per minute, and a window starting mid-minute
    # would leave out that minute's bucket.
    started_at: datetime = field(
        default_factory=lambda: datetime.now(UTC).replace(second=0, microsecond=0)
    )

    @contextmanager
    def step(self, scenario: str, number: str, title: str) -> Iterator[Step]:
        """Print the step, time it and record how it went; an exception aborts the scenario."""
        step = Step(scenario, number, title)
        self.console.print(f"[bold cyan]{number}[/bold cyan] {escape(title)}")
        start = time.monotonic()
        try:
            yield step
        except ScenarioAborted:
            step.ok = False
            raise
        except Exception as exc:
            step.ok = False
            step.problems.append(str(exc) or type(exc).__name__)
            raise ScenarioAborted(str(exc)) from exc
        except BaseException:  # Ctrl-C or SIGTERM: the demo stops here
            step.problems.append("interrupted")
            raise
        finally:
            step.seconds = time.monotonic() - start
            if step.problems:
                step.ok = False
            self.steps.append(step)
            self._report(step)

    def _report(self, step: Step) -> None:
        timing = f"[dim]({step.seconds:.1f} s)[/dim]"
        if step.ok:
            self.console.print(f"    [green]✓[/green] {escape(step.detail)} {timing}")
        else:
            for problem in step.problems:
                self.console.print(f"    [red]✗ {escape(problem)}[/red] {timing}")

    def progress(self, bar: bool = True) -> Progress:
        """A progress display in the house style (a bar with counts, or a spinner)."""
        columns = [SpinnerColumn(), TextColumn("    {task.description}")]
        if bar:
            columns += [BarColumn(bar_width=30), MofNCompleteColumn()]
        columns += [TimeElapsedColumn()]
        return Progress(*columns, console=self.console, transient=False)

    def name(self, stem: str) -> str:
        """A resource name unique to this demo run, e.g. `demo-fraud-1a2b3c`."""
        return f"demo-{stem}-{self.run_id}"

    def topic(self, scenario: str, role: str | None = None) -> str:
        """A Kafka topic unique to this demo run, e.g. `demo.fraud.1a2b3c.payments`."""
        return f"demo.{scenario}.{self.run_id}" + (f".{role}" if role else "")
