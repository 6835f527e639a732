"""The agent's config file (``fleetvpn agent run --config /etc/fleetvpn/agent.yml``), validated key
by key. Pure: parsing only (reading the file is :func:`load`'s one line of I/O).

Example (``controller`` is the only required key; the rest shows the defaults)::

    controller: https://198.19.1.10:8443         # the controller's base URL
    ca_file: /etc/fleetvpn/ca.pem                # optional: the fleet CA, pinned (see below)
    insecure_http: false                         # true: allow an http:// controller (the lab)
    enrollment_token_file: /etc/fleetvpn/enrollment.token   # read once, before enrolling
    node: branch1                                # default: the hostname
    endpoint: 198.19.1.11:51820                  # optional: where other nodes dial this one
    interface: wg0
    listen_port: 51820
    wireguard: auto                              # auto | kernel | userspace
    apply: true                                  # false: measure and report only
    probe:
      listen_port: 51821                         # this node's probe responder (UDP)
      key_file: /etc/fleetvpn/probe.key          # the fleet's probe key
      nat_responder: 198.19.1.10:4789            # optional: NAT measurement against it
      nat_max_lifetime_s: 300                    # the NAT search's upper bound
    state_dir: /var/lib/fleetvpn                 # wg.key, node.json (token), spool/, status.json
    intervals: {report_s: 30, desired_s: 30, pmtu_s: 600, nat_s: 3600, rtt_s: 30}
    on_stop: keep                                # keep | down: what SIGTERM does to the tunnel
    log_level: info                              # debug | info | warning | error
    spool_max_reports: 2000                      # reports kept on disk while the controller is away
    tunnel_networks: [10.99.0.0/16]              # optional: the fleet's tunnel subnets (below)
    routed_subnets: []                           # subnets a peer may route to us (its LAN)

Transport: an ``http://`` controller is refused unless ``insecure_http: true`` or its host is a
loopback address (the desired state says where this node's traffic goes: on the path, plain
HTTP lets anyone redirect it; a loopback controller is on this host, with no path to be on).
With ``ca_file`` the controller's certificate must chain to that CA alone (the fleet CA), not to
the system's store.

What the desired state may ask for (:mod:`fleetvpn.agent.desired`): this node's addresses and
its peers' tunnel addresses must lie in ``tunnel_networks`` (without it: the networks of the
addresses in the last good desired state, or on the very first start of the first document's,
trust on first use); a peer's other allowed IPs must lie in ``routed_subnets``. A default route
(a /0) is refused in both: a default route through the tunnel needs policy routing, which
fleetvpn does not do.

Errors: :class:`ConfigError`, whose text reads ``FILE: KEY: PROBLEM`` (``probe.key_file``,
``intervals.pmtu_s`` — the dotted key), with a did-you-mean for unknown keys.
"""

from __future__ import annotations

import difflib
import re
import socket
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import yaml

from fleetvpn import grammar
from fleetvpn.grammar import IPNetwork
from fleetvpn.model import NAME_PATTERN
from fleetvpn.net.endpoint import parse_endpoint

DEFAULT_PATH: Final = Path("/etc/fleetvpn/agent.yml")
_NAME_RE: Final = re.compile(NAME_PATTERN)
_IFNAME_RE: Final = re.compile(r"[A-Za-z0-9_.-]{1,15}")

Implementation = Literal["auto", "kernel", "userspace"]


class ConfigError(ValueError):
    """``str()`` reads ``FILE: KEY: PROBLEM``."""


@dataclass(frozen=True)
class Intervals:
    report_s: float = 30.0
    desired_s: float = 30.0
    pmtu_s: float = 600.0
    nat_s: float = 3600.0
    rtt_s: float = 30.0


@dataclass(frozen=True)
class ProbeConfig:
    listen_port: int = 51821
    key_file: Path = Path("/etc/fleetvpn/probe.key")
    nat_responder: tuple[str, int] | None = None
    nat_max_lifetime_s: float = 300.0


@dataclass(frozen=True)
class AgentConfig:
    controller: str
    node: str
    ca_file: Path | None = None
    enrollment_token_file: Path = Path("/etc/fleetvpn/enrollment.token")
    endpoint: str | None = None
    interface: str = "wg0"
    listen_port: int = 51820
    wireguard: Implementation = "auto"
    apply: bool = True
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    state_dir: Path = Path("/var/lib/fleetvpn")
    intervals: Intervals = field(default_factory=Intervals)
    on_stop: Literal["keep", "down"] = "keep"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    spool_max_reports: int = 2000
    insecure_http: bool = False
    tunnel_networks: tuple[IPNetwork, ...] = ()  # empty: derived (module docstring)
    routed_subnets: tuple[IPNetwork, ...] = ()

    # Files in state_dir (the layout is part of the agent's contract with Ansible).
    @property
    def private_key_file(self) -> Path:
        return self.state_dir / "wg.key"

    @property
    def node_file(self) -> Path:
        return self.state_dir / "node.json"

    @property
    def status_file(self) -> Path:
        return self.state_dir / "status.json"

    @property
    def desired_file(self) -> Path:
        return self.state_dir / "desired.json"

    @property
    def measurements_file(self) -> Path:
        return self.state_dir / "measurements.json"

    @property
    def spool_dir(self) -> Path:
        return self.state_dir / "spool"


_TOP: Final = {
    "controller", "ca_file", "enrollment_token_file", "node", "endpoint", "interface",
    "listen_port", "wireguard", "apply", "probe", "state_dir", "intervals", "on_stop",
    "log_level", "spool_max_reports", "insecure_http", "tunnel_networks", "routed_subnets",
}  # fmt: skip
_PROBE: Final = {"listen_port", "key_file", "nat_responder", "nat_max_lifetime_s"}
_INTERVALS: Final = {"report_s", "desired_s", "pmtu_s", "nat_s", "rtt_s"}


def load(path: Path) -> AgentConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse(text, str(path))


def parse(text: str, source: str = "<config>", *, hostname: str | None = None) -> AgentConfig:
    """Validate the YAML ``text``; ``hostname`` is the default node name (the host's, if None)."""

    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")

    try:
        doc: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise fail("", f"not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise fail("", "must be a mapping of settings (at least `controller: URL`)")

    def mapping(raw: Any, prefix: str, known: set[str]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise fail(prefix.rstrip("."), "must be a mapping")
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise fail(f"{prefix}{key}", f"unknown key{hint}")
        return raw

    def integer(
        raw: dict[str, Any], key: str, default: int, low: int, high: int, where: str
    ) -> int:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise fail(where, f"must be an integer in {low}..{high}, not {value!r}")
        return value

    def seconds(raw: dict[str, Any], key: str, default: float, low: float, where: str) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not value >= low:
            raise fail(where, f"must be a number of seconds >= {low:g}, not {value!r}")
        return float(value)

    def choice(key: str, default: str, options: tuple[str, ...]) -> Any:
        value = doc.get(key, default)
        if value not in options:
            raise fail(key, f"must be one of {', '.join(options)}, not {value!r}")
        return value

    def path(raw: dict[str, Any], key: str, default: Path | None, where: str) -> Path | None:
        value = raw.get(key, default)
        if value is None:
            return None
        if not isinstance(value, str | Path) or not str(value).startswith("/"):
            raise fail(where, f"must be an absolute path, not {value!r}")
        return Path(value)

    def endpoint(value: Any, where: str) -> tuple[str, int]:
        try:
            return parse_endpoint(str(value))
        except ValueError as e:
            raise fail(where, str(e)) from None

    mapping(doc, "", _TOP)
    if "controller" not in doc:
        raise fail("controller", "required: the controller's base URL, e.g. http://10.0.0.1:8080")
    controller = doc["controller"]
    parts = urlsplit(str(controller)) if isinstance(controller, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise fail("controller", f"must be an http:// or https:// URL, not {controller!r}")
    ca_file = path(doc, "ca_file", None, "ca_file")
    if ca_file is not None and parts.scheme != "https":
        raise fail("ca_file", "is only used with an https:// controller")
    insecure_http = doc.get("insecure_http", False)
    if not isinstance(insecure_http, bool):
        raise fail("insecure_http", f"must be true or false, not {insecure_http!r}")
    if parts.scheme == "http" and not insecure_http and not _loopback(parts.hostname):
        raise fail(
            "controller",
            f"{controller!r} is plain HTTP: use https:// (with ca_file), or set "
            "insecure_http: true where the path to the controller is trusted (the lab)",
        )

    def networks(key: str) -> tuple[IPNetwork, ...]:
        raw = doc.get(key, [])
        if not isinstance(raw, list):
            raise fail(key, "must be a list of CIDRs (10.99.0.0/16)")
        out: list[IPNetwork] = []
        for i, text in enumerate(raw):
            try:
                net = grammar.cidr(text, f"{key}[{i}]")
            except grammar.GrammarError as e:
                raise fail(f"{key}[{i}]", str(e).split(": ", 1)[-1]) from None
            if net.prefixlen == 0:
                raise fail(f"{key}[{i}]", f"{net}: a default route through the tunnel is refused")
            out.append(net)
        return tuple(out)

    tunnel_networks = networks("tunnel_networks")
    routed_subnets = networks("routed_subnets")

    node = doc.get("node", hostname if hostname is not None else socket.gethostname())
    if not isinstance(node, str) or not _NAME_RE.fullmatch(node):
        raise fail("node", f"{node!r} is not a node name ({NAME_PATTERN})")
    endpoint_text = doc.get("endpoint")
    if endpoint_text is not None:
        host, port = endpoint(endpoint_text, "endpoint")
        endpoint_text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    interface = doc.get("interface", "wg0")
    if not isinstance(interface, str) or not _IFNAME_RE.fullmatch(interface):
        raise fail("interface", f"{interface!r} is not an interface name (1-15 characters)")
    try:
        grammar.ifname(interface)
    except grammar.GrammarError as e:
        raise fail("interface", str(e).split(": ", 1)[-1]) from None
    apply = doc.get("apply", True)
    if not isinstance(apply, bool):
        raise fail("apply", f"must be true or false, not {apply!r}")

    raw_probe = mapping(doc.get("probe", {}), "probe.", _PROBE)
    nat_responder = raw_probe.get("nat_responder")
    probe = ProbeConfig(
        listen_port=integer(raw_probe, "listen_port", 51821, 1, 65535, "probe.listen_port"),
        key_file=path(raw_probe, "key_file", ProbeConfig.key_file, "probe.key_file")
        or ProbeConfig.key_file,
        nat_responder=None
        if nat_responder is None
        else endpoint(nat_responder, "probe.nat_responder"),
        nat_max_lifetime_s=seconds(
            raw_probe, "nat_max_lifetime_s", 300.0, 5.0, "probe.nat_max_lifetime_s"
        ),
    )
    listen_port = integer(doc, "listen_port", 51820, 1, 65535, "listen_port")
    if probe.listen_port == listen_port:
        raise fail("probe.listen_port", f"{listen_port} is also the WireGuard listen_port")

    raw_intervals = mapping(doc.get("intervals", {}), "intervals.", _INTERVALS)
    defaults = Intervals()
    intervals = Intervals(
        **{
            key: seconds(raw_intervals, key, getattr(defaults, key), 1.0, f"intervals.{key}")
            for key in sorted(_INTERVALS)
        }
    )
    return AgentConfig(
        controller=str(controller).rstrip("/"),
        node=node,
        ca_file=ca_file,
        enrollment_token_file=path(
            doc, "enrollment_token_file", AgentConfig.enrollment_token_file, "enrollment_token_file"
        )
        or AgentConfig.enrollment_token_file,
        endpoint=endpoint_text,
        interface=interface,
        listen_port=listen_port,
        wireguard=choice("wireguard", "auto", ("auto", "kernel", "userspace")),
        apply=apply,
        probe=probe,
        state_dir=path(doc, "state_dir", AgentConfig.state_dir, "state_dir")
        or AgentConfig.state_dir,
        intervals=intervals,
        on_stop=choice("on_stop", "keep", ("keep", "down")),
        log_level=choice("log_level", "info", ("debug", "info", "warning", "error")),
        spool_max_reports=integer(
            doc, "spool_max_reports", 2000, 2, 1_000_000, "spool_max_reports"
        ),
        insecure_http=insecure_http,
        tunnel_networks=tunnel_networks,
        routed_subnets=routed_subnets,
    )


def _loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return grammar.ip_address(host).is_loopback
    except grammar.GrammarError:
        return False


# What a reload (SIGHUP) cannot change: the node's identity, its state and its interface.
RESTART_ONLY: Final = ("controller", "node", "state_dir", "interface", "listen_port", "wireguard")


def reloaded(running: AgentConfig, new: AgentConfig) -> tuple[AgentConfig, list[str]]:
    """The config a SIGHUP applies: ``new`` with the restart-only keys kept as they run, and
    the names of those that differ (they take effect at the next restart)."""
    changed = [k for k in RESTART_ONLY if getattr(new, k) != getattr(running, k)]
    return replace(new, **{k: getattr(running, k) for k in RESTART_ONLY}), changed
