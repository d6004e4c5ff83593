"""Deterministic traffic splitting: the same entity key gets the same variant everywhere.

A key's bucket is a stable hash of (deployment salt, key) into 10,000 buckets; live variants own
consecutive bucket ranges in proportion to their weights (1% = 100 buckets), in the order the
deployment lists them. The same key lands in the same variant on every scorer and after restarts,
and a weight change moves only the keys whose buckets change owner. Shadow variants sample with a
second, independent hash, so their sample does not correlate with the live split.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Sequence

import numpy as np

from carrara.streams.deployment_spec import VariantSpec

BUCKETS = 10_000


def bucket_of(salt: str, key: str) -> int:
    """The key's bucket in [0, 10000): blake2b, so every process and platform agrees."""
    digest = hashlib.blake2b(f"{salt}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % BUCKETS


def routing_key(key: str | None, partition: int, offset: int) -> str:
    """The key used for splitting: the entity key, or the event's position when it has none."""
    return key if key is not None else f"\x00offset:{partition}:{offset}"


class Splitter:
    """Chooses the live variant of a bucket and whether shadow variants score a key."""

    def __init__(self, salt: str, variants: Sequence[VariantSpec]) -> None:
        self.salt = salt
        self.live = [v for v in variants if not v.shadow]
        self.shadows = [v for v in variants if v.shadow]
        if sum(v.weight for v in self.live) != 100:
            raise ValueError("live variant weights must sum to 100")
        self._upper: list[int] = []
        total = 0
        for variant in self.live:
            total += variant.weight * (BUCKETS // 100)
            self._upper.append(total)
        self._upper_array = np.asarray(self._upper, dtype=np.int64)

    def choose(self, key: str) -> VariantSpec:
        """The live variant that serves `key`."""
        return self.live[bisect.bisect_right(self._upper, bucket_of(self.salt, key))]

    def choose_index(self, buckets: Sequence[int]) -> list[int]:
        """Indexes into `live` for precomputed buckets (the batch path)."""
        upper = self._upper
        return [bisect.bisect_right(upper, b) for b in buckets]

    def buckets(self, keys: Sequence[str]) -> np.ndarray:
        """`bucket_of(salt, key)` for a batch of keys (one digest per key, nothing else)."""
        prefix = f"{self.salt}\x00".encode()
        blake2b, from_bytes = hashlib.blake2b, int.from_bytes
        return np.fromiter(
            (
                from_bytes(blake2b(prefix + k.encode(), digest_size=8).digest(), "big") % BUCKETS
                for k in keys
            ),
            dtype=np.int64,
            count=len(keys),
        )

    def choose_indexes(self, buckets: np.ndarray) -> np.ndarray:
        """Indexes into `live` for a batch of buckets, in one vectorised lookup."""
        return np.searchsorted(self._upper_array, buckets, side="right")

    def shadow_scores(self, variant: VariantSpec, key: str) -> bool:
        """Whether shadow `variant` scores `key` (all keys unless it samples a percentage)."""
        if variant.shadow_sample_pct is None or variant.shadow_sample_pct >= 100:
            return True
        bucket = bucket_of(f"{self.salt}\x00shadow\x00{variant.name}", key)
        return bucket < variant.shadow_sample_pct * (BUCKETS / 100)
