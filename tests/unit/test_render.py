"""Rendered configs: what wg-quick, systemd-networkd and Ansible will read."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from fleetvpn.controller.render import KINDS, render

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
        {"peer": "hub", "site": "hub", "public_key": "h" * 43 + "=",
         "endpoint": "198.19.1.11:51820", "allowed_ips": ["10.99.0.1/32", "fd99:f1ee:7::1/128"],
         "keepalive_s": 8, "keepalive_reason": "keepalive 8 s = floor((19.55 - 2) / 2)",
         "route_mtu": 1340, "route_mtu_reason": "route MTU 1340 = the interface MTU"},
        {"peer": "cloud1", "site": "cloud", "public_key": "c" * 43 + "=", "endpoint": None,
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
