"""The collection without a lab: its filters (pure), its packaging (the wheel carries roles/ as
they are, and ansible finds the collection from the install alone), its documentation."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
COLLECTION = REPO / "ansible_collections/fleetvpn/fleet"
BIN = Path(sys.executable).parent


def load(relative: str) -> ModuleType:
    path = COLLECTION / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tunnel = load("plugins/filter/tunnel.py")
grammar_filters = load("plugins/filter/grammar.py")
fleet = load("plugins/filter/fleet.py")
inventory = load("plugins/inventory/controller.py")

KEYS = [  # wg genkey | wg pubkey
    "KqkHARKrDpxfjZq7B99cU1K18vq6Socu+kYOUocRZRc=",
    "hxWIM5/0EXTH6xrfdGFycohv0MYKJoJbY8JEA5r3v30=",
    "+KT4j05vB0bxPHQeK92OrapJkq+d3QxV3fBDyNnbLlM=",
    "XtWGBQV4aSlRiS3VfcG00Pimms6VkCo+skbf/qwYYGc=",
]

DESIRED = {
    "interface": "wg0",
    "listen_port": 51820,
    "addresses": ["10.99.0.2/16"],
    "interface_mtu": 1340,
    "interface_mtu_reason": "measured",
    "peers": [
        {"peer": "hub", "public_key": KEYS[0], "endpoint": "198.19.1.11:51820",
         "allowed_ips": ["10.99.0.1/32"], "keepalive_s": 8, "keepalive_reason": "NAT 20 s",
         "route_mtu": 1340, "route_mtu_reason": "path MTU 1400"},
    ],
}  # fmt: skip


def test_fixed_settings_replace_recommendations_and_say_so() -> None:
    fixed = tunnel.fixed_settings(DESIRED, 1420, 25)
    assert fixed["interface_mtu"] == 1420
    assert "fleetvpn_wireguard_mtu" in fixed["interface_mtu_reason"]
    (peer,) = fixed["peers"]
    assert (peer["keepalive_s"], peer["route_mtu"]) == (25, None)
    assert "fixed at 25 s" in peer["keepalive_reason"]
    assert DESIRED["peers"][0]["keepalive_s"] == 8  # the input is not modified
    assert tunnel.fixed_settings(DESIRED, None, None) == DESIRED


def test_inventory_peers_follow_the_controllers_rule() -> None:
    key = "fleetvpn__wireguard_self"
    hostvars: dict[str, dict[str, Any]] = {
        "hub": {key: {"endpoint": "198.51.100.1:51820", "addresses": ["10.9.0.1/24"],
                      "public_key": KEYS[0]}},
        "b1": {key: {"endpoint": "", "addresses": ["10.9.0.2/24"], "public_key": KEYS[1]}},
        "b2": {key: {"endpoint": "", "addresses": ["10.9.0.3/24"], "public_key": KEYS[2]}},
    }  # fmt: skip
    hosts = list(hostvars)
    b1 = tunnel.inventory_peers(hostvars, hosts, "b1", 13)
    # Two NATed nodes never peer directly; the NATed side keeps the mapping open.
    assert [(p["peer"], p["keepalive_s"], p["allowed_ips"]) for p in b1] == [
        ("hub", 13, ["10.9.0.1/32"])
    ]
    hub = tunnel.inventory_peers(hostvars, hosts, "hub", 13)
    assert [(p["peer"], p["keepalive_s"], p["endpoint"]) for p in hub] == [
        ("b1", 0, None),
        ("b2", 0, None),
    ]
    del hostvars["hub"][key]
    with pytest.raises(Exception, match="hub has no public key"):
        tunnel.inventory_peers(hostvars, hosts, "b1", 13)


def _link(a: str, b: str, state: str) -> dict[str, Any]:
    def direction(node: str, peer: str) -> dict[str, Any]:
        return {"node": node, "peer": peer, "state": state, "reason": f"{node}→{peer} {state}",
                "path_mtu": 1400, "icmp_seen": False, "rtt_s": 0.001, "loss_ratio": 0.0,
                "handshake_age_s": 5, "configured_mtu": 1420, "recommended_mtu": 1340,
                "mtu_reason": "m", "configured_keepalive_s": 25, "recommended_keepalive_s": 8,
                "keepalive_reason": "k"}  # fmt: skip

    return {"a": a, "b": b, "site_a": "x", "site_b": "y", "state": state,
            "reason": f"{a}↔{b} {state}",
            "a_to_b": direction(a, b), "b_to_a": direction(b, a)}  # fmt: skip


def test_health_lines_and_problems() -> None:
    doc = {"links": [_link("b1", "hub", "blackhole"), _link("c1", "hub", "ok")],
           "summary": {"blackhole": 1, "ok": 1}, "sites": []}  # fmt: skip
    lines = fleet.health_lines(doc)
    assert lines[0].startswith("b1 (x) ↔ hub (y): blackhole")
    assert "MTU 1420→1340, keepalive 25 s→8 s" in lines[0]
    assert lines[-1] == "2 links: 1 blackhole, 1 ok"
    assert fleet.health_problems(doc, ["ok"]) == ["b1 ↔ hub: blackhole"]
    assert fleet.health_problems(doc, ["ok", "blackhole"]) == []
    states = inventory.node_states(doc["links"])
    assert states == {"b1": "blackhole", "hub": "blackhole", "c1": "ok"}
    per_node = inventory.node_links(doc["links"])
    assert per_node["b1"]["hub"]["recommended_keepalive_s"] == 8


def test_inventory_reads_health_page_by_page(tmp_path: Path) -> None:
    """Against the real controller over HTTP: every link, in order, in pages of the size asked,
    the same document as the whole one; a cursor that does not move is an error, not a loop."""
    from fleetvpn.controller.store import Store

    from ..unit.apiutil import Server, bearer, enroll

    store = Store.open(f"sqlite+pysqlite:///{tmp_path / 'controller.db'}")
    try:
        with Server(store) as api:
            admin = store.create_admin_token()
            nodes = [("hub", "core"), ("b1", "branch"), ("b2", "branch"), ("b3", "edge")]
            for i, (node, site) in enumerate(nodes):
                key = KEYS[i]
                enroll(api, admin, node, site, key=key, endpoint=f"198.19.1.{i + 1}:51820")
            asked: list[str] = []

            def get(path: str) -> Any:
                asked.append(path)
                r = api.get(path, headers=bearer(admin))
                assert r.status_code == 200, r.text
                return r.json()

            whole = get("/v1/health")
            assert len(whole["links"]) == 6
            asked.clear()
            paged = inventory.fetch_health(get, 4)
            assert asked == ["/v1/health?limit=4", "/v1/health?limit=4&after=b2%2Cb3"]
            assert paged["links"] == whole["links"] and paged["sites"] == whole["sites"]
            assert paged["next_after"] is None
            asked.clear()
            assert inventory.fetch_health(get, 1000)["links"] == whole["links"]
            assert len(asked) == 1
    finally:
        store.close()
    stuck = {"links": [], "next_after": "a,b"}
    with pytest.raises(Exception, match="same cursor again"):
        inventory.fetch_health(lambda path: stuck, 10)


def test_tune_lines() -> None:
    change = {"node": "b1", "peer": "hub", "setting": "keepalive_s", "current": 25,
              "recommended": 0, "reason": "public"}  # fmt: skip
    assert fleet.tune_lines([change]) == ["b1 → hub: keepalive_s 25 → 0 — public"]
    assert "nothing to change" in fleet.tune_lines([])[0]


def test_roles_in_the_collection_are_the_top_level_roles() -> None:
    assert (COLLECTION / "roles").resolve() == REPO / "roles"
    assert (COLLECTION / "playbooks").resolve() == REPO / "playbooks"
    for role in ("controller", "agent", "wireguard"):
        assert (REPO / "roles" / role / "meta/argument_specs.yml").is_file()


def test_the_wheel_alone_makes_the_collection_available(tmp_path: Path) -> None:
    """Build the wheel, install it into a bare directory, and ask ansible (configured by
    nothing: no ansible.cfg, no collections path) for the collection's roles and modules."""
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "w"),
         str(REPO)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if build.returncode != 0:
        pytest.fail(f"pip wheel failed: {build.stderr[-2000:]}")
    (wheel,) = (tmp_path / "w").glob("fleetvpn-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        prefix = "ansible_collections/fleetvpn/fleet/roles/"
        shipped = {n[len(prefix) :] for n in zf.namelist() if n.startswith(prefix)}
        source = {
            str(p.relative_to(REPO / "roles")) for p in (REPO / "roles").rglob("*") if p.is_file()
        }
        assert shipped == source
        for name in ("agent/tasks/main.yml", "wireguard/tasks/main.yml"):
            assert zf.read(prefix + name) == (REPO / "roles" / name).read_bytes()
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    empty_config = tmp_path / "ansible.cfg"
    empty_config.write_text("[defaults]\n")
    env.update(PYTHONPATH=str(site), ANSIBLE_CONFIG=str(empty_config), HOME=str(tmp_path))
    roles = subprocess.run(
        [str(BIN / "ansible-doc"), "-t", "role", "-l", "fleetvpn.fleet"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert roles.returncode == 0, roles.stderr
    for role in ("controller", "agent", "wireguard"):
        assert f"fleetvpn.fleet.{role}" in roles.stdout
    for module in ("wireguard", "process"):
        doc = subprocess.run(
            [str(BIN / "ansible-doc"), "-t", "module", f"fleetvpn.fleet.{module}"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert doc.returncode == 0 and str(site) in doc.stdout, doc.stderr


# --- hostile values fail the task, naming the field (issue 11) ---------------------------------

ISSUE_ENDPOINT = "[fe80::1%1]:51820\n[Interface]\nPostUp = touch /tmp/owned\n#]:51820"


def _with_peer(**changes: Any) -> dict[str, Any]:
    return {**DESIRED, "peers": [{**DESIRED["peers"][0], **changes}]}


@pytest.mark.parametrize(
    ("desired", "field"),
    [
        (_with_peer(endpoint=ISSUE_ENDPOINT), "desired.peers[0].endpoint"),
        (_with_peer(public_key="--help"), "desired.peers[0].public_key"),
        (_with_peer(keepalive_reason="x\nPostUp = y"), "desired.peers[0].keepalive_reason"),
        (_with_peer(peer="hub\n[Peer]"), "desired.peers[0].peer"),
        (_with_peer(allowed_ips=["0.0.0.0/1", "128.0.0.1/1"]), "desired.peers[0].allowed_ips[1]"),
        (_with_peer(keepalive_s=65535), "desired.peers[0].keepalive_s"),
        (_with_peer(route_mtu=68), "desired.peers[0].route_mtu"),
        ({**DESIRED, "interface": "wg0\nx"}, "desired.interface"),
        ({**DESIRED, "interface_mtu": 68}, "desired.interface_mtu"),
        ({**DESIRED, "addresses": ["10.99.0.2/16 "]}, "desired.addresses[0]"),
    ],
)
def test_fixed_settings_refuse_a_hostile_desired_tunnel(
    desired: dict[str, Any], field: str
) -> None:
    from ansible.errors import AnsibleFilterError

    with pytest.raises(AnsibleFilterError, match=f"^{re.escape(field)}: ") as raised:
        tunnel.fixed_settings(desired, None, None)
    assert "\n" not in str(raised.value)


def test_fixed_settings_refuse_an_mtu_or_keepalive_out_of_range() -> None:
    with pytest.raises(Exception, match=r"^fixed settings\.interface_mtu: 68 is out of range"):
        tunnel.fixed_settings(DESIRED, 68, None)
    with pytest.raises(Exception, match=r"keepalive_s: 65535 is out of range"):
        tunnel.fixed_settings(DESIRED, None, 65535)


def test_inventory_peers_refuse_a_hostile_endpoint() -> None:
    key = "fleetvpn__wireguard_self"
    hostvars = {
        "hub": {key: {"endpoint": ISSUE_ENDPOINT, "addresses": ["10.9.0.1/24"],
                      "public_key": KEYS[0]}},
        "b1": {key: {"endpoint": "", "addresses": ["10.9.0.2/24"], "public_key": KEYS[1]}},
    }  # fmt: skip
    with pytest.raises(Exception, match=r"^hub: fleetvpn_endpoint: "):
        tunnel.inventory_peers(hostvars, ["hub", "b1"], "b1", 13)


def test_line_and_checked_filters() -> None:
    assert grammar_filters.line("MTU 1340 — hub ⇄ branch", "reason") == "MTU 1340 — hub ⇄ branch"
    for bad in ("a\nb", "a\rb", "x\u2028y", "x\x00", None, {"a": 1}):
        with pytest.raises(Exception, match=r"^fleetvpn_bin: "):
            grammar_filters.line(bad, "fleetvpn_bin")
    checked = grammar_filters.checked
    assert checked("[2001:db8::1]:51820", "endpoint", "e") == "[2001:db8::1]:51820"
    assert checked("51820", "port", "p") == 51820
    assert checked("10.99.0.0/16", "cidr", "c") == "10.99.0.0/16"
    hostile = [(ISSUE_ENDPOINT, "endpoint"), ("--help", "wg_key"), ("a\nb", "name"),
               ("10.99.0.1/16", "cidr"), ("٥١٨٢٠", "port"), ("wg0/..", "ifname")]  # fmt: skip
    for value, kind in hostile:
        with pytest.raises(Exception, match=r"^fleetvpn_x: "):
            checked(value, kind, "fleetvpn_x")
    with pytest.raises(Exception, match="unknown kind"):
        checked("x", "shell", "fleetvpn_x")


def test_tls_san_writes_only_addresses_and_dns_names() -> None:
    """The certificate's names reach openssl's extension file (controller-cert.ext.j2): a name
    that is neither an address nor a DNS name must fail the task, not add a line."""
    san = grammar_filters.tls_san(["198.19.1.10", "fd99::1", "Controller.Example."])
    assert san == "IP:198.19.1.10,IP:fd99::1,DNS:controller.example"
    hostile = ["ctl\nbasicConstraints=CA:TRUE", "ctl,IP:1.2.3.4", "fe80::1%eth0", "a b", ""]
    for bad in [*hostile, "ctl.example"]:  # a bare string is not a list of names
        names: Any = bad if bad == "ctl.example" else [bad]
        with pytest.raises(Exception, match=r"^fleetvpn_controller_tls_names"):
            grammar_filters.tls_san(names)


def test_inventory_leaves_out_a_node_with_a_hostile_value_and_keeps_the_others() -> None:
    good = {"name": "hub", "site": "core", "endpoint": "198.19.1.1:51820", "listen_port": 51820,
            "public_key": KEYS[0]}  # fmt: skip
    inventory.check_node(good, {}, {}, None)
    cases = [
        ({**good, "endpoint": ISSUE_ENDPOINT}, "hub: endpoint"),
        ({**good, "name": "hub\n[all:vars]"}, "name"),
        ({**good, "site": "core\nx"}, "hub: site"),
        ({**good, "public_key": "--help"}, "hub: public_key"),
        ({**good, "listen_port": 0}, "hub: listen_port"),
    ]
    for node, field in cases:
        with pytest.raises(Exception, match=f"^{re.escape(field)}: "):
            inventory.check_node(node, {}, {}, None)
    links = {"hub": {"b1": {"state": "ok", "reason": "fine\nPostUp = x"}}}
    with pytest.raises(Exception, match=r"^hub: links: b1: reason: "):
        inventory.check_node(good, links, {}, None)
    with pytest.raises(Exception, match=r"^hub: desired interface_mtu: "):
        inventory.check_node(good, {}, {}, {"interface_mtu": 65535})
