"""Who may open the dashboard: a holder of an operator key or the admin key.

Scripts send the key as `Authorization: Bearer KEY`. A browser signs in once with a form; the node
answers with a random session token in an HttpOnly, SameSite=Strict cookie scoped to /ui (so the
key never sits in a URL or in the page), which the live feed's EventSource sends along.
"""

from __future__ import annotations

import hashlib
import secrets
import time

from starlette.requests import HTTPConnection

COOKIE = "wwwserve_ui"
SESSION_S = 12 * 3600.0
MAX_SESSIONS = 1000


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class OperatorAuth:
    def __init__(self, keys: tuple[str, ...], session_s: float = SESSION_S) -> None:
        self._keys = {_digest(k) for k in keys if k}
        self._sessions: dict[bytes, float] = {}  # token digest -> expiry (monotonic)
        self.session_s = session_s

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def key_ok(self, key: str) -> bool:
        return bool(key) and _digest(key.strip()) in self._keys

    def login(self, key: str) -> str | None:
        """A new session token for a right key; None for a wrong one."""
        if not self.key_ok(key):
            return None
        now = time.monotonic()
        self._sessions = {t: exp for t, exp in self._sessions.items() if exp > now}
        while len(self._sessions) >= MAX_SESSIONS:  # the oldest session goes first
            del self._sessions[min(self._sessions, key=self._sessions.__getitem__)]
        token = secrets.token_urlsafe(32)
        self._sessions[_digest(token)] = now + self.session_s
        return token

    def logout(self, token: str | None) -> None:
        if token:
            self._sessions.pop(_digest(token), None)

    def authorized(self, conn: HTTPConnection) -> bool:
        scheme, _, token = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.key_ok(token):
            return True
        cookie = conn.cookies.get(COOKIE)
        if not cookie:
            return False
        expiry = self._sessions.get(_digest(cookie))
        return expiry is not None and expiry > time.monotonic()
