"""`/healthz` and `/readyz` against the real services."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from carrara.settings import Settings, get_settings
from carrara.streams.resilience import LoopHealth


def test_healthz_answers_while_the_process_is_up(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    # The test app runs no background loops (the relay is driven by the tests themselves), and
    # takes no part in the election of the process that runs the single-run loops.
    body = response.json()
    assert body == {"status": "ok", "wedged": [], "loops": {}, "single_run": [], "pid": body["pid"]}


def test_healthz_reports_the_background_loops_and_fails_when_one_is_wedged(
    client: TestClient,
) -> None:
    relay, status = LoopHealth("outbox-relay", 0.2), LoopHealth("scorer-status", 60)
    client.app.state.loops = {"outbox-relay": relay, "scorer-status": status}  # type: ignore[attr-defined]
    relay.trouble("KafkaError{code=_TRANSPORT}", connection=True)
    body = client.get("/healthz").json()
    assert body["loops"]["outbox-relay"]["last_error"] == "KafkaError{code=_TRANSPORT}"
    assert body["loops"]["scorer-status"]["stalled"] is False

    deadline = time.monotonic() + 5
    while not relay.wedged():  # the relay's loop stops turning (no beat)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["wedged"] == ["outbox-relay"]
    assert response.json()["loops"]["outbox-relay"]["stalled"] is True

    relay.beat()
    relay.progress()
    assert client.get("/healthz").status_code == 200


def test_readyz_is_200_when_every_dependency_answers(
    client: TestClient, viewer_headers: dict[str, str]
) -> None:
    response = client.get("/readyz", headers=viewer_headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["failing"] == []
    assert set(body["checks"]) == {"postgres", "kafka", "redis", "mlflow"}


def test_readyz_is_503_and_names_the_unreachable_dependency(
    client: TestClient, test_settings: Settings, viewer_headers: dict[str, str]
) -> None:
    broken = test_settings.model_copy(
        update={"redis_url": "redis://127.0.0.1:1/0", "mlflow_url": "http://127.0.0.1:1"}
    )
    client.app.dependency_overrides[get_settings] = lambda: broken  # type: ignore[attr-defined]
    response = client.get("/readyz", headers=viewer_headers)
    assert response.status_code == 503
    assert response.json()["failing"] == ["redis", "mlflow"]
    assert "Connection" in response.json()["checks"]["redis"]["detail"]


def test_readyz_shows_details_only_with_a_valid_token(
    client: TestClient, test_settings: Settings, viewer_headers: dict[str, str]
) -> None:
    broken = test_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    client.app.dependency_overrides[get_settings] = lambda: broken  # type: ignore[attr-defined]
    for headers in ({}, {"Authorization": "Bearer crr_not-a-token"}):
        response = client.get("/readyz", headers=headers)
        assert response.status_code == 503
        assert response.json() == {"status": "not ready", "failing": ["redis"]}
    assert (
        "Connection"
        in client.get("/readyz", headers=viewer_headers).json()["checks"]["redis"]["detail"]
    )


def test_readyz_answers_from_a_cache(
    client: TestClient, test_settings: Settings, viewer_headers: dict[str, str]
) -> None:
    settings = test_settings.model_copy(update={"readyz_cache_s": 60.0})
    client.app.dependency_overrides[get_settings] = lambda: settings  # type: ignore[attr-defined]
    first = client.get("/readyz", headers=viewer_headers).json()
    started = time.monotonic()
    for _ in range(20):
        again = client.get("/readyz", headers=viewer_headers).json()
    assert time.monotonic() - started < 2  # twenty answers without probing anything again
    assert again["checks"] == first["checks"]
    assert again["age_s"] >= first["age_s"]
