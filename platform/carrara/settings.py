"""One Settings object for every Carrara process, read from `CARRARA_*` environment variables.

The defaults point at the local stack that `carrara stack up` runs, so a fresh clone works with no
configuration. Connection URLs left unset are derived from the stack's ports, so moving a port
(`CARRARA_PG_PORT=6543`) moves every client with it.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_DB_PASSWORD = "carrara-dev"  # noqa: S105 - local-stack default, refused in production
DEV_MLFLOW_DB_PASSWORD = "mlflow-dev"  # noqa: S105 - local-stack default, refused in production
DEV_SECRET_KEY = "carrara-dev-secret-key-change-me"  # noqa: S105 - refused in production


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Settings(BaseSettings):
    """Configuration of the control plane, workers, scorers and the local stack."""

    # `__` nests: CARRARA_KAFKA__<PROPERTY> fills the `kafka` pass-through map (see below).
    # Validation errors never echo the input (it holds passwords).
    model_config = SettingsConfigDict(
        env_prefix="CARRARA_",
        env_file=".env",
        extra="ignore",
        env_nested_delimiter="__",
        hide_input_in_errors=True,
    )

    environment: Literal["development", "test", "production"] = "development"
    log_level: str = "INFO"
    log_json: bool = False
    # Signs the UI's session cookies (the API only). Unset: the API generates a random key on its
    # first start and keeps it in `<home>/secret-key` (mode 0600); production needs it given,
    # here or in a file. Never shown in a repr.
    secret_key: str = Field(default="", repr=False)
    secret_key_file: Path | None = None

    # Where the local stack keeps data, logs and PID files (git-ignored).
    home: Path = Field(default_factory=lambda: Path.cwd() / ".carrara")

    # Ports of the local stack. Infrastructure uses uncommon ports so it never collides with a
    # Postgres or Redis that a Debian package may have started on the defaults.
    host: str = "127.0.0.1"
    pg_port: int = 55432
    redis_port: int = 56379
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    mlflow_port: int = 5000
    api_port: int = 8000
    schema_registry_port: int = 8081
    schema_registry_management_port: int = 9081

    db_user: str = "carrara"
    db_password: str = DEV_DB_PASSWORD
    db_name: str = "carrara"
    mlflow_db_user: str = "mlflow"
    mlflow_db_password: str = DEV_MLFLOW_DB_PASSWORD
    mlflow_db_name: str = "mlflow"
    kafka_version: str = "4.1.1"
    kafka_heap: str = "512m"
    # The local stack's Schema Registry: Apicurio Registry from Maven Central (3.3.x needs Java
    # 21+: found under /usr/lib/jvm or /opt, or given here; 3.0.9 runs on Java 17).
    schema_registry_version: str = "3.3.3"
    schema_registry_heap: str = "384m"
    schema_registry_java_home: Path | None = None

    # The API process relays committed outbox messages (deployment revisions, training tasks).
    outbox_relay_enabled: bool = True
    deployments_topic: str = "carrara.deployments"
    # Compacted topic scorers publish their status to (keyed by instance id); the API consumes it.
    scorer_status_topic: str = "carrara.scorer-status"
    # Alerts (drift, automatic promotions and rollbacks) are published here and kept in Postgres.
    alerts_topic: str = "carrara.alerts"
    # The monitor raises a drift alert when a feature's PSI over this window exceeds the threshold.
    drift_window_s: int = Field(default=900, ge=60, le=86_400)
    drift_min_events: int = Field(default=200, ge=1)
    # Celery queue training tasks are sent to (and workers consume).
    training_queue: str = "carrara"
    # A running run whose worker has not written a heartbeat for this long is considered lost:
    # the control plane re-queues it (up to `training_max_attempts` starts) or fails it.
    run_heartbeat_interval_s: float = 5.0
    run_heartbeat_timeout_s: float = 60.0
    training_max_attempts: int = 3

    # The streaming scorer (`carrara-scorer`).
    scorer_instance_id: str = ""  # default: the host name (stable pod names give static membership)
    scorer_delivery: Literal["exactly_once", "at_least_once"] = "exactly_once"
    scorer_batch_size: int = Field(default=1000, ge=1, le=100_000)
    # While a commit is in flight the next batch keeps growing with what arrives, up to this.
    scorer_max_batch_size: int = Field(default=10_000, ge=1, le=1_000_000)
    scorer_max_event_bytes: int = Field(default=1_000_000, ge=1)
    scorer_metrics_port: int = 9400
    # The monitor's /metrics, /healthz and /readyz (0: any free port).
    monitor_metrics_port: int = 9390
    scorer_status_interval_s: float = 10.0
    # Static group membership (group.instance.id = instance id) keeps partitions through a quick
    # restart, but a static member does not leave the group on shutdown: enable it only where
    # instance ids are stable (a StatefulSet), never with pods that get new names.
    scorer_static_membership: bool = False
    scorer_session_timeout_ms: int = Field(default=10_000, ge=6_000, le=300_000)
    # A loop (a deployment's scoring loop, the monitor, the outbox relay) that has work waiting
    # and completes nothing for this long is stalled: it shows as `stalled` and fails /healthz,
    # so the orchestrator restarts the process.
    stall_timeout_s: float = Field(default=60.0, ge=1.0, le=3600.0)
    # Deadline of one blocking Kafka client call (commit, flush, send offsets, close); a call past
    # it means the client is rebuilt (librdkafka can ignore its own timeouts during an outage).
    kafka_call_timeout_s: float = Field(default=30.0, ge=1.0, le=600.0)

    # --- guards and limits (README: Security) ---
    # HMAC-SHA256 key of deployment records: the API signs what it publishes to the deployments
    # topic, scorers refuse records that do not verify. Unset: records are not signed, and scorers
    # only check that a record's key is its deployment's name. The previous key keeps verifying
    # during a rotation.
    deployment_signing_key: str = Field(default="", repr=False)
    deployment_signing_key_file: Path | None = None
    deployment_signing_previous_key: str = Field(default="", repr=False)
    # Request bodies larger than this get 413 before any parsing (routes may allow more).
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    # The size limit of an ONNX model upload (`POST /api/v1/models/{name}/versions`, multipart).
    max_model_upload_bytes: int = Field(default=200 * 1024 * 1024, ge=1024)
    # Topics deployments and datasets may use, as comma-separated prefixes (empty: any topic
    # that is not reserved: `carrara.*`, `__*`); per pool: `{"fraud": "fraud.,payments."}`.
    allowed_topic_prefixes: str = ""
    pool_topic_prefixes: dict[str, str] = Field(default_factory=dict)
    # Topic creation through the API: partitions per topic, topics per request.
    max_topic_partitions: int = Field(default=100, ge=1, le=10_000)
    max_topics_per_request: int = Field(default=4, ge=1, le=100)
    # /readyz answers from a cache this fresh, so probing it cannot load the dependencies.
    readyz_cache_s: float = Field(default=5.0, ge=0.0, le=300.0)

    # --- capacity of the API (README: Sizing the API) ---
    # uvicorn worker processes of the API (the local stack, docker-compose, the Helm chart).
    api_workers: int = Field(default_factory=lambda: usable_cores(), ge=1, le=64)
    # Database connections per process: the pool, and how many more it may open at a peak.
    db_pool_size: int = Field(default=10, ge=1, le=200)
    db_max_overflow: int = Field(default=10, ge=0, le=200)
    # A bearer token's principal is remembered this long per process: a revoked token keeps
    # working at most this long in the other processes (expiry is checked on every request).
    auth_cache_s: float = Field(default=5.0, ge=0.0, le=60.0)
    # A deployment's metrics and verdict, once computed, are served this long per process (and
    # per revision: a new revision is seen at once); 0 computes every request.
    monitoring_cache_s: float = Field(default=5.0, ge=0.0, le=300.0)
    # Address of the scorer's and the monitor's /metrics, /healthz, /readyz server.
    probes_host: str = "0.0.0.0"

    # Kafka security, applied to every Kafka client of every process by
    # `carrara.streams.client_config` (one identity per process: give each its own environment).
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: (
        Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None
    ) = None
    kafka_sasl_username: str = ""
    kafka_sasl_password: SecretStr | None = None
    kafka_sasl_password_file: Path | None = None
    # OAUTHBEARER with OIDC client credentials (`sasl.oauthbearer.method=oidc`).
    kafka_oidc_token_endpoint_url: str = ""
    kafka_oidc_client_id: str = ""
    kafka_oidc_client_secret: SecretStr | None = None
    kafka_oidc_client_secret_file: Path | None = None
    kafka_oidc_scope: str = ""
    # TLS: the CA bundle that signed the brokers' certificates (PEM); a client certificate and key
    # for mutual TLS.
    kafka_ssl_ca_location: Path | None = None
    kafka_ssl_certificate_location: Path | None = None
    kafka_ssl_key_location: Path | None = None
    kafka_ssl_key_password: SecretStr | None = None
    kafka_ssl_key_password_file: Path | None = None
    # Any other librdkafka property: CARRARA_KAFKA__SSL_ENDPOINT_IDENTIFICATION_ALGORITHM=none sets
    # `ssl.endpoint.identification.algorithm` (`_` becomes `.`); CARRARA_KAFKA='{"name": "value"}'
    # gives exact names. Values are kept as secrets (never shown in a repr or a log).
    kafka: dict[str, SecretStr] = Field(default_factory=dict)

    # Schema Registry of Avro / Protobuf / JSON Schema events (README: Event formats), shared by
    # the API, workers, scorers and the monitor: its Confluent-compatible URL (default: the local
    # stack's Apicurio, `.../apis/ccompat/v7`), basic-auth credentials and TLS (a CA bundle, and a
    # client certificate and key for mutual TLS).
    schema_registry_url: str = ""
    schema_registry_username: str = ""
    schema_registry_password: SecretStr | None = None
    schema_registry_password_file: Path | None = None
    schema_registry_ca_location: Path | None = None
    schema_registry_certificate_location: Path | None = None
    schema_registry_key_location: Path | None = None

    # Client connection settings; derived from the ports above when not given.
    database_url: str = ""
    kafka_bootstrap: str = ""
    redis_url: str = ""
    mlflow_url: str = ""
    api_url: str = ""

    @model_validator(mode="after")
    def _derive_urls(self) -> Settings:
        if not self.database_url:
            self.database_url = (
                f"postgresql+psycopg://{self.db_user}:{self.db_password}"
                f"@{self.host}:{self.pg_port}/{self.db_name}"
            )
        if not self.kafka_bootstrap:
            self.kafka_bootstrap = f"{self.host}:{self.kafka_port}"
        if not self.redis_url:
            self.redis_url = f"redis://{self.host}:{self.redis_port}/0"
        if not self.mlflow_url:
            self.mlflow_url = f"http://{self.host}:{self.mlflow_port}"
        if not self.api_url:
            self.api_url = f"http://{self.host}:{self.api_port}"
        if not self.schema_registry_url:
            self.schema_registry_url = (
                f"http://{self.host}:{self.schema_registry_port}/apis/ccompat/v7"
            )
        return self

    @model_validator(mode="after")
    def _check_kafka_security(self) -> Settings:
        """Refuse incomplete Kafka security settings at start, naming settings (never values)."""
        problems = []
        sasl = self.kafka_security_protocol.startswith("SASL_")
        if sasl and self.kafka_sasl_mechanism is None:
            problems.append("CARRARA_KAFKA_SASL_MECHANISM is required with SASL_* protocols")
        if not sasl and self.kafka_sasl_mechanism is not None:
            problems.append("CARRARA_KAFKA_SASL_MECHANISM needs a SASL_* security protocol")
        if self.kafka_sasl_mechanism in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512") and not (
            self.kafka_sasl_username and (self.kafka_sasl_password or self.kafka_sasl_password_file)
        ):
            problems.append(
                "CARRARA_KAFKA_SASL_USERNAME and CARRARA_KAFKA_SASL_PASSWORD(_FILE) are required "
                f"with {self.kafka_sasl_mechanism}"
            )
        if self.kafka_oidc_token_endpoint_url and not (
            self.kafka_oidc_client_id
            and (self.kafka_oidc_client_secret or self.kafka_oidc_client_secret_file)
        ):
            problems.append(
                "CARRARA_KAFKA_OIDC_CLIENT_ID and CARRARA_KAFKA_OIDC_CLIENT_SECRET(_FILE) are "
                "required with CARRARA_KAFKA_OIDC_TOKEN_ENDPOINT_URL"
            )
        for secret, file in (
            ("KAFKA_SASL_PASSWORD", self.kafka_sasl_password_file),
            ("KAFKA_OIDC_CLIENT_SECRET", self.kafka_oidc_client_secret_file),
            ("KAFKA_SSL_KEY_PASSWORD", self.kafka_ssl_key_password_file),
        ):
            if file is not None and not file.is_file():
                problems.append(f"CARRARA_{secret}_FILE names no readable file")
        if problems:
            raise ValueError("Kafka security settings: " + "; ".join(problems))
        return self

    def check_secrets(self, *, session_key: bool = False, database: bool = False) -> None:
        """Refuse, in production, the development secrets this process uses (and only those).

        The API uses both; workers and the monitor the database; scorers neither. ValueError
        names the settings (never their values). `carrara.secret_keys.session_secret` checks the
        session key itself, wherever it comes from.
        """
        if self.environment != "production":
            return
        unsafe = []
        if session_key and not (self.secret_key or self.secret_key_file):
            unsafe.append("CARRARA_SECRET_KEY or CARRARA_SECRET_KEY_FILE (a random value)")
        if database and DEV_DB_PASSWORD in self.database_url:
            unsafe.append("CARRARA_DATABASE_URL (uses the local-stack password)")
        if unsafe:
            raise ValueError("unsafe settings for production: " + "; ".join(unsafe))

    @property
    def mlflow_database_url(self) -> str:
        """Backend store of the local MLflow server (its own database in the stack's Postgres)."""
        return (
            f"postgresql+psycopg://{self.mlflow_db_user}:{self.mlflow_db_password}"
            f"@{self.host}:{self.pg_port}/{self.mlflow_db_name}"
        )


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings (read once; tests build their own `Settings`)."""
    return Settings()
