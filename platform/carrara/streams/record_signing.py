"""HMAC-SHA256 signatures of deployment records: the control plane signs, scorers verify.

A record is signed over its key and its exact value bytes, so neither can be changed or moved to
another deployment's key; the signature travels in the `carrara-signature` header as
`hmac-sha256:<hex>`. Self-contained (stdlib only): scorers verify without the control plane.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Sequence

SIGNATURE_HEADER = "carrara-signature"
_SCHEME = "hmac-sha256:"


def _message(key: bytes, value: bytes) -> bytes:
    # Length-prefixed key, then the value: no two (key, value) pairs give the same message.
    return len(key).to_bytes(4, "big") + key + value


def sign(secret: bytes, key: str, value: bytes) -> str:
    """The header value signing record (`key`, `value`) with `secret`."""
    digest = hmac.new(secret, _message(key.encode(), value), hashlib.sha256).hexdigest()
    return _SCHEME + digest


def header_value(headers: Iterable[tuple[str, str | bytes | None]] | None) -> bytes | None:
    """The `carrara-signature` header of a consumed record (None when absent or repeated)."""
    found = [v for k, v in headers or () if k == SIGNATURE_HEADER]
    if len(found) != 1 or found[0] is None:
        return None
    value = found[0]
    return value.encode() if isinstance(value, str) else value


def record_problem(
    secrets: Sequence[bytes],
    key: bytes | str | None,
    value: bytes,
    signature: bytes | None,
    name: str,
) -> str | None:
    """Why a deployment record must be refused, or None when it is acceptable.

    The record's key must be the deployment's name; when `secrets` are configured (the current
    signing key first, then previous ones during a rotation), its signature must verify with one
    of them (compared in constant time).
    """
    key_text = key.decode(errors="replace") if isinstance(key, bytes) else key
    if key_text != name:
        return f"record key {key_text!r} is not the deployment name {name!r}"
    if not secrets:
        return None
    if signature is None:
        return "the record is not signed (no carrara-signature header)"
    for secret in secrets:
        expected = sign(secret, name, value).encode()
        if hmac.compare_digest(expected, signature):
            return None
    return "the record's signature does not verify with the configured signing key"
