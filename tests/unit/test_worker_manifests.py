"""The Kubernetes manifests in workers/ parse and wire the scorer the way the scorer expects."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from carrara.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
WORKERS = ROOT / "workers"
KUBERNETES = WORKERS / "kubernetes"


def documents() -> list[tuple[Path, dict[str, Any]]]:
    found = []
    for path in sorted([*WORKERS.rglob("*.yaml"), *WORKERS.rglob("*.yml")]):
        with path.open() as f:
            found += [(path, doc) for doc in yaml.safe_load_all(f) if doc is not None]
    return found


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def one(kind: str) -> dict[str, Any]:
    docs = by_kind(kind)
    assert len(docs) == 1, f"expected one {kind}, found {len(docs)}"
    return docs[0]


def scorer_container() -> dict[str, Any]:
    containers = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["scorer"]
    return containers[0]


def test_every_manifest_parses_with_an_api_version_kind_and_name() -> None:
    docs = documents()
    assert {path.name for path, _ in docs} >= {
        "kustomization.yaml",
        "scorer-config.yaml",
        "scorer-deployment.yaml",
        "scorer-keda.yaml",
    }
    for path, doc in docs:
        assert isinstance(doc, dict), path
        assert doc.get("apiVersion"), f"{path}: no apiVersion"
        assert doc.get("kind"), f"{path}: no kind"
        if doc["kind"] != "Kustomization":
            assert doc["metadata"]["name"], f"{path}: {doc['kind']} without a name"
    kinds = sorted(doc["kind"] for _, doc in docs)
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "Kustomization",
        "PodDisruptionBudget",
        "ScaledObject",
        "Service",
    ]


def test_kustomization_lists_existing_files_and_leaves_keda_optional() -> None:
    kustomization = one("Kustomization")
    for resource in kustomization["resources"]:
        assert (KUBERNETES / resource).is_file(), resource
    assert "scorer-keda.yaml" not in kustomization["resources"]
    assert [image["name"] for image in kustomization["images"]] == ["carrara"]
    assert scorer_container()["image"] == "carrara"


def test_the_deployment_runs_the_scorer_command_of_the_package() -> None:
    deployment = one("Deployment")
    container = scorer_container()
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert container["command"] == ["carrara-scorer"]
    assert "carrara-scorer" in scripts
    assert container["args"] == ["--pool", "default"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 60
    # No preStop hook: SIGTERM itself is the graceful stop.
    assert "lifecycle" not in container


def test_probes_and_metrics_use_the_scorers_http_port() -> None:
    port = Settings.model_fields["scorer_metrics_port"].default  # the default the manifests assume
    container = scorer_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    annotations = one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port),
        "prometheus.io/path": "/metrics",
    }


def test_selectors_match_the_pod_labels() -> None:
    deployment = one("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": one("Service")["spec"]["selector"],
        "PodDisruptionBudget": one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    affinity = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    (preferred,) = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    selectors["anti-affinity"] = preferred["podAffinityTerm"]["labelSelector"]["matchLabels"]
    assert preferred["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    for what, selector in selectors.items():
        assert selector.items() <= pod_labels.items(), what
    service_port = one("Service")["spec"]["ports"][0]
    assert (service_port["name"], service_port["targetPort"]) == ("metrics", "metrics")
    assert one("ScaledObject")["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_settings_come_from_the_configmap_and_secret_and_the_id_from_the_pod_name() -> None:
    container = scorer_container()
    sources = {
        next(iter(source)): next(iter(source.values()))["name"] for source in container["envFrom"]
    }
    config = one("ConfigMap")
    assert sources == {
        "configMapRef": config["metadata"]["name"],
        "secretRef": "carrara-scorer-secrets",
    }
    env = {e["name"]: e for e in container["env"]}
    assert env["CARRARA_SCORER_INSTANCE_ID"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.name"}
    }


@pytest.mark.parametrize(
    "key", sorted(yaml.safe_load((KUBERNETES / "scorer-config.yaml").read_text())["data"])
)
def test_every_configmap_key_is_a_setting_with_a_valid_value(key: str) -> None:
    config = one("ConfigMap")["data"]
    assert key.startswith("CARRARA_")
    field = key.removeprefix("CARRARA_").lower()
    assert field in Settings.model_fields, f"{key} is not a Carrara setting (typo?)"
    assert isinstance(config[key], str), f"{key}: ConfigMap values must be strings"
    # The value passes the setting's own validation (production also needs the Secret's values).
    Settings.model_validate(
        {field: config[key], "environment": "development"}
        if field != "environment"
        else {field: config[key], "secret_key": "x" * 32, "database_url": "postgresql://db/x"}
    )


def test_resources_are_bounded_and_the_pod_runs_unprivileged() -> None:
    container = scorer_container()
    resources = container["resources"]
    assert set(resources) == {"requests", "limits"}
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[part]), part
    pod = one("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    if container["securityContext"].get("readOnlyRootFilesystem"):
        # The scorer downloads model artifacts to temporary directories.
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/tmp" in mounts  # noqa: S108 - the container's temp dir, nothing is written here
