"""Rendered configs: what wg-quick, systemd-networkd and Ansible will read."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetvpn.controller.render import KINDS, RenderError, render

HUB_KEY = "KqkHARKrDpxfjZq7B99cU1K18vq6Socu+kYOUocRZRc="
CLOUD_KEY = "hxWIM5/0EXTH6xrfdGFycohv0MYKJoJbY8JEA5r3v30="

DESIRED: dict[str, Any] = {
    "schema_version": 1,
    "node": "branch1",
    "site": "branch",
    "generated_at": "2026-11-25T17:00:00Z",
    "interface": "wg0",
    "addresses": ["10.99.0.2/16", "fd99:f1ee:7::2/64"],
    "listen_port": 51820,
    "interface_mtu": 1340,
    "interface_mtu_reason": "interface MTU 1340: the largest of its links",
    "peers": [
        {"peer": "hub", "site": "hub", "public_key": HUB_KEY,
         "endpoint": "198.19.1.11:51820", "allowed_ips": ["10.99.0.1/32", "fd99:f1ee:7::1/128"],
         "keepalive_s": 8, "keepalive_reason": "keepalive 8 s = floor((19.55 - 2) / 2)",
         "route_mtu": 1340, "route_mtu_reason": "route MTU 1340 = the interface MTU"},
        {"peer": "cloud1", "site": "cloud", "public_key": CLOUD_KEY, "endpoint": None,
         "allowed_ips": ["10.99.0.5/32"], "keepalive_s": 0, "keepalive_reason": "off",
         "route_mtu": 1264, "route_mtu_reason": "route MTU 1264 = floor16(1270)"},
    ],
}  # fmt: skip


def test_wg_quick_carries_per_peer_route_mtus_and_no_private_key(tmp_path: Path) -> None:
    ((name, text),) = render(DESIRED, "wg-quick").items()
    assert name == "wg0.conf"
    assert "MTU = 1340" in text
    assert "PostUp = ip route replace 10.99.0.5/32 dev %i mtu 1264" in text
    assert "PostUp = ip route replace fd99:f1ee:7::1/128 dev %i mtu 1340" in text
    assert "PersistentKeepalive = 8" in text and text.count("PersistentKeepalive") == 1
    assert "Endpoint = 198.19.1.11:51820" in text and text.count("Endpoint") == 1
    assert "PrivateKey" not in text
    if shutil.which("wg-quick"):  # wg-quick's own parser accepts it
        conf = tmp_path / "wg0.conf"
        conf.write_text(text)
        conf.chmod(0o600)
        stripped = subprocess.run(
            ["wg-quick", "strip", str(conf)], capture_output=True, text=True, check=True
        ).stdout
        assert stripped.count("[Peer]") == 2 and "MTU =" not in stripped


def test_networkd_files() -> None:
    files = render(DESIRED, "networkd")
    assert set(files) == {"wg0.netdev", "wg0.network"}
    assert "MTUBytes = 1340" in files["wg0.netdev"]
    assert "PrivateKeyFile = /etc/wireguard/wg0.key" in files["wg0.netdev"]
    network = files["wg0.network"]
    assert "Address = 10.99.0.2/16" in network and "Address = fd99:f1ee:7::2/64" in network
    assert "Destination = 10.99.0.5/32\nMTUBytes = 1264" in network


def test_host_vars_are_yaml_with_every_decision_and_its_reason() -> None:
    ((name, text),) = render(DESIRED, "host_vars").items()
    assert name == "branch1.yml"
    doc = yaml.safe_load(text)
    assert doc["fleetvpn_interface_mtu"] == 1340
    assert [(p["name"], p["keepalive_s"], p["route_mtu"]) for p in doc["fleetvpn_peers"]] == [
        ("hub", 8, 1340),
        ("cloud1", 0, 1264),
    ]
    assert doc["fleetvpn_peers"][1]["endpoint"] is None
    empty = yaml.safe_load(render({**DESIRED, "peers": []}, "host_vars")["branch1.yml"])
    assert empty["fleetvpn_peers"] == []


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_renders_a_node_without_peers(kind: str) -> None:
    assert all(render({**DESIRED, "peers": []}, kind).values())


# --- templates refuse, never escape-and-hope (issue 11) ----------------------------------------

INJECTED = "\n[Interface]\nPostUp = touch /tmp/owned\n#"


def _peer(**changes: Any) -> dict[str, Any]:
    return {**DESIRED, "peers": [{**DESIRED["peers"][0], **changes}, DESIRED["peers"][1]]}


HOSTILE: list[tuple[str, dict[str, Any], str]] = [
    # (case, document, the field the error must name)
    ("issue 11's scoped endpoint", _peer(endpoint=f"[fe80::1%1]:51820{INJECTED}]:51820"),
     "peers[0].endpoint"),
    ("scope id alone", _peer(endpoint="[fe80::1%eth0]:51820"), "peers[0].endpoint"),
    ("non-ASCII port", _peer(endpoint="198.19.1.11:٥١٨٢٠"), "peers[0].endpoint"),
    ("endpoint not canonical", _peer(endpoint="[FD00::1]:51820"), "peers[0].endpoint"),
    ("key --help", _peer(public_key="--help"), "peers[0].public_key"),
    ("key of 31 bytes", _peer(public_key="A" * 42 + "=="), "peers[0].public_key"),
    ("newline in a peer name", _peer(peer="hub\n[Peer]"), "peers[0].peer"),
    ("newline in a peer's site", _peer(site="hub\nPostUp = x"), "peers[0].site"),
    ("newline in a reason", _peer(keepalive_reason=f"ok{INJECTED}"), "peers[0].keepalive_reason"),
    ("U+2028 in a reason", _peer(route_mtu_reason="a\u2028PostUp = x"),
     "peers[0].route_mtu_reason"),
    ("bidi override in a reason", _peer(keepalive_reason="a\u202eb"), "peers[0].keepalive_reason"),
    ("allowed IP with a newline", _peer(allowed_ips=["10.99.0.1/32\nPostUp = x"]),
     "peers[0].allowed_ips[0]"),
    ("allowed IP with host bits", _peer(allowed_ips=["10.99.0.1/24"]), "peers[0].allowed_ips[0]"),
    ("no allowed IPs", _peer(allowed_ips=[]), "peers[0].allowed_ips"),
    ("keepalive 65535", _peer(keepalive_s=65535), "peers[0].keepalive_s"),
    ("keepalive as text", _peer(keepalive_s="25\nPostUp = x"), "peers[0].keepalive_s"),
    ("keepalive true", _peer(keepalive_s=True), "peers[0].keepalive_s"),
    ("route MTU 68", _peer(route_mtu=68), "peers[0].route_mtu"),
    ("route MTU 575", _peer(route_mtu=575), "peers[0].route_mtu"),
    ("outer fragmentation as text", _peer(outer_fragmentation="yes"),
     "peers[0].outer_fragmentation"),
    ("route MTU None", _peer(route_mtu=None), "peers[0].route_mtu"),
    ("same key twice", _peer(public_key=CLOUD_KEY), "peers[1].public_key"),
    ("newline in the node", {**DESIRED, "node": "branch1\nPostUp = x"}, "node"),
    ("path in the node", {**DESIRED, "node": "../../etc/cron.d/x"}, "node"),
    ("65-char site", {**DESIRED, "site": "s" * 64}, "site"),
    ("interface ..", {**DESIRED, "interface": ".."}, "interface"),
    ("interface with a slash", {**DESIRED, "interface": "wg0/../x"}, "interface"),
    ("address with a newline", {**DESIRED, "addresses": ["10.99.0.2/16\nPostUp = x"]},
     "addresses[0]"),
    ("interface MTU 1279 with IPv6", {**DESIRED, "interface_mtu": 1279}, "interface_mtu"),
    ("interface MTU 65535", {**DESIRED, "interface_mtu": 65535}, "interface_mtu"),
    ("listen port 0", {**DESIRED, "listen_port": 0}, "listen_port"),
    ("listen port as text", {**DESIRED, "listen_port": "51820"}, "listen_port"),
    ("reason with CR", {**DESIRED, "interface_mtu_reason": "x\rPostUp = y"},
     "interface_mtu_reason"),
    ("generated_at with a newline", {**DESIRED, "generated_at": "now\n[Peer]"}, "generated_at"),
    ("unknown schema", {**DESIRED, "schema_version": 2}, "schema_version"),
    ("missing peers", {k: v for k, v in DESIRED.items() if k != "peers"}, "peers"),
    ("peer not an object", {**DESIRED, "peers": ["hub"]}, "peers[0]"),
]  # fmt: skip


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("case", "document", "field"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_values_make_render_raise_naming_the_field(
    kind: str, case: str, document: dict[str, Any], field: str
) -> None:
    with pytest.raises(RenderError) as raised:
        render(document, kind)
    assert raised.value.field == field, case
    assert str(raised.value).startswith(f"{field}: ")
    assert "\n" not in str(raised.value)  # the message never carries the hostile line


def test_an_ipv4_only_node_may_go_below_1280() -> None:
    v4 = {**DESIRED, "addresses": ["10.99.0.2/16"], "interface_mtu": 1264,
          "peers": [DESIRED["peers"][1]]}  # fmt: skip
    assert "MTU = 1264" in render(v4, "wg-quick")["wg0.conf"]


def test_an_ipv6_route_stays_at_1280_with_tcp_mss_clamped_below_it() -> None:
    """A path under 1280 + overhead (issue 12): IPv4 routes go lower, IPv6 routes cannot (RFC
    8200), so they keep 1280 and advertise an MSS that fits the lower route MTU."""
    low = _peer(route_mtu=1232, outer_fragmentation=True)
    conf = render(low, "wg-quick")["wg0.conf"]
    assert "PostUp = ip route replace 10.99.0.1/32 dev %i mtu 1232\n" in conf
    assert "PostUp = ip route replace fd99:f1ee:7::1/128 dev %i mtu 1280 advmss 1172\n" in conf
    network = render(low, "networkd")["wg0.network"]
    assert "Destination = 10.99.0.1/32\nMTUBytes = 1232\n\n#" in network
    assert (
        "Destination = fd99:f1ee:7::1/128\nMTUBytes = 1280\nTCPAdvertisedMaximumSegmentSize = 1172"
        in network
    )
    assert "advmss" not in render(DESIRED, "wg-quick")["wg0.conf"]  # 1340: no clamp


def test_the_template_environment_refuses_any_printed_line_break() -> None:
    """A value nobody validated (a new field, a template edit) still cannot add a line."""
    from fleetvpn.controller.render import _environment

    template = _environment().from_string("Endpoint = {{ value }}\n")
    assert template.render(value="198.19.1.11:51820") == "Endpoint = 198.19.1.11:51820\n"
    for value in ("a\nb", "a\rb", "a\x0bb", "a\x85b", "a\u2028b", "a\u2029b", "a\x00b", None):
        with pytest.raises(RenderError, match=r"^template: "):
            template.render(value=value)


def test_a_reason_ending_in_a_backslash_cannot_swallow_the_next_line() -> None:
    """systemd joins a key line ending in ``\\`` with the next one (tests/lab/
    test_render_parsers.py shows it with the real networkd); render() refuses every such line,
    comments included, whatever the parser's version does with them."""
    document = _peer(route_mtu_reason="route MTU 1340 \\")
    with pytest.raises(RenderError, match=r"^wg0\.network line \d+: ends in a backslash"):
        render(document, "networkd")
    with pytest.raises(RenderError, match=r"^wg0\.conf line \d+: ends in a backslash"):
        render(document, "wg-quick")


def test_unicode_reasons_and_max_length_names_render() -> None:
    name63 = "n" + "-x" * 31
    document = {**DESIRED, "node": name63, "site": "s" * 63,
                "interface_mtu_reason": "MTU 1340 — the largest link ⇄ hub",
                "peers": [{**DESIRED["peers"][0], "peer": "p" * 63, "site": "q" * 63,
                           "endpoint": "[2001:db8::11]:51820",
                           "keepalive_reason": "NAT ⇄ 19.5 s — keepalive 8 s"},
                          {**DESIRED["peers"][1],
                           "endpoint": "hub-1.example.net:65535"}]}  # fmt: skip
    conf = render(document, "wg-quick")["wg0.conf"]
    assert "# MTU 1340 — the largest link ⇄ hub\n" in conf
    assert "Endpoint = [2001:db8::11]:51820\n" in conf
    assert "Endpoint = hub-1.example.net:65535\n" in conf
    assert set(render(document, "host_vars")) == {f"{name63}.yml"}
    doc = yaml.safe_load(render(document, "host_vars")[f"{name63}.yml"])
    assert doc["fleetvpn_peers"][0]["keepalive_reason"] == "NAT ⇄ 19.5 s — keepalive 8 s"
