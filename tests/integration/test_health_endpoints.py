"""`/healthz` and `/readyz` against the real services."""

from __future__ import annotations

from fastapi.testclient import TestClient

from carrara.settings import Settings, get_settings


def test_healthz_answers_while_the_process_is_up(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_is_200_when_every_dependency_answers(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["failing"] == []
    assert set(body["checks"]) == {"postgres", "kafka", "redis", "mlflow"}


def test_readyz_is_503_and_names_the_unreachable_dependency(
    client: TestClient, test_settings: Settings
) -> None:
    broken = test_settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "mlflow_url": "http://127.0.0.1:1"}
    )
    client.app.dependency_overrides[get_settings] = lambda: broken  # type: ignore[attr-defined]
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["failing"] == ["redis", "mlflow"]
    assert "Connection" in response.json()["checks"]["redis"]["detail"]
