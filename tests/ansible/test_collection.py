"""The collection without a lab: its filters (pure), its packaging (the wheel carries roles/ as
they are, and ansible finds the collection from the install alone), its documentation."""

from __future__ import annotations

import importlib.util
import os
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
fleet = load("plugins/filter/fleet.py")
inventory = load("plugins/inventory/controller.py")

DESIRED = {
    "interface": "wg0",
    "listen_port": 51820,
    "addresses": ["10.99.0.2/16"],
    "interface_mtu": 1340,
    "interface_mtu_reason": "measured",
    "peers": [
        {"peer": "hub", "public_key": "K" * 43 + "=", "endpoint": "198.19.1.11:51820",
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
                      "public_key": "H" * 43 + "="}},
        "b1": {key: {"endpoint": "", "addresses": ["10.9.0.2/24"], "public_key": "A" * 43 + "="}},
        "b2": {key: {"endpoint": "", "addresses": ["10.9.0.3/24"], "public_key": "B" * 43 + "="}},
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
                key = chr(ord("a") + i) * 43 + "="
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
