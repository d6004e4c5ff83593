"""The deterministic holdout: which rows of a replayed snapshot are kept out of training.

Two ways, both identical across processes, machines and runs (no Python `hash()`, which is salted
per process):
- by entity key: a row is in the holdout when blake2b(f"{seed}:{key}") mapped to [0, 1) is below
  the fraction, so all events of one entity fall on the same side (no leakage between an entity's
  events) and the holdout holds about `fraction` of the entities;
- by event time: the latest `fraction` of the rows, the way a model meets the future; rows sharing
  the cut-off time all go to the holdout, so it may be slightly larger than the fraction.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

DEFAULT_FRACTION = 0.2
_HASH_BYTES = 8
_HASH_SCALE = float(2 ** (8 * _HASH_BYTES))


class HoldoutBy(StrEnum):
    key = "key"
    time = "time"


@dataclass(frozen=True)
class HoldoutConfig:
    """A run's holdout: `{"by": "key" | "time", "fraction": 0.2, "seed": 0}`."""

    by: HoldoutBy = HoldoutBy.key
    fraction: float = DEFAULT_FRACTION
    seed: int | str = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction < 1.0:
            raise ValueError(f"the holdout fraction must be in (0, 1), got {self.fraction}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int | str):
            raise ValueError(f"the holdout seed must be an integer or a string, got {self.seed!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> HoldoutConfig:
        """The config from a run's `holdout` JSON (missing entries take the defaults)."""
        data = data or {}
        unknown = set(data) - {"by", "fraction", "seed"}
        if unknown:
            raise ValueError(f"unknown holdout settings: {', '.join(sorted(unknown))}")
        return cls(
            by=HoldoutBy(data.get("by", HoldoutBy.key)),
            fraction=float(data.get("fraction", DEFAULT_FRACTION)),
            seed=data.get("seed", 0),
        )

    def as_dict(self) -> dict[str, Any]:
        return {"by": str(self.by), "fraction": self.fraction, "seed": self.seed}


def key_unit(key: str, seed: int | str = 0) -> float:
    """A stable pseudo-random number in [0, 1) for an entity key and a seed."""
    digest = hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=_HASH_BYTES).digest()
    return int.from_bytes(digest, "big") / _HASH_SCALE


def holdout_by_key(keys: Sequence[str], fraction: float, seed: int | str = 0) -> np.ndarray:
    """Boolean mask (True = holdout) placing each entity key wholly on one side."""
    # Entities repeat: hash each distinct key once.
    sides = {key: key_unit(key, seed) < fraction for key in set(keys)}
    return np.fromiter(map(sides.__getitem__, keys), dtype=bool, count=len(keys))


def holdout_by_time(event_times: np.ndarray, fraction: float) -> np.ndarray:
    """Boolean mask (True = holdout) of the latest `fraction` of rows by event time."""
    times = np.asarray(event_times, dtype=np.float64)
    n = len(times)
    count = round(fraction * n)
    if count == 0:
        return np.zeros(n, dtype=bool)
    cut = np.sort(times, kind="stable")[n - count]
    return times >= cut


def holdout_mask(
    config: HoldoutConfig | Mapping[str, Any] | None,
    *,
    keys: Sequence[str],
    event_times: np.ndarray | None = None,
) -> np.ndarray:
    """The holdout mask of a run's config over decoded rows (True = holdout)."""
    cfg = config if isinstance(config, HoldoutConfig) else HoldoutConfig.from_dict(config)
    if cfg.by is HoldoutBy.time:
        if event_times is None:
            raise ValueError("a holdout by time needs the dataset's event_time_field")
        if len(event_times) != len(keys):
            raise ValueError("event_times and keys must have one entry per row")
        return holdout_by_time(event_times, cfg.fraction)
    return holdout_by_key(keys, cfg.fraction, cfg.seed)
