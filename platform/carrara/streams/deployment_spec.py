"""The wire format of a deployment revision on the compacted deployments topic.

The control plane publishes one record per revision, keyed by the deployment name, so compaction
keeps the latest revision of every deployment and a scorer that reads the topic from the start
learns the whole desired state. A stopped deployment is a record with `stopped: true` (not a
tombstone), so scorers see the stop even before compaction removes older revisions.

This module is self-contained (msgspec only): scorers decode records without the control plane.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

FORMAT_VERSION = 1

Weight = Annotated[int, msgspec.Meta(ge=0, le=100)]
Percent = Annotated[float, msgspec.Meta(gt=0, le=100)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class VariantSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One model version serving a share of the traffic (or shadowing it)."""

    name: str
    model_name: str
    model_version: PositiveInt
    # Live variants split the traffic by weight (they sum to 100); shadow variants have weight 0.
    weight: Weight
    shadow: bool = False
    # Share of the events a shadow variant scores (None: all of them).
    shadow_sample_pct: Percent | None = None
    # SHA-256 of every file of the model version a scorer may load, pinned when the version was
    # registered (keys and format: carrara.artifacts). A scorer refuses files that differ. None
    # for versions registered before digests existed.
    artifact_digests: dict[str, str] | None = None
    # An admin marked the version as trusted code: the scorer may load it from formats that
    # execute code (pickle, cloudpickle, pyfunc). Only ever learnt from this spec.
    trusted_code: bool = False


class DeploymentSpec(msgspec.Struct, frozen=True, kw_only=True):
    """The desired state of a deployment at one revision, as scorers receive it."""

    name: str
    revision: PositiveInt
    # Scorers hash `salt + entity key` to choose a variant: stable per deployment, so an entity
    # keeps its variant across revisions, and different deployments split independently.
    salt: str
    published_at: datetime
    stopped: bool = False
    input_topic: str | None = None
    output_topic: str | None = None
    key_field: str | None = None
    pool: str | None = None
    variants: tuple[VariantSpec, ...] = ()
    format_version: int = FORMAT_VERSION
    # How predictions are written: JSON objects, or Avro framed with the id of the prediction
    # schema registered under `<output topic>-value` (README: Event formats).
    output_format: Literal["json", "avro"] = "json"
    # Write each prediction's model input vector in the record (`features`), e.g. to check that
    # the features a scorer computed equal the training rows.
    include_features: bool = False

    def __post_init__(self) -> None:
        # msgspec turns a ValueError raised here into a ValidationError on decode.
        if self.stopped:
            if self.variants:
                raise ValueError("a stopped deployment has no variants")
            return
        missing = [
            field
            for field in ("input_topic", "output_topic", "key_field", "pool")
            if not getattr(self, field)
        ]
        if missing:
            raise ValueError(f"a running deployment needs {', '.join(missing)}")
        if not self.variants:
            raise ValueError("a running deployment needs at least one variant")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, got {names}")
        live = sum(v.weight for v in self.variants if not v.shadow)
        if live != 100:
            raise ValueError(f"live variant weights must sum to 100, got {live}")

    @property
    def live_variants(self) -> tuple[VariantSpec, ...]:
        return tuple(v for v in self.variants if not v.shadow)

    @property
    def shadow_variants(self) -> tuple[VariantSpec, ...]:
        return tuple(v for v in self.variants if v.shadow)


_decoder = msgspec.json.Decoder(DeploymentSpec)
_encoder = msgspec.json.Encoder()


def encode_spec(spec: DeploymentSpec) -> bytes:
    """JSON bytes of `spec`, as produced to the deployments topic."""
    return _encoder.encode(spec)


def decode_spec(data: bytes | str) -> DeploymentSpec:
    """Parse and validate a deployments-topic record value; raises msgspec.ValidationError."""
    return _decoder.decode(data)


def spec_to_dict(spec: DeploymentSpec) -> dict[str, Any]:
    """`spec` as JSON-compatible builtins (for an outbox row's JSON payload)."""
    # A JSON round trip yields plain dicts and lists (to_builtins would keep tuples).
    result: dict[str, Any] = msgspec.json.decode(_encoder.encode(spec))
    return result


def spec_from_dict(data: dict[str, Any]) -> DeploymentSpec:
    """The inverse of `spec_to_dict`, with the same validation as `decode_spec`."""
    return msgspec.convert(data, DeploymentSpec, strict=False)
