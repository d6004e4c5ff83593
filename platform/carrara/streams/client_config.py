"""librdkafka configuration for Carrara's consumers, producers and admin clients.

The tuned values come from measurements on this machine (benchmarks/RESULTS.md): with librdkafka's
defaults consuming was ~30x slower than with larger fetches and batched `consume()` calls.
"""

from __future__ import annotations

from typing import Any


def admin_config(bootstrap: str) -> dict[str, Any]:
    # log_level 3 (errors only, no per-attempt connection chatter while a broker is down).
    return {"bootstrap.servers": bootstrap, "socket.timeout.ms": 5000, "log_level": 3}


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """An idempotent producer (no duplicates on retry) that batches for throughput."""
    return {
        "bootstrap.servers": bootstrap,
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "batch.size": 1_000_000,
        "compression.type": "lz4",
        **overrides,
    }


def consumer_config(bootstrap: str, group_id: str, **overrides: Any) -> dict[str, Any]:
    """A consumer that stores offsets only after processing (at-least-once by construction)."""
    return {
        "bootstrap.servers": bootstrap,
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
