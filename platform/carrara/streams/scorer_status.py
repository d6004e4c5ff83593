"""The wire format of scorer status records on the compacted status topic.

Every scorer instance publishes one record, keyed by its instance id, when something changes and
at least every `interval_s` seconds (a liveness signal). The control plane keeps the latest record
per instance and derives the rollout of each deployment from them ("3/3 scorers on revision 7").
An instance that shuts down cleanly publishes `stopping: true` and then a tombstone.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

FORMAT_VERSION = 1
STATUS_TOPIC = "carrara.scorer-status"

# stalled: the scoring loop has events waiting and has completed nothing for the stall timeout.
DeploymentState = Literal["loading", "serving", "stalled", "failed", "stopped"]


class DeploymentStatus(msgspec.Struct, frozen=True, kw_only=True):
    """What one scorer does for one deployment."""

    name: str
    # The revision whose models are serving (None until the first revision is loaded).
    served_revision: int | None
    # The latest revision the scorer has seen on the deployments topic.
    desired_revision: int
    state: DeploymentState
    loaded_versions: tuple[str, ...] = ()  # "model-name/3"
    last_error: str | None = None
    events_scored: int = 0
    dead_letters: int = 0


class ScorerStatus(msgspec.Struct, frozen=True, kw_only=True):
    instance_id: str
    pool: str
    host: str
    started_at: datetime
    updated_at: datetime
    interval_s: float
    deployments: tuple[DeploymentStatus, ...] = ()
    stopping: bool = False
    format_version: int = FORMAT_VERSION


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ScorerStatus)


def encode_status(status: ScorerStatus) -> bytes:
    return _encoder.encode(status)


def decode_status(raw: bytes) -> ScorerStatus:
    """Decode a status record; raises msgspec.ValidationError / DecodeError when malformed."""
    return _decoder.decode(raw)
