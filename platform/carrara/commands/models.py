"""Models: list, show lineage, import from MLflow, upload ONNX, trust, aliases (REST client)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import orjson
import typer
from rich.table import Table

from carrara.commands.api_client import ApiClient, console, print_json

app = typer.Typer(no_args_is_help=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
VersionOpt = Annotated[int, typer.Option("--version", min=1, help="Model version number.")]


def _path(name: str, *rest: str) -> str:
    # Quote every segment: a name is never allowed to change the URL's shape.
    return "/".join(["/models", *(quote(part, safe="") for part in (name, *rest))])


def _aliases(aliases: dict[str, int]) -> str:
    return ", ".join(f"{alias}→v{version}" for alias, version in sorted(aliases.items()))


def _metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(metrics.items())
    )


def _lineage(version: dict[str, Any]) -> str:
    run = version.get("run")
    if not run:
        return "imported from MLflow"
    dataset = run["dataset"]
    return f"run {run['id']} ← {dataset['dataset']} v{dataset['version']}"


@app.command("list")
def list_(
    name: Annotated[str | None, typer.Option("--name", help="Name prefix to filter on.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List registered models with their latest version and aliases."""
    params: dict[str, Any] = {"limit": 500}
    if name:
        params["name"] = name
    page = ApiClient().get("/models", params=params)
    if as_json:
        print_json(page["items"])
        return
    table = Table("name", "latest", "versions", "aliases", "created")
    for m in page["items"]:
        table.add_row(
            m["name"],
            str(m["latest_version"] or ""),
            str(m["version_count"]),
            _aliases(m["aliases"]),
            m["created_at"],
        )
    console.print(table)


@app.command("show")
def show(name: str, as_json: JsonOpt = False) -> None:
    """Show a model's versions with lineage (run → dataset snapshot), metrics and aliases."""
    model = ApiClient().get(_path(name))
    if as_json:
        print_json(model)
        return
    console.print(f"[bold]{model['name']}[/bold] {model['description']}".rstrip())
    if model["aliases"]:
        console.print(f"aliases: {_aliases(model['aliases'])}")
    table = Table("version", "aliases", "lineage", "metrics", "created")
    for v in model["versions"]:
        table.add_row(
            str(v["version"]),
            ", ".join(v["aliases"]),
            _lineage(v),
            _metrics(v["metrics"]),
            v["created_at"],
        )
    console.print(table)


@app.command("import")
def import_(name: str, version: VersionOpt, as_json: JsonOpt = False) -> None:
    """Import an existing MLflow registry version into Carrara."""
    imported = ApiClient().post(_path(name, "versions"), json={"version": version})
    if as_json:
        print_json(imported)
        return
    console.print(f"imported {name} v{imported['version']} ({imported['mlflow_source']})")


@app.command("alias")
def alias(name: str, alias: str, version: VersionOpt, as_json: JsonOpt = False) -> None:
    """Point ALIAS (e.g. champion) at a version, in MLflow's registry and in Carrara."""
    result = ApiClient().put(_path(name, "aliases", alias), json={"version": version})
    if as_json:
        print_json(result)
        return
    previous = result["previous_version"]
    moved = f" (was v{previous})" if previous is not None and previous != version else ""
    console.print(f"{name}@{alias} → v{result['version']}{moved}")


@app.command("unalias")
def unalias(name: str, alias: str, as_json: JsonOpt = False) -> None:
    """Remove ALIAS from the model, in MLflow's registry and in Carrara."""
    result = ApiClient().delete(_path(name, "aliases", alias))
    if as_json:
        print_json(result)
        return
    console.print(f"{name}@{alias} removed (it named v{result['version']})")


@app.command("sync")
def sync(name: str, as_json: JsonOpt = False) -> None:
    """Reconcile a model from MLflow's registry: import missing versions, mirror aliases."""
    result = ApiClient().post(_path(name, "sync"))
    if as_json:
        print_json(result)
        return
    imported = ", ".join(f"v{v}" for v in result["imported_versions"]) or "none"
    console.print(f"imported versions: {imported}")
    console.print(f"aliases set: {_aliases(result['aliases_set']) or 'none'}")
    console.print(f"aliases removed: {', '.join(result['aliases_removed']) or 'none'}")
    if result["aliases_skipped"]:
        console.print(f"aliases skipped: {', '.join(result['aliases_skipped'])}")


def _label(value: str) -> str | int | bool:
    text = value.strip()
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return int(text)
    except ValueError:
        return text


@app.command("upload")
def upload(
    name: str,
    file: Annotated[Path, typer.Argument(help="The .onnx file.", exists=True, dir_okay=False)],
    dataset: Annotated[str, typer.Option(help="The dataset whose events the model scores.")],
    features: Annotated[
        str,
        typer.Option(help="Numeric dataset features, comma-separated, in input-column order."),
    ],
    output: Annotated[
        str,
        typer.Option(
            help="What the output means: probability (of the positive class), class_scores, "
            "regression or anomaly_score."
        ),
    ],
    classes: Annotated[
        str | None,
        typer.Option(
            help="class_scores: the label of each column; probability: negative,positive."
        ),
    ] = None,
    threshold: Annotated[
        float | None, typer.Option(help="anomaly_score: alert above this score.")
    ] = None,
    input_name: Annotated[
        str | None, typer.Option(help="The input tensor (default: the only one).")
    ] = None,
    output_name: Annotated[
        str | None, typer.Option(help="The output tensor to score with.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload an ONNX model trained anywhere as a new version (checked on the dataset's events)."""
    declaration: dict[str, Any] = {
        "dataset": dataset,
        "features": [f.strip() for f in features.split(",") if f.strip()],
        "output": output,
    }
    if classes is not None:
        declaration["classes"] = [_label(c) for c in classes.split(",") if c.strip()]
    optional = {"threshold": threshold, "input_name": input_name, "output_name": output_name}
    declaration.update({k: v for k, v in optional.items() if v is not None})
    with file.open("rb") as handle:
        created = ApiClient().post(
            _path(name, "versions"),
            files={"file": (file.name, handle, "application/octet-stream")},
            data={"declaration": orjson.dumps(declaration).decode()},
        )
    if as_json:
        print_json(created)
        return
    console.print(f"uploaded {name} v{created['version']} ({created['mlflow_source']})")


@app.command("trust")
def trust(
    name: str,
    version: VersionOpt,
    reason: Annotated[str, typer.Option(help="Why (kept in the audit log).")] = "",
    revoke: Annotated[bool, typer.Option("--revoke", help="Take the trust back.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Admins: allow scorers to load a version from formats that run code (pickle, pyfunc)."""
    result = ApiClient().put(
        _path(name, "versions", str(version), "trust"),
        json={"trusted_code": not revoke, "reason": reason},
    )
    if as_json:
        print_json(result)
        return
    state = "trusted code" if result["trusted_code"] else "not trusted"
    console.print(f"{name} v{version}: {state} (effective from each deployment's next revision)")
