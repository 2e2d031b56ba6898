"""An executor's memory of unpaid receipts (delegation/debtors.py), on a clock the test moves."""

from __future__ import annotations

from wwwserve_gateway.delegation.debtors import Debtors


def test_only_receipts_past_the_grace_period_count_and_payments_clear_them() -> None:
    now = [0.0]
    paid: set[str] = set()
    looked_up: list[str] = []

    def is_paid(entry: str, request: str) -> bool:
        looked_up.append(request)
        return request in paid

    debtors = Debtors(is_paid, grace_s=10.0, max_defaults=2, clock=lambda: now[0])
    for i in range(4):
        debtors.issued("e", f"r{i}")
        now[0] += 1.0
    assert debtors.defaults("e") == 0 and looked_up == []  # nothing due yet: nothing looked up
    now[0] = 12.5  # r0..r2 are due
    assert debtors.defaults("e") == 3 and debtors.refuses("e")
    assert debtors.defaults("other") == 0
    paid.update({"r0", "r2"})
    assert debtors.defaults("e") == 1 and not debtors.refuses("e")
    looked_up.clear()
    paid.update({"r1", "r3"})
    now[0] = 100.0
    assert debtors.defaults("e") == 0
    assert looked_up == ["r1", "r3"]  # paid ones were forgotten, not looked up again
    assert debtors.defaults("e") == 0
