#!/usr/bin/python
# Copyright: fleetvpn developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""A detached process kept by pidfile: the service manager for hosts without systemd."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: process
short_description: Keep a detached background process running, by pidfile
description:
  - The service manager for hosts without systemd (containers, the fleetvpn lab's namespace hosts).
  - C(started) starts the process when no live process matches the pidfile, and restarts it when
    the live one runs a different command line. C(stopped) sends SIGTERM, then SIGKILL after
    O(stop_timeout_s). C(reloaded) sends SIGHUP (starting the process if it is not running).
    C(restarted) stops and starts.
  - The process runs in its own session with stdin from /dev/null and stdout and stderr appended
    to O(log_file); it outlives the Ansible connection.
  - Idempotent; supports check mode and diff mode (the command line is shown, the environment is
    not, because it may carry secrets).
version_added: 0.1.0
author: fleetvpn developers
options:
  name:
    description: A name for messages.
    type: str
    required: true
  argv:
    description: The command line. Required for C(started), C(restarted) and C(reloaded).
    type: list
    elements: str
  pidfile:
    description: Where the process's pid is kept.
    type: path
    required: true
  state:
    description: What should be true afterwards.
    type: str
    choices: [started, stopped, restarted, reloaded]
    default: started
  log_file:
    description: stdout and stderr are appended here.
    type: path
  environment:
    description: Extra environment variables for the process.
    type: dict
    default: {}
  chdir:
    description: Working directory of the process.
    type: path
    default: /
  startup_check_s:
    description:
      - After starting, wait this long and fail (with the end of the log) if the process died.
    type: float
    default: 1.0
  stop_timeout_s:
    description: Seconds between SIGTERM and SIGKILL.
    type: float
    default: 10.0
"""

EXAMPLES = r"""
- name: Run the fleetvpn agent
  fleetvpn.fleet.process:
    name: fleetvpn-agent
    argv: [/opt/fleetvpn/bin/fleetvpn, agent, run, --config, /etc/fleetvpn/agent.yml]
    pidfile: /run/fleetvpn/agent.pid
    log_file: /var/log/fleetvpn-agent.log

- name: Reload its configuration (SIGHUP)
  fleetvpn.fleet.process:
    name: fleetvpn-agent
    argv: [/opt/fleetvpn/bin/fleetvpn, agent, run, --config, /etc/fleetvpn/agent.yml]
    pidfile: /run/fleetvpn/agent.pid
    state: reloaded
"""

RETURN = r"""
pid:
  description: The pid of the running process (absent when stopped).
  returned: when running
  type: int
action:
  description: What was done, C(none) when nothing was needed.
  returned: always
  type: str
  sample: started
"""

import os
import signal
import subprocess
import time

from ansible.module_utils.basic import AnsibleModule


def read_pid(pidfile):
    try:
        with open(pidfile) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def cmdline_of(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    if state == "Z" or not raw:
        return None
    return [part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")]


def runs(cmdline, argv):
    """Does ``cmdline`` (from /proc) run ``argv``? A script started through its shebang shows
    up as ``interpreter script args…``, so the tail must match and the program appear."""
    if cmdline is None:
        return False
    if cmdline == argv:
        return True
    tail = argv[1:]
    head = cmdline[: len(cmdline) - len(tail)] if tail else cmdline
    return (not tail or cmdline[-len(tail) :] == tail) and argv[0] in head


def live_pid(pidfile, argv):
    """The pid in ``pidfile`` if that process is alive (and runs ``argv`` when given)."""
    pid = read_pid(pidfile)
    if pid is None:
        return None, None
    cmdline = cmdline_of(pid)
    if cmdline is None:
        return None, None
    if argv is not None and not runs(cmdline, argv):
        return pid, cmdline  # alive, but something else (an older config, a reused pid)
    return pid, cmdline


def describe(pid, cmdline):
    if pid is None:
        return "stopped\n"
    return f"running (pid {pid}): {' '.join(cmdline or [])}\n"


def start(module, p):
    os.makedirs(os.path.dirname(p["pidfile"]) or "/", exist_ok=True)
    env = dict(os.environ)
    # Ansible's own variables are not the service's business.
    for key in [k for k in env if k.startswith("ANSIBLE_")]:
        del env[key]
    env.update({k: str(v) for k, v in p["environment"].items()})
    log_path = p["log_file"] or os.devnull
    if p["log_file"]:
        os.makedirs(os.path.dirname(log_path) or "/", exist_ok=True)
    with open(log_path, "ab") as log:
        offset = log.tell()
        try:
            proc = subprocess.Popen(
                p["argv"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=p["chdir"],
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as e:
            module.fail_json(msg=f"{p['name']}: cannot start {p['argv'][0]}: {e.strerror}")
    tmp = p["pidfile"] + ".tmp"
    with open(tmp, "w") as f:
        f.write(f"{proc.pid}\n")
    os.replace(tmp, p["pidfile"])
    deadline = time.monotonic() + p["startup_check_s"]
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        os.unlink(p["pidfile"])
        tail = ""
        if p["log_file"]:
            with open(log_path, "rb") as f:
                f.seek(offset)
                tail = f.read()[-2000:].decode(errors="replace")
        module.fail_json(
            msg=f"{p['name']} exited with status {proc.returncode} right after starting",
            log_tail=tail,
        )
    return proc.pid


def stop(pid, timeout_s):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cmdline_of(pid) is None:
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    while cmdline_of(pid) is not None:
        time.sleep(0.05)


def main():
    module = AnsibleModule(
        argument_spec={
            "name": {"type": "str", "required": True},
            "argv": {"type": "list", "elements": "str"},
            "pidfile": {"type": "path", "required": True},
            "state": {
                "type": "str",
                "default": "started",
                "choices": ["started", "stopped", "restarted", "reloaded"],
            },
            "log_file": {"type": "path"},
            "environment": {"type": "dict", "default": {}},
            "chdir": {"type": "path", "default": "/"},
            "startup_check_s": {"type": "float", "default": 1.0},
            "stop_timeout_s": {"type": "float", "default": 10.0},
        },
        required_if=[
            ("state", "started", ["argv"]),
            ("state", "restarted", ["argv"]),
            ("state", "reloaded", ["argv"]),
        ],
        supports_check_mode=True,
    )
    p = module.params
    state = p["state"]
    pid, cmdline = live_pid(p["pidfile"], None)
    if pid is not None and p["argv"] and not any(p["argv"][0] in part for part in cmdline):
        pid, cmdline = None, None  # a stale pidfile whose pid now belongs to another program
    matches = pid is not None and runs(cmdline, p["argv"]) if p["argv"] else pid is not None
    before = describe(pid, cmdline)

    if state == "stopped":
        action = "stopped" if pid is not None else "none"
    elif state == "started":
        action = "none" if matches else ("restarted" if pid is not None else "started")
    elif state == "reloaded":
        action = "reloaded" if matches else ("restarted" if pid is not None else "started")
    else:
        action = "restarted"

    changed = action != "none"
    after_desc = before
    if changed:
        after_desc = "stopped\n" if action == "stopped" else f"running: {' '.join(p['argv'])}\n"
        if action == "reloaded":
            after_desc = before.rstrip("\n") + " (reloaded: SIGHUP)\n"
    result = {
        "changed": changed,
        "action": action,
        "diff": {
            "before": before,
            "after": after_desc,
            "before_header": p["pidfile"],
            "after_header": p["pidfile"],
        },
    }
    if module.check_mode or not changed:
        if pid is not None and action != "stopped":
            result["pid"] = pid
        module.exit_json(**result)

    if action == "reloaded":
        os.kill(pid, signal.SIGHUP)
        result["pid"] = pid
    elif action == "stopped":
        stop(pid, p["stop_timeout_s"])
        if os.path.exists(p["pidfile"]):
            os.unlink(p["pidfile"])
    else:
        if pid is not None:
            stop(pid, p["stop_timeout_s"])
        result["pid"] = start(module, p)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
