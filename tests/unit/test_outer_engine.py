"""The outer-packet fates of design.md, one case per documented fact (kernel side held here:
the lab has no kernel WireGuard)."""

from __future__ import annotations

import pytest

from fleetvpn.engines.outer import outer_fate


def test_fits_is_delivered() -> None:
    v = outer_fate("userspace", 4, outer_size=1340, route_mtu=1500, path_mtu=1400)
    assert (v.fate, v.health_state) == ("delivered", "ok")


def test_wireguard_go_ipv4_sets_df_black_hole() -> None:
    v = outer_fate("userspace", 4, outer_size=1404, route_mtu=1500, path_mtu=1400)
    assert (v.fate, v.health_state) == ("black_hole", "blackhole")
    assert "IP_PMTUDISC_WANT" in v.reason


def test_kernel_ipv4_never_sets_df_routers_fragment() -> None:
    v = outer_fate("kernel", 4, outer_size=1404, route_mtu=1500, path_mtu=1400)
    assert (v.fate, v.health_state) == ("fragmented", "fragmenting")
    assert "socket.c:84-87" in v.reason
    dropped = outer_fate(
        "kernel", 4, outer_size=1404, route_mtu=1500, path_mtu=1400, fragments_cross=False
    )
    assert dropped.fate == "black_hole" and "drops fragments" in dropped.reason


@pytest.mark.parametrize("implementation", ["kernel", "userspace"])
def test_ipv6_too_big_for_the_path_is_a_black_hole(implementation: str) -> None:
    v = outer_fate(implementation, 6, outer_size=1360, route_mtu=1500, path_mtu=1300)  # type: ignore[arg-type]
    assert v.fate == "black_hole" and "never fragment IPv6" in v.reason


def test_kernel_ipv6_fragments_at_the_source_at_the_route_mtu() -> None:
    """The outer-fragmentation fix (item 3): the endpoint's route MTU set to the path MTU."""
    v = outer_fate("kernel", 6, outer_size=1360, route_mtu=1300, path_mtu=1300)
    assert v.fate == "fragmented" and "ip6_fragment" in v.reason
    # a route MTU still above the path: the fragments themselves are too big
    assert outer_fate("kernel", 6, outer_size=1500, route_mtu=1400, path_mtu=1300).fate == (
        "black_hole"
    )


def test_locked_route_clears_df_for_wireguard_go_ipv4() -> None:
    v = outer_fate(
        "userspace", 4, outer_size=1404, route_mtu=1500, path_mtu=1400, route_locked=True
    )
    assert v.fate == "fragmented"


def test_wireguard_go_fix_is_safe_without_gso_and_loses_gso_batches() -> None:
    single = outer_fate("userspace", 6, outer_size=1360, route_mtu=1300, path_mtu=1300)
    assert single.fate == "fragmented"
    batch = outer_fate(
        "userspace", 6, outer_size=1360, route_mtu=1300, path_mtu=1300, gso_batch=True
    )
    assert (batch.fate, batch.health_state) == ("refused", "blackhole")
    assert "EMSGSIZE" in batch.reason and "EIO" in batch.reason
    # the kernel has no such batch: its fix is safe
    kernel = outer_fate("kernel", 6, outer_size=1360, route_mtu=1300, path_mtu=1300, gso_batch=True)
    assert kernel.fate == "fragmented"


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        outer_fate("kernel", 5, outer_size=1, route_mtu=1, path_mtu=1)
    with pytest.raises(ValueError):
        outer_fate("boringtun", 4, outer_size=1, route_mtu=1, path_mtu=1)  # type: ignore[arg-type]
