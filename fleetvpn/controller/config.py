"""The controller's config file (``fleetvpn controller serve --config FILE``), validated key by key.

Example (every key optional)::

    listen: 0.0.0.0:8080                          # ADDR:PORT of the HTTP API
    database: sqlite:////var/lib/fleetvpn/controller.db   # or postgresql://user:pw@host/db
    tls: {cert: /etc/fleetvpn/api.crt, key: /etc/fleetvpn/api.key}   # HTTPS when given
    retention_days: 30                            # history kept per link and site
    max_body_bytes: 1048576                       # larger requests get 413
    probe_responder:                              # agents measure their NAT against it
      listen: "[::]:4789"
      key_file: /etc/fleetvpn/probe.key
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fleetvpn.net.responder import parse_endpoint

DEFAULT_DATABASE = "sqlite:////var/lib/fleetvpn/controller.db"


class ConfigError(ValueError):
    """``str()`` reads ``FILE: KEY: PROBLEM``."""


@dataclass(frozen=True)
class ControllerConfig:
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    database: str = DEFAULT_DATABASE
    tls_cert: Path | None = None
    tls_key: Path | None = None
    retention_days: int = 30
    max_body_bytes: int = 1 << 20
    responder_listen: tuple[str, int] | None = None
    responder_key_file: Path | None = None


_KEYS = {"listen", "database", "tls", "retention_days", "max_body_bytes", "probe_responder"}


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
    return ControllerConfig(
        listen=endpoint(doc.get("listen", "0.0.0.0:8080"), "listen"),
        database=database,
        tls_cert=cert,
        tls_key=key,
        retention_days=integer("retention_days", 30, 1, 3650),
        max_body_bytes=integer("max_body_bytes", 1 << 20, 1024, 64 << 20),
        responder_listen=responder_listen,
        responder_key_file=responder_key,
    )
