"""A node's identity: an Ed25519 key pair kept in its data dir. The node id is the public key (hex).

The id is self-certifying: anyone holding a record signed by a node can check the signature
against the id alone, with no directory. Providers are known to the network only by it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import nacl.exceptions
import nacl.signing

from wwwserve_gateway.network.canonical import canonical

KEY_FILE = "identity.key"
# bytes.fromhex also takes upper case and spaces: one key must have exactly one id string.
NODE_ID = re.compile(r"[0-9a-f]{64}")


class InvalidSignature(Exception):
    pass


class NodeIdentity:
    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self.signing_key = signing_key
        self.node_id = signing_key.verify_key.encode().hex()

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def load_or_create(cls, data_dir: Path) -> NodeIdentity:
        """The key in `data_dir`, created on first start with owner-only permissions."""
        path = data_dir / KEY_FILE
        if path.exists():
            return cls.load(path)
        data_dir.mkdir(parents=True, exist_ok=True)
        identity = cls.generate()
        identity.save(path)
        return identity

    @classmethod
    def load(cls, path: Path) -> NodeIdentity:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{path} is readable by others (mode {mode:o}); run: chmod 600 {path}")
        seed = bytes.fromhex(path.read_text().strip())
        return cls(nacl.signing.SigningKey(seed))

    def save(self, path: Path) -> None:
        # Created 0600 from the start: the key is never readable by others, even briefly.
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(bytes(self.signing_key).hex() + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def sign(self, data: bytes) -> bytes:
        return self.signing_key.sign(data).signature

    def sign_record(self, body: dict[str, Any]) -> dict[str, Any]:
        """A record as relayed and stored: the body (whose `id` is the author) and its signature."""
        if body.get("id") != self.node_id:
            raise ValueError("a record's id must be its author's node id")
        return {"body": body, "sig": self.sign(canonical(body)).hex()}


def verify(node_id: str, data: bytes, signature: bytes) -> None:
    """Raise InvalidSignature unless `signature` is `node_id`'s signature of `data`."""
    if not isinstance(node_id, str) or not NODE_ID.fullmatch(node_id):
        raise InvalidSignature("a node id is 64 lowercase hex characters")
    try:
        key = nacl.signing.VerifyKey(bytes.fromhex(node_id))
        key.verify(data, signature)
    except (ValueError, TypeError, nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError) as exc:
        raise InvalidSignature(f"bad signature for {node_id[:16]}: {exc}") from None


class VerifiedSignatures:
    """Signatures verified in this process, each with the exact canonical body it signs: checking a
    record again is then a byte comparison instead of an Ed25519 check (about 80 us). Bounded; a
    changed body never matches."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._by_sig: dict[str, bytes] = {}

    def holds(self, sig: str, encoded: bytes) -> bool:
        return self._by_sig.get(sig) == encoded

    def add(self, sig: str, encoded: bytes) -> None:
        if len(self._by_sig) >= self.size:
            self._by_sig.clear()  # simpler than LRU, and safe across threads (single dict operations)
        self._by_sig[sig] = encoded

    def clear(self) -> None:
        self._by_sig.clear()


def verify_record(record: Any, known: VerifiedSignatures | None = None) -> dict[str, Any]:
    """The body of a signed record, after checking its shape and its author's signature (skipped
    for a signature `known` to be verified over exactly this body; a verified one is added)."""
    if not isinstance(record, dict) or set(record) != {"body", "sig"}:
        raise InvalidSignature("a signed record is {body, sig}")
    body, sig = record["body"], record["sig"]
    if not isinstance(body, dict) or not isinstance(body.get("id"), str) or not isinstance(sig, str):
        raise InvalidSignature("malformed signed record")
    try:
        encoded = canonical(body)
    except TypeError as exc:  # orjson: an integer beyond 64 bits, for one
        raise InvalidSignature(f"unencodable record: {exc}") from None
    if known is not None and known.holds(sig, encoded):
        return body
    try:
        signature = bytes.fromhex(sig)
    except ValueError:
        raise InvalidSignature("signature is not hex") from None
    verify(body["id"], encoded, signature)
    if known is not None:
        known.add(sig, encoded)
    return body
