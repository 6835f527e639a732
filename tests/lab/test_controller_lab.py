"""The controller closes the loop on the lab's black-holed branch: real measurements in, a
rendered wg-quick file out, and a tunnel that moves bulk TCP both ways where 1420 stalls."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

from fleetvpn.controller.store import Store, sqlite_url
from fleetvpn.net import keys

from ..unit.apiutil import Server, bearer
from . import wgutil
from .conftest import LabHandle
from .test_probe import PORT, Responder, start_responder

NODES = ("hub", "branch1")


def test_rendered_config_fixes_the_black_hole(default_lab: LabHandle, tmp_path: Path) -> None:
    lab, plan = default_lab.lab, default_lab.plan
    default_lab.cli("up")
    hosts = {name: lab.host_ns(name) for name in NODES}
    hub_ip = plan.hosts["hub"].ipv4
    public = {}
    for name, ns in hosts.items():
        wgutil.sh(ns, "umask 077; wg genkey > /etc/wireguard/wg0.key")
        public[name] = wgutil.sh(ns, "wg pubkey < /etc/wireguard/wg0.key")

    key_file = tmp_path / "probe.key"
    keys.write_key(key_file)
    # The controller host runs the responder, as `controller serve` does.
    ctl_ip = plan.hosts["controller"].ipv4
    proc = start_responder(default_lab, key_file, "controller")
    try:
        responder = Responder(default_lab, key_file, proc, ctl_ip, "")
        pmtu = responder.probe("branch1", "pmtu", f"{ctl_ip}:{PORT}")
        nats = {
            name: responder.probe(name, "nat", f"{ctl_ip}:{PORT}", "--max-lifetime", "30")
            for name in NODES
        }
    finally:
        proc.terminate()
        proc.wait(5)
    assert pmtu["path_mtu"] == 1400 and nats["branch1"]["nat"] is True

    store = Store.open(sqlite_url(str(tmp_path / "controller.db")))
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        with Server(store) as api:
            admin = store.create_admin_token()
            tokens = {}
            for name in NODES:
                site = plan.hosts[name].site
                enrollment = api.post("/v1/enrollment-tokens", json={"site": site},
                                      headers=bearer(admin)).json()["enrollment_token"]  # fmt: skip
                body = {"enrollment_token": enrollment, "name": name, "public_key": public[name]}
                if name == "hub":
                    body["endpoint"] = f"{hub_ip}:51820"
                tokens[name] = api.post("/v1/enroll", json=body).json()["node_token"]
            branch_report = {
                "schema_version": 1, "report_id": str(uuid.uuid4()), "node": "branch1",
                "site": "branch", "created_at": now, "configured": {},
                "measurements": [{"peer": "hub", "family": 4, "rx_bytes": 0, "tx_bytes": 0,
                                  "path_mtu": pmtu["path_mtu"], "icmp_seen": pmtu["icmp_seen"]}],
                "nat": {"measured_at": now, "nat": nats["branch1"]["nat"],
                        "stateful_filter": nats["branch1"]["stateful_filter"],
                        "mapping_lifetime_s": nats["branch1"]["mapping_lifetime_s"],
                        "resolution_s": nats["branch1"]["resolution_s"], "max_lifetime_s": 30.0},
            }  # fmt: skip
            hub_report = {
                **branch_report, "report_id": str(uuid.uuid4()), "node": "hub", "site": "hub",
                "measurements": [{"peer": "branch1", "family": 4, "rx_bytes": 0, "tx_bytes": 0}],
                "nat": {**branch_report["nat"], "nat": nats["hub"]["nat"],  # type: ignore[dict-item]
                        "stateful_filter": nats["hub"]["stateful_filter"],
                        "mapping_lifetime_s": None, "resolution_s": None},
            }  # fmt: skip
            for name, report in (("branch1", branch_report), ("hub", hub_report)):
                r = api.post("/v1/reports", json=report, headers=bearer(tokens[name]))
                assert r.status_code == 201, r.text
            configs = {
                name: api.get(f"/v1/nodes/{name}/config/wg-quick",
                              headers=bearer(tokens[name])).json()["files"]["wg0.conf"]
                for name in NODES
            }  # fmt: skip
    finally:
        store.close()

    assert "MTU = 1340" in configs["branch1"] and "PersistentKeepalive = 8" in configs["branch1"]
    assert "PersistentKeepalive" not in configs["hub"]  # the public hub keeps keepalive off
    try:
        for name, ns in hosts.items():
            wgutil.sh(ns, "umask 077; cat > /etc/wireguard/wg0.conf", input=configs[name])
            wgutil.sh(ns, "wg-quick up wg0 2>&1")
        branch, hub = (wgutil.WgEnd(hosts[n], plan.hosts[n].ns, "", "") for n in ("branch1", "hub"))
        assert "mtu 1340" in wgutil.sh(hosts["branch1"], "ip route show 10.99.0.1")
        size = 4_000_000
        hub_tunnel, branch_tunnel = "10.99.0.1", "10.99.0.2"
        out = wgutil.tcp_transfer(branch.netns_name, hub.netns_name, hub_tunnel, size, 20, 5401)
        back = wgutil.tcp_transfer(hub.netns_name, branch.netns_name, branch_tunnel, size, 20, 5402)
        assert out == (True, size) and back == (True, size)
    finally:
        for ns in hosts.values():
            wgutil.sh(ns, "wg-quick down wg0 >/dev/null 2>&1 || true; "
                          "rm -f /etc/wireguard/wg0.conf /etc/wireguard/wg0.key")  # fmt: skip
