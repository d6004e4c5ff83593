"""Kafka security settings become librdkafka properties in one place, and secrets never show."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
import structlog
from pydantic import ValidationError

from carrara.settings import Settings
from carrara.streams.client_config import (
    admin_config,
    connection_config,
    consumer_config,
    producer_config,
    property_name,
    security_config,
)


def _settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name in list(__import__("os").environ):
        if name.startswith("CARRARA_KAFKA"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(f"CARRARA_{name}", value)
    return Settings()


def test_plain_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(monkeypatch)
    assert connection_config("k:9092", settings) == {
        "bootstrap.servers": "k:9092",
        "security.protocol": "plaintext",
    }


def test_scram_over_tls_from_a_password_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text("s3cret-from-file\n")
    settings = _settings(
        monkeypatch,
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME="scorer",
        KAFKA_SASL_PASSWORD_FILE=str(secret),
        KAFKA_SSL_CA_LOCATION="/etc/kafka/ca.pem",
    )
    assert security_config(settings) == {
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "scorer",
        "sasl.password": "s3cret-from-file",
        "ssl.ca.location": "/etc/kafka/ca.pem",
    }
    # Every kind of client carries them.
    for config in (
        admin_config("k:9093", settings),
        producer_config("k:9093", settings, **{"transactional.id": "t"}),
        consumer_config("k:9093", "g", settings, **{"fetch.min.bytes": 1}),
    ):
        assert config["sasl.password"] == "s3cret-from-file"
        assert config["bootstrap.servers"] == "k:9093"


def test_oidc_client_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(
        monkeypatch,
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="OAUTHBEARER",
        KAFKA_OIDC_TOKEN_ENDPOINT_URL="https://idp.example/oauth2/token",
        KAFKA_OIDC_CLIENT_ID="carrara-scorer",
        KAFKA_OIDC_CLIENT_SECRET="oidc-secret",
        KAFKA_OIDC_SCOPE="kafka",
    )
    config = security_config(settings)
    assert config["sasl.mechanism"] == "OAUTHBEARER"
    assert config["sasl.oauthbearer.method"] == "oidc"
    assert config["sasl.oauthbearer.token.endpoint.url"] == "https://idp.example/oauth2/token"
    assert config["sasl.oauthbearer.client.id"] == "carrara-scorer"
    assert config["sasl.oauthbearer.client.secret"] == "oidc-secret"
    assert config["sasl.oauthbearer.scope"] == "kafka"


def test_mutual_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(
        monkeypatch,
        KAFKA_SECURITY_PROTOCOL="SSL",
        KAFKA_SSL_CA_LOCATION="/tls/ca.pem",
        KAFKA_SSL_CERTIFICATE_LOCATION="/tls/client.pem",
        KAFKA_SSL_KEY_LOCATION="/tls/client.key",
        KAFKA_SSL_KEY_PASSWORD="key-secret",
    )
    assert security_config(settings) == {
        "security.protocol": "ssl",
        "ssl.ca.location": "/tls/ca.pem",
        "ssl.certificate.location": "/tls/client.pem",
        "ssl.key.location": "/tls/client.key",
        "ssl.key.password": "key-secret",
    }


def test_any_other_librdkafka_property_passes_through(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(
        monkeypatch,
        KAFKA__SSL_ENDPOINT_IDENTIFICATION_ALGORITHM="none",
        KAFKA__CLIENT_ID="carrara-api",
        KAFKA__LOG_LEVEL="7",
        KAFKA='{"sasl.oauthbearer.extensions": "logicalCluster=lkc-1"}',
    )
    config = security_config(settings)
    assert config["ssl.endpoint.identification.algorithm"] == "none"
    assert config["client.id"] == "carrara-api"
    assert config["log_level"] == "7"
    assert config["sasl.oauthbearer.extensions"] == "logicalCluster=lkc-1"
    assert property_name("ENABLE_SSL_CERTIFICATE_VERIFICATION") == (
        "enable.ssl.certificate.verification"
    )


def test_incomplete_settings_are_refused_naming_settings_not_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValidationError) as refused:
        _settings(
            monkeypatch,
            KAFKA_SECURITY_PROTOCOL="SASL_SSL",
            KAFKA_SASL_PASSWORD="do-not-echo-me",
        )
    assert "CARRARA_KAFKA_SASL_MECHANISM" in str(refused.value)
    assert "do-not-echo-me" not in str(refused.value)
    with pytest.raises(ValidationError, match="CARRARA_KAFKA_SASL_USERNAME"):
        _settings(
            monkeypatch, KAFKA_SECURITY_PROTOCOL="SASL_SSL", KAFKA_SASL_MECHANISM="SCRAM-SHA-256"
        )
    with pytest.raises(ValidationError, match="CARRARA_KAFKA_OIDC_CLIENT_ID"):
        _settings(
            monkeypatch,
            KAFKA_SECURITY_PROTOCOL="SASL_SSL",
            KAFKA_SASL_MECHANISM="OAUTHBEARER",
            KAFKA_OIDC_TOKEN_ENDPOINT_URL="https://idp/token",
        )
    with pytest.raises(ValidationError, match="CARRARA_KAFKA_SASL_PASSWORD_FILE"):
        _settings(
            monkeypatch,
            KAFKA_SECURITY_PROTOCOL="SASL_SSL",
            KAFKA_SASL_MECHANISM="PLAIN",
            KAFKA_SASL_USERNAME="u",
            KAFKA_SASL_PASSWORD_FILE="/nonexistent/password",
        )


def test_secrets_never_show_in_the_settings_repr_or_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(
        monkeypatch,
        KAFKA_SECURITY_PROTOCOL="SASL_SSL",
        KAFKA_SASL_MECHANISM="SCRAM-SHA-512",
        KAFKA_SASL_USERNAME="api",
        KAFKA_SASL_PASSWORD="sasl-secret-1",
        KAFKA_SSL_KEY_PASSWORD="key-secret-2",
        KAFKA__SSL_KEYSTORE_PASSWORD="pass-through-secret-3",
    )
    secrets = ("sasl-secret-1", "key-secret-2", "pass-through-secret-3")
    shown = repr(settings) + str(settings) + settings.model_dump_json()
    assert not any(s in shown for s in secrets)

    out = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.JSONRenderer()],
        logger_factory=structlog.PrintLoggerFactory(out),
    )
    try:
        structlog.get_logger().info("settings", settings=settings)
        logging.getLogger("carrara").info("%r", settings)
    finally:
        structlog.reset_defaults()
    assert not any(s in out.getvalue() for s in secrets)
