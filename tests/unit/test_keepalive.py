"""The keepalive rule (fleetvpn.engines.keepalive), shared by the NAT engine and the controller."""

from __future__ import annotations

import pytest

from fleetvpn.engines import keepalive, natlife
from fleetvpn.engines.keepalive import DEFAULT_KEEPALIVE_S, keepalive_for


@pytest.mark.parametrize(
    ("lifetime_s", "keepalive_s"),
    [(20, 9), (30, 13), (120, 54), (10, 4), (60, 27), (300, 135), (29.6, 13), (3, 0 + 1)],
)
def test_keepalive_rule(lifetime_s: float, keepalive_s: int) -> None:
    value, reason = keepalive_for(lifetime_s, nat=True, stateful_filter=False)
    assert value == keepalive_s
    assert "NAT" in reason


def test_keepalive_off_without_nat_or_filter() -> None:
    assert keepalive_for(30, nat=False, stateful_filter=False)[0] == 0
    assert keepalive_for(None, nat=False, stateful_filter=False) == (
        0,
        "no NAT and no stateful filter: nothing expires, keepalive off",
    )
    assert keepalive_for(30, nat=False, stateful_filter=True)[0] == 13


def test_keepalive_default_when_nothing_expired() -> None:
    value, reason = keepalive_for(None, nat=True, stateful_filter=False, lower_bound_s=300)
    assert value == 25 and "no mapping expired within 300 s" in reason
    assert keepalive_for(None, nat=True, stateful_filter=False, lower_bound_s=40)[0] == 18
    assert keepalive_for(None, nat=True, stateful_filter=False, default_s=1)[0] == 5
    assert keepalive_for(None, nat=True, stateful_filter=False, default_s=600)[0] == 120


def test_keepalive_reasons_and_the_wg_ceiling() -> None:
    assert keepalive_for(30, nat=True, stateful_filter=True)[1] == (
        "keepalive 13 s = floor((30 - 3) / 2): NAT mapping lifetime 30 s, margin max(2 s, T/10), "
        "survives one lost keepalive"
    )
    assert keepalive_for(None, nat=False, stateful_filter=True)[1] == (
        "stateful filter present, lifetime unknown: default keepalive 25 s"
    )
    assert keepalive_for(None, nat=True, stateful_filter=False, lower_bound_s=300)[1].endswith(
        "keepalive 25 s, the default"
    )
    assert keepalive_for(10**6, nat=True, stateful_filter=False)[0] == 65535  # wg(8) maximum


def test_natlife_still_exports_the_rule() -> None:
    # The adapter and the controller import it from natlife, where it used to live.
    assert natlife.keepalive_for is keepalive.keepalive_for
    assert natlife.DEFAULT_KEEPALIVE_S == DEFAULT_KEEPALIVE_S == 25
