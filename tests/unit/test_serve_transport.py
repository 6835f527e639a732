"""TLS by default outside the lab (issue 11, item 7): `controller serve` refuses plain HTTP on
a non-loopback address unless the config says `insecure_http: true`."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fleetvpn.controller.config import ConfigError, parse, plain_http_refusal

from .apiutil import self_signed_cert
from .test_controller_serve import fleetvpn


@pytest.mark.parametrize(
    ("listen", "refused"),
    [
        ("0.0.0.0:8080", True),
        ("[::]:8080", True),
        ("192.0.2.10:8080", True),
        ("[2001:db8::1]:8080", True),
        ("127.0.0.1:8080", False),
        ("127.0.0.53:8080", False),
        ("[::1]:8080", False),
    ],
)
def test_plain_http_only_on_loopback(listen: str, refused: bool) -> None:
    problem = plain_http_refusal(parse(f"listen: '{listen}'\n"), "controller.yml")
    assert (problem is not None) == refused
    if problem is not None:
        assert problem.startswith("controller.yml: insecure_http: refusing plain HTTP on ")
        assert "not a loopback address" in problem and "insecure_http: true" in problem
    assert plain_http_refusal(parse(f"listen: '{listen}'\ninsecure_http: true\n")) is None


def test_tls_or_insecure_http_allow_any_address(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    config = parse(f"tls: {{cert: {cert}, key: {key}}}\n")  # on 0.0.0.0 by default
    assert config.listen[0] == "0.0.0.0" and plain_http_refusal(config) is None
    assert parse("").insecure_http is False
    with pytest.raises(ConfigError, match="insecure_http: must be true or false"):
        parse("insecure_http: yes please\n", "controller.yml")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_refuses_plain_http_on_all_addresses_then_serves_when_told(tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "controller.yml"
    base = f"listen: 0.0.0.0:{port}\ndatabase: sqlite:///{tmp_path / 'c.db'}\n"
    config.write_text(base)
    refused = fleetvpn("controller", "serve", "--config", str(config))
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"{config}: insecure_http: refusing plain HTTP on 0.0.0.0:{port}" in refused.stderr
    assert not (tmp_path / "c.db").exists()  # refused before anything was opened

    config.write_text(base + "insecure_http: true\n")
    server = subprocess.Popen(
        [sys.executable, "-m", "fleetvpn", "controller", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(10)
