"""The pieces every Kafka loop uses to survive an outage: deadlines, error remedies, health."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from confluent_kafka import KafkaError, KafkaException
from structlog.testing import capture_logs

from carrara.streams import resilience
from carrara.streams.resilience import Backoff, CallGuard, ClientHung, LoopHealth, classify


def _exc(code: int, **flags: bool) -> KafkaException:
    return KafkaException(KafkaError(code, "test", **flags))


def test_classify_follows_the_transactional_api_contract() -> None:
    assert classify(_exc(KafkaError._FENCED, fatal=True)) == "fatal"
    assert classify(_exc(KafkaError._TIMED_OUT, txn_requires_abort=True)) == "abort"
    assert classify(_exc(KafkaError.COORDINATOR_NOT_AVAILABLE, retriable=True)) == "retry"
    assert classify(_exc(KafkaError._TIMED_OUT)) == "retry"
    assert classify(_exc(KafkaError._ALL_BROKERS_DOWN)) == "retry"
    assert classify(_exc(KafkaError._STATE)) == "fail"
    assert classify(ValueError("not kafka")) == "fail"


def test_call_guard_returns_results_and_raises_the_call_errors() -> None:
    guard = CallGuard("t")
    try:
        assert guard.call("add", lambda a, b: a + b, 2, 3, deadline_s=5) == 5
        with pytest.raises(KafkaException):
            guard.call("fail", lambda: (_ for _ in ()).throw(_exc(KafkaError._STATE)), deadline_s=5)
        assert guard.call("again", lambda: "ok", deadline_s=5) == "ok"
    finally:
        guard.close()


def test_a_call_past_its_deadline_poisons_the_guard() -> None:
    guard = CallGuard("t")
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(ClientHung, match="send_offsets_to_transaction did not return"):
        guard.call("send_offsets_to_transaction", release.wait, 30, deadline_s=0.2)
    assert time.monotonic() - started < 5  # the caller got its answer at the deadline
    with pytest.raises(ClientHung, match="still inside send_offsets_to_transaction"):
        guard.call("commit", lambda: None, deadline_s=5)
    release.set()
    guard.close()


def test_backoff_grows_to_its_cap_with_jitter_and_resets() -> None:
    backoff = Backoff(initial_s=1.0, cap_s=8.0)
    delays = [backoff.next_delay() for _ in range(8)]
    assert 0.5 <= delays[0] <= 1.0
    assert all(4.0 <= d <= 8.0 for d in delays[4:])
    backoff.reset()
    assert backoff.next_delay() <= 1.0


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """The module's log lines, even when an earlier test configured structlog to cache loggers."""
    with capture_logs() as logs:
        monkeypatch.setattr(resilience, "log", structlog.get_logger())
        yield logs


def test_loop_health_logs_one_line_per_outage_and_one_on_recovery(
    captured: list[dict[str, Any]],
) -> None:
    health = LoopHealth("scorer", stall_after_s=60, deployment="d")
    health.on_client_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "0/2 brokers are down"))
    assert not health.in_trouble  # a late report, after a recovery: not an outage
    health.on_client_error(KafkaError(KafkaError._ALL_BROKERS_DOWN, "1/1 brokers are down"))
    health.on_client_error(KafkaError(KafkaError._TRANSPORT, "connection refused"))
    assert "connection refused" in (health.last_error or "")
    health.trouble("commit_transaction: timed out", "aborted a transaction")
    health.trouble("rewound", "rewound")
    assert health.broker_down
    assert health.in_trouble
    health.progress()
    health.progress()
    events = [entry["event"] for entry in captured]
    assert events == ["loop lost the broker", "loop recovered"]
    assert captured[0]["deployment"] == "d"
    assert captured[1]["actions"] == {"aborted a transaction": 1, "rewound": 1}
    assert not health.broker_down
    assert not health.in_trouble


def test_loop_health_is_stalled_without_progress_and_recovers(
    captured: list[dict[str, Any]],
) -> None:
    health = LoopHealth("monitor", stall_after_s=0.1)
    assert not health.is_stalled()
    health.trouble("Postgres: connection refused")
    captured.clear()  # the trouble's own line
    deadline = time.monotonic() + 5
    while not health.is_stalled():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert health.is_stalled()  # logged once per episode
    report = health.report()
    health.progress()
    assert report["stalled"] is True
    assert report["last_error"] == "Postgres: connection refused"
    assert [e["event"] for e in captured] == ["loop stalled", "loop recovered"]
    assert not health.is_stalled()


def test_one_election_per_installation_not_per_database() -> None:
    from carrara.leadership import single_run_key

    key = single_run_key("kafka:9092", "carrara.deployments", "carrara.scorer-status")
    assert key == single_run_key("kafka:9092", "carrara.deployments", "carrara.scorer-status")
    assert -(2**63) <= key < 2**63  # a Postgres bigint
    assert key != single_run_key("other:9092", "carrara.deployments", "carrara.scorer-status")
    assert key != single_run_key("kafka:9092", "test-deployments", "carrara.scorer-status")
    assert key != single_run_key("kafka:9092", "carrara.deployments", "test-status")


def test_a_pending_call_is_settled_when_done_or_overdue() -> None:
    import threading

    from carrara.streams.resilience import CallGuard

    guard = CallGuard("settled")
    release = threading.Event()
    try:
        quick = guard.submit("quick", lambda: 1, deadline_s=5)
        assert quick.wait(5)
        assert quick.settled()
        hung = guard.submit("hung", release.wait, deadline_s=0.2)
        assert not hung.settled()  # running, within its deadline
        assert not hung.wait(1.0)  # waits no longer than the deadline
        assert hung.settled()  # overdue: the caller stops waiting and asks result()
        assert not hung.done()
    finally:
        release.set()
        guard.close()
