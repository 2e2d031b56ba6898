"""Receipts: signing, checking, the header encoding, and the cache of verified signatures."""

from __future__ import annotations

import copy

import pytest

from wwwserve_gateway.network import identity, receipts
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.network.receipts import (
    InvalidReceipt,
    check_receipt,
    decode_receipt,
    encode_receipt,
    sign_receipt,
)

EXECUTOR, ENTRY = NodeIdentity.generate(), NodeIdentity.generate()
NET = "ab" * 32


def make(tokens: int = 7, net: str = NET) -> dict:
    return sign_receipt(
        EXECUTOR,
        net=net,
        entry=ENTRY.node_id,
        request="a" * 64,
        response="b" * 64,
        model="m",
        prompt_tokens=3,
        completion_tokens=tokens,
        started=1.0,
        finished=2.0,
    )


def test_a_receipt_round_trips_through_the_header() -> None:
    record = make()
    assert check_receipt(decode_receipt(encode_receipt(record)), NET) == record["body"]


def test_the_cache_never_accepts_a_changed_body_under_a_known_signature() -> None:
    record = make()
    check_receipt(record, NET)  # cached now (it was signed here, and checked)
    forged = copy.deepcopy(record)
    forged["body"]["completion_tokens"] = 70_000
    with pytest.raises(InvalidReceipt, match="signature"):
        check_receipt(forged, NET)
    other = NodeIdentity.generate()
    stolen = copy.deepcopy(record)
    stolen["body"]["id"] = other.node_id  # same sig, claimed by another node
    with pytest.raises(InvalidReceipt):
        check_receipt(stolen, NET)


def test_a_receipt_from_elsewhere_is_verified_then_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    record = make(tokens=9)
    receipts.VERIFIED.clear()  # as if it came from another process
    calls = []
    real_verify = identity.verify
    monkeypatch.setattr(identity, "verify", lambda *a: calls.append(a) or real_verify(*a))
    check_receipt(record, NET)
    check_receipt(copy.deepcopy(record), NET)
    assert len(calls) == 1


def test_malformed_records_are_refused() -> None:
    record = make()
    for bad in ({}, {"body": record["body"]}, {"body": "x", "sig": record["sig"]}, {**record, "sig": "zz"}):
        with pytest.raises(InvalidReceipt):
            check_receipt(bad, NET)
    huge = copy.deepcopy(record)
    huge["body"]["prompt_tokens"] = 2**70
    with pytest.raises(InvalidReceipt):
        check_receipt(huge, NET)


def test_a_receipt_of_another_network_is_refused() -> None:
    with pytest.raises(InvalidReceipt, match="another network"):
        check_receipt(make(net="cd" * 32), NET)
