"""`carrara stack up SERVICE` starts what SERVICE needs first, in the stack's start order."""

from __future__ import annotations

from pathlib import Path

import pytest

from carrara.devstack.manager import APPLICATION, INFRASTRUCTURE, ServiceStatus, Stack
from carrara.devstack.service import Service, StackError
from carrara.settings import Settings


@pytest.fixture
def stack(tmp_path: Path) -> Stack:
    return Stack(Settings(home=tmp_path / "home"))


def _names(services: list[Service]) -> list[str]:
    return [svc.name for svc in services]


def test_api_and_worker_need_the_whole_infrastructure_first(stack: Stack) -> None:
    assert _names(stack.with_requirements(["api", "worker"])) == [*INFRASTRUCTURE, "api", "worker"]


def test_a_scorer_needs_kafka_the_registry_and_mlflow_but_no_postgres(stack: Stack) -> None:
    assert _names(stack.with_requirements(["scorer-1"])) == [
        "kafka",
        "schema-registry",
        "mlflow",
        "scorer-1",
    ]


def test_the_monitor_needs_postgres_and_kafka(stack: Stack) -> None:
    assert _names(stack.with_requirements(["monitor"])) == ["postgres", "kafka", "monitor"]


def test_infrastructure_needs_nothing_else(stack: Stack) -> None:
    for name in INFRASTRUCTURE:
        assert _names(stack.with_requirements([name])) == [name]
    assert _names(stack.with_requirements(None)) == list(INFRASTRUCTURE)


def test_every_requirement_is_a_service_that_starts_earlier(stack: Stack) -> None:
    order = list(stack.services)
    for name in APPLICATION:
        for required in stack.services[name].requires:
            assert order.index(required) < order.index(name), (name, required)


def test_up_starts_requirements_before_the_named_services(
    stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[str] = []

    def fake_up_one(svc: Service) -> ServiceStatus:
        started.append(svc.name)
        return ServiceStatus(svc.name, svc.label, svc.endpoint, 1, True, True, True, "")

    monkeypatch.setattr(stack, "_up_one", fake_up_one)
    statuses = stack.up(["worker", "api"])
    assert started == [*INFRASTRUCTURE, "api", "worker"]
    assert [s.name for s in statuses] == started


def test_unknown_services_are_refused_before_anything_starts(stack: Stack) -> None:
    with pytest.raises(StackError, match="unknown service"):
        stack.with_requirements(["api", "nope"])
