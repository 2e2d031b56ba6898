"""API keys: apps send 'Authorization: Bearer KEY'. Keys are compared by their SHA-256 digest."""

from __future__ import annotations

import hashlib

from wwwserve_gateway.http.asgi import Scope, header
from wwwserve_gateway.http.errors import AuthenticationFailed


def _digest(key: str | bytes) -> bytes:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).digest()


class KeyCheck:
    """Accepts any of the configured keys; with none configured, accepts every request."""

    def __init__(self, keys: list[str]) -> None:
        # A set of digests: lookup time does not depend on how much of a key matched.
        self._digests = {_digest(k) for k in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def presented(self, scope: Scope) -> bool:
        """Whether the request carries one of the keys (False when none is configured)."""
        value = header(scope, b"authorization")
        if not self._digests or value is None:
            return False
        scheme, _, token = value.partition(b" ")
        return scheme.lower() == b"bearer" and _digest(token.strip()) in self._digests

    def check(self, scope: Scope) -> None:
        if not self._digests:
            return
        value = header(scope, b"authorization")
        if value is None:
            raise AuthenticationFailed(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            )
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer" or _digest(token.strip()) not in self._digests:
            raise AuthenticationFailed("Incorrect API key provided.")
