"""Nothing about the default topology is hard-coded: other numbers, no IPv6, a second lab beside
the first, and a down that leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from fleetvpn.lab.build import LabPaths, lab_namespaces

from .conftest import LabHandle, lab_name, verify_json

ALT_LAB = lab_name("fvalt")

ALT = """
name: fvalt
controller: ctl
management: 10.253.7.0/24
sites:
  dc:
    kind: public
    uplink_mtu: 9000
    hosts: [ctl, dc1]
  shop:
    kind: nat
    uplink_mtu: 1280
    icmp_blackhole: true
    lan: 10.77.0.0/24
    conntrack: {udp_timeout: 4, udp_timeout_stream: 7}
    hosts: [shop1]
  flat:
    kind: double_nat
    uplink_mtu: 1420
    conntrack: {udp_timeout: 5, udp_timeout_stream: 11}
    carrier_conntrack: {udp_timeout: 6, udp_timeout_stream: 9}
    hosts: [flat1, flat2]
  lab:
    kind: firewall
    uplink_mtu: 1500
    lan_mtu: 1500
    conntrack: {udp_timeout: 3, udp_timeout_stream: 6}
    hosts: [lab1]
"""


def test_a_second_topology_builds_verifies_and_coexists(
    tmp_path: Path, default_lab: LabHandle
) -> None:
    default_lab.cli("up")  # idempotent; an earlier test may have taken it down
    topo_file = tmp_path / "alt.yml"
    topo_file.write_text(ALT)
    alt = LabHandle(topo_file, ALT_LAB)
    alt.cli("down", check=False)
    try:
        alt.cli("up")
        doc = verify_json("-t", str(topo_file), "--name", ALT_LAB)
        checks = {(c["site"], c["check"]): c for c in doc["checks"]}  # type: ignore[union-attr]
        assert doc["exit"] == 0, [c for c in checks.values() if not c["ok"]]
        assert (
            checks[("shop", "path MTU out, ipv4")]["observed"]
            == "1280 passes, 1281 dropped silently"
        )
        assert (
            checks[("dc", "path MTU out, ipv4")]["observed"] == "9000 passes, 9001 refused locally"
        )
        assert (
            checks[("flat", "path MTU in, ipv4")]["observed"] == "1420 passes, 1421 ICMP says 1420"
        )
        assert checks[("flat", "home NAT + carrier NAT: established UDP timer")][
            "expected"
        ].startswith("9 s")
        assert checks[("flat", "carrier NAT: established UDP timer")]["expected"].startswith("9 s")
        assert checks[("lab", "firewall: established UDP timer")]["ok"]
        assert not any("ipv6" in check for _, check in checks)
        # Both labs are up side by side, each with its own namespaces.
        assert lab_namespaces(ALT_LAB) and lab_namespaces(default_lab.name)
        assert default_lab.cli("status").returncode == 0
    finally:
        alt.cli("down")
    paths = LabPaths(ALT_LAB)
    assert lab_namespaces(ALT_LAB) == []
    assert ALT_LAB not in Path("/proc/self/mountinfo").read_text()
    assert not paths.run_dir.exists() and not paths.state_dir.exists()
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"fleetvpn-lab/{ALT_LAB}/" not in ps
    # The other lab is untouched.
    assert default_lab.cli("status").returncode == 0
    assert os.path.exists(f"/run/netns/{default_lab.name}-core")
