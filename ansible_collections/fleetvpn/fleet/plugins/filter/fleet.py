# Copyright: fleetvpn developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filters that turn the controller's health and tune documents into lines for people."""

from __future__ import annotations


def _fmt(value, unit=""):
    if value is None:
        return "-"
    if value == 0 and unit == " s":
        return "off"
    return f"{value}{unit}"


def _direction(d):
    return (
        f"{d['node']}→{d['peer']}: path MTU {_fmt(d.get('path_mtu'))}, "
        f"MTU {_fmt(d.get('configured_mtu'))}→{_fmt(d.get('recommended_mtu'))}, "
        f"keepalive {_fmt(d.get('configured_keepalive_s'), ' s')}→"
        f"{_fmt(d.get('recommended_keepalive_s'), ' s')}"
    )


def health_lines(doc):
    """``GET /v1/health`` -> one line per link (state, both directions, reason), then a summary."""
    lines = []
    for link in doc.get("links", []):
        lines.append(
            f"{link['a']} ({link['site_a']}) ↔ {link['b']} ({link['site_b']}): {link['state']} | "
            f"{_direction(link['a_to_b'])} | {_direction(link['b_to_a'])} | {link['reason']}"
        )
    summary = ", ".join(f"{n} {state}" for state, n in sorted(doc.get("summary", {}).items()))
    lines.append(f"{len(doc.get('links', []))} links: {summary or 'none'}")
    return lines


def health_problems(doc, ok_states=("ok",)):
    """The links whose state is not in ``ok_states`` (``a ↔ b: state``; health_lines has the
    reasons)."""
    return [
        f"{link['a']} ↔ {link['b']}: {link['state']}"
        for link in doc.get("links", [])
        if link["state"] not in ok_states
    ]


def tune_lines(changes):
    """``GET /v1/tune``'s changes -> ``node → peer: setting current → recommended — reason``."""
    if not changes:
        return ["nothing to change: every node runs what the controller recommends"]
    return [
        f"{c['node']} → {c['peer']}: {c['setting']} {_fmt(c.get('current'))} → "
        f"{_fmt(c.get('recommended'))} — {c['reason']}"
        for c in changes
    ]


class FilterModule:
    def filters(self):
        return {
            "health_lines": health_lines,
            "health_problems": health_problems,
            "tune_lines": tune_lines,
        }
