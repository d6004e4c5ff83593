"""Deployments (REST client): list, show, status, history, rollback, delete; `deploy -f` applies."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.table import Table

from carrara.commands.api_client import ApiClient, console, fail, load_document, print_json

app = typer.Typer(no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ReasonOpt = Annotated[
    str, typer.Option("--reason", help="Why: kept in the revision history and audit log.")
]


def _path(name: str, *rest: str) -> str:
    # Quote every segment: a name is never allowed to change the URL's shape.
    return "/".join(["/deployments", *(quote(part, safe="") for part in (name, *rest))])


def _variants_table(spec: dict[str, Any]) -> Table:
    table = Table("variant", "model", "version", "weight", "shadow")
    for v in spec["variants"]:
        shadow = f"yes ({v['shadow_sample_pct']:g}%)" if v["shadow"] else ""
        table.add_row(v["name"], v["model"], str(v["version"]), str(v["weight"]), shadow)
    return table


def _print_deployment(deployment: dict[str, Any]) -> None:
    colour = "green" if deployment["status"] == "running" else "yellow"
    console.print(
        f"[bold]{deployment['name']}[/bold] [{colour}]{deployment['status']}[/{colour}] "
        f"revision {deployment['revision']}"
    )
    spec = deployment["spec"]
    if spec is None:
        console.print(f"stopped at {deployment['stopped_at']}")
        return
    console.print(
        f"{spec['input_topic']} → {spec['output_topic']}  key: {spec['key_field']}  "
        f"pool: {spec['pool']}"
    )
    if spec["description"]:
        console.print(spec["description"])
    console.print(_variants_table(spec))


def _print_rollout(rollout: dict[str, Any]) -> None:
    done = rollout["total"] > 0 and rollout["up_to_date"] == rollout["total"]
    colour = "green" if done else "yellow"
    console.print(f"rollout: [{colour}]{rollout['summary']}[/{colour}]")
    if not rollout["scorers"]:
        return
    table = Table("scorer", "host", "served revision", "state", "live", "last error")
    for s in rollout["scorers"]:
        served = s["served_revision"]
        table.add_row(
            s["instance_id"],
            s["host"],
            "" if served is None else str(served),
            s["state"],
            "yes" if s["live"] else f"no (seen {s['seen_at']})",
            s["last_error"] or "",
        )
    console.print(table)


def _print_applied(result: dict[str, Any], verb: str) -> None:
    console.print(f"deployment {result['name']}: revision {result['revision']} ({verb})")


def deploy_command(
    file: Annotated[
        str, typer.Option("-f", "--file", help="Deployment YAML/JSON file (`-` for stdin).")
    ],
    name: Annotated[
        str | None, typer.Option("--name", help="Deployment name (default: `name` in the file).")
    ] = None,
    reason: Annotated[
        str | None, typer.Option("--reason", help="Why: kept in the revision history.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply a deployment file: a new revision only if the desired state changed."""
    document = load_document(file)
    file_name = document.pop("name", None)
    name = name or file_name
    if not isinstance(name, str) or not name:
        fail(f"{file} needs a `name` (or pass --name)")
    if reason is not None:
        document["reason"] = reason
    result = ApiClient().put(_path(name), json=document)
    if as_json:
        print_json(result)
        return
    _print_applied(result, "changed: new revision" if result["changed"] else "unchanged")


@app.command("list")
def list_(
    status: Annotated[str | None, typer.Option("--status", help="running or stopped.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name prefix to filter on.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List deployments with their status and current revision."""
    params: dict[str, Any] = {"limit": 500}
    if status:
        params["status"] = status
    if name:
        params["name"] = name
    page = ApiClient().get("/deployments", params=params)
    if as_json:
        print_json(page["items"])
        return
    table = Table("name", "status", "revision", "input → output", "variants", "updated")
    for d in page["items"]:
        spec = d["spec"]
        table.add_row(
            d["name"],
            d["status"],
            str(d["revision"]),
            f"{spec['input_topic']} → {spec['output_topic']}" if spec else "",
            ", ".join(
                f"{v['name']}={v['model']}:v{v['version']}"
                + (" (shadow)" if v["shadow"] else f" {v['weight']}%")
                for v in spec["variants"]
            )
            if spec
            else "",
            d["updated_at"],
        )
    console.print(table)


@app.command("show")
def show(name: str, as_json: JsonOpt = False) -> None:
    """Show the current revision of a deployment, whether it runs, and its rollout to scorers."""
    deployment = ApiClient().get(_path(name))
    if as_json:
        print_json(deployment)
        return
    _print_deployment(deployment)
    _print_rollout(deployment["rollout"])


@app.command("history")
def history(name: str, as_json: JsonOpt = False) -> None:
    """Show the revisions of a deployment, newest first: who, when, why."""
    page = ApiClient().get(_path(name, "revisions"), params={"limit": 500})
    if as_json:
        print_json(page["items"])
        return
    table = Table("revision", "state", "variants", "by", "when", "reason")
    for r in page["items"]:
        spec = r["spec"]
        variants = (
            ", ".join(f"{v['name']}={v['model']}:v{v['version']}" for v in spec["variants"])
            if spec
            else ""
        )
        table.add_row(
            str(r["number"]),
            "stopped" if r["stopped"] else "running",
            variants,
            r["created_by"],
            r["created_at"],
            r["reason"],
        )
    console.print(table)


@app.command("rollback")
def rollback(
    name: str,
    to: Annotated[int, typer.Option("--to", min=1, help="Revision whose spec to restore.")],
    reason: ReasonOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Make a new revision with the spec of revision --to."""
    result = ApiClient().post(_path(name, "rollback"), json={"revision": to, "reason": reason})
    if as_json:
        print_json(result)
        return
    _print_applied(result, f"rolled back to the spec of revision {to}")


@app.command("delete")
def delete(name: str, reason: ReasonOpt = "", as_json: JsonOpt = False) -> None:
    """Stop a deployment (a new revision tells scorers to stop; history is kept)."""
    result = ApiClient().delete(_path(name), params={"reason": reason} if reason else None)
    if as_json:
        print_json(result)
        return
    _print_applied(result, "stopped")


def _number(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}g}"


def _print_last_hour(metrics: dict[str, Any]) -> None:
    regression = metrics["task"] == "regression"
    console.print(f"[bold]last hour[/bold] ({metrics['from']} → {metrics['to']})")
    quality = ("rmse", "mae") if regression else ("accuracy", "auc")
    table = Table(
        "variant",
        "model version",
        "predictions",
        "dead letters",
        "p99 latency ms",
        "outcomes",
        *quality,
    )
    for v in metrics["variants"]:
        totals = v["totals"]
        name = v["variant"] + (" (shadow)" if v["shadow"] else "")
        table.add_row(
            name,
            "" if v["model_version"] is None else str(v["model_version"]),
            f"{totals['predictions']:,}",
            f"{totals['dead_letters']:,}",
            _number(totals["p99_latency_ms"]),
            f"{totals['outcomes']:,}",
            *(_number(totals[q], 4) for q in quality),
        )
    console.print(table)
    stats = metrics["outcome_stats"]
    console.print(
        "outcomes: " + ", ".join(f"{k.replace('_', ' ')} {count:,}" for k, count in stats.items())
    )


def _print_verdict(verdict: dict[str, Any]) -> None:
    console.print(f"[bold]verdict[/bold] on {verdict['metric']} vs. champion {verdict['champion']}")
    if not verdict["comparisons"]:
        console.print("  no challenger to compare")
    for c in verdict["comparisons"]:
        colour = "green" if c["significant"] else "yellow"
        console.print(f"  {c['challenger']}: [{colour}]{escape(c['verdict'])}[/{colour}]")


def _print_drift(drift: dict[str, Any]) -> None:
    console.print(
        f"[bold]drift[/bold] vs. {drift['model']} v{drift['model_version']} "
        f"(PSI threshold {drift['threshold']:g})"
    )
    if drift.get("note"):
        console.print(f"  {escape(drift['note'])}")
        return
    drifted = [f for f in drift["features"] if f["drifted"]]
    if not drifted:
        console.print("  no feature drifted")
    for f in drifted:
        ks = f" KS {f['ks']:.3f}" if f["ks"] is not None else ""
        console.print(
            f"  [red]{escape(f['feature'])}[/red]: PSI {f['psi']:.3f}{ks} (n = {f['live_count']:,})"
        )


def _print_alerts(alerts: list[dict[str, Any]]) -> None:
    if not alerts:
        console.print("[bold]alerts[/bold]: none")
        return
    table = Table("at", "kind", "severity", "message", title="newest alerts")
    for a in alerts:
        table.add_row(a["at"], escape(a["kind"]), a["severity"], escape(a["message"]))
    console.print(table)


@app.command("status")
def status(name: str, as_json: JsonOpt = False) -> None:
    """Show rollout, the last hour per variant, the A/B verdict, drifted features, newest alerts."""
    api = ApiClient()
    deployment = api.get(_path(name))
    metrics = api.get(_path(name, "metrics"), params={"bucket": "hour"})
    verdict = api.get(_path(name, "verdict"))
    drift = api.get(_path(name, "drift"))
    alerts = api.get("/alerts", params={"deployment": name, "limit": 5})["items"]
    # The last hour as totals: the per-bucket series is for charts, not for a status line.
    last_hour = {
        "from": metrics["from"],
        "to": metrics["to"],
        "task": metrics["task"],
        "variants": [{k: v for k, v in m.items() if k != "series"} for m in metrics["variants"]],
        "outcome_stats": metrics["outcome_stats"],
    }
    if as_json:
        print_json(
            {
                "deployment": deployment,
                "last_hour": last_hour,
                "verdict": verdict,
                "drift": drift,
                "alerts": alerts,
            }
        )
        return
    _print_deployment(deployment)
    _print_rollout(deployment["rollout"])
    _print_last_hour(last_hour)
    _print_verdict(verdict)
    _print_drift(drift)
    _print_alerts(alerts)
