"""Deterministic splitting: proportions, stickiness, minimal movement on a weight change."""

from __future__ import annotations

import subprocess
import sys

from carrara.scoring.splitter import BUCKETS, Splitter, bucket_of, routing_key
from carrara.streams.deployment_spec import VariantSpec


def _variants(a: int, b: int, shadow_pct: float | None = None) -> list[VariantSpec]:
    variants = [
        VariantSpec(name="a", model_name="m", model_version=1, weight=a),
        VariantSpec(name="b", model_name="m", model_version=2, weight=b),
    ]
    if shadow_pct is not None:
        variants.append(
            VariantSpec(
                name="s",
                model_name="m",
                model_version=3,
                weight=0,
                shadow=True,
                shadow_sample_pct=shadow_pct,
            )
        )
    return variants


KEYS = [f"card-{i}" for i in range(20_000)]


def test_proportions_on_20k_keys_are_within_two_points() -> None:
    splitter = Splitter("salt-1", _variants(90, 10))
    share_b = sum(splitter.choose(k).name == "b" for k in KEYS) / len(KEYS)
    assert abs(share_b - 0.10) < 0.02


def test_the_same_key_gets_the_same_bucket_in_another_process() -> None:
    here = [bucket_of("salt-1", k) for k in KEYS[:50]]
    code = (
        "from carrara.scoring.splitter import bucket_of;"
        "print([bucket_of('salt-1', f'card-{i}') for i in range(50)])"
    )
    there = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    ).stdout
    assert str(here) == there.strip()
    assert all(0 <= b < BUCKETS for b in here)


def test_a_weight_change_moves_only_the_keys_it_must() -> None:
    before = Splitter("salt-1", _variants(90, 10))
    after = Splitter("salt-1", _variants(80, 20))
    moved = [(before.choose(k).name, after.choose(k).name) for k in KEYS]
    assert all(not (b == "b" and a == "a") for b, a in moved)  # nobody leaves b
    share_moved = sum(b != a for b, a in moved) / len(KEYS)
    assert abs(share_moved - 0.10) < 0.02


def test_salts_split_independently() -> None:
    one = Splitter("deployment-1", _variants(50, 50))
    two = Splitter("deployment-2", _variants(50, 50))
    agree = sum(one.choose(k).name == two.choose(k).name for k in KEYS) / len(KEYS)
    assert 0.45 < agree < 0.55


def test_shadow_sampling_follows_its_percentage() -> None:
    splitter = Splitter("salt", _variants(50, 50, shadow_pct=25))
    (shadow,) = splitter.shadows
    share = sum(splitter.shadow_scores(shadow, k) for k in KEYS) / len(KEYS)
    assert abs(share - 0.25) < 0.02
    everything = Splitter("salt", _variants(50, 50, shadow_pct=100))
    assert all(everything.shadow_scores(everything.shadows[0], k) for k in KEYS[:100])


def test_keyless_events_are_routed_by_position() -> None:
    assert routing_key(None, 2, 17) != routing_key(None, 2, 18)
    assert routing_key("card-1", 2, 17) == "card-1"


def test_the_batch_path_agrees_with_the_per_key_path() -> None:
    variants = [
        VariantSpec(name="a", model_name="m", model_version=1, weight=70),
        VariantSpec(name="b", model_name="m", model_version=2, weight=20),
        VariantSpec(name="c", model_name="m", model_version=3, weight=10),
    ]
    splitter = Splitter("salt-1", variants)
    keys = [f"card-{i}" for i in range(5000)] + ["", "\u00e9", "\x00offset:1:2"]
    buckets = splitter.buckets(keys)
    assert buckets.tolist() == [bucket_of("salt-1", k) for k in keys]
    chosen = splitter.choose_indexes(buckets)
    assert [splitter.live[i].name for i in chosen] == [splitter.choose(k).name for k in keys]
