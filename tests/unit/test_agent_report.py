"""Report building, the desired-state parser, and the status document (pure parts of the agent)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from fleetvpn.agent.desired import DesiredError, parse_desired
from fleetvpn.agent.probes import hello_tag
from fleetvpn.agent.report import (
    PathMtu,
    PeerObservation,
    Rtt,
    build_report,
    configured_from,
    status_document,
)
from fleetvpn.model import Configured, NatMeasurement, Report
from fleetvpn.wg.state import PeerStatus, TunnelState

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
HUB_KEY = "h" * 42 + "g="  # base64 of 32 bytes, as the grammar wants
CLOUD_KEY = "c" * 42 + "c="


def desired_doc() -> dict[str, Any]:
    return {
        "schema_version": 1, "node": "branch1", "site": "branch",
        "generated_at": "2026-01-01T12:00:00Z", "interface": "wg0",
        "addresses": ["10.99.0.6/16", "fd99::6/64"], "listen_port": 51820,
        "interface_mtu": 1340, "interface_mtu_reason": "largest link",
        "peers": [
            {"peer": "hub", "site": "hub", "public_key": HUB_KEY,
             "endpoint": "198.19.1.11:51820", "allowed_ips": ["10.99.0.5/32"],
             "keepalive_s": 8, "keepalive_reason": "branch is behind NAT",
             "route_mtu": 1340, "route_mtu_reason": "path MTU 1400 measured"},
            {"peer": "cloud1", "site": "cloud", "public_key": CLOUD_KEY, "endpoint": None,
             "allowed_ips": ["10.99.0.3/32", "fd99::3/128"], "keepalive_s": 0,
             "keepalive_reason": "off", "route_mtu": 1280, "route_mtu_reason": "unmeasured"},
        ],
    }  # fmt: skip


def test_desired_state_becomes_the_tunnel_spec_with_reasons() -> None:
    d = parse_desired(desired_doc(), interface="wg0", listen_port=51820)
    assert (d.node, d.site, d.spec.mtu, d.spec.addresses) == (
        "branch1",
        "branch",
        1340,
        ("10.99.0.6/16", "fd99::6/64"),
    )
    hub, cloud = d.spec.peers
    assert (hub.public_key, hub.endpoint, hub.keepalive_s, hub.route_mtu, hub.name) == (
        HUB_KEY,
        "198.19.1.11:51820",
        8,
        1340,
        "hub",
    )
    assert cloud.endpoint is None and cloud.allowed_ips == ("10.99.0.3/32", "fd99::3/128")
    assert d.reasons["interface_mtu"] == "largest link"
    assert d.reasons[f"{HUB_KEY}:keepalive"] == "hub: branch is behind NAT"
    assert d.reasons[f"{HUB_KEY}:route_mtu"] == "hub: path MTU 1400 measured"
    assert [p.tunnel_ipv4 for p in d.peers] == ["10.99.0.5", "10.99.0.3"]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("interface_mtu",), 40, "interface_mtu: 40 out of range"),
        (("peers", 0, "endpoint"), "nowhere", "peers[0].endpoint:"),
        (("peers", 1, "allowed_ips"), ["10.99.0.300/32"], "peers[1].allowed_ips[0]:"),
        (("peers", 0, "keepalive_s"), True, "peers[0].keepalive_s: unexpected value True"),
        (("peers", 0, "route_mtu"), "1340", "peers[0].route_mtu: unexpected value"),
        (("addresses",), ["banana"], "addresses[0]: 'banana' is not ADDRESS/PREFIX"),
    ],
)
def test_bad_desired_state_is_refused_naming_the_field(
    path: tuple[Any, ...], value: Any, message: str
) -> None:
    doc = desired_doc()
    target: Any = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(
        DesiredError, match="desired state: " + message.replace("[", r"\[").replace("]", r"\]")
    ):
        parse_desired(doc, interface="wg0", listen_port=51820)


def test_report_is_a_valid_snapshot_with_the_latest_of_everything() -> None:
    peers = [
        PeerObservation(
            name="hub", public_key=HUB_KEY, planned_endpoint="198.19.1.11:51820",
            endpoint="198.19.1.11:51820", latest_handshake=int(NOW.timestamp()) - 7,
            rx_bytes=10, tx_bytes=20,
            pmtu=PathMtu(4, 1400, False, NOW.timestamp() - 500, "forward", "exact"),
            rtt=Rtt(0.021, 0.25, 4, NOW.timestamp()),
        ),
        # a NATed peer: no endpoint planned; WireGuard learned one; the PMTU came from a
        # reverse run; IPv6 PMTU of another family than the endpoint in use is left out
        PeerObservation(
            name="cloud1", public_key=CLOUD_KEY, planned_endpoint=None,
            endpoint="198.18.2.6:40000",
            pmtu=PathMtu(6, 1300, True, NOW.timestamp(), "reverse", "exact"),
        ),
    ]  # fmt: skip
    nat = NatMeasurement(measured_at=NOW, nat=True, stateful_filter=True, mapping_lifetime_s=19.55)
    r = build_report(
        report_id="00000000-0000-0000-0000-000000000001", node="branch1", site="branch",
        created_at=NOW, peers=peers, nat=nat, configured=Configured(1340),
    )  # fmt: skip
    again = Report.from_json(json.loads(json.dumps(r.to_json())))  # what the controller parses
    assert again == r
    hub, cloud = r.measurements
    assert (hub.path_mtu, hub.rtt_s, hub.loss_ratio, hub.handshake_age_s) == (
        1400,
        0.021,
        0.25,
        7.0,
    )
    assert (cloud.family, cloud.path_mtu, cloud.handshake_age_s) == (4, None, None)
    assert r.nat == nat and r.configured.interface_mtu == 1340


def test_nat_measured_after_the_report_time_is_left_out() -> None:
    later = NatMeasurement(measured_at=datetime(2026, 1, 1, 12, 1, tzinfo=UTC), nat=False,
                           stateful_filter=False)  # fmt: skip
    r = build_report(report_id="00000000-0000-0000-0000-000000000001", node="a", site="s",
                     created_at=NOW, peers=[], nat=later, configured=Configured())  # fmt: skip
    assert r.nat is None
    Report.from_json(r.to_json())


def test_configured_is_read_back_from_the_interface() -> None:
    state = TunnelState(
        interface="wg0", public_key="x" * 43 + "=", listen_port=51820, mtu=1340,
        addresses=("10.99.0.6/16",),
        peers=(
            PeerStatus(HUB_KEY, "198.19.1.11:51820", ("10.99.0.5/32",), 8, 0, 0, 0),
            PeerStatus(CLOUD_KEY, None, ("10.99.0.3/32",), 0, 0, 0, 0),
            PeerStatus("u" * 43 + "=", None, ("10.99.0.9/32",), 0, 0, 0, 0),  # unknown: left out
        ),
        route_mtus={"10.99.0.5/32": 1340, "10.99.0.3/32": None},
    )  # fmt: skip
    c = configured_from(state, {HUB_KEY: "hub", CLOUD_KEY: "cloud1"})
    assert c.interface_mtu == 1340
    assert [(p.peer, p.route_mtu, p.keepalive_s) for p in c.peers] == [
        ("cloud1", None, 0),
        ("hub", 1340, 8),
    ]
    assert configured_from(None, {}) == Configured()


def test_status_document_has_no_secrets_and_names_every_peer() -> None:
    doc = status_document(
        node="branch1", site="branch", interface="wg0", apply=True, now=NOW,
        peers=[PeerObservation("hub", HUB_KEY, "198.19.1.11:51820")], nat=None,
        configured=Configured(1340), controller={"reachable": True}, last_apply=None,
        spool={"pending": 0}, pid=1,
    )  # fmt: skip
    text = json.dumps(doc)
    assert doc["schema_version"] == 1 and doc["peers"][0]["peer"] == "hub"
    assert "token" not in text and "private" not in text


def test_hello_tags_differ_per_key_and_are_stable() -> None:
    assert hello_tag(HUB_KEY) == hello_tag(HUB_KEY)
    assert hello_tag(HUB_KEY) != hello_tag(CLOUD_KEY)
    assert 0 <= hello_tag(HUB_KEY) < 2**64
