"""The secured local stack: TLS material, SCRAM users, Kafka ACLs and MLflow accounts.

`carrara stack up --secure` runs the same services as the plain stack, on their own ports and under
their own home (`<home>/secure`), with Kafka on a SASL_SSL listener (SCRAM-SHA-512 over TLS, the
StandardAuthorizer, ACLs per identity) and MLflow with its basic-auth app. Everything secret is
generated here on first start and kept under the stack's home with mode 0600:

- `tls/`: a CA and the broker's certificate, made with openssl (the broker's keystore is PKCS12,
  its truststore the CA's PEM; clients get `ca.crt`);
- `secrets/passwords.json`: the generated passwords; `secrets/kafka-<user>.password`: one file per
  Kafka user, for `CARRARA_KAFKA_SASL_PASSWORD_FILE`;
- `secrets/<identity>.env`: the environment of each identity (control plane, scorer, monitor), to
  `source` before running a process as that identity.

Identities (Kafka user / MLflow account):

| identity | Kafka user | MLflow account | processes |
|---|---|---|---|
| control | carrara-control | carrara (writes) | API (relay, status consumer), worker, CLI |
| scorer | carrara-scorer | carrara-scorer (reads) | carrara-scorer |
| monitor | carrara-monitor | — | carrara-monitor |

`broker` (inter-broker and controller traffic) and `admin` (the stack's own tooling: health probe,
ACLs) are super users.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaException

# confluent_kafka.admin re-exports these on purpose but without `__all__`.
from confluent_kafka.admin import (
    AclBinding,  # pyright: ignore[reportPrivateImportUsage]
    AclOperation,  # pyright: ignore[reportPrivateImportUsage]
    AclPermissionType,  # pyright: ignore[reportPrivateImportUsage]
    AdminClient,
    ResourcePatternType,  # pyright: ignore[reportPrivateImportUsage]
    ResourceType,  # pyright: ignore[reportPrivateImportUsage]
)

from carrara.devstack.service import StackError
from carrara.settings import Settings
from carrara.streams.client_config import admin_config

SCRAM = "SCRAM-SHA-512"
BROKER, ADMIN = "broker", "admin"
KAFKA_USERS = {
    "control": "carrara-control",
    "scorer": "carrara-scorer",
    "monitor": "carrara-monitor",
}
MLFLOW_ADMIN = "admin"
MLFLOW_ACCOUNTS = {"control": "carrara", "scorer": "carrara-scorer"}
IDENTITIES = ("control", "scorer", "monitor")
# The secured stack's ports: the plain stack's + this, so both run at once.
PORT_OFFSET = 100


def secure_profile(settings: Settings) -> Settings:
    """The settings of the secured stack: `<home>/secure`, every port moved by PORT_OFFSET."""
    moved = {
        name: getattr(settings, name) + PORT_OFFSET
        for name in (
            "pg_port",
            "redis_port",
            "kafka_port",
            "kafka_controller_port",
            "mlflow_port",
            "api_port",
            "scorer_metrics_port",
            "monitor_metrics_port",
            "schema_registry_port",
            "schema_registry_management_port",
        )
    }
    derived = (
        "database_url",
        "kafka_bootstrap",
        "redis_url",
        "mlflow_url",
        "api_url",
        "schema_registry_url",
    )
    # Built again (not copied) so the connection URLs are derived from the moved ports.
    values = {**settings.model_dump(), "home": settings.home / "secure", **moved}
    return type(settings)(**{**values, **dict.fromkeys(derived, "")})


def profile_env(settings: Settings) -> dict[str, str]:
    """What a process needs in its environment to find the stack `settings` describes."""
    return {
        "CARRARA_HOME": str(settings.home),
        "CARRARA_PG_PORT": str(settings.pg_port),
        "CARRARA_REDIS_PORT": str(settings.redis_port),
        "CARRARA_KAFKA_PORT": str(settings.kafka_port),
        "CARRARA_KAFKA_CONTROLLER_PORT": str(settings.kafka_controller_port),
        "CARRARA_MLFLOW_PORT": str(settings.mlflow_port),
        "CARRARA_API_PORT": str(settings.api_port),
        "CARRARA_SCORER_METRICS_PORT": str(settings.scorer_metrics_port),
        "CARRARA_MONITOR_METRICS_PORT": str(settings.monitor_metrics_port),
        "CARRARA_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "CARRARA_MLFLOW_URL": settings.mlflow_url,
        "CARRARA_API_URL": settings.api_url,
        "CARRARA_SCHEMA_REGISTRY_PORT": str(settings.schema_registry_port),
        "CARRARA_SCHEMA_REGISTRY_MANAGEMENT_PORT": str(settings.schema_registry_management_port),
        "CARRARA_SCHEMA_REGISTRY_URL": settings.schema_registry_url,
    }


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` with mode 0600 from the first byte (never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    path.chmod(0o600)


@dataclass(frozen=True)
class SecureMaterial:
    """Certificates, passwords and identity environments of a secured stack under `home`."""

    home: Path
    host: str = "127.0.0.1"

    @property
    def tls_dir(self) -> Path:
        return self.home / "tls"

    @property
    def secrets_dir(self) -> Path:
        return self.home / "secrets"

    @property
    def ca_file(self) -> Path:
        return self.tls_dir / "ca.crt"

    @property
    def keystore(self) -> Path:
        return self.tls_dir / "broker.p12"

    # --- passwords ------------------------------------------------------------------------------

    def passwords(self) -> dict[str, str]:
        """Every generated password, made once (32 random URL-safe characters each)."""
        path = self.secrets_dir / "passwords.json"
        try:
            known: dict[str, str] = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            known = {}
        wanted = [f"kafka:{u}" for u in (BROKER, ADMIN, *KAFKA_USERS.values())] + [
            f"mlflow:{a}" for a in (MLFLOW_ADMIN, *MLFLOW_ACCOUNTS.values())
        ]
        wanted += ["keystore", "mlflow:flask-secret"]
        missing = [name for name in wanted if name not in known]
        if missing:
            known |= {name: secrets.token_urlsafe(24) for name in missing}
            write_private(path, orjson.dumps(known, option=orjson.OPT_INDENT_2).decode())
        return known

    def password(self, name: str) -> str:
        return self.passwords()[name]

    def kafka_password_file(self, user: str) -> Path:
        path = self.secrets_dir / f"kafka-{user}.password"
        if not path.exists():
            write_private(path, self.password(f"kafka:{user}") + "\n")
        return path

    # --- TLS ------------------------------------------------------------------------------------

    def ensure_tls(self) -> None:
        """A CA and a broker certificate for `host`, 127.0.0.1 and localhost (made once)."""
        if self.keystore.exists() and self.ca_file.exists():
            return
        if shutil.which("openssl") is None:
            raise StackError("openssl is not installed: the secured stack makes its certificates")
        self.tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        d = self.tls_dir
        names = sorted({self.host, "127.0.0.1"})
        san = ",".join([f"IP:{n}" if n.replace(".", "").isdigit() else f"DNS:{n}" for n in names])
        (d / "broker.ext").write_text(
            f"subjectAltName={san},DNS:localhost\n"
            "extendedKeyUsage=serverAuth,clientAuth\n"
            "basicConstraints=CA:FALSE\n"
        )
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        steps = [
            ["req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "825",
             "-subj", "/CN=Carrara local stack CA",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
            ["req", *ec, "-keyout", "broker.key", "-out", "broker.csr",
             "-subj", "/CN=carrara-kafka"],
            ["x509", "-req", "-in", "broker.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "broker.crt", "-days", "825", "-extfile", "broker.ext"],
            ["pkcs12", "-export", "-in", "broker.crt", "-inkey", "broker.key",
             "-certfile", "ca.crt", "-name", "broker", "-out", "broker.p12",
             "-passout", "env:CARRARA_KEYSTORE_PASSWORD"],
        ]  # fmt: skip
        env = {**os.environ, "CARRARA_KEYSTORE_PASSWORD": self.password("keystore")}
        for step in steps:
            result = subprocess.run(
                ["openssl", *step], cwd=d, env=env, capture_output=True, text=True, check=False
            )
            if result.returncode != 0:
                raise StackError(f"openssl {step[0]} failed:\n{result.stderr[-2000:]}")
        for name in ("ca.key", "broker.key", "broker.p12"):
            (d / name).chmod(0o600)

    # --- identities -----------------------------------------------------------------------------

    def kafka_env(self, user: str) -> dict[str, str]:
        """The CARRARA_KAFKA_* settings of Kafka user `user` (password by file)."""
        return {
            "CARRARA_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "CARRARA_KAFKA_SASL_MECHANISM": SCRAM,
            "CARRARA_KAFKA_SASL_USERNAME": user,
            "CARRARA_KAFKA_SASL_PASSWORD_FILE": str(self.kafka_password_file(user)),
            "CARRARA_KAFKA_SSL_CA_LOCATION": str(self.ca_file),
        }

    def identity_env(self, identity: str) -> dict[str, str]:
        """Kafka and MLflow credentials of `identity` (control, scorer, monitor)."""
        env = self.kafka_env(KAFKA_USERS[identity])
        account = MLFLOW_ACCOUNTS.get(identity)
        if account is not None:
            env["MLFLOW_TRACKING_USERNAME"] = account
            env["MLFLOW_TRACKING_PASSWORD"] = self.password(f"mlflow:{account}")
        return env

    def client_settings(self, settings: Settings, user: str) -> Settings:
        """`settings` with the Kafka credentials of `user` (for clients built in this process)."""
        return settings.model_copy(
            update={
                "kafka_security_protocol": "SASL_SSL",
                "kafka_sasl_mechanism": SCRAM,
                "kafka_sasl_username": user,
                "kafka_sasl_password_file": self.kafka_password_file(user),
                "kafka_ssl_ca_location": self.ca_file,
            }
        )

    def write_env_files(self, settings: Settings) -> list[Path]:
        """`secrets/<identity>.env` (0600): the stack's ports plus that identity's credentials."""
        written = []
        for identity in IDENTITIES:
            env = {**profile_env(settings), **self.identity_env(identity)}
            path = self.secrets_dir / f"{identity}.env"
            write_private(path, "".join(f"{k}={v}\n" for k, v in env.items()))
            written.append(path)
        return written


# --- Kafka ACLs ---------------------------------------------------------------------------------


def _allow(
    kind: ResourceType,
    name: str,
    user: str,
    *operations: AclOperation,
    pattern: ResourcePatternType = ResourcePatternType.LITERAL,
    deny: bool = False,
) -> list[AclBinding]:
    permission = AclPermissionType.DENY if deny else AclPermissionType.ALLOW
    return [
        AclBinding(kind, name, pattern, f"User:{user}", "*", op, permission) for op in operations
    ]


def stack_acls(settings: Settings, data_prefixes: tuple[str, ...] = ()) -> list[AclBinding]:
    """The ACLs of the secured stack's identities.

    `data_prefixes`: topic prefixes of datasets, inputs, outputs and outcomes the scorer and the
    monitor may use (none: any topic). Whatever they allow, only the control plane may write the
    deployments topic (and the alerts topic): the scorer and the monitor are denied it outright.
    """
    T, G, X, C = (
        ResourceType.TOPIC,
        ResourceType.GROUP,
        ResourceType.TRANSACTIONAL_ID,
        ResourceType.BROKER,
    )
    op = AclOperation
    prefixed = ResourcePatternType.PREFIXED
    control, scorer, monitor = (KAFKA_USERS[i] for i in IDENTITIES)
    deployments, status, alerts = (
        settings.deployments_topic,
        settings.scorer_status_topic,
        settings.alerts_topic,
    )
    acls: list[AclBinding] = []
    # The control plane owns the platform: topics (create, configure, read, write), its groups,
    # the cluster's create/describe.
    acls += _allow(T, "*", control, op.ALL)
    acls += _allow(G, "*", control, op.ALL)
    acls += _allow(C, "kafka-cluster", control, op.CREATE, op.DESCRIBE, op.DESCRIBE_CONFIGS)

    def data(user: str, *operations: AclOperation) -> list[AclBinding]:
        if not data_prefixes:
            return _allow(T, "*", user, *operations)
        return [b for p in data_prefixes for b in _allow(T, p, user, *operations, pattern=prefixed)]

    # Scorers: read the deployments and their inputs; write outputs, dead letters (creating the
    # dead-letter topic) and their status; their groups and transactional ids.
    acls += _allow(T, deployments, scorer, op.READ, op.DESCRIBE, op.DESCRIBE_CONFIGS)
    acls += _allow(T, status, scorer, op.WRITE, op.DESCRIBE)
    acls += data(scorer, op.READ, op.WRITE, op.DESCRIBE, op.CREATE)
    acls += _allow(G, "carrara-scorer", scorer, op.READ, op.DESCRIBE, pattern=prefixed)
    acls += _allow(X, "carrara-scorer.", scorer, op.WRITE, op.DESCRIBE, pattern=prefixed)
    # The monitor: reads inputs, outputs, dead letters and outcomes in its group; creates the
    # alerts topic if missing (the control plane publishes alerts).
    acls += data(monitor, op.READ, op.DESCRIBE)
    acls += _allow(G, "carrara-monitor", monitor, op.READ, op.DESCRIBE)
    acls += _allow(T, alerts, monitor, op.CREATE, op.DESCRIBE)
    # Only the control plane writes the deployments and alerts topics, whatever else allows it.
    for user in (scorer, monitor):
        acls += _allow(T, deployments, user, op.WRITE, op.ALTER, op.ALTER_CONFIGS, deny=True)
        acls += _allow(T, alerts, user, op.WRITE, deny=True)
    return acls


def apply_acls(bootstrap: str, admin_settings: Settings, acls: list[AclBinding]) -> None:
    """Create `acls` (idempotent: an existing binding is left as is) as the admin user."""
    admin = AdminClient(admin_config(bootstrap, admin_settings))
    futures: dict[Any, Any] = admin.create_acls(acls, request_timeout=30)
    problems = []
    for binding, future in futures.items():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            problems.append(f"{binding}: {exc}")
    if problems:
        raise StackError("could not create Kafka ACLs:\n" + "\n".join(problems[:10]))
