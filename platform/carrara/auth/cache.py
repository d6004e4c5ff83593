"""A short-lived, per-process memory of bearer tokens: most requests authenticate without a query.

An entry maps a token's hash to its principal, expiry and `last_used_at`, for `ttl_s` seconds
(`CARRARA_AUTH_CACHE_S`, default 5). The bounds it keeps:

- expiry: checked against the remembered `expires_at` on every request, so an expired token is
  refused at its expiry, cached or not;
- revocation (and rotation, which revokes): at once in the process that revoked it (the service
  forgets the token in every cache of the process), within `ttl_s` in the others;
- `last_used_at`: entries live less than its one-minute resolution, so the write it needs happens
  on a refresh from the database, as often as before.

Unknown tokens are not remembered (a flood of random tokens cannot fill the cache); the cache
holds at most `max_entries` tokens and starts over when full.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime

from carrara.auth.principal import Principal


@dataclass(frozen=True)
class CachedToken:
    principal: Principal
    prefix: str
    expires_at: datetime | None
    cached_at: float  # time.monotonic()


_caches: weakref.WeakSet[TokenCache] = weakref.WeakSet()


class TokenCache:
    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: dict[str, CachedToken] = {}
        self._lock = threading.Lock()
        _caches.add(self)

    def get(self, token_hash: str) -> CachedToken | None:
        """The remembered token, if remembered less than `ttl_s` ago."""
        entry = self._entries.get(token_hash)
        if entry is None:
            return None
        if time.monotonic() - entry.cached_at >= self.ttl_s:
            with self._lock:
                self._entries.pop(token_hash, None)
            return None
        return entry

    def put(
        self, token_hash: str, principal: Principal, prefix: str, expires_at: datetime | None
    ) -> None:
        if self.ttl_s <= 0:
            return
        entry = CachedToken(principal, prefix, expires_at, time.monotonic())
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._entries.clear()
            self._entries[token_hash] = entry

    def forget(self, token_id: int) -> None:
        """Drop every entry of token `token_id` (it was revoked or rotated)."""
        with self._lock:
            stale = [h for h, e in self._entries.items() if e.principal.token_id == token_id]
            for token_hash in stale:
                del self._entries[token_hash]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def forget_everywhere(token_id: int) -> None:
    """Forget token `token_id` in every cache of this process."""
    for cache in list(_caches):
        cache.forget(token_id)
