"""The Helm chart (deploy/helm/carrara) lints, renders and validates, and is hardened by default.

Each values case is rendered once with `helm template`; every manifest is validated offline
against the Kubernetes JSON schemas that the `kubernetes-validate` package ships (strict: unknown
fields fail), at the oldest Kubernetes the chart supports and the newest the package knows. CRD
kinds (KEDA, Prometheus Operator) have no schema there and get structural checks here instead.
helm comes from `deploy/bootstrap.sh helm` (`make helm`), built from the Go module proxy.
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import re
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Annotated, Any

import kubernetes_validate
import pytest
import yaml
from pydantic import TypeAdapter

from carrara.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "carrara"
PRODUCTION = CHART / "ci" / "production-values.yaml"
MINIMAL = CHART / "examples" / "minimal-values.yaml"
HELM = Path(os.environ.get("HELM", ROOT / ".tools" / "bin" / "helm"))
MIN_KUBERNETES = "1.30.0"  # Chart.yaml kubeVersion
NAMESPACE = "carrara"
RELEASE = "carrara"

# Mutual TLS (Strimzi `tls` KafkaUsers) for every identity, through --set.
MTLS = [
    "kafka.securityProtocol=SSL",
    "kafka.ca.existingSecret=events-cluster-ca-cert",
    *(
        f"kafka.identities.{who}.{key}={value}"
        for who in ("control", "scorer", "monitor")
        for key, value in (
            ("existingSecret", f"carrara-{who}"),
            ("certKey", "user.crt"),
            ("keyKey", "user.key"),
        )
    ),
]
# OAUTHBEARER with OIDC client credentials, scaled through Prometheus.
OIDC = [
    "kafka.securityProtocol=SASL_SSL",
    "kafka.saslMechanism=OAUTHBEARER",
    "kafka.oidc.tokenEndpointUrl=https://idp.example.com/token",
    "kafka.oidc.scope=kafka",
    "networkPolicy.oidc.peers[0].ipBlock.cidr=192.0.2.10/32",
    *(
        f"kafka.identities.{who}.{key}={value}"
        for who in ("control", "scorer", "monitor")
        for key, value in (("username", f"carrara-{who}"), ("existingSecret", f"oidc-{who}"))
    ),
    "scorers.defaults.autoscaling.enabled=true",
    "scorers.defaults.autoscaling.source=prometheus",
]
CASES: dict[str, tuple[list[Path], list[str]]] = {
    "default": ([], []),
    "minimal": ([MINIMAL], []),
    "production": ([PRODUCTION], []),
    "mtls": ([], MTLS),
    "oidc": ([], OIDC),
}

CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor"}
WORKLOADS = {"Deployment", "StatefulSet", "Job"}
SCORER_PORT = Settings.model_fields["scorer_metrics_port"].default
MONITOR_PORT = Settings.model_fields["monitor_metrics_port"].default
CALL_TIMEOUT_S = Settings.model_fields["kafka_call_timeout_s"].default


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    if not os.access(HELM, os.X_OK):
        pytest.fail(f"{HELM} is missing: run `deploy/bootstrap.sh helm` (make helm)")
    return subprocess.run([str(HELM), *args], capture_output=True, text=True, timeout=120)


def values_args(files: list[Path], sets: list[str]) -> list[str]:
    return [*(a for f in files for a in ("-f", str(f))), *(a for s in sets for a in ("--set", s))]


def template(files: list[Path], sets: list[str]) -> subprocess.CompletedProcess[str]:
    return helm(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--kube-version",
        MIN_KUBERNETES,
        *values_args(files, sets),
    )


class StrictLoader(yaml.SafeLoader):
    """YAML as the API server reads it: a key given twice in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value]
        twice = {k for k in keys if keys.count(k) > 1}
        assert not twice, f"duplicate keys {twice} at {node.start_mark}"
        return super().construct_mapping(node, deep=deep)


@cache
def rendered(case: str) -> list[dict[str, Any]]:
    result = template(*CASES[case])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.load_all(result.stdout, Loader=StrictLoader) if doc]


@cache
def values(case: str) -> dict[str, Any]:
    """The values a case renders with: the chart's defaults, its values files, its --set."""
    files, sets = CASES[case]
    merged = yaml.safe_load((CHART / "values.yaml").read_text())
    for f in files:
        merged = deep_merge(merged, yaml.safe_load(f.read_text()))
    for assignment in sets:
        apply_set(merged, assignment)
    return merged


def apply_set(tree: dict[str, Any], assignment: str) -> None:
    """`a.b[0].c=value` as `helm --set` applies it (the subset the cases here use)."""
    path, raw = assignment.split("=", 1)
    value: Any = yaml.safe_load(raw)
    steps: list[str | int] = []
    for part in path.split("."):
        name, *indexes = re.split(r"\[(\d+)\]", part)
        steps.append(name)
        steps += [int(i) for i in indexes if i]
    node: Any = tree
    for step, following in itertools.pairwise(steps):
        empty: Any = [] if isinstance(following, int) else {}
        if isinstance(step, int):
            while len(node) <= step:
                node.append(empty)
        elif step not in node:
            node[step] = empty
        node = node[step]
    last = steps[-1]
    if isinstance(last, int):
        while len(node) <= last:
            node.append(None)
    node[last] = value


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def of_kind(case: str, *kinds: str) -> list[dict[str, Any]]:
    return [doc for doc in rendered(case) if doc["kind"] in kinds]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def scorer_workloads(case: str) -> dict[str, dict[str, Any]]:
    return {
        w["spec"]["template"]["metadata"]["labels"]["carrara.io/pool"]: w
        for w in of_kind(case, "Deployment", "StatefulSet")
        if w["metadata"]["labels"]["app.kubernetes.io/component"] == "scorer"
    }


def pools(case: str) -> dict[str, dict[str, Any]]:
    v = values(case)
    return {p["name"]: deep_merge(v["scorers"]["defaults"], p) for p in v["scorers"]["pools"]}


# ---------------------------------------------------------------- lint, render, validate


@pytest.mark.parametrize("case", ["default", "production"])
def test_helm_lint_strict(case: str) -> None:
    result = helm("lint", "--strict", str(CHART), *values_args(*CASES[case]))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kubernetes", [MIN_KUBERNETES, kubernetes_validate.latest_version()])
def test_every_manifest_validates_against_the_kubernetes_schemas(
    case: str, kubernetes: str
) -> None:
    docs = rendered(case)
    assert docs
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, kubernetes, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {e}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_crd_objects_are_well_formed(case: str) -> None:
    for doc in of_kind(case, *CRD_KINDS):
        assert doc["metadata"]["name"]
        if doc["kind"] in {"ScaledObject", "TriggerAuthentication"}:
            assert doc["apiVersion"] == "keda.sh/v1alpha1"
        if doc["kind"] == "ScaledObject":
            spec = doc["spec"]
            assert set(spec) <= {
                "scaleTargetRef",
                "minReplicaCount",
                "maxReplicaCount",
                "pollingInterval",
                "cooldownPeriod",
                "triggers",
            }
            assert spec["triggers"]
            for trigger in spec["triggers"]:
                assert trigger["type"] in {"kafka", "prometheus"}
                assert all(isinstance(v, str) for v in trigger["metadata"].values()), trigger
        if doc["kind"] == "TriggerAuthentication":
            for ref in doc["spec"].get("secretTargetRef", []):
                assert set(ref) == {"parameter", "name", "key"}
                assert ref["parameter"] in {"password", "ca", "cert", "key"}
        if doc["kind"] == "ServiceMonitor":
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            assert [e["port"] for e in doc["spec"]["endpoints"]] == ["metrics"]


def test_every_option_is_exercised_by_the_production_values() -> None:
    kinds = {doc["kind"] for doc in rendered("production")}
    assert kinds >= {
        "Deployment",
        "StatefulSet",
        "Job",
        "Service",
        "Ingress",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceAccount",
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "ConfigMap",
    }
    assert len(pools("production")) >= 3
    sources = {
        p["autoscaling"]["source"]
        for p in pools("production").values()
        if p["autoscaling"]["enabled"]
    }
    assert sources == {"kafka", "prometheus"}


def test_chart_and_image_follow_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == version
    assert chart["appVersion"] == version
    images = {c["image"] for w in of_kind("default", *WORKLOADS) for c in containers(w)}
    assert images == {f"carrara:{version}"}
    digest = yaml.safe_load(PRODUCTION.read_text())["image"]["digest"]
    images = {c["image"] for w in of_kind("production", *WORKLOADS) for c in containers(w)}
    assert images == {f"registry.example.com/carrara@{digest}"}


# ---------------------------------------------------------------- hardening


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_pod_is_hardened(case: str) -> None:
    workloads = of_kind(case, *WORKLOADS)
    assert {w["kind"] for w in workloads} >= {"Deployment", "Job"}
    for workload in workloads:
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        spec = pod_spec(workload)
        assert spec["automountServiceAccountToken"] is False, name
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] != 0, name
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("hostNetwork"), name
        assert not spec.get("hostPID"), name
        for container in containers(workload):
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False, name
            assert security["privileged"] is False, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            resources = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources[part]), f"{name}: {part}"
            # Read-only root: temporary files, model downloads and HOME go to an emptyDir.
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in spec["volumes"]}
            assert "emptyDir" in volumes[mounts["/tmp"]], name  # noqa: S108
            env = env_of(container)
            assert env["HOME"]["value"] == "/tmp", name  # noqa: S108
            assert env["TMPDIR"]["value"] == "/tmp", name  # noqa: S108
    for account in of_kind(case, "ServiceAccount"):
        assert account["automountServiceAccountToken"] is False


SECRET_NAME = re.compile(r"PASSWORD|SECRET|_KEY$|_KEY_|DATABASE_URL|TOKEN$")


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_secret_value_is_inline(case: str) -> None:
    """Secrets reach pods only by reference: secretKeyRef env vars or mounted Secret files."""
    docs = rendered(case)
    assert not [d for d in docs if d["kind"] == "Secret"], "the chart never makes a Secret"
    for workload in of_kind(case, *WORKLOADS):
        for container in containers(workload):
            assert "envFrom" not in container
            for name, entry in env_of(container).items():
                if "value" not in entry:
                    ref = entry["valueFrom"]
                    assert set(ref) <= {"secretKeyRef", "fieldRef"}, name
                    continue
                value = str(entry["value"])
                if SECRET_NAME.search(name):
                    assert name.endswith(("_FILE", "_LOCATION")), f"{name} given inline"
                    assert value.startswith("/etc/carrara/secrets/"), name
                assert not re.search(r"://[^/@\s]+:[^/@\s]+@", value), f"{name}: credentials"
        for volume in pod_spec(workload)["volumes"]:
            assert set(volume) & {"emptyDir", "projected"}, volume
            for source in volume.get("projected", {}).get("sources", []):
                assert set(source) == {"secret"}, source
            if "projected" in volume:
                assert volume["projected"]["defaultMode"] == 0o440


def test_secrets_come_from_the_referenced_secrets() -> None:
    v = values("production")
    api = next(
        w for w in of_kind("production", "Deployment") if w["metadata"]["name"].endswith("-api")
    )
    (container,) = api["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    assert env["CARRARA_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {
        "name": v["postgres"]["existingSecret"],
        "key": v["postgres"]["urlKey"],
    }
    assert env["CARRARA_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "carrara-redis"
    assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "carrara-mlflow-control",
        "key": "password",
    }
    assert env["CARRARA_KAFKA_SASL_USERNAME"]["value"] == "carrara-control"
    files = {
        "CARRARA_KAFKA_SASL_PASSWORD_FILE": ("carrara-control", "password"),
        "CARRARA_KAFKA_SSL_CA_LOCATION": ("events-cluster-ca-cert", "ca.crt"),
        "CARRARA_SECRET_KEY_FILE": ("carrara-session", "secret-key"),
        "CARRARA_DEPLOYMENT_SIGNING_KEY_FILE": ("carrara-deployment-signing", "signing-key"),
    }
    (volume,) = [v for v in api["spec"]["template"]["spec"]["volumes"] if "projected" in v]
    projected = {
        item["path"]: (source["secret"]["name"], item["key"])
        for source in volume["projected"]["sources"]
        for item in source["secret"]["items"]
    }
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    for name, secret in files.items():
        path = env[name]["value"].removeprefix(mount["mountPath"] + "/")
        assert projected[path] == secret, name


def test_the_settings_each_process_gets() -> None:
    """The API signs and has the session key; scorers verify and have no database or session."""
    by_component: dict[str, dict[str, dict[str, Any]]] = {}
    for workload in of_kind("production", *WORKLOADS):
        component = workload["metadata"]["labels"]["app.kubernetes.io/component"]
        by_component.setdefault(component, {}).update(env_of(containers(workload)[-1]))
    assert {"CARRARA_SECRET_KEY_FILE", "CARRARA_DEPLOYMENT_SIGNING_KEY_FILE"} <= set(
        by_component["api"]
    )
    scorer = by_component["scorer"]
    assert "CARRARA_DEPLOYMENT_SIGNING_KEY_FILE" in scorer
    assert "CARRARA_DEPLOYMENT_SIGNING_PREVIOUS_KEY" in scorer
    for forbidden in ("CARRARA_DATABASE_URL", "CARRARA_SECRET_KEY_FILE", "CARRARA_REDIS_URL"):
        assert forbidden not in scorer
    assert "CARRARA_DATABASE_URL" in by_component["monitor"]
    assert "CARRARA_SECRET_KEY_FILE" not in by_component["monitor"]
    assert "CARRARA_DATABASE_URL" in by_component["migrations"]
    assert "CARRARA_KAFKA_BOOTSTRAP" not in by_component["migrations"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_carrara_variable_is_a_setting_with_a_valid_value(case: str) -> None:
    for workload in of_kind(case, *WORKLOADS):
        for container in containers(workload):
            for name, entry in env_of(container).items():
                if not name.startswith("CARRARA_") or name.startswith("CARRARA_KAFKA__"):
                    continue
                field = name.removeprefix("CARRARA_").lower()
                assert field in Settings.model_fields, f"{name} is not a Carrara setting"
                if "value" in entry:
                    info = Settings.model_fields[field]
                    kind = (
                        Annotated[info.annotation, *info.metadata]
                        if info.metadata
                        else info.annotation
                    )
                    TypeAdapter(kind).validate_python(entry["value"])


# ---------------------------------------------------------------- scorers


@pytest.mark.parametrize("case", sorted(CASES))
def test_one_workload_pdb_and_network_policy_per_scorer_pool(case: str) -> None:
    workloads = scorer_workloads(case)
    assert set(workloads) == set(pools(case))
    for pool, workload in workloads.items():
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        pdbs = [
            p
            for p in of_kind(case, "PodDisruptionBudget")
            if labels_match(p["spec"]["selector"]["matchLabels"], pod_labels)
        ]
        assert len(pdbs) == 1, pool
        policies = [
            p
            for p in of_kind(case, "NetworkPolicy")
            if labels_match(p["spec"]["podSelector"]["matchLabels"], pod_labels)
        ]
        assert len(policies) == 1, pool
        assert labels_match(workload["spec"]["selector"]["matchLabels"], pod_labels)


@pytest.mark.parametrize("case", sorted(CASES))
def test_scorer_pods_run_the_pool_with_probes_and_a_long_enough_grace(case: str) -> None:
    for pool, workload in scorer_workloads(case).items():
        config = pools(case)[pool]
        (container,) = pod_spec(workload)["containers"]
        assert container["command"][:3] == ["carrara-scorer", "--pool", pool]
        assert container["command"][3:5] == ["--instance-id", "$(POD_NAME)"]
        env = env_of(container)
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
            "metrics": SCORER_PORT
        }
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert "lifecycle" not in container  # SIGTERM itself is the graceful stop
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        assert grace >= 2 * CALL_TIMEOUT_S
        assert env["CARRARA_SCORER_DELIVERY"]["value"] == config["delivery"]
        static = config["staticMembership"]
        assert workload["kind"] == ("StatefulSet" if static else "Deployment")
        assert env["CARRARA_SCORER_STATIC_MEMBERSHIP"]["value"] == str(static).lower()
        if static:
            assert workload["spec"]["serviceName"] in {
                s["metadata"]["name"] for s in of_kind(case, "Service")
            }
        if config["autoscaling"]["enabled"]:
            assert "replicas" not in workload["spec"]  # KEDA owns it
        else:
            assert workload["spec"]["replicas"] == config["replicas"]


def rule_ports(rule: dict[str, Any]) -> set[tuple[str, int]]:
    return {(p["protocol"], p["port"]) for p in rule["ports"]}


@pytest.mark.parametrize("case", sorted(CASES))
def test_scorer_network_policy_allows_only_kafka_mlflow_dns_and_metrics_scrapes(
    case: str,
) -> None:
    v = values(case)
    net = v["networkPolicy"]
    allowed: list[tuple[str, set[tuple[str, int]], list[Any]]] = [
        ("dns", {("UDP", 53), ("TCP", 53)}, net["dns"]["peers"]),
        ("kafka", {("TCP", p) for p in net["kafka"]["ports"]}, net["kafka"]["peers"]),
    ]
    if case == "oidc":  # the token endpoint, with OAUTHBEARER only
        allowed.append(("oidc", {("TCP", p) for p in net["oidc"]["ports"]}, net["oidc"]["peers"]))
    allowed.append(("mlflow", {("TCP", p) for p in net["mlflow"]["ports"]}, net["mlflow"]["peers"]))
    for pool, workload in scorer_workloads(case).items():
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        (policy,) = [
            p
            for p in of_kind(case, "NetworkPolicy")
            if labels_match(p["spec"]["podSelector"]["matchLabels"], pod_labels)
        ]
        spec = policy["spec"]
        assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
        (ingress,) = spec["ingress"]
        assert rule_ports(ingress) == {("TCP", SCORER_PORT)}
        assert ingress["from"] == [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": v["monitoring"]["namespace"]}
                }
            }
        ]
        egress = spec["egress"]
        assert len(egress) == len(allowed), pool
        for rule, (what, ports, peers) in zip(egress, allowed, strict=True):
            assert rule_ports(rule) == ports, f"{pool}: {what}"
            # No peers configured: those ports anywhere; otherwise exactly the configured peers.
            assert rule.get("to", []) == peers, f"{pool}: {what}"
            for peer in rule.get("to", []):
                if "ipBlock" in peer:
                    ipaddress.ip_network(peer["ipBlock"]["cidr"])
        for rule in egress:
            assert rule["ports"], f"{pool}: an egress rule without ports opens every port"


@pytest.mark.parametrize("case", ["production", "oidc"])
def test_keda_scales_each_autoscaled_pool_within_its_partitions(case: str) -> None:
    objects = {o["metadata"]["name"]: o for o in of_kind(case, "ScaledObject")}
    autoscaled = {p: c for p, c in pools(case).items() if c["autoscaling"]["enabled"]}
    assert autoscaled
    workloads = scorer_workloads(case)
    assert len(objects) == len(autoscaled)
    for pool, config in autoscaled.items():
        workload = workloads[pool]
        scaled = objects[workload["metadata"]["name"]]["spec"]
        assert scaled["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": workload["kind"],
            "name": workload["metadata"]["name"],
        }
        assert scaled["minReplicaCount"] >= 1
        assert scaled["maxReplicaCount"] <= config["autoscaling"]["partitions"]
        if config["autoscaling"]["source"] == "kafka":
            groups = {t["metadata"]["consumerGroup"] for t in scaled["triggers"]}
            assert groups == {
                f"carrara-scorer.{d['name']}" for d in config["autoscaling"]["deployments"]
            }
            for trigger in scaled["triggers"]:
                assert trigger["metadata"]["sasl"] == "scram_sha512"
                assert trigger["metadata"]["tls"] == "enable"
                assert trigger["authenticationRef"]["name"] == workload["metadata"]["name"]
        else:
            (trigger,) = scaled["triggers"]
            assert "carrara_scorer_consumer_lag" in trigger["metadata"]["query"]
            assert workload["metadata"]["name"] in trigger["metadata"]["query"]


# ---------------------------------------------------------------- the other processes


def component(case: str, name: str) -> dict[str, Any]:
    (workload,) = [
        w
        for w in of_kind(case, *WORKLOADS)
        if w["metadata"]["labels"]["app.kubernetes.io/component"] == name
    ]
    return workload


def test_api_worker_monitor_and_migrations() -> None:
    api = component("production", "api")
    (container,) = pod_spec(api)["containers"]
    assert container["command"][:2] == ["uvicorn", "carrara.main:app"]
    assert "--workers=1" in container["command"]  # api.workers (README: Sizing the API)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    # Not /readyz: a Kafka outage must not take the UI and the API out of the Service.
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    (ingress,) = of_kind("production", "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == api["metadata"]["name"]
    assert ingress["spec"]["tls"][0]["secretName"] == "carrara-tls"
    assert not of_kind("default", "Ingress")

    (worker,) = pod_spec(component("production", "worker"))["containers"]
    assert worker["command"][:4] == ["celery", "-A", "carrara.training.worker", "worker"]

    (monitor,) = pod_spec(component("production", "monitor"))["containers"]
    assert monitor["command"] == ["carrara-monitor", "--metrics-port", str(MONITOR_PORT)]
    assert monitor["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}

    job = component("production", "migrations")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert "before-hook-creation" in annotations["helm.sh/hook-delete-policy"]
    (migrate,) = pod_spec(job)["containers"]
    assert migrate["command"] == ["alembic", "upgrade", "head"]
    assert (ROOT / "alembic.ini").is_file()
    assert migrate["workingDir"] == "/app"  # where the Dockerfile puts alembic.ini
    assert "WORKDIR /app" in (ROOT / "Dockerfile").read_text()


def test_the_image_user_is_the_one_the_pods_run_as() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    uid = re.search(r"useradd .*--uid (\d+)", dockerfile)
    assert uid is not None
    for workload in of_kind("default", *WORKLOADS):
        assert pod_spec(workload)["securityContext"]["runAsUser"] == int(uid[1])


# ---------------------------------------------------------------- wrong values fail at install


@pytest.mark.parametrize(
    ("sets", "error"),
    [
        (["apiReplicas=2"], "additional properties"),  # a typo
        (["extraEnv.CARRARA_DB_PASSWORD=hunter2"], "CARRARA_DB_PASSWORD"),  # a secret inline
        (["scorers.defaults.delivery=exactly-once"], "delivery"),
        (["containerSecurityContext.readOnlyRootFilesystem=false"], "readOnlyRootFilesystem"),
        (["redis.url=redis://:hunter2@redis:6379/0"], "redis"),
        (
            [
                "scorers.defaults.autoscaling.enabled=true",
                "scorers.defaults.autoscaling.source=prometheus",
                "scorers.defaults.autoscaling.maxReplicas=8",
                "scorers.defaults.autoscaling.partitions=4",
            ],
            "exceeds its partitions",
        ),
        (["scorers.defaults.autoscaling.minReplicas=0"], "minReplicas"),
        (["scorers.defaults.terminationGracePeriodSeconds=30"], "terminationGracePeriodSeconds"),
        (["scorers.pools[0].name=default", "scorers.pools[1].name=default"], "listed twice"),
        (
            ["scorers.defaults.autoscaling.enabled=true"],
            "list the pool's deployments",
        ),
    ],
)
def test_wrong_values_fail_at_render(sets: list[str], error: str) -> None:
    result = template([], sets)
    assert result.returncode != 0, f"{sets} rendered"
    assert error in result.stderr, result.stderr


def test_the_dashboard_shows_metrics_the_processes_export() -> None:
    dashboard = json.loads((CHART / "dashboards" / "carrara.json").read_text())
    exported = set()
    for source in ("scoring/metrics.py", "monitoring/monitor.py"):
        text = (ROOT / "platform" / "carrara" / source).read_text()
        exported |= set(re.findall(r'"(carrara_[a-z_]+)"', text))
    used = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"carrara_[a-z_]+", target["expr"]))
    assert used
    histograms = {re.sub(r"_bucket$", "", m) for m in used}
    assert histograms <= exported, histograms - exported
    for wanted in (
        "carrara_scorer_predictions_total",  # throughput per variant
        "carrara_scorer_end_to_end_seconds",  # latency per variant
        "carrara_scorer_dead_letters_total",
        "carrara_scorer_consumer_lag",
        "carrara_scorer_model_load_seconds",
        "carrara_monitor_last_batch_age_seconds",
    ):
        assert wanted in histograms, wanted
    (config_map,) = of_kind("production", "ConfigMap")
    assert json.loads(config_map["data"]["carrara.json"]) == dashboard
