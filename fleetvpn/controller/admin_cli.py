"""How ``fleetvpn controller nodes|tokens`` show what they found: a table for people, and the
stable ``--json`` documents for programs (snake_case keys, ``schema_version``, times in RFC 3339
UTC). Pure: rows in, text out; the commands themselves are in :mod:`fleetvpn.controller.cli`.
"""

from __future__ import annotations

import json
from typing import Any

from rich.markup import escape

from fleetvpn.controller.tokens import SCHEMA_VERSION, Revoked
from fleetvpn.model import format_time

STATE_STYLE = {"valid": "green", "active": "green", "used": "", "expired": "yellow",
               "revoked": "red"}  # fmt: skip


def json_document(kind: str, rows: list[dict[str, Any]]) -> str:
    """``{"schema_version": 1, KIND: [rows]}``: ``kind`` is ``tokens`` or ``nodes``."""
    return json.dumps({"schema_version": SCHEMA_VERSION, kind: rows}, indent=2)


def revoked_json(done: Revoked) -> str:
    return json.dumps(done.to_json(), indent=2)


def revoked_line(done: Revoked) -> str:
    if done.already:
        return f"{done.what} was already revoked at {format_time(done.revoked_at)}"
    return f"revoked {done.what}"


def _when(value: str | None) -> str:
    """RFC 3339 → ``2024-05-01 12:34`` (minutes are enough to read; --json has it all)."""
    return "–" if value is None else value[:16].replace("T", " ")


def _state(row: dict[str, Any]) -> str:
    state = str(row["state"])
    style = STATE_STYLE.get(state, "")
    if state == "used" and row.get("used_by"):
        text = f"used by {row['used_by']} {_when(row['used_at'])}"
    elif state == "revoked":
        text = f"revoked {_when(row['revoked_at'])}"
    else:
        text = state
    return f"[{style}]{escape(text)}[/]" if style else escape(text)


def _table(columns: list[str]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for column in columns:
        table.add_column(column, no_wrap=True)
    return table


def tokens_table(rows: list[dict[str, Any]]) -> Any:
    """Admin and enrollment tokens; the ids are what `tokens revoke` takes."""
    table = _table(["id", "kind", "name / site", "created", "expires", "state"])
    for row in rows:
        table.add_row(
            row["id"],
            row["kind"],
            escape(row["name"] if row["kind"] == "admin" else f"site {row['site']}"),
            _when(row["created_at"]),
            _when(row["expires_at"]),
            _state(row),
        )
    return table


def nodes_table(rows: list[dict[str, Any]]) -> Any:
    table = _table(["node", "site", "public key", "endpoint", "enrolled", "last report", "state"])
    for row in rows:
        table.add_row(
            row["name"],
            row["site"],
            row["public_key"],
            escape(row["endpoint"] or "–"),
            _when(row["enrolled_at"]),
            _when(row["last_report_at"]),
            _state(row),
        )
    return table


def print_table(table: Any, empty: str, count: int) -> None:
    import sys

    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    if count:
        console.print(table)
    else:
        console.print(empty)
