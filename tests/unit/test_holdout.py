"""The deterministic holdout: by a stable hash of the entity key, or the latest events by time."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from carrara.training.holdout import (
    HoldoutBy,
    HoldoutConfig,
    holdout_by_key,
    holdout_by_time,
    holdout_mask,
    key_unit,
)

KEYS = [f"entity-{i}" for i in range(20_000)]


def test_key_units_are_a_fixed_function_of_seed_and_key() -> None:
    # Pinned values: a change here silently changes every future run's holdout.
    assert key_unit("user-1", 0) == 0.5646566085540076
    assert key_unit("user-2", 0) == 0.4200319325914333
    assert key_unit("42", "x") == 0.590958688247584
    digest = hashlib.blake2b(b"0:user-1", digest_size=8).digest()
    assert key_unit("user-1") == int.from_bytes(digest, "big") / 2**64


def test_the_split_is_identical_in_another_process_with_another_hash_seed() -> None:
    code = (
        "from carrara.training.holdout import holdout_by_key;"
        "keys = [f'entity-{i}' for i in range(20000)];"
        "print(''.join('1' if h else '0' for h in holdout_by_key(keys, 0.2, seed=3)))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
    here = "".join("1" if h else "0" for h in holdout_by_key(KEYS, 0.2, seed=3))
    assert out == here


@pytest.mark.parametrize("fraction", [0.05, 0.2, 0.5])
def test_the_holdout_is_close_to_the_requested_fraction(fraction: float) -> None:
    mask = holdout_by_key(KEYS, fraction)
    assert abs(mask.mean() - fraction) < 0.01


def test_every_event_of_an_entity_is_on_the_same_side() -> None:
    keys = [f"user-{i % 300}" for i in range(6_000)]
    mask = holdout_by_key(keys, 0.3, seed=1)
    sides: dict[str, set[bool]] = {}
    for key, side in zip(keys, mask, strict=True):
        sides.setdefault(key, set()).add(bool(side))
    assert all(len(s) == 1 for s in sides.values())
    assert 0 < mask.mean() < 1


def test_the_seed_changes_the_split() -> None:
    a = holdout_by_key(KEYS, 0.2, seed=1)
    b = holdout_by_key(KEYS, 0.2, seed=2)
    np.testing.assert_array_equal(a, holdout_by_key(KEYS, 0.2, seed=1))
    assert (a != b).mean() > 0.2


def test_by_time_the_latest_fraction_is_the_holdout() -> None:
    times = np.array([50, 10, 40, 20, 30, 90, 60, 80, 70, 100], dtype=np.float64)
    mask = holdout_by_time(times, 0.3)
    np.testing.assert_array_equal(np.sort(times[mask]), [80, 90, 100])
    assert times[~mask].max() < times[mask].min()


def test_by_time_rows_sharing_the_cut_off_time_stay_together() -> None:
    times = np.array([1, 2, 3, 3, 3, 4], dtype=np.float64)
    mask = holdout_by_time(times, 0.3)  # 2 rows asked; the cut-off at 3 takes all threes
    np.testing.assert_array_equal(mask, [False, False, True, True, True, True])
    assert not holdout_by_time(times, 0.01).any()


def test_holdout_mask_follows_the_run_config() -> None:
    keys = KEYS[:1000]
    times = np.arange(1000, dtype=np.float64)
    by_key = holdout_mask({"fraction": 0.25, "seed": 9}, keys=keys, event_times=times)
    np.testing.assert_array_equal(by_key, holdout_by_key(keys, 0.25, seed=9))
    by_time = holdout_mask({"by": "time", "fraction": 0.1}, keys=keys, event_times=times)
    np.testing.assert_array_equal(by_time, times >= 900)
    assert holdout_mask(None, keys=keys).mean() == pytest.approx(0.2, abs=0.05)
    with pytest.raises(ValueError, match="event_time_field"):
        holdout_mask({"by": "time"}, keys=keys)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"fraction": 0}, "fraction"),
        ({"fraction": 1.0}, "fraction"),
        ({"by": "partition"}, "partition"),
        ({"seed": 1.5}, "seed"),
        ({"ratio": 0.2}, "unknown holdout settings: ratio"),
    ],
)
def test_invalid_configs_are_refused(config: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HoldoutConfig.from_dict(config)


def test_config_round_trips() -> None:
    config = HoldoutConfig(by=HoldoutBy.time, fraction=0.15, seed="exp-1")
    assert HoldoutConfig.from_dict(config.as_dict()) == config
    assert config.as_dict() == {"by": "time", "fraction": 0.15, "seed": "exp-1"}
