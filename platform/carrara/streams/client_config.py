"""librdkafka configuration for Carrara's consumers, producers and admin clients.

Every Kafka client Carrara builds starts from `connection_config`: the bootstrap servers plus the
process's security settings (`CARRARA_KAFKA_SECURITY_PROTOCOL`, SASL, TLS and the
`CARRARA_KAFKA__<PROPERTY>` pass-through). A process has one identity: its settings are read from
its own environment, so a scorer, the monitor and the control plane can run with different
credentials. Secrets are read here, at client creation (from the environment or a `*_FILE`), and
never logged.

The tuned values come from measurements on this machine (benchmarks/RESULTS.md): with librdkafka's
defaults consuming was ~30x slower than with larger fetches and batched `consume()` calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import SecretStr

from carrara.settings import Settings, get_settings

# librdkafka properties whose names contain `_` themselves (kept as given in the pass-through).
_UNDERSCORED = frozenset({"log_level", "enabled_events"})


def _secret(value: SecretStr | None, file: Path | None) -> str | None:
    if file is not None:
        return file.read_text().strip()
    return value.get_secret_value() if value is not None else None


def property_name(key: str) -> str:
    """`ssl_endpoint_identification_algorithm` (from CARRARA_KAFKA__...) -> librdkafka's name."""
    key = key.lower()
    if "." in key or key in _UNDERSCORED:
        return key
    return key.replace("_", ".")


def security_config(settings: Settings) -> dict[str, Any]:
    """The librdkafka security properties of `settings`: protocol, SASL, TLS, pass-through."""
    s = settings
    config: dict[str, Any] = {"security.protocol": s.kafka_security_protocol.lower()}
    if s.kafka_sasl_mechanism is not None:
        config["sasl.mechanism"] = s.kafka_sasl_mechanism
    if s.kafka_sasl_username:
        config["sasl.username"] = s.kafka_sasl_username
    password = _secret(s.kafka_sasl_password, s.kafka_sasl_password_file)
    if password is not None:
        config["sasl.password"] = password
    if s.kafka_oidc_token_endpoint_url:
        config["sasl.oauthbearer.method"] = "oidc"
        config["sasl.oauthbearer.token.endpoint.url"] = s.kafka_oidc_token_endpoint_url
        config["sasl.oauthbearer.client.id"] = s.kafka_oidc_client_id
        secret = _secret(s.kafka_oidc_client_secret, s.kafka_oidc_client_secret_file)
        if secret is not None:
            config["sasl.oauthbearer.client.secret"] = secret
        if s.kafka_oidc_scope:
            config["sasl.oauthbearer.scope"] = s.kafka_oidc_scope
    for name, path in (
        ("ssl.ca.location", s.kafka_ssl_ca_location),
        ("ssl.certificate.location", s.kafka_ssl_certificate_location),
        ("ssl.key.location", s.kafka_ssl_key_location),
    ):
        if path is not None:
            config[name] = str(path)
    key_password = _secret(s.kafka_ssl_key_password, s.kafka_ssl_key_password_file)
    if key_password is not None:
        config["ssl.key.password"] = key_password
    for key, value in s.kafka.items():
        config[property_name(key)] = value.get_secret_value()
    return config


def connection_config(bootstrap: str, settings: Settings | None = None) -> dict[str, Any]:
    """Where and how to connect: `bootstrap` plus the security settings of `settings` (by default
    the process's own). Every Carrara Kafka client's configuration starts here."""
    return {"bootstrap.servers": bootstrap, **security_config(settings or get_settings())}


def admin_config(bootstrap: str, settings: Settings | None = None) -> dict[str, Any]:
    # log_level 3 (errors only, no per-attempt connection chatter while a broker is down).
    return {**connection_config(bootstrap, settings), "socket.timeout.ms": 5000, "log_level": 3}


def producer_config(
    bootstrap: str, settings: Settings | None = None, **overrides: Any
) -> dict[str, Any]:
    """An idempotent producer (no duplicates on retry) that batches for throughput."""
    return {
        **connection_config(bootstrap, settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        **overrides,
    }


def consumer_config(
    bootstrap: str, group_id: str, settings: Settings | None = None, **overrides: Any
) -> dict[str, Any]:
    """A consumer that stores offsets only after processing (at-least-once by construction)."""
    return {
        **connection_config(bootstrap, settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.min.bytes": 1_000_000,
        "fetch.wait.max.ms": 50,
        "max.partition.fetch.bytes": 8_000_000,
        # librdkafka's default (1000 ms) idles any consumer slower than the fetcher: measured here,
        # replay + decode fell from 0.67x to 0.36x of raw consume (benchmarks/RESULTS.md).
        "fetch.queue.backoff.ms": 10,
        "isolation.level": "read_committed",
        **overrides,
    }


def latency_consumer_config(
    bootstrap: str, group_id: str, settings: Settings | None = None, **overrides: Any
) -> dict[str, Any]:
    """A consumer for a latency-critical loop (the scorer): every fetch returns as soon as one
    record is there (`fetch.min.bytes` 1), never held by the broker to fill; small fetches.

    `consumer_config`'s throughput settings (1 MB / 50 ms fetches) are right for replay and
    backfills and wrong here: they made the broker hold each fetch up to 50 ms at 1k events/s.
    """
    return consumer_config(
        bootstrap,
        group_id,
        settings,
        **{
            "fetch.min.bytes": 1,
            "fetch.wait.max.ms": 100,  # only how long an idle long-poll waits
            "max.partition.fetch.bytes": 1_000_000,
            **overrides,
        },
    )


def latency_producer_config(
    bootstrap: str, settings: Settings | None = None, **overrides: Any
) -> dict[str, Any]:
    """A producer for a latency-critical loop: no linger (each batch is flushed or committed as
    soon as it is produced anyway), compression kept, and a short first retry backoff.

    Back-to-back transactions make the broker answer `send_offsets_to_transaction` with
    CONCURRENT_TRANSACTIONS while the previous commit's markers are written; librdkafka retries
    after `retry.backoff.ms`, 100 ms by default, which was most of a transaction's time here
    (measured: 82-95 ms per `send_offsets_to_transaction` at 100 ms, ~6 ms at 5 ms, ~2 ms at
    1 ms). The backoff still grows exponentially to `retry.backoff.max.ms` when the broker is
    really away.
    """
    return producer_config(
        bootstrap,
        settings,
        **{"linger.ms": 0, "retry.backoff.ms": 2, "retry.backoff.max.ms": 1000, **overrides},
    )
