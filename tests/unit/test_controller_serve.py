"""`fleetvpn controller serve` as an operator runs it: a config file, HTTPS with its own
certificate, the probe responder beside the API, an admin token from the command line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .apiutil import self_signed_cert, wait_serving


def _port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fleetvpn(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleetvpn", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_serve_with_tls_and_the_probe_responder(tmp_path: Path) -> None:
    cert, key = self_signed_cert(tmp_path)
    probe_key = tmp_path / "probe.key"
    probe_key.write_text(fleetvpn("probe", "genkey").stdout)
    api_port, probe_port = _port(socket.SOCK_STREAM), _port(socket.SOCK_DGRAM)
    config = tmp_path / "controller.yml"
    config.write_text(
        f"listen: 127.0.0.1:{api_port}\n"
        f"database: sqlite:///{tmp_path / 'db' / 'controller.db'}\n"
        f"tls: {{cert: {cert}, key: {key}}}\n"
        f"probe_responder: {{listen: '127.0.0.1:{probe_port}', key_file: {probe_key}}}\n"
    )
    admin = fleetvpn("controller", "admin-token", "--config", str(config))
    assert admin.returncode == 0, admin.stderr
    token = admin.stdout.strip()
    assert token.startswith("fva_")
    assert token not in (tmp_path / "db" / "controller.db").read_bytes().decode("latin-1")

    server = subprocess.Popen(
        [sys.executable, "-m", "fleetvpn", "controller", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    env = {
        "FLEETVPN_CONTROLLER": f"https://127.0.0.1:{api_port}",
        "FLEETVPN_TOKEN": token,
        "FLEETVPN_CA_FILE": str(cert),
    }
    try:
        deadline = time.monotonic() + 30
        while (health := fleetvpn("health", "--json", env=env)).returncode == 2:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            assert time.monotonic() < deadline, health.stderr
            time.sleep(0.3)
        assert health.returncode == 0, health.stderr  # no links yet: nothing is broken
        assert json.loads(health.stdout)["schema_version"] == 1
        # Plain HTTP or an untrusted certificate do not get through.
        plain = fleetvpn(
            "health", env={**env, "FLEETVPN_CONTROLLER": f"http://127.0.0.1:{api_port}"}
        )
        assert plain.returncode == 2
        untrusted = fleetvpn("health", env={**env, "FLEETVPN_CA_FILE": ""})
        assert untrusted.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
        # The responder runs beside the API: a NAT probe against it works.
        nat = fleetvpn("probe", "nat", f"127.0.0.1:{probe_port}", "--key-file", str(probe_key),
                       "--json")  # fmt: skip
        assert nat.returncode == 0, nat.stderr
        assert json.loads(nat.stdout)["nat"] is False
    finally:
        server.terminate()
        server.wait(10)


def test_a_broken_config_is_one_clear_line(tmp_path: Path) -> None:
    config = tmp_path / "controller.yml"
    config.write_text("listen: 127.0.0.1:99999\n")
    result = fleetvpn("controller", "serve", "--config", str(config))
    assert result.returncode == 1
    assert f"{config}: listen: port: '99999' is not a port" in result.stderr
    assert "Traceback" not in result.stderr
    config.write_text("lisen: 1\n")
    assert "lisen: unknown key" in fleetvpn("controller", "serve", "--config", str(config)).stderr


@pytest.mark.parametrize("missing", ["tls.cert"])
def test_missing_tls_files_are_named(tmp_path: Path, missing: str) -> None:
    config = tmp_path / "controller.yml"
    config.write_text(f"tls: {{cert: {tmp_path}/none.crt, key: {tmp_path}/none.key}}\n")
    result = fleetvpn("controller", "serve", "--config", str(config))
    assert (
        result.returncode == 1 and f"{missing}: {tmp_path}/none.crt does not exist" in result.stderr
    )


def test_view_interval_and_token_cache_are_settings() -> None:
    from fleetvpn.controller.config import ConfigError, parse

    config = parse("view_interval_s: 10\nauth_cache_s: 2\n", "controller.yml")
    assert (config.view_interval_s, config.auth_cache_s) == (10, 2)
    assert (parse("").view_interval_s, parse("").auth_cache_s) == (0, 5)
    with pytest.raises(
        ConfigError, match=r"controller.yml: auth_cache_s: must be an integer in 0..3600"
    ):
        parse("auth_cache_s: -1\n", "controller.yml")


def test_access_log_is_a_setting_off_by_default() -> None:
    from fleetvpn.controller.config import ConfigError, parse

    assert parse("").access_log is False
    assert parse("access_log: true\n").access_log is True
    with pytest.raises(ConfigError, match=r"controller.yml: access_log: must be true or false"):
        parse("access_log: sometimes\n", "controller.yml")


class _AdminOnly:
    """Stands in for the store where a test fleet only needs an admin token (made by the CLI)."""

    def __init__(self, token: str) -> None:
        self.token = token

    def create_admin_token(self) -> str:
        return self.token


def _children(pid: int) -> list[int]:
    tasks = Path(f"/proc/{pid}/task")
    found: list[int] = []
    for task in tasks.iterdir() if tasks.exists() else []:
        children = task / "children"
        if children.exists():
            found += [int(c) for c in children.read_text().split()]
    return found


def _gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return True
        if stat.rsplit(")", 1)[1].split()[0] == "Z":  # a zombie has exited
            return True
        time.sleep(0.05)
    return False


def test_the_view_worker_process_serves_restarts_and_dies_with_the_api(tmp_path: Path) -> None:
    """`controller serve` computes the fleet view in a worker process: answers come from it,
    a killed worker is started again (writes after it still reach the view), and the worker
    never outlives the API, even a SIGKILLed one."""
    import httpx

    from .test_fleet_api import fleet

    port = _port(socket.SOCK_STREAM)
    config = tmp_path / "controller.yml"
    config.write_text(f"listen: 127.0.0.1:{port}\ndatabase: sqlite:///{tmp_path / 'c.db'}\n")
    token = fleetvpn("controller", "admin-token", "--config", str(config)).stdout.strip()
    server = subprocess.Popen(
        [sys.executable, "-m", "fleetvpn", "controller", "serve", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    admin = {"authorization": f"Bearer {token}"}
    try:
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        wait_serving(api, server, timeout_s=30)
        (worker,) = _children(server.pid)
        assert "fleetvpn.controller.views" in Path(f"/proc/{worker}/cmdline").read_text()
        assert "sqlite" not in Path(f"/proc/{worker}/cmdline").read_text()  # URL not in argv
        fleet(api, _AdminOnly(token))  # type: ignore[arg-type]

        def links() -> list[tuple[str, str, str]]:
            deadline = time.monotonic() + 30
            while True:  # this server may answer from a view a moment old: wait for it
                doc = api.get("/v1/health", headers=admin).json()
                rows = [(r["a"], r["b"], r["state"]) for r in doc["links"]]
                if len(rows) == len(set(_nodes())) - 1 or time.monotonic() > deadline:
                    return rows
                time.sleep(0.1)

        def _nodes() -> list[str]:
            return [n["name"] for n in api.get("/v1/nodes", headers=admin).json()["nodes"]]

        assert links() == [("branch1", "hub", "blackhole")]
        metrics = api.get("/metrics")
        assert metrics.status_code == 200
        assert 'fleetvpn_link_path_mtu_bytes{node="branch1",peer="hub",site="branch"} 1400' in (
            metrics.text
        )
        os.kill(worker, 9)
        assert _gone(worker, 10)
        from .apiutil import enroll

        enroll(api, token, "b2", "branch", "2" * 42 + "A=")  # a write after the kill
        assert [row[:2] for row in links()] == [("b2", "hub"), ("branch1", "hub")]
        (restarted,) = _children(server.pid)
        assert restarted != worker
        server.kill()  # no clean shutdown: the worker must go by itself
        server.wait(10)
        assert _gone(restarted, 10), "the view worker outlived its API process"
    finally:
        if server.poll() is None:
            server.terminate()
            server.wait(10)
