"""Verifying pulled ranges across worker processes gives what the serial check gives, errors included."""

from __future__ import annotations

import copy

import pytest

from tests.test_ledger_fold import IDS, NET, PARAMS, Chain, h, pay_body, receipt
from wwwserve_gateway.network.identity import NodeIdentity
from wwwserve_gateway.plugins.ledger.ops import InvalidOperation
from wwwserve_gateway.plugins.ledger.verify import PARALLEL_MIN, Verifier, verify_ops


def a_range(n: int) -> list[dict]:
    e, x = IDS[0], NodeIdentity.generate()  # e: a key the genesis funds
    chain = Chain(e)
    chain.append("join", {"grant": 100}, 1)
    for i in range(n - 1):
        chain.append("pay", pay_body(x, [receipt(x, e.node_id, h(f"r{i}"), 1, 1)]), 2 + i)
    return [op.signed for op in chain.ops]


@pytest.fixture(scope="module")
def raw() -> list[dict]:
    return a_range(PARALLEL_MIN + 50)


async def test_parallel_verification_matches_the_serial_one(raw: list[dict]) -> None:
    verifier = Verifier(PARAMS, NET, workers=2)
    try:
        parallel = await verifier.verify(raw)
    finally:
        verifier.close()
    assert [op.hash for op in parallel] == [op.hash for op in verify_ops(raw, PARAMS, NET)]


async def test_a_bad_operation_anywhere_in_the_range_is_reported(raw: list[dict]) -> None:
    tampered = copy.deepcopy(raw)
    tampered[-3]["op"]["body"]["payments"][0]["amount"] = 99  # the signature no longer matches
    verifier = Verifier(PARAMS, NET, workers=2)
    try:
        with pytest.raises(InvalidOperation):
            await verifier.verify(tampered)
    finally:
        verifier.close()
