"""Canonical encoding of signed records: sorted-key compact JSON in UTF-8.

Two nodes that hold the same record must produce the same bytes, or signatures and hashes would
not agree: keys are sorted and no whitespace is emitted (orjson's output is deterministic).
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson


def canonical(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)


def digest(obj: Any) -> str:
    """SHA-256 of the canonical encoding, hex."""
    return hashlib.sha256(canonical(obj)).hexdigest()
