"""The controller's config file (``fleetvpn controller serve --config FILE``), validated key by key.

Example (every key optional)::

    listen: 0.0.0.0:8080                          # ADDR:PORT of the HTTP API
    database: sqlite:////var/lib/fleetvpn/controller.db   # or postgresql://user:pw@host/db
    tls: {cert: /etc/fleetvpn/api.crt, key: /etc/fleetvpn/api.key}   # HTTPS when given
    insecure_http: false                          # plain HTTP on a non-loopback listen
                                                  # address: refused unless true (a lab)
    retention_days: 30                            # history kept per link and site
    max_body_bytes: 1048576                       # larger requests (and reports inside a
                                                  # batch) get 413
    max_reports_per_node: 50000                   # stored per node; the oldest (by arrival)
                                                  # are pruned beyond it (about 5 % slack)
    report_rate_per_min: 12                       # report requests per node and minute, in
    report_burst: 30                              # bursts of up to this many; then 429 with
                                                  # Retry-After (agents wait and retry)
    metrics_token_file: /etc/fleetvpn/metrics.token   # /metrics wants this bearer token
                                                  # (without the key, /metrics is open)
    view_interval_s: 0                            # recompute the fleet view at most this often
                                                  # (and never busier than 1/3 of a core)
    view_process: true                            # compute it in a worker process (false: a
                                                  # thread, sharing the API's GIL)
    auth_cache_s: 5                               # a revoked token is refused this soon
    access_log: false                             # one log line per request (0.25 ms of CPU
                                                  # each: off by default, errors still logged)
    probe_responder:                              # agents measure their NAT against it
      listen: "[::]:4789"
      key_file: /etc/fleetvpn/probe.key
    tunnel:                                       # the WireGuard network the nodes share
      interface: wg0
      ipv4: 10.99.0.0/16                          # node n gets the n-th address
      ipv6: fd99:f1ee:7::/64                      # optional; the tunnel then carries IPv6
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fleetvpn.net.endpoint import parse_endpoint

DEFAULT_DATABASE = "sqlite:////var/lib/fleetvpn/controller.db"
DEFAULT_TUNNEL_V4 = ipaddress.IPv4Network("10.99.0.0/16")


class ConfigError(ValueError):
    """``str()`` reads ``FILE: KEY: PROBLEM``."""


@dataclass(frozen=True)
class TunnelConfig:
    interface: str = "wg0"
    ipv4: ipaddress.IPv4Network = DEFAULT_TUNNEL_V4
    ipv6: ipaddress.IPv6Network | None = None

    def addresses(self, node_id: int) -> list[str]:
        """Node ``node_id``'s tunnel addresses (CIDR): the id-th host of each network."""
        out = [f"{self.ipv4[node_id]}/{self.ipv4.prefixlen}"]
        if self.ipv6 is not None:
            out.append(f"{self.ipv6[node_id]}/{self.ipv6.prefixlen}")
        return out

    def capacity(self) -> int:
        return self.ipv4.num_addresses - 2


@dataclass(frozen=True)
class ControllerConfig:
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    database: str = DEFAULT_DATABASE
    tls_cert: Path | None = None
    tls_key: Path | None = None
    retention_days: int = 30
    max_body_bytes: int = 1 << 20
    view_interval_s: int = 0
    view_process: bool = True
    auth_cache_s: int = 5
    access_log: bool = False
    max_reports_per_node: int = 50000
    report_rate_per_min: int = 12
    report_burst: int = 30
    metrics_token_file: Path | None = None
    insecure_http: bool = False
    responder_listen: tuple[str, int] | None = None
    responder_key_file: Path | None = None
    tunnel: TunnelConfig = field(default_factory=TunnelConfig)


_KEYS = {
    "listen",
    "database",
    "tls",
    "retention_days",
    "max_body_bytes",
    "view_interval_s",
    "view_process",
    "auth_cache_s",
    "access_log",
    "max_reports_per_node",
    "report_rate_per_min",
    "report_burst",
    "metrics_token_file",
    "insecure_http",
    "probe_responder",
    "tunnel",
}


def load(path: Path) -> ControllerConfig:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse(text, str(path))


def parse(text: str, source: str = "<config>") -> ControllerConfig:
    def fail(key: str, problem: str) -> ConfigError:
        return ConfigError(f"{source}: {key}: {problem}" if key else f"{source}: {problem}")

    try:
        doc: Any = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise fail("", f"not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise fail("", "must be a mapping of settings")
    for key in doc:
        if key not in _KEYS:
            raise fail(str(key), f"unknown key (known: {', '.join(sorted(_KEYS))})")

    def endpoint(value: Any, key: str) -> tuple[str, int]:
        try:
            return parse_endpoint(str(value))
        except ValueError as e:
            raise fail(key, str(e)) from None

    def integer(key: str, default: int, low: int, high: int) -> int:
        value = doc.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise fail(key, f"must be an integer in {low}..{high}, not {value!r}")
        return value

    def boolean(key: str, default: bool) -> bool:
        value = doc.get(key, default)
        if not isinstance(value, bool):
            raise fail(key, f"must be true or false, not {value!r}")
        return value

    database = doc.get("database", DEFAULT_DATABASE)
    if not isinstance(database, str) or not database.startswith(("sqlite", "postgresql")):
        raise fail("database", "must be a sqlite:/// path URL or a postgresql:// URL")
    cert = key = None
    if "tls" in doc:
        tls = doc["tls"]
        if not isinstance(tls, dict) or set(tls) != {"cert", "key"}:
            raise fail("tls", "must have exactly `cert` and `key` (file paths)")
        cert, key = Path(tls["cert"]), Path(tls["key"])
        for name, p in (("tls.cert", cert), ("tls.key", key)):
            if not p.is_file():
                raise fail(name, f"{p} does not exist")
    responder_listen = responder_key = None
    if "probe_responder" in doc:
        pr = doc["probe_responder"]
        if not isinstance(pr, dict) or set(pr) != {"listen", "key_file"}:
            raise fail("probe_responder", "must have exactly `listen` and `key_file`")
        responder_listen = endpoint(pr["listen"], "probe_responder.listen")
        responder_key = Path(pr["key_file"])
    metrics_token_file = None
    if "metrics_token_file" in doc:
        value = doc["metrics_token_file"]
        if not isinstance(value, str) or not value:
            raise fail("metrics_token_file", "must be a file path")
        metrics_token_file = Path(value)
        if not metrics_token_file.is_file():
            raise fail("metrics_token_file", f"{metrics_token_file} does not exist")
    tunnel = TunnelConfig()
    if "tunnel" in doc:
        raw = doc["tunnel"]
        if not isinstance(raw, dict) or not set(raw) <= {"interface", "ipv4", "ipv6"}:
            raise fail("tunnel", "must be a mapping with `interface`, `ipv4` and `ipv6`")
        try:
            v4 = ipaddress.IPv4Network(str(raw.get("ipv4", tunnel.ipv4)))
        except ValueError as e:
            raise fail("tunnel.ipv4", f"not an IPv4 network: {e}") from None
        try:
            v6 = ipaddress.IPv6Network(str(raw["ipv6"])) if raw.get("ipv6") else None
        except ValueError as e:
            raise fail("tunnel.ipv6", f"not an IPv6 network: {e}") from None
        interface = str(raw.get("interface", tunnel.interface))
        if not 0 < len(interface) <= 15 or "/" in interface or " " in interface:
            raise fail("tunnel.interface", f"{interface!r} is not an interface name")
        tunnel = TunnelConfig(interface, v4, v6)
    return ControllerConfig(
        tunnel=tunnel,
        listen=endpoint(doc.get("listen", "0.0.0.0:8080"), "listen"),
        database=database,
        tls_cert=cert,
        tls_key=key,
        retention_days=integer("retention_days", 30, 1, 3650),
        max_body_bytes=integer("max_body_bytes", 1 << 20, 1024, 64 << 20),
        view_interval_s=integer("view_interval_s", 0, 0, 3600),
        auth_cache_s=integer("auth_cache_s", 5, 0, 3600),
        view_process=boolean("view_process", True),
        max_reports_per_node=integer("max_reports_per_node", 50000, 100, 100_000_000),
        report_rate_per_min=integer("report_rate_per_min", 12, 1, 600_000),
        report_burst=integer("report_burst", 30, 1, 100_000),
        metrics_token_file=metrics_token_file,
        access_log=boolean("access_log", False),
        insecure_http=boolean("insecure_http", False),
        responder_listen=responder_listen,
        responder_key_file=responder_key,
    )


def plain_http_refusal(config: ControllerConfig, source: str = "<config>") -> str | None:
    """Why ``controller serve`` must not start with this config, or None. Plain HTTP is
    refused on any listen address but loopback (tokens and every node's desired state would
    cross the network in clear, and anyone on the path could redirect the fleet) unless the
    config says ``insecure_http: true`` (a lab, or TLS ended by a proxy on the same host)."""
    host, port = config.listen
    if config.tls_cert is not None or config.insecure_http:
        return None
    if ipaddress.ip_address(host).is_loopback:
        return None
    return (
        f"{source}: insecure_http: refusing plain HTTP on {host}:{port}, which is not a "
        "loopback address: give `tls: {cert: FILE, key: FILE}`, or set `insecure_http: true` "
        "to serve tokens and desired state unencrypted (a lab)"
    )


def read_token_file(path: Path, key: str = "metrics_token_file") -> str:
    """The token a file holds (one line; surrounding whitespace dropped); ConfigError if the
    file cannot be read or holds no printable ASCII token."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{key}: cannot read {path}: {e}") from None
    if not token or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{key}: {path} must hold one token (printable ASCII, no spaces)")
    return token
