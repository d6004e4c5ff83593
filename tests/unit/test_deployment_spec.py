"""The deployments-topic wire format: what scorers decode, validated on both sides."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import orjson
import pytest

from carrara.streams.deployment_spec import (
    FORMAT_VERSION,
    DeploymentSpec,
    VariantSpec,
    decode_spec,
    encode_spec,
    spec_from_dict,
    spec_to_dict,
)

PUBLISHED = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def _running(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "name": "fraud",
        "revision": 3,
        "salt": "0123456789abcdef",
        "published_at": "2025-01-02T03:04:05Z",
        "input_topic": "payments",
        "output_topic": "payments.scores",
        "key_field": "user_id",
        "pool": "default",
        "variants": [
            {"name": "a", "model_name": "fraud-model", "model_version": 4, "weight": 90},
            {"name": "b", "model_name": "fraud-model", "model_version": 5, "weight": 10},
            {
                "name": "c",
                "model_name": "fraud-gbm",
                "model_version": 1,
                "weight": 0,
                "shadow": True,
                "shadow_sample_pct": 25.0,
            },
        ],
    }
    record.update(overrides)
    return record


def test_a_running_record_decodes_with_its_variants() -> None:
    spec = decode_spec(orjson.dumps(_running()))
    assert spec.name == "fraud"
    assert spec.revision == 3
    assert spec.published_at == PUBLISHED
    assert not spec.stopped
    assert spec.format_version == FORMAT_VERSION
    assert [v.name for v in spec.live_variants] == ["a", "b"]
    assert spec.shadow_variants == (
        VariantSpec(
            name="c",
            model_name="fraud-gbm",
            model_version=1,
            weight=0,
            shadow=True,
            shadow_sample_pct=25.0,
        ),
    )


def test_encode_decode_and_dict_round_trips_are_lossless() -> None:
    spec = decode_spec(orjson.dumps(_running()))
    assert decode_spec(encode_spec(spec)) == spec
    as_dict = spec_to_dict(spec)
    # Plain JSON types only: the dict goes into a JSONB outbox payload.
    assert orjson.loads(orjson.dumps(as_dict)) == as_dict
    assert isinstance(as_dict["variants"], list)
    assert spec_from_dict(as_dict) == spec
    assert decode_spec(orjson.dumps(as_dict)) == spec


def test_a_stop_record_needs_no_topics_and_has_no_variants() -> None:
    stop = DeploymentSpec(
        name="fraud", revision=4, salt="0123456789abcdef", published_at=PUBLISHED, stopped=True
    )
    decoded = decode_spec(encode_spec(stop))
    assert decoded.stopped
    assert decoded.variants == ()
    assert decoded.input_topic is None
    with pytest.raises(msgspec.ValidationError, match="no variants"):
        decode_spec(orjson.dumps(_running(stopped=True)))


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    spec = decode_spec(orjson.dumps(_running(added_in_a_later_format="x")))
    assert spec.name == "fraud"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"output_topic": None}, "needs output_topic"),
        ({"variants": []}, "at least one variant"),
        (
            {
                "variants": [
                    {"name": "a", "model_name": "m", "model_version": 1, "weight": 60},
                    {"name": "a", "model_name": "m", "model_version": 2, "weight": 40},
                ]
            },
            "unique",
        ),
        (
            {"variants": [{"name": "a", "model_name": "m", "model_version": 1, "weight": 90}]},
            "sum to 100, got 90",
        ),
        (
            {"variants": [{"name": "a", "model_name": "m", "model_version": 0, "weight": 100}]},
            ">= 1",
        ),
        (
            {"variants": [{"name": "a", "model_name": "m", "model_version": 1, "weight": 101}]},
            "<= 100",
        ),
        ({"revision": 0}, ">= 1"),
        ({"published_at": "yesterday"}, "datetime"),
    ],
)
def test_invalid_records_are_refused_with_a_reason(
    overrides: dict[str, object], message: str
) -> None:
    with pytest.raises(msgspec.ValidationError, match=message):
        decode_spec(orjson.dumps(_running(**overrides)))


def test_constructing_an_invalid_spec_in_python_fails_too() -> None:
    with pytest.raises(ValueError, match="sum to 100"):
        DeploymentSpec(
            name="x",
            revision=1,
            salt="s",
            published_at=PUBLISHED,
            input_topic="i",
            output_topic="o",
            key_field="k",
            pool="default",
            variants=(VariantSpec(name="a", model_name="m", model_version=1, weight=50),),
        )
