"""The agent's config file: defaults, and an error naming the key for every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetvpn.agent.config import ConfigError, load, parse, reloaded

MINIMAL = "controller: http://198.19.1.10:8080\ninsecure_http: true\n"


def test_minimal_config_gets_the_documented_defaults() -> None:
    c = parse(MINIMAL, "agent.yml", hostname="branch1")
    assert c.controller == "http://198.19.1.10:8080"
    assert c.node == "branch1"
    assert (c.interface, c.listen_port, c.wireguard, c.apply) == ("wg0", 51820, "auto", True)
    assert c.probe.listen_port == 51821 and c.probe.nat_responder is None
    assert c.probe.key_file == Path("/etc/fleetvpn/probe.key")
    assert c.state_dir == Path("/var/lib/fleetvpn")
    assert c.private_key_file == Path("/var/lib/fleetvpn/wg.key")
    assert c.status_file == Path("/var/lib/fleetvpn/status.json")
    i = c.intervals
    assert (i.report_s, i.desired_s, i.pmtu_s, i.nat_s) == (30, 30, 600, 3600)
    assert (c.on_stop, c.log_level, c.endpoint, c.ca_file) == ("keep", "info", None, None)
    assert (c.tunnel_networks, c.routed_subnets) == ((), ())


def test_full_config_from_the_contract() -> None:
    text = """
controller: https://ctl.example:8443/
ca_file: /etc/fleetvpn/ca.pem
enrollment_token_file: /etc/fleetvpn/enrollment.token
node: branch1
endpoint: 198.19.1.11:51820
interface: wg1
listen_port: 51830
wireguard: userspace
apply: false
probe:
  listen_port: 51831
  key_file: /etc/fleetvpn/probe.key
  nat_responder: "[2001:2::1]:4789"
state_dir: /srv/fleetvpn
intervals: {report_s: 10, desired_s: 20, pmtu_s: 300, nat_s: 1800}
on_stop: down
log_level: debug
"""
    c = parse(text, "agent.yml")
    assert c.controller == "https://ctl.example:8443"
    assert c.endpoint == "198.19.1.11:51820"
    assert c.probe.nat_responder == ("2001:2::1", 4789)
    assert (c.wireguard, c.apply, c.on_stop, c.interface) == ("userspace", False, "down", "wg1")
    assert c.intervals.pmtu_s == 300 and c.intervals.rtt_s == 30
    assert c.spool_dir == Path("/srv/fleetvpn/spool")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("node: a\n", "agent.yml: controller: required"),
        ("controller: ftp://x\n", "agent.yml: controller: must be an http:// or https:// URL"),
        (
            MINIMAL + "contoller: x\n",
            "agent.yml: contoller: unknown key (did you mean 'controller'?)",
        ),
        (MINIMAL + "probe: {listen_prot: 1}\n", "agent.yml: probe.listen_prot: unknown key"),
        (
            MINIMAL + "probe: {listen_port: 70000}\n",
            "agent.yml: probe.listen_port: must be an integer in 1..65535",
        ),
        (MINIMAL + "probe: {nat_responder: 'nowhere'}\n", "agent.yml: probe.nat_responder:"),
        (
            MINIMAL + "probe: {key_file: relative.key}\n",
            "agent.yml: probe.key_file: must be an absolute path",
        ),
        (MINIMAL + "probe: 5\n", "agent.yml: probe: must be a mapping"),
        (
            MINIMAL + "intervals: {pmtu_s: 0}\n",
            "agent.yml: intervals.pmtu_s: must be a number of seconds >= 1",
        ),
        (MINIMAL + "intervals: {report_s: yes}\n", "agent.yml: intervals.report_s:"),
        (
            MINIMAL + "intervals: {nat: 5}\n",
            "agent.yml: intervals.nat: unknown key (did you mean 'nat_s'?)",
        ),
        (MINIMAL + "node: Branch_1\n", "agent.yml: node: 'Branch_1' is not a node name"),
        (MINIMAL + "endpoint: 1.2.3.4\n", "agent.yml: endpoint:"),
        (MINIMAL + "interface: a-very-long-interface-name\n", "agent.yml: interface:"),
        (MINIMAL + "interface: -h\n", "agent.yml: interface: '-h' is not an interface name"),
        (
            MINIMAL + "wireguard: maybe\n",
            "agent.yml: wireguard: must be one of auto, kernel, userspace",
        ),
        (MINIMAL + "apply: 'yes'\n", "agent.yml: apply: must be true or false"),
        (MINIMAL + "on_stop: halt\n", "agent.yml: on_stop: must be one of keep, down"),
        (
            MINIMAL + "listen_port: 51821\n",
            "agent.yml: probe.listen_port: 51821 is also the WireGuard",
        ),
        (MINIMAL + "ca_file: /etc/ca.pem\n", "agent.yml: ca_file: is only used with an https://"),
        ("controller: [\n", "agent.yml: not valid YAML"),
        # plain HTTP only where the path is trusted: said so in the config, or loopback
        ("controller: http://198.19.1.10:8080\n", "agent.yml: controller: 'http://198.19.1.10"),
        (
            "controller: http://[2001:db8::1]:8080\ninsecure_http: false\n",
            "agent.yml: controller: 'http://[2001:db8::1]:8080' is plain HTTP",
        ),
        (MINIMAL + "insecure_http: 'yes'\n", "agent.yml: insecure_http: must be true or false"),
        (MINIMAL + "tunnel_networks: 10.99.0.0/16\n", "agent.yml: tunnel_networks: must be a"),
        (MINIMAL + "tunnel_networks: [10.99.0.1/16]\n", "agent.yml: tunnel_networks[0]:"),
        (MINIMAL + "routed_subnets: [0.0.0.0/0]\n", "agent.yml: routed_subnets[0]: 0.0.0.0/0"),
        (MINIMAL + "routed_subnets: ['::/0']\n", "agent.yml: routed_subnets[0]: ::/0"),
        (MINIMAL + "routed_subnets: ['10.1.0.0/16\\n']\n", "agent.yml: routed_subnets[0]:"),
        ("- a\n", "agent.yml: must be a mapping"),
    ],
)
def test_errors_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse(text, "agent.yml", hostname="node1")
    assert str(caught.value).startswith(message), str(caught.value)


def test_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yml: cannot read"):
        load(tmp_path / "missing.yml")


def test_default_node_name_must_be_a_name() -> None:
    with pytest.raises(ConfigError, match="node: 'My_Laptop' is not a node name"):
        parse(MINIMAL, "agent.yml", hostname="My_Laptop")


def test_sighup_applies_intervals_but_not_the_identity() -> None:
    running = parse(MINIMAL + "node: branch1\ninterface: wg0\n", "agent.yml")
    new = parse(
        MINIMAL + "node: branch9\ninterface: wg1\nintervals: {rtt_s: 3600}\non_stop: down\n",
        "agent.yml",
    )
    applied, changed = reloaded(running, new)
    assert changed == ["node", "interface"]
    assert (applied.node, applied.interface) == ("branch1", "wg0")
    assert applied.intervals.rtt_s == 3600 and applied.on_stop == "down"


def test_plain_http_to_a_loopback_controller_needs_no_flag() -> None:
    for url in ("http://127.0.0.1:8080", "http://[::1]:8080", "http://localhost:8080"):
        assert parse(f"controller: {url}\n", "agent.yml", hostname="n1").controller == url
    assert parse("controller: https://ctl.example\n", "a", hostname="n1").insecure_http is False


def test_tunnel_networks_and_routed_subnets_are_parsed() -> None:
    c = parse(
        MINIMAL + "tunnel_networks: [10.99.0.0/16, 'fd99:f1ee:7::/64']\n"
        "routed_subnets: [192.168.10.0/24]\n",
        "agent.yml",
        hostname="n1",
    )
    assert [str(n) for n in c.tunnel_networks] == ["10.99.0.0/16", "fd99:f1ee:7::/64"]
    assert [str(n) for n in c.routed_subnets] == ["192.168.10.0/24"]
