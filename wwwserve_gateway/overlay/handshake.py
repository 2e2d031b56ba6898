"""The overlay handshake, sans I/O: three messages that authenticate both nodes and agree session keys.

    initiator -> responder   hello    {t, v, id, net, nonce, ts, kx}
    responder -> initiator   welcome  {t, v, id, net, nonce, ts, kx, sig}
    initiator -> responder   finish   {t, sig}

Each message is one JSON object in one binary websocket message. `id` is the sender's node id (its
Ed25519 public key, hex), `net` the network id, `nonce` 32 fresh random bytes, `ts` the sender's clock
in unix seconds, `kx` a fresh X25519 public key for libsodium's `crypto_kx`. The responder signs the
canonical encoding of [DOMAIN, hello, welcome without sig]; the initiator signs [DOMAIN, hello,
welcome with sig]. So each signature covers the whole transcript so far (both nonces, both ephemeral
keys), a replayed message cannot complete a handshake, and nobody in the middle can swap a key.

Session keys come from `crypto_kx_client_session_keys` (initiator) and
`crypto_kx_server_session_keys` (responder): one key per direction.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nacl.bindings
import nacl.exceptions
import orjson

from wwwserve_gateway.network.canonical import canonical
from wwwserve_gateway.network.identity import InvalidSignature, NodeIdentity, verify
from wwwserve_gateway.overlay.errors import HandshakeError

# 2: stream flow control counts bytes, per stream and per connection (1 counted items).
VERSION = 2
DOMAIN = "wwwserve-overlay-handshake/1"
MAX_HANDSHAKE_BYTES = 4096
MAX_CLOCK_SKEW_S = 60
MAX_NETWORK_ID_LEN = 128

_HEX32 = re.compile(r"[0-9a-f]{64}")
_HEX64 = re.compile(r"[0-9a-f]{128}")
_GREETING_KEYS = frozenset({"t", "v", "id", "net", "nonce", "ts", "kx"})
_FINISH_KEYS = frozenset({"t", "sig"})

Clock = Callable[[], float]


@dataclass(frozen=True)
class HandshakeResult:
    """An authenticated peer and the session keys of each direction."""

    peer_id: str
    rx_key: bytes
    tx_key: bytes
    initiator: bool


def transcript(hello: dict[str, Any], welcome: dict[str, Any]) -> bytes:
    """The bytes a handshake signature covers."""
    return canonical([DOMAIN, hello, welcome])


def _load(data: bytes, expected: str) -> dict[str, Any]:
    if not isinstance(data, bytes):
        raise HandshakeError("malformed", f"{expected} is not a binary message")
    if len(data) > MAX_HANDSHAKE_BYTES:
        raise HandshakeError("oversized", f"{expected} of {len(data)} bytes")
    try:
        msg = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise HandshakeError("malformed", f"{expected} is not JSON") from None
    if not isinstance(msg, dict) or msg.get("t") != expected:
        raise HandshakeError("malformed", f"expected a {expected} message")
    return msg


def _is_hex(value: Any, pattern: re.Pattern[str]) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None


def parse_greeting(data: bytes, expected: str, network_id: str, now: float) -> dict[str, Any]:
    """A hello or welcome (without checking its signature), or HandshakeError."""
    msg = _load(data, expected)
    version = msg.get("v")
    if type(version) is not int or version != VERSION:
        raise HandshakeError("version", f"unsupported protocol version {version!r}")
    keys = _GREETING_KEYS | {"sig"} if expected == "welcome" else _GREETING_KEYS
    if set(msg) != keys:
        raise HandshakeError("malformed", f"{expected} has fields {sorted(msg)}")
    net, ts = msg["net"], msg["ts"]
    if not (
        _is_hex(msg["id"], _HEX32)
        and _is_hex(msg["nonce"], _HEX32)
        and _is_hex(msg["kx"], _HEX32)
        and isinstance(net, str)
        and 0 < len(net) <= MAX_NETWORK_ID_LEN
        and type(ts) is int
        and (expected == "hello" or _is_hex(msg["sig"], _HEX64))
    ):
        raise HandshakeError("malformed", f"{expected} has a field of the wrong type or length")
    if net != network_id:
        raise HandshakeError("wrong_network", f"peer is on network {net[:16]}, not {network_id[:16]}")
    if abs(ts - now) > MAX_CLOCK_SKEW_S:
        raise HandshakeError("stale", f"peer clock is {ts - now:+.0f} s off (limit {MAX_CLOCK_SKEW_S} s)")
    return msg


def parse_finish(data: bytes) -> dict[str, Any]:
    msg = _load(data, "finish")
    if set(msg) != _FINISH_KEYS or not _is_hex(msg["sig"], _HEX64):
        raise HandshakeError("malformed", "finish is {t, sig}")
    return msg


def _check_signature(node_id: str, signed: bytes, sig_hex: str) -> None:
    try:
        verify(node_id, signed, bytes.fromhex(sig_hex))
    except InvalidSignature:
        raise HandshakeError("bad_signature", f"transcript not signed by {node_id[:16]}") from None


def _greeting(kind: str, identity: NodeIdentity, network_id: str, kx_public: bytes, now: float) -> dict:
    return {
        "t": kind,
        "v": VERSION,
        "id": identity.node_id,
        "net": network_id,
        "nonce": os.urandom(32).hex(),
        "ts": int(now),
        "kx": kx_public.hex(),
    }


class Initiator:
    """The dialling side: hello(), then on_welcome() gives the finish message and the result."""

    def __init__(
        self,
        identity: NodeIdentity,
        network_id: str,
        *,
        expected_id: str | None = None,
        clock: Clock = time.time,
    ) -> None:
        self.identity = identity
        self.network_id = network_id
        self.expected_id = expected_id
        self.clock = clock
        self._kx_public, self._kx_secret = nacl.bindings.crypto_kx_keypair()
        self.hello_msg = _greeting("hello", identity, network_id, self._kx_public, clock())
        self.peer_id: str | None = None

    def hello(self) -> bytes:
        return orjson.dumps(self.hello_msg)

    def on_welcome(self, data: bytes) -> tuple[bytes, HandshakeResult]:
        welcome = parse_greeting(data, "welcome", self.network_id, self.clock())
        peer_id = welcome["id"]
        if peer_id == self.identity.node_id:
            raise HandshakeError("self", "dialled our own node")
        if self.expected_id is not None and peer_id != self.expected_id:
            raise HandshakeError("identity_mismatch", f"expected {self.expected_id[:16]}, got {peer_id[:16]}")
        unsigned = {k: v for k, v in welcome.items() if k != "sig"}
        _check_signature(peer_id, transcript(self.hello_msg, unsigned), welcome["sig"])
        self.peer_id = peer_id
        sig = self.identity.sign(transcript(self.hello_msg, welcome))
        try:
            rx, tx = nacl.bindings.crypto_kx_client_session_keys(
                self._kx_public, self._kx_secret, bytes.fromhex(welcome["kx"])
            )
        except nacl.exceptions.CryptoError:
            raise HandshakeError("malformed", "unusable key-exchange public key") from None
        finish = orjson.dumps({"t": "finish", "sig": sig.hex()})
        return finish, HandshakeResult(peer_id, rx, tx, initiator=True)


class Responder:
    """The accepting side: on_hello() gives the welcome, on_finish() authenticates the initiator."""

    def __init__(self, identity: NodeIdentity, network_id: str, *, clock: Clock = time.time) -> None:
        self.identity = identity
        self.network_id = network_id
        self.clock = clock
        self._kx_public, self._kx_secret = nacl.bindings.crypto_kx_keypair()
        self.hello_msg: dict[str, Any] | None = None
        self.welcome_msg: dict[str, Any] | None = None

    def on_hello(self, data: bytes) -> bytes:
        hello = parse_greeting(data, "hello", self.network_id, self.clock())
        if hello["id"] == self.identity.node_id:
            raise HandshakeError("self", "a hello from our own node id")
        welcome = _greeting("welcome", self.identity, self.network_id, self._kx_public, self.clock())
        welcome["sig"] = self.identity.sign(transcript(hello, welcome)).hex()
        self.hello_msg, self.welcome_msg = hello, welcome
        return orjson.dumps(welcome)

    def on_finish(self, data: bytes) -> HandshakeResult:
        if self.hello_msg is None or self.welcome_msg is None:
            raise HandshakeError("malformed", "finish before hello")
        finish = parse_finish(data)
        peer_id = self.hello_msg["id"]
        _check_signature(peer_id, transcript(self.hello_msg, self.welcome_msg), finish["sig"])
        try:
            rx, tx = nacl.bindings.crypto_kx_server_session_keys(
                self._kx_public, self._kx_secret, bytes.fromhex(self.hello_msg["kx"])
            )
        except nacl.exceptions.CryptoError:
            raise HandshakeError("malformed", "unusable key-exchange public key") from None
        return HandshakeResult(peer_id, rx, tx, initiator=False)
