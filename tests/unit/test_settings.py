"""Settings derive client URLs from the stack's ports and refuse unsafe production defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from carrara.settings import Settings


def test_urls_follow_the_stack_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARRARA_PG_PORT", "6543")
    monkeypatch.setenv("CARRARA_KAFKA_PORT", "19092")
    settings = Settings()
    assert settings.database_url.endswith("@127.0.0.1:6543/carrara")
    assert settings.kafka_bootstrap == "127.0.0.1:19092"
    assert settings.mlflow_database_url.endswith(":6543/mlflow")


def test_explicit_urls_win_over_derived_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARRARA_REDIS_URL", "redis://cache.internal:6379/3")
    assert Settings().redis_url == "redis://cache.internal:6379/3"


def test_production_refuses_the_development_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARRARA_ENVIRONMENT", "production")
    settings = Settings()  # a scorer uses neither: it starts
    with pytest.raises(ValueError, match=r"CARRARA_SECRET_KEY.*CARRARA_DATABASE_URL"):
        settings.check_secrets(session_key=True, database=True)
    with pytest.raises(ValueError, match=r"CARRARA_DATABASE_URL") as only_db:
        settings.check_secrets(database=True)
    assert "SECRET_KEY" not in str(only_db.value)
    settings.check_secrets()


def test_production_accepts_real_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CARRARA_ENVIRONMENT", "production")
    monkeypatch.setenv("CARRARA_SECRET_KEY", "3f9c1e7a5b2d8c4e6a0f1b3d5e7c9a2b4d6f8e0a")
    monkeypatch.setenv("CARRARA_DATABASE_URL", "postgresql+psycopg://app:s3cret@db:5432/carrara")
    Settings().check_secrets(session_key=True, database=True)


def test_the_readme_documents_every_setting(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    missing = [
        f"CARRARA_{name.upper()}"
        for name in Settings.model_fields
        if f"CARRARA_{name.upper()}" not in readme
    ]
    assert missing == []
