"""``fleetvpn health`` and ``fleetvpn tune``: the fleet at a glance, from the controller.

Exit codes (for pipelines, like ``netbird status --check``): 0 healthy, 1 problems,
2 controller unreachable or refusing (bad token). The client is the standard library's: nodes
that only run the agent need nothing more to ask the controller.
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import click

from fleetvpn.model import HEALTH_SEVERITY

UNREACHABLE = 2
DEFAULT_CONTROLLER = "http://127.0.0.1:8080"
STATE_STYLE = {
    "ok": "green",
    "degraded": "yellow",
    "fragmenting": "blue",
    "blackhole": "red bold",
    "stale": "magenta",
    "down": "red",
    "unmeasured": "cyan",
}


class ControllerUnreachable(click.ClickException):
    exit_code = UNREACHABLE


def controller_options(f: Any) -> Any:
    f = click.option(
        "--token-file",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="FLEETVPN_TOKEN_FILE",
        help="File holding an admin token (or set FLEETVPN_TOKEN).",
    )(f)
    f = click.option(
        "--controller",
        envvar="FLEETVPN_CONTROLLER",
        default=DEFAULT_CONTROLLER,
        show_default=True,
        help="Controller URL (or set FLEETVPN_CONTROLLER).",
    )(f)
    return f


def _token(token_file: Path | None) -> str:
    if token_file is not None:
        try:
            return token_file.read_text().strip()
        except OSError as e:
            raise ControllerUnreachable(
                f"{token_file}: cannot read the token: {e.strerror}"
            ) from None
    token = os.environ.get("FLEETVPN_TOKEN", "")
    if not token:
        raise ControllerUnreachable("no token: give --token-file or set FLEETVPN_TOKEN")
    return token


def get_json(controller: str, path: str, token: str, **query: Any) -> dict[str, Any]:
    params = {k: str(v).lower() if isinstance(v, bool) else v for k, v in query.items() if v}
    url = controller.rstrip("/") + path + ("?" + urllib.parse.urlencode(params) if params else "")
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    context = ssl.create_default_context(cafile=os.environ.get("FLEETVPN_CA_FILE"))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            doc = json.load(response)
    except urllib.error.HTTPError as e:
        try:
            detail = json.load(e).get("error", e.reason)
        except (ValueError, AttributeError):
            detail = e.reason
        raise ControllerUnreachable(f"{controller} answered {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ControllerUnreachable(
            f"cannot reach the controller at {controller}: {reason}"
        ) from None
    except ValueError:
        raise ControllerUnreachable(f"{controller} did not answer with JSON") from None
    if not isinstance(doc, dict):
        raise ControllerUnreachable(f"{controller} answered with an unexpected document")
    return doc


def _num(value: Any, fmt: str = "{}") -> str:
    return "–" if value is None else fmt.format(value)


def _age(seconds: Any) -> str:
    if seconds is None:
        return "–"
    s = float(seconds)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m" if s < 7200 else f"{s / 3600:.0f}h"


def _pair(a: Any, b: Any) -> str:
    """``a/b``, or one number when both ways agree."""
    return _num(a) if a == b else f"{_num(a)}/{_num(b)}"


SEVERITY = HEALTH_SEVERITY  # worst first, as the controller ranks a link's two directions
REASON_WIDTH = 46  # the reason column's budget: the whole table fits 160 columns


def _rank(state: Any) -> int:
    return SEVERITY.index(state) if state in SEVERITY else 0


def short_reason(row: dict[str, Any]) -> str:
    """One line for the table: the worse direction and the gist of its reason (empty for an
    ok link). The full reasons are in --json and --why."""
    if row["state"] == "ok":
        return ""
    ab, ba = row["a_to_b"], row["b_to_a"]
    worse, other, arrow = (ab, ba, f"{row['a']}→{row['b']}")
    if _rank(ba["state"]) < _rank(ab["state"]):
        worse, other, arrow = (ba, ab, f"{row['b']}→{row['a']}")
    text = str(worse.get("reason") or "")
    state = str(worse["state"])
    if text.startswith(f"{state}: "):
        text = text[len(state) + 2 :]
    if state == "blackhole" and worse.get("path_mtu") is not None:
        gist = f"MTU {_num(worse.get('configured_mtu'))} > path {worse['path_mtu']}, no ICMP"
    elif state == "unmeasured":
        gist = "not measured yet"
    else:
        clauses = text.split("; ")
        gist = clauses[0].split(" (")[0].split(": ")[0]
        if len(clauses) > 1:
            gist += f" (+{len(clauses) - 1})"
    if other["state"] == state:  # the same both ways: a⇄b
        arrow = f"{row['a']}⇄{row['b']}"
    elif other["state"] != "ok":
        gist += f"; back: {other['state']}"
    return f"{arrow} {gist}"


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def health_table(doc: dict[str, Any]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"fleet health at {doc['generated_at']}",
        title_justify="left",
        expand=False,
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    for column in (
        "link", "state", "handshake\nage", "rtt", "loss", "path MTU\n→/←", "MTU\nconf→rec",
        "keepalive\nconf→rec", "NAT\nlifetime", "report\nage",
    ):  # fmt: skip
        table.add_column(column, no_wrap=True)
    table.add_column("reason\n(the worse way; --why: all)", no_wrap=True)
    for row in doc["links"]:
        ab, ba = row["a_to_b"], row["b_to_a"]
        ages = [d["handshake_age_s"] for d in (ab, ba) if d["handshake_age_s"] is not None]
        rtts = [d["rtt_s"] for d in (ab, ba) if d["rtt_s"] is not None]
        losses = [d["loss_ratio"] for d in (ab, ba) if d["loss_ratio"] is not None]
        style = STATE_STYLE.get(row["state"], "")
        table.add_row(
            f"{row['a']} ↔ {row['b']}",
            f"[{style}]{row['state']}[/]",
            _age(min(ages)) if ages else "–",
            f"{min(rtts) * 1000:.0f} ms" if rtts else "–",
            f"{max(losses):.1%}" if losses else "–",
            _pair(ab["path_mtu"], ba["path_mtu"]),
            f"{_pair(ab['configured_mtu'], ba['configured_mtu'])}→"
            f"{_pair(ab['recommended_mtu'], ba['recommended_mtu'])}",
            f"{_pair(ab['configured_keepalive_s'], ba['configured_keepalive_s'])}→"
            f"{_pair(ab['recommended_keepalive_s'], ba['recommended_keepalive_s'])}",
            _num(row["mapping_lifetime_s"], "{:g}s"),
            _age(row["report_age_s"]),
            _cut(short_reason(row), REASON_WIDTH),
        )
    return table


def why_lines(doc: dict[str, Any]) -> list[str]:
    """--why: every shown link that is not ok, with its sites and both directions' full
    reasons (and the MTU and keepalive reasons where a setting should change)."""
    lines: list[str] = []
    for row in doc["links"]:
        if row["state"] == "ok":
            continue
        lines.append(f"{row['a']} ({row['site_a']}) ↔ {row['b']} ({row['site_b']}): {row['state']}")
        for (src, dst), d in (((row["a"], row["b"]), row["a_to_b"]),
                              ((row["b"], row["a"]), row["b_to_a"])):  # fmt: skip
            lines.append(f"  {src}→{dst} {d['reason']}")
            if d.get("configured_mtu") != d.get("recommended_mtu") and d.get("mtu_reason"):
                lines.append(f"    MTU {d['recommended_mtu']}: {d['mtu_reason']}")
            if d.get("configured_keepalive_s") != d.get("recommended_keepalive_s") and d.get(
                "keepalive_reason"
            ):
                keepalive = d["recommended_keepalive_s"]
                lines.append(f"    keepalive {keepalive}: {d['keepalive_reason']}")
    return lines


def _print_health(doc: dict[str, Any], note: str = "", why: bool = False) -> None:
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    if doc["links"]:
        console.print(health_table(doc))
    summary = ", ".join(f"{n} {state}" for state, n in sorted(doc["summary"].items())) or "no links"
    console.print(f"{len(doc['links'])} links shown; fleet: {summary}")
    if note:
        console.print(note)
    if why:
        for line in why_lines(doc):
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    elif any(row["state"] != "ok" for row in doc["links"]):
        console.print("--why: the full reasons of the links that are not ok")


# A fleet with more links than this shows, without --site or --all, its summary and its
# problem links (at most this many): a table of 100,000 rows helps no one.
TABLE_ROWS = 100


def _health_doc(
    controller: str, token: str, site: str | None, problems: bool, everything: bool
) -> tuple[dict[str, Any], str]:
    """The document to show and a note on what was left out."""
    if site is not None or everything:
        return get_json(controller, "/v1/health", token, site=site, problems=problems), ""
    doc = get_json(controller, "/v1/health", token, problems=problems, limit=TABLE_ROWS)
    if doc.get("next_after") is None:  # all of it (or a controller that does not page)
        return doc, ""
    if not problems:
        doc = get_json(controller, "/v1/health", token, problems=True, limit=TABLE_ROWS)
    matched = doc.get("links_matched", len(doc["links"]))
    note = (
        f"{matched:,} links are not ok; the first {len(doc['links']):,} are shown"
        if matched > len(doc["links"])
        else f"only the {matched:,} links that are not ok are shown"
    )
    return doc, f"{note} (a large fleet): --site S for a site, --all for every link, --json"


@click.command()
@controller_options
@click.option("--site", help="Only links with an end in this site.")
@click.option("--problems", is_flag=True, help="Only links that are not ok.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema_version 1).")
@click.option(
    "--watch",
    "watch_s",
    type=float,
    is_flag=False,
    flag_value=5.0,
    default=None,
    metavar="[SECONDS]",
    help="Refresh every SECONDS (default 5) until interrupted.",
)
@click.option(
    "--why",
    "-v",
    "why",
    is_flag=True,
    help="Below the table, the full reasons (both directions) of each link that is not ok.",
)
@click.option(
    "--all",
    "everything",
    is_flag=True,
    help=f"Every link even in a fleet of more than {TABLE_ROWS} (the table otherwise shows the"
    " summary and the problem links).",
)
def health(
    controller: str,
    token_file: Path | None,
    site: str | None,
    problems: bool,
    as_json: bool,
    watch_s: float | None,
    why: bool,
    everything: bool,
) -> None:
    """One row per link: state, handshake age, RTT, loss, path MTU each way, MTU and keepalive
    configured vs recommended, NAT lifetime, report age, and the reason.

    A fleet of more than 100 links shows, without --site or --all, the fleet's summary and the
    links that are not ok. The reason column shows the gist of the worse direction's reason;
    --why prints both directions' full reasons below the table. --json prints the whole
    document (schema_version 1).

    Exits 0 when every link is ok, 1 when there are problems, 2 when the controller cannot be
    reached.
    """
    token = _token(token_file)
    while True:
        if as_json:
            doc = get_json(controller, "/v1/health", token, site=site, problems=problems)
            click.echo(json.dumps(doc, indent=2))
        else:
            doc, note = _health_doc(controller, token, site, problems, everything)
            if watch_s is not None:
                click.clear()
            _print_health(doc, note, why)
        if watch_s is None:
            break
        time.sleep(watch_s)
    sys.exit(0 if doc.get("healthy") else 1)


@click.command()
@controller_options
@click.option("--site", help="Only nodes of this site.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (schema_version 1).")
def tune(controller: str, token_file: Path | None, site: str | None, as_json: bool) -> None:
    """What would change: current → recommended MTU and keepalive, with the reasons."""
    doc = get_json(controller, "/v1/tune", _token(token_file), site=site)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    if not doc["changes"]:
        click.echo("nothing to change: every node applies what the controller recommends")
        return
    for c in doc["changes"]:
        click.echo(
            f"{c['node']} → {c['peer']}: {c['setting']} {c['current']} → {c['recommended']}\n"
            f"    {c['reason']}"
        )
