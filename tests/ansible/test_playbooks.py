"""The playbooks, for real: ansible-playbook over SSH (paramiko) against the fvanst lab.

One story, in order (the tests share the lab and build on each other):
site.yml deploys the controller, agents (measure-only) and conventional tunnels (MTU 1420,
keepalive 25); a second run changes nothing; ``--check --diff`` after a change shows exactly
that change and changes nothing; once the agents have measured, tune.yml applies the measured
MTU and keepalive live (same interface, no restart) and says why; lowering the branch NAT's
timeout and tuning again changes the branch's keepalive and nothing else; health.yml fails
while links have problems; the inventory plugin reads the controller; and no secret appears in
any output, at -vv.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fleetvpn.model import parse_time
from tests.ansible.conftest import (
    BIN,
    FAST_AGENTS,
    HOSTS_DIR,
    LAB,
    NODES,
    TOPOLOGY,
    Ansible,
    Run,
    on,
)

CONVENTIONAL = "@playbooks/vars/conventional.yml"
FLEETVPN = str(BIN / "fleetvpn")


def wg_peers(host: str) -> dict[str, int]:
    """Peer public key -> persistent keepalive (0 = off), from `wg show wg0 dump`."""
    lines = on(host, "wg", "show", "wg0", "dump").strip().splitlines()[1:]
    return {f[0]: (0 if f[7] == "off" else int(f[7])) for f in (line.split("\t") for line in lines)}


def link(host: str, interface: str = "wg0") -> dict[str, Any]:
    doc = json.loads(on(host, "ip", "-j", "link", "show", "dev", interface))
    return {"ifindex": doc[0]["ifindex"], "mtu": doc[0]["mtu"]}


def route_mtus(host: str) -> dict[str, int | None]:
    out = on(host, "ip", "-4", "route", "show", "dev", "wg0")
    mtus: dict[str, int | None] = {}
    for line in out.splitlines():
        m = re.search(r"mtu lock (\d+)", line)
        mtus[line.split()[0]] = int(m.group(1)) if m else None
    return mtus


def controller_json(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys_python(), "-m", "fleetvpn", "lab", "exec", "-t", str(TOPOLOGY), "--name", LAB,
         "controller", "--", "env", "FLEETVPN_TOKEN_FILE=/etc/fleetvpn/admin.token",
         # the lab's controller serves TLS (controller_tls): its certificate names 127.0.0.1
         "FLEETVPN_CONTROLLER=https://127.0.0.1:8080",
         "FLEETVPN_CA_FILE=/etc/fleetvpn/tls/ca.pem",
         FLEETVPN, *args, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def sys_python() -> str:
    return str(BIN / "python")


def wait_for(what: str, condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting {timeout_s:.0f} s for {what}"
        time.sleep(3)


def unwrap(value: Any) -> Any:
    """ansible-inventory marks what an inventory plugin returns as untrusted text:
    ``{"__ansible_unsafe": "x"}`` in its JSON. The value is the text."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {k: unwrap(v) for k, v in value.items()}
    if isinstance(value, list):
        return [unwrap(v) for v in value]
    return value


def public_key(host: str) -> str:
    return on(host, "sh", "-c", "wg pubkey < /var/lib/fleetvpn/wg.key").strip()


def node_changed(run: Run) -> dict[str, int]:
    return {h: run.changed(h) for h in NODES if h in run.recap}


# --- the story ---------------------------------------------------------------------------------

STATE: dict[str, Any] = {}


def test_check_mode_on_a_fresh_fleet_says_what_it_would_do_and_does_nothing(
    ansible_lab: Ansible,
) -> None:
    run = ansible_lab.playbook(
        "site.yml", "-e", CONVENTIONAL, "-e", FAST_AGENTS, "--check", "-l", "controllers,branch1"
    )
    assert run.returncode == 0, run.output[-5000:]
    assert run.changed("controller") > 0 and run.changed("branch1") > 0
    assert not list((HOSTS_DIR / "controller/etc/fleetvpn").iterdir())
    assert not list((HOSTS_DIR / "branch1/var/lib/fleetvpn").iterdir())
    assert "wg0" not in on("branch1", "ip", "-br", "link")


def test_first_run_deploys_controller_agents_and_conventional_tunnels(ansible_lab: Ansible) -> None:
    run = ansible_lab.playbook("site.yml", "-e", CONVENTIONAL, "-e", FAST_AGENTS, "-vv")
    assert run.returncode == 0, run.output[-5000:]
    assert set(run.recap) == {"controller", *NODES}
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in run.recap.values())
    assert all(run.changed(h) > 0 for h in run.recap)
    keys = {h: public_key(h) for h in NODES}
    STATE["keys"] = keys
    for host in NODES:
        # The conventional start: MTU 1420 and keepalive 25 towards every peer.
        assert link(host)["mtu"] == 1420
        peers = wg_peers(host)
        assert peers and set(peers.values()) == {25}, (host, peers)
        assert keys[host] not in peers
        # The agent runs and has enrolled (its node token is on the node).
        assert (HOSTS_DIR / host / "var/lib/fleetvpn/node.json").exists()
        pid = on(host, "cat", "/run/fleetvpn/agent.pid").strip()
        assert "agent\0run" in on(host, "cat", f"/proc/{pid}/cmdline")
    # Every NATed branch node peers with the public hub and cloud1, not with its neighbour.
    assert set(wg_peers("branch1")) == {keys["hub"], keys["cloud1"]}
    assert set(wg_peers("hub")) == {keys["branch1"], keys["branch2"], keys["cloud1"]}


TLS_PROBE = """
import ssl, sys, urllib.request
url, ca = sys.argv[1], sys.argv[2]
def get(url, context=None):
    try:
        return urllib.request.urlopen(url + "/healthz", context=context, timeout=10).status
    except Exception as e:
        return type(e).__name__
print(get(url, ssl.create_default_context(cafile=ca)), get(url), get(url.replace("https", "http")))
"""


def test_agents_reach_the_controller_over_tls_pinning_the_fleet_ca(ansible_lab: Ansible) -> None:
    """The topology says controller_tls: the controller role made a fleet CA and a certificate,
    the controller serves HTTPS only, and every agent's config pins that CA (issue 11)."""
    ca = (HOSTS_DIR / "controller/etc/fleetvpn/tls/ca.pem").read_text()
    assert "BEGIN CERTIFICATE" in ca
    for host in NODES:
        config = (HOSTS_DIR / host / "etc/fleetvpn/agent.yml").read_text()
        url = re.search(r'^controller: "(https://[^"]+)"$', config, re.M)
        ca_file = re.search(r'^ca_file: "([^"]+)"$', config, re.M)
        assert url and ca_file and "insecure_http" not in config, config
        assert (HOSTS_DIR / host / ca_file.group(1).lstrip("/")).read_text() == ca
        # From the node itself: the pinned CA verifies; the system's store does not know the
        # fleet CA; plain HTTP gets no answer from a TLS port.
        answers = on(host, sys_python(), "-c", TLS_PROBE, url.group(1), ca_file.group(1))
        verified, unpinned, plain = answers.split()
        assert (verified, unpinned) == ("200", "URLError"), (host, answers)
        assert plain != "200", (host, answers)


def test_second_run_changes_nothing(ansible_lab: Ansible) -> None:
    run = ansible_lab.playbook("site.yml", "-e", CONVENTIONAL, "-e", FAST_AGENTS)
    assert run.returncode == 0, run.output[-5000:]
    assert {h: r["changed"] for h, r in run.recap.items()} == dict.fromkeys(run.recap, 0)


def test_check_diff_shows_exactly_the_change_and_changes_nothing(ansible_lab: Ansible) -> None:
    before = {h: (link(h), wg_peers(h)) for h in ("branch1", "hub")}
    run = ansible_lab.playbook(
        "site.yml", "-e", CONVENTIONAL, "-e", FAST_AGENTS,
        "-e", "fleetvpn_wireguard_keepalive_s=13", "--check", "--diff",
        "-l", "controllers,site_branch",
    )  # fmt: skip
    assert run.returncode == 0, run.output[-5000:]
    assert run.changed("controller") == 0
    assert run.changed("branch1") == 1 and run.changed("branch2") == 1
    diff_lines = [
        line
        for line in run.output.splitlines()
        if line[:1] in ("+", "-") and not line.startswith(("+++", "---"))
    ]
    # Two peers on each of two hosts: keepalive 25 -> 13, and nothing else.
    assert sorted(diff_lines) == sorted(["-  keepalive 25", "+  keepalive 13"] * 4), diff_lines
    assert "peer hub: keepalive 25 s => 13 s" in run.output
    # Check mode changed nothing live.
    assert {h: (link(h), wg_peers(h)) for h in ("branch1", "hub")} == before


def test_a_changed_agent_setting_is_applied_live_by_the_handler(ansible_lab: Ansible) -> None:
    pids = {h: on(h, "cat", "/run/fleetvpn/agent.pid").strip() for h in ("branch1", "branch2")}
    ifindex = link("branch1")["ifindex"]
    run = ansible_lab.playbook(
        "site.yml", "-e", CONVENTIONAL, "-e", FAST_AGENTS, "-e", "fleetvpn_agent_log_level=debug",
        "--diff", "-l", "controllers,site_branch",
    )  # fmt: skip
    assert run.returncode == 0, run.output[-5000:]
    assert run.changed("branch1") == 2 and run.changed("controller") == 0  # config + reload
    assert '-log_level: "info"' in run.output and '+log_level: "debug"' in run.output
    assert "HANDLER [fleetvpn.fleet.agent : Reload the agent (process, SIGHUP)]" in run.output
    # The same agent processes (reloaded, not restarted), the same tunnel.
    assert {h: on(h, "cat", "/run/fleetvpn/agent.pid").strip() for h in pids} == pids
    assert link("branch1")["ifindex"] == ifindex


def test_tune_applies_measured_settings_live_with_reasons(ansible_lab: Ansible) -> None:
    def measured() -> bool:
        doc = controller_json("health")
        sites = {s["site"]: s for s in doc["sites"]}
        directions = [d for link in doc["links"] for d in (link["a_to_b"], link["b_to_a"])]
        return sites.get("branch", {}).get("mapping_lifetime_s") is not None and all(
            d["path_mtu"] is not None for d in directions
        )

    wait_for("the agents' path MTU and NAT measurements", measured, timeout_s=180)
    before = {h: link(h) for h in NODES}
    run = ansible_lab.playbook("tune.yml", "--diff")
    assert run.returncode == 0, run.output[-5000:]
    keys = STATE["keys"]
    # The black-holed 1400-byte branch uplink: interface MTU 1340, with the reason.
    assert re.search(r"branch1: wg0: mtu 1420 => 1340 — interface MTU 1340", run.output)
    assert link("branch1")["mtu"] == 1340
    assert route_mtus("branch1")  # per-peer routes carry their own MTU now
    # The branch's 20 s NAT: keepalive set from the measured mapping lifetime, with the reason.
    m = re.search(r"branch1: peer hub: keepalive 25 s => (\d+) s — (.*behind NAT.*)", run.output)
    assert m, run.output[-5000:]
    branch_keepalive = int(m.group(1))
    assert 0 < branch_keepalive < 10
    assert wg_peers("branch1")[keys["hub"]] == branch_keepalive
    # The public hub needs no keepalive towards the branch.
    assert re.search(r"hub: peer branch1: keepalive 25 s => off", run.output)
    assert wg_peers("hub")[keys["branch1"]] == 0
    # Live: the same interfaces, never re-created.
    assert {h: link(h)["ifindex"] for h in NODES} == {h: before[h]["ifindex"] for h in NODES}
    STATE["branch_keepalive"] = branch_keepalive


def test_lower_nat_timeout_changes_that_sites_keepalive_and_nothing_else(
    ansible_lab: Ansible,
) -> None:
    # Whatever the agents measured since the last tune, settle it first.
    settle = ansible_lab.playbook("tune.yml")
    assert settle.returncode == 0, settle.output[-5000:]
    hub_key = STATE["keys"]["hub"]
    old = wg_peers("branch1")[hub_key]  # what the branch runs now, after the settling tune
    other_before = {h: (link(h), route_mtus(h), wg_peers(h)) for h in ("hub", "cloud1")}
    # The branch NAT now forgets idle established mappings after 12 s instead of 20 s.
    on("branch-r", "sysctl", "-qw", "net.netfilter.nf_conntrack_udp_timeout_stream=12")

    def lowered() -> bool:
        changes = controller_json("tune")["changes"]
        # The agent reports what it runs (`current`): wait for a recommendation below it.
        return any(
            c["node"] == "branch1"
            and c["setting"] == "keepalive_s"
            and c["current"] == old
            and c["recommended"] < old
            for c in changes
        )

    wait_for("the branch's new NAT lifetime to lower its keepalive", lowered, timeout_s=150)
    run = ansible_lab.playbook("tune.yml", "--diff")
    assert run.returncode == 0, run.output[-5000:]
    assert node_changed(run) == {"hub": 0, "branch1": 1, "branch2": 1, "cloud1": 0}, run.output
    summary = run.output.split("TASK [What changed, and why]", 1)[1]
    applied = re.findall(r'"((?:hub|branch1|branch2|cloud1): [^"]*)"', summary)
    changed_lines = [line for line in applied if "unchanged" not in line]
    assert changed_lines and all(
        re.match(r"branch[12]: peer (hub|cloud1): keepalive \d+ s => \d+ s — .*behind NAT", line)
        for line in changed_lines
    ), changed_lines
    assert {h: (link(h), route_mtus(h), wg_peers(h)) for h in ("hub", "cloud1")} == other_before
    assert wg_peers("branch1")[hub_key] < old
    STATE["branch_keepalive"] = wg_peers("branch1")[hub_key]


def test_agentless_tunnels_from_inventory_variables(ansible_lab: Ansible) -> None:
    first = ansible_lab.playbook("tests/ansible/playbooks/agentless.yml")
    assert first.returncode == 0, first.output[-5000:]
    # Two changes per node: its key, generated there, and its tunnel.
    assert {h: first.changed(h) for h in NODES} == dict.fromkeys(NODES, 2)
    assert "branch1 has no endpoint (NAT or firewall): keepalive 9 s" in first.output
    again = ansible_lab.playbook("tests/ansible/playbooks/agentless.yml")
    assert again.returncode == 0 and all(again.changed(h) == 0 for h in NODES), again.output

    def handshake() -> bool:
        out = on("branch1", "wg", "show", "wg1", "latest-handshakes")
        return all(int(line.split()[1]) > 0 for line in out.strip().splitlines())

    # The NATed branch's keepalive starts the handshakes with both public nodes it dials.
    wait_for("branch1's wg1 handshakes", handshake, timeout_s=30)
    assert len(on("branch1", "wg", "show", "wg1", "peers").split()) == 2
    assert link("hub")["ifindex"] != 0 and "wg0" in on("hub", "ip", "-br", "link")


def test_health_fails_while_links_have_problems(ansible_lab: Ansible) -> None:
    doc = controller_json("health")
    problems = {f"{link['a']} ↔ {link['b']}" for link in doc["links"] if link["state"] != "ok"}
    run = ansible_lab.playbook("health.yml")
    for link in doc["links"]:
        assert f"{link['a']} ({link['site_a']}) ↔ {link['b']} ({link['site_b']})" in run.output
    if problems:
        assert run.returncode != 0
        assert f"{len(problems)} link(s) with problems" in run.output
    else:
        assert run.returncode == 0, run.output[-3000:]
    every_state = ["ok", "degraded", "unmeasured", "stale", "down", "blackhole"]
    tolerant = ansible_lab.playbook(
        "health.yml", "-e", json.dumps({"fleetvpn_health_ok_states": every_state})
    )
    assert tolerant.returncode == 0, tolerant.output[-3000:]


def test_inventory_plugin_reads_the_controller(ansible_lab: Ansible, tmp_path: Any) -> None:
    source = tmp_path / "fleet.fleetvpn.yml"
    source.write_text(
        "plugin: fleetvpn.fleet.controller\n"
        "url: https://10.254.0.10:8080\n"
        f"ca_file: {HOSTS_DIR / 'controller/etc/fleetvpn/tls/ca.pem'}\n"
        f"token_file: {HOSTS_DIR / 'controller/etc/fleetvpn/admin.token'}\n"
    )
    proc = ansible_lab.inventory(source, "--list")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert set(doc["site_branch"]["hosts"]) == {"branch1", "branch2"}
    assert set(doc["site_cloud"]["hosts"]) == {"cloud1"}
    health_groups = [g for g in doc if g.startswith("health_")]
    assert health_groups and {h for g in health_groups for h in doc[g]["hosts"]} == set(NODES)
    hv = unwrap(doc["_meta"]["hostvars"])
    assert hv["branch1"]["fleetvpn_site"] == "branch"
    assert hv["branch1"]["fleetvpn_recommended_interface_mtu"] == 1340
    assert hv["branch1"]["fleetvpn_links"]["hub"]["path_mtu"] == 1400
    assert 0 < hv["branch1"]["fleetvpn_recommended_keepalive_s"] <= STATE["branch_keepalive"]
    assert hv["hub"]["fleetvpn_endpoint"].endswith(":51820")


def test_the_probe_key_rotates_without_a_gap_in_probing(ansible_lab: Ansible) -> None:
    """playbooks/rotate-probe-key.yml: three steps, each on the controller host and then every
    node; the controller's responder follows its key file and the agents reload theirs live,
    so NAT measurements against the controller keep succeeding, with the new key after."""
    etc = HOSTS_DIR / "controller/etc/fleetvpn"
    (old,) = (etc / "probe.key").read_text().split()
    logs = {h: HOSTS_DIR / h / "var/lib/fleetvpn/log/agent.log" for h in NODES}
    sizes = {h: p.stat().st_size for h, p in logs.items()}
    pids = {h: on(h, "cat", "/run/fleetvpn/agent.pid").strip() for h in NODES}
    run = ansible_lab.playbook(
        "rotate-probe-key.yml", "-e", CONVENTIONAL, "-e", FAST_AGENTS,
        "-e", "fleetvpn_agent_log_level=debug",
    )  # fmt: skip
    assert run.returncode == 0, run.output[-5000:]
    for said in ("a new key added as line 2", "the new key now seals", "the old key retired"):
        assert said in run.output, run.output[-5000:]
    finished = datetime.now(UTC)
    (new,) = (etc / "probe.key").read_text().split()
    assert new != old and not (etc / "probe.key.next").exists()
    for host in NODES:
        assert (HOSTS_DIR / host / "etc/fleetvpn/probe.key").read_text().split() == [new]
    # Reloaded, not restarted.
    assert {h: on(h, "cat", "/run/fleetvpn/agent.pid").strip() for h in NODES} == pids

    def nat_measured_since() -> bool:
        status = json.loads((HOSTS_DIR / "branch1/var/lib/fleetvpn/status.json").read_text())
        nat = status.get("nat") or {}
        return bool(nat.get("measured_at")) and parse_time(nat["measured_at"]) > finished

    # The agents measure their NAT against the controller's responder every 30 s here.
    wait_for("a NAT measurement with the new key", nat_measured_since, timeout_s=120)
    for host, path in logs.items():
        since = path.read_bytes()[sizes[host] :].decode(errors="replace")
        assert "no authenticated reply" not in since, (host, since[-3000:])
    STATE["old probe key"] = old


def test_no_secret_in_any_output(ansible_lab: Ansible) -> None:
    secrets = {}
    for host in NODES:
        secrets[f"{host} private key"] = (HOSTS_DIR / host / "var/lib/fleetvpn/wg.key").read_text()
        node = json.loads((HOSTS_DIR / host / "var/lib/fleetvpn/node.json").read_text())
        for key, value in node.items():
            if "token" in key and isinstance(value, str):
                secrets[f"{host} {key}"] = value
    etc = HOSTS_DIR / "controller/etc/fleetvpn"
    secrets["probe key"] = (etc / "probe.key").read_text()
    secrets["admin token"] = (etc / "admin.token").read_text()
    if "old probe key" in STATE:
        secrets["rotated-out probe key"] = STATE["old probe key"]
    secrets["fleet CA key"] = (etc / "tls/ca.key").read_text().split("-----")[2].split()[0]
    secrets["controller TLS key"] = (
        (etc / "tls/controller.key").read_text().split("-----")[2].split()[0]
    )
    secrets = {k: v.strip() for k, v in secrets.items()}
    assert all(len(v) >= 20 for v in secrets.values()), "not the secrets we meant to look for"
    assert len(ansible_lab.outputs) >= 6
    for output in ansible_lab.outputs:
        leaked = [name for name, value in secrets.items() if value in output]
        assert not leaked, f"{leaked} in the output of a run"
    # The public keys, on the other hand, are shown (the diff names peers by them).
    assert any(STATE["keys"]["hub"] in output for output in ansible_lab.outputs)
