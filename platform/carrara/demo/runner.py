"""Run both scenarios, print the summary, then keep streaming until stopped (unless `once`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

from confluent_kafka import KafkaException
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from carrara.demo import fraud, vitals
from carrara.demo.api import ApiError, DemoApi
from carrara.demo.context import DemoContext, ScenarioAborted
from carrara.demo.pipeline import stop_deployment
from carrara.demo.streaming import Pacer
from carrara.settings import Settings

STATUS_INTERVAL_S = 30.0
SCENARIOS = (fraud.SCENARIO, vitals.SCENARIO)  # each names its dataset, model and deployment


def run_demo(
    settings: Settings,
    token: str,
    *,
    once: bool,
    console: Console,
    scorers: int,
    keep_deployments: bool = False,
) -> bool:
    """Both scenarios through the public API; True if every step worked.

    Without `once`, keeps streaming both scenarios until KeyboardInterrupt (Ctrl-C or SIGTERM).
    The demo's deployments are stopped at the end (unless `keep_deployments`) so the scorers do
    not keep their models loaded across demo runs; their history stays visible.
    """
    ctx = DemoContext(
        settings=settings,
        api=DemoApi(settings.api_url, token),
        console=console,
        run_id=uuid.uuid4().hex[:6],
        once=once,
        scorers=scorers,
    )
    started = time.monotonic()
    console.print(
        f"\n[bold]Running the demo scenarios[/bold] (run id [bold]{ctx.run_id}[/bold]: every "
        "name below ends with it) through the public API, as a CI pipeline would."
    )
    fraud_live: fraud.FraudLive | None = None
    vitals_live: vitals.VitalsLive | None = None
    aborted: list[str] = []
    try:
        console.rule(f"[bold]Scenario 1 · {fraud.TITLE}")
        try:
            fraud_live = fraud.run(ctx)
        except ScenarioAborted:
            aborted.append(fraud.TITLE)
        console.rule(f"[bold]Scenario 2 · {vitals.TITLE}")
        try:
            vitals_live = vitals.run(ctx)
        except ScenarioAborted:
            aborted.append(vitals.TITLE)
        _print_platform_alerts(ctx)
        _print_urls(ctx, token)
        ok = not aborted and all(step.ok for step in ctx.steps)
        _print_summary(ctx, ok, time.monotonic() - started)
        if once:
            return ok
        _keep_streaming(ctx, fraud_live, vitals_live)
        return True
    finally:
        for live in (fraud_live, vitals_live):
            if live is not None:
                live.close()
        if not keep_deployments:
            _stop_deployments(ctx)
        ctx.api.close()


def _stop_deployments(ctx: DemoContext) -> None:
    names = [ctx.name(scenario) for scenario in SCENARIOS]
    stopped = [name for name in names if _exists(ctx, name) and stop_deployment(ctx, name)]
    if stopped:
        ctx.console.print(
            f"stopped the demo's deployments ({', '.join(stopped)}); their revisions, metrics "
            "and models stay in the API, the UI and MLflow"
        )


def _exists(ctx: DemoContext, name: str) -> bool:
    try:
        return ctx.api.get(f"/deployments/{name}")["status"] == "running"
    except ApiError:
        return False


def _print_platform_alerts(ctx: DemoContext, only_new: bool = False) -> None:
    """Alerts the monitor raised for the demo's deployments (GET /api/v1/alerts)."""
    try:
        alerts = vitals.recent_alerts(ctx, [ctx.name(scenario) for scenario in SCENARIOS])
    except ApiError as exc:
        ctx.console.print(f"[yellow]cannot list platform alerts: {escape(str(exc))}[/yellow]")
        return
    new = [a for a in alerts if a["id"] not in ctx.alerts_seen]
    ctx.alerts_seen.update(a["id"] for a in new)
    if not new:
        if not only_new:
            ctx.console.print(
                "Platform alerts (GET /api/v1/alerts): none yet — drift and automatic "
                "rollbacks show up there."
            )
        return
    ctx.console.print("Platform alerts (GET /api/v1/alerts):")
    for alert in new:
        ctx.console.print(
            f"    [yellow]{alert['severity']}[/yellow] {alert['kind']} on "
            f"{alert['deployment']}: {escape(alert['message'])}"
        )


def _print_urls(ctx: DemoContext, token: str) -> None:
    api_url = ctx.settings.api_url
    table = Table(title="Where to look", title_justify="left")
    table.add_column("what")
    table.add_column("where")
    table.add_row("Carrara UI", f"{api_url}/")
    table.add_row("API docs (OpenAPI)", f"{api_url}/docs")
    table.add_row("MLflow (experiments, registry)", ctx.settings.mlflow_url)
    for scenario in SCENARIOS:
        table.add_row(
            f"{scenario} deployment", f"{api_url}/api/v1/deployments/{ctx.name(scenario)}"
        )
    ctx.console.print(table)
    ctx.console.print(f"Admin token: [bold]{token}[/bold]")
    ctx.console.print(
        f"  export CARRARA_API_URL={api_url} CARRARA_TOKEN=$(cat {ctx.settings.home}/admin-token)"
    )


def _print_summary(ctx: DemoContext, ok: bool, seconds: float) -> None:
    table = Table(title=f"Demo summary (run {ctx.run_id})", title_justify="left")
    for column in ("step", "scenario", "result", "key numbers", "time"):
        table.add_column(column, overflow="fold")
    for step in ctx.steps:
        table.add_row(
            f"{step.number} {step.title}",
            step.scenario,
            "[green]ok[/green]" if step.ok else "[red]FAILED[/red]",
            escape(step.detail if step.ok else "; ".join(step.problems)),
            f"{step.seconds:.1f} s",
        )
    ctx.console.print(table)
    verdict = "[bold green]every step worked" if ok else "[bold red]some steps failed"
    ctx.console.print(f"{verdict}[/] — {len(ctx.steps)} steps in {seconds:.0f} s")


def _keep_streaming(
    ctx: DemoContext,
    fraud_live: fraud.FraudLive | None,
    vitals_live: vitals.VitalsLive | None,
) -> None:
    """Both streams at a modest rate, alerts as they come, a status every 30 s; until Ctrl-C."""
    ctx.console.print(
        f"[bold]Carrara is running.[/bold] Streaming {fraud.CONTINUOUS_RATE} payments/s and "
        f"{vitals.CONTINUOUS_RATE} readings/s; live metrics every {STATUS_INTERVAL_S:.0f} s. "
        "Press Ctrl-C to stop what this demo started."
    )
    fraud_pacer, vitals_pacer = Pacer(fraud.CONTINUOUS_RATE), Pacer(vitals.CONTINUOUS_RATE)
    if vitals_live is not None:
        vitals_live.alert_lines = None
    last_status = time.monotonic()
    try:
        while not ctx.stop.wait(0.1):
            _survive(
                ctx,
                lambda: (
                    fraud_live.send(fraud_pacer.due()) if fraud_live is not None else None,
                    vitals_live.send(vitals_pacer.due(), vitals.CONTINUOUS_EPISODE_CHANCE)
                    if vitals_live is not None
                    else None,
                    vitals_live.watch() if vitals_live is not None else None,
                ),
            )
            if time.monotonic() - last_status > STATUS_INTERVAL_S:
                last_status = time.monotonic()
                _survive(ctx, lambda: _print_status(ctx, fraud_live, vitals_live))
    except KeyboardInterrupt:
        ctx.console.print("\nstopping the live streams ...")


def _survive(ctx: DemoContext, action: Callable[[], object]) -> None:
    """Run `action`; a hiccup of the API or Kafka is shown, and streaming goes on."""
    try:
        action()
    except (ApiError, KafkaException, RuntimeError) as exc:
        ctx.console.print(f"[yellow]warning: {escape(str(exc))}[/yellow]")


def _print_status(
    ctx: DemoContext, fraud_live: fraud.FraudLive | None, vitals_live: vitals.VitalsLive | None
) -> None:
    if fraud_live is not None:
        name = fraud_live.deployment
        deployment = ctx.api.get(f"/deployments/{name}")
        ctx.console.print(fraud.metrics_table(fraud.metrics_since_start(ctx, name), deployment))
        for comparison in ctx.api.get(f"/deployments/{name}/verdict")["comparisons"]:
            ctx.console.print(
                f"    verdict {comparison['challenger']}: {escape(comparison['verdict'])}"
            )
        ctx.console.print(
            f"    rollout: {escape(deployment['rollout']['summary'])} "
            f"(revision {deployment['revision']})"
        )
    if vitals_live is not None:
        ctx.console.print(
            f"    vitals: {vitals_live.scored:,} readings scored, "
            f"{vitals_live.flagged_episodes}/{vitals_live.scored_episodes} episodes flagged, "
            f"{vitals_live.false_alarms} false alarms"
        )
    _print_platform_alerts(ctx, only_new=True)
