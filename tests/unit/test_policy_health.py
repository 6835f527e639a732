"""Link health: each state from the latest report, its age, configured vs recommended values."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleetvpn.controller.policy import (
    REJECT_AFTER_TIME_S,
    STALE_AFTER_S,
    classify_direction,
    classify_link,
)
from fleetvpn.model import (
    Configured,
    ConfiguredPeer,
    LinkHealth,
    LinkMeasurement,
    Report,
    StoredReport,
)

NOW = datetime(2024, 5, 1, 12, tzinfo=UTC)


def stored(
    report_age_s: float = 10.0,
    interface_mtu: int | None = 1340,
    route_mtu: int | None = None,
    keepalive_s: int = 13,
    implementation: Any = None,
    outer_fragmentation: bool = False,
    family: Any = 4,
    **measurement: Any,
) -> StoredReport:
    fields: dict[str, Any] = {
        "path_mtu": 1400,
        "handshake_age_s": 20.0,
        "loss_ratio": 0.0,
        "rtt_s": 0.02,
        "endpoint": "198.18.0.1:51820",
    } | measurement
    if family == 6:
        fields["endpoint"] = "[2001:2::1]:51820"
    m = LinkMeasurement(peer="hub", family=family, rx_bytes=1, tx_bytes=1, **fields)
    received_at = NOW - timedelta(seconds=report_age_s)
    report = Report(
        report_id="0b9e3b5c-1f3e-4c1a-9d2e-2b7d8f0c1a22",
        node="branch1",
        site="office",
        created_at=received_at,
        measurements=(m,),
        configured=Configured(
            interface_mtu,
            (ConfiguredPeer("hub", route_mtu, keepalive_s, outer_fragmentation),),
            implementation,
        ),
    )
    return StoredReport(received_at, report)


def health(s: StoredReport | None, **kwargs: Any) -> LinkHealth:
    defaults: dict[str, Any] = {
        "recommended_route_mtu": 1340,
        "recommended_keepalive_s": 13,
        "mapping_lifetime_s": 30.0,
    }
    return classify_direction("branch1", "hub", s, now=NOW, **(defaults | kwargs))


def test_ok() -> None:
    h = health(stored())
    assert (h.node, h.peer, h.state) == ("branch1", "hub", "ok")
    assert h.reason == "ok: handshake 30 s ago, RTT 20 ms, loss 0.0%, path MTU 1400"


def test_down_without_a_report() -> None:
    h = health(None)
    assert (h.state, h.reason) == ("down", "down: no report from branch1")


def test_down_when_the_handshake_is_older_than_reject_after_time() -> None:
    h = health(stored(handshake_age_s=REJECT_AFTER_TIME_S))  # + 10 s of report age
    assert h.state == "down"
    assert "last handshake 190 s ago (> 180 s, REJECT_AFTER_TIME): no valid session" in h.reason
    never = health(stored(handshake_age_s=None))
    assert (never.state, never.reason) == ("down", "down: no handshake between branch1 and hub yet")


def test_stale_when_the_report_is_old() -> None:
    h = health(stored(report_age_s=STALE_AFTER_S + 1, handshake_age_s=5000))
    assert h.state == "stale"  # stale wins: an old handshake age says nothing about now
    assert "last report from branch1 301 s ago (> 300 s)" in h.reason


def test_blackhole_when_configured_packets_exceed_the_path_and_no_icmp_comes_back() -> None:
    h = health(stored(interface_mtu=1420))
    assert h.state == "blackhole"
    assert h.reason == (
        "blackhole: configured MTU 1420 sends up to 1480 bytes (padding and +60 overhead) into "
        "a path MTU of 1400 and no ICMP was seen: packets above 1340 bytes vanish"
    )


def test_the_padding_black_hole_from_design_md() -> None:
    # interface 1420, route 1329: 1329 pads to 1344 + 60 = 1404 > 1400
    assert health(stored(interface_mtu=1420, route_mtu=1329)).state == "blackhole"
    assert health(stored(interface_mtu=1420, route_mtu=1328)).state == "ok"


def test_kernel_wireguard_over_ipv4_fragments_where_wireguard_go_black_holes() -> None:
    """Item 9: the same settings on the same path, per implementation (design.md)."""
    too_big = {"interface_mtu": 1420, "path_mtu": 1400}
    go = health(stored(implementation="userspace", **too_big))
    assert go.state == "blackhole"
    assert "no ICMP was seen: packets above 1340 bytes vanish" in go.reason
    kernel = health(stored(implementation="kernel", **too_big))
    assert kernel.state == "fragmenting"
    assert "kernel WireGuard never sets DF on IPv4" in kernel.reason
    assert "routers fragment 1480 for the 1400 path" in kernel.reason
    # the prober saw fragments dropped on this path: kernel WireGuard black-holes too
    dropped = health(stored(implementation="kernel", fragments_cross=False, **too_big))
    assert dropped.state == "blackhole" and "this path drops fragments" in dropped.reason
    # over IPv6 routers never fragment, kernel or not
    v6 = health(stored(implementation="kernel", family=6, interface_mtu=1420, path_mtu=1400))
    assert v6.state == "blackhole" and "routers never fragment IPv6" in v6.reason
    # an agent too old to say which: as before (the lab's wireguard-go)
    assert health(stored(**too_big)).state == "blackhole"


def test_a_path_below_1340_fragments_ipv6_outside_and_is_not_a_blackhole() -> None:
    """Item 3: 1300-byte path, IPv4 routes at 1232, IPv6 at 1280 with the endpoint's route
    locked by the agent (wireguard-go): every packet arrives, IPv6 ones above 1232 in
    fragments."""
    below = {"interface_mtu": 1280, "route_mtu": 1232, "path_mtu": 1300}
    h = health(stored(implementation="userspace", outer_fragmentation=True, **below),
               recommended_route_mtu=1232)  # fmt: skip
    assert h.state == "fragmenting", h.reason
    assert "IPv4 inside fits (route MTU 1232: up to 1292 bytes into a path MTU of 1300)" in h.reason
    assert "TCP aside (MSS clamped to 1172)" in h.reason
    assert "a locked route MTU clears DF" not in h.reason  # fits its locked route: no local frag
    assert "routers fragment 1340 for the 1300 path" in h.reason
    # fragments do not cross this path: the IPv6 part is a black hole, and it says why
    lost = health(
        stored(implementation="userspace", outer_fragmentation=True, fragments_cross=False,
               **below),
        recommended_route_mtu=1232,
    )  # fmt: skip
    assert lost.state == "blackhole" and "this path drops fragments" in lost.reason
    # the same routes without the endpoint's route locked: IPv4 fits, and nothing claims more
    assert health(stored(**below), recommended_route_mtu=1232).state == "ok"
    # fragmenting and lossy: degraded, both said
    both = health(
        stored(implementation="userspace", outer_fragmentation=True, loss_ratio=0.1, **below),
        recommended_route_mtu=1232,
    )
    assert both.state == "degraded" and "loss 10.0%" in both.reason and "IPv6 inside" in both.reason


def test_too_big_with_icmp_seen_is_degraded_not_blackhole() -> None:
    h = health(stored(interface_mtu=1420, icmp_seen=True))
    assert h.state == "degraded"
    assert "ICMP seen, so big packets rely on PMTU discovery" in h.reason


@pytest.mark.parametrize(
    ("kwargs", "advice", "words"),
    [
        ({"loss_ratio": 0.05}, {}, "loss 5.0% (> 2%)"),
        ({"interface_mtu": 1280}, {"recommended_route_mtu": 1420},
         "MTU 1280 configured, 1420 recommended (> 100 bytes unused per packet)"),
        ({"keepalive_s": 45}, {},
         "keepalive 45 s is above the site's mapping lifetime 30 s: hub cannot reach branch1"),
        ({"keepalive_s": 0}, {}, "keepalive off, 13 s recommended (NAT)"),
    ],
)  # fmt: skip
def test_degraded(kwargs: dict[str, Any], advice: dict[str, Any], words: str) -> None:
    h = health(stored(**kwargs), **advice)
    assert h.state == "degraded"
    assert words in h.reason


def test_degraded_lists_every_cause() -> None:
    h = health(stored(loss_ratio=0.1, keepalive_s=45))
    assert h.reason.startswith("degraded: loss 10.0%")
    assert "; keepalive 45 s" in h.reason


def test_small_mtu_shortfalls_and_public_nodes_are_fine() -> None:
    assert health(stored(interface_mtu=1300)).state == "ok"  # 40 bytes below: tolerated
    public = health(stored(keepalive_s=0), recommended_keepalive_s=0, mapping_lifetime_s=None)
    assert public.state == "ok"


def test_unmeasured() -> None:
    h = health(stored(path_mtu=None))
    assert (h.state, h.reason) == (
        "unmeasured",
        "unmeasured: path MTU branch1→hub not measured yet",
    )
    other = classify_direction("branch1", "dc9", stored(), now=NOW)
    assert (other.state, other.reason) == (
        "unmeasured",
        "unmeasured: branch1's report has no measurement of dc9",
    )


def test_a_link_shows_the_worse_direction_with_both_reasons() -> None:
    ok = health(stored())
    bad = LinkHealth("hub", "branch1", "blackhole", "blackhole: …")
    row = classify_link(ok, bad)
    assert (row.node, row.peer, row.state) == ("branch1", "hub", "blackhole")
    assert row.reason.startswith("branch1→hub ok: ")
    assert "; hub→branch1 blackhole: …" in row.reason
    assert classify_link(bad, LinkHealth("branch1", "hub", "down", "down: x")).state == "down"
