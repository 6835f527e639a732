"""Who may talk to the controller: enrollment, the token list, revocation of tokens and nodes.

Functions over a :class:`~fleetvpn.controller.store.Store` (the API and ``fleetvpn controller
tokens|nodes`` call them; the CLI works on the store directly, like ``admin-token``). Only a
token's SHA-256 hash is ever stored, so nothing here can show a token again.

Contract:

- :func:`enroll` spends an enrollment token with one conditional ``UPDATE … WHERE used_at IS
  NULL AND revoked_at IS NULL AND expires_at >= now RETURNING site``: the database says which
  request won, on SQLite (one writer at a time) and on PostgreSQL (a second ``UPDATE`` of the
  row waits for the first to commit, then finds ``used_at`` set and changes nothing), however
  many controllers share it. The winner inserts the node in the same transaction; a name or
  key already enrolled raises :class:`Conflict` and rolls back, so the token stays unspent.
  A request that did not win is told why (:class:`Forbidden`): unknown, revoked, expired, or
  used by another node — unless it is the same enrollment again (below).
- **A retried enrollment** (same token, same name, same public key: the agent never got the
  answer) returns the same node with a *new* node token, and the node's previous token stops
  working (its hash goes to ``retired_tokens``, which every API process reads with the
  revocations). The previous token cannot be given again — only its hash was stored — and
  handing out a second valid one would leave a token nobody holds working forever. Allowed only
  while the enrollment token has not expired or been revoked, the node is not revoked, and the
  node has not reported yet: a node that reported had its token, so a spent token is worth
  nothing once its node is running. Concurrent retries: one gets the token, the others 403.
- :func:`list_tokens`, :func:`revoke_token`: admin and enrollment tokens, by id (``a3`` admin
  token 3, ``e7`` enrollment token 7). :func:`list_nodes`, :func:`revoke_node`: nodes by name.
  Revoking is idempotent (``already`` says it was revoked before) and never undone.
- :func:`revocation_mark` changes whenever a node is revoked: the API polls it
  (:func:`watch_revocations`) to recompute the fleet view, so a node revoked by any process
  (this CLI, another controller) leaves every peer's desired state within seconds.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from fleetvpn import grammar
from fleetvpn.controller.store import (
    Conflict,
    Forbidden,
    NotFound,
    Store,
    _aware,
    admin_tokens,
    enrollment_tokens,
    hash_token,
    new_token,
    nodes,
    retired_tokens,
    utcnow,
)
from fleetvpn.model import format_time

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1  # of the --json documents of `controller tokens list` / `nodes list`
REVOCATION_POLL_S = 5.0  # how often an API process looks for nodes revoked elsewhere
TOKEN_ID_PATTERN = "a<N> (admin token) or e<N> (enrollment token)"
_TOKEN_ID_RE = re.compile(r"([ae])([1-9][0-9]{0,17})", re.ASCII)


@dataclass(frozen=True)
class Enrollment:
    node: str
    site: str
    node_token: str
    reissued: bool  # a retry: the same node, a new token (the one issued before is retired)


def enroll(
    store: Store,
    enrollment_token: str,
    name: str,
    public_key: str,
    *,
    listen_port: int = 51820,
    endpoint: str | None = None,
) -> Enrollment:
    """Spend ``enrollment_token`` on a new node ``name`` (or answer a retry of that enrollment);
    see the module docstring. Raises Forbidden or Conflict with a message for the client."""
    now = utcnow()
    digest = hash_token(enrollment_token)
    token = new_token("fvn")
    et = enrollment_tokens
    with store.tx() as conn:
        won = conn.execute(
            et.update()
            .where(
                et.c.token_hash == digest,
                et.c.used_at.is_(None),
                et.c.revoked_at.is_(None),
                et.c.expires_at >= now,
            )
            .values(used_at=now, used_by=name)
            .returning(et.c.site)
        ).first()
        if won is not None:
            site = str(won.site)
            for column, value, what in (
                (nodes.c.name, name, "node name"),
                (nodes.c.public_key, public_key, "public key"),
            ):
                if conn.scalar(sa.select(nodes.c.id).where(column == value)) is not None:
                    raise Conflict(f"{what} {value!r} is already enrolled")  # rolls back
            try:
                conn.execute(
                    nodes.insert().values(
                        name=name,
                        site=site,
                        public_key=public_key,
                        listen_port=listen_port,
                        endpoint=endpoint,
                        token_hash=hash_token(token),
                        enrolled_at=now,
                    )
                )
            except sa.exc.IntegrityError:  # the same name or key enrolled by another token now
                raise Conflict(
                    f"node name {name!r} or its public key is already enrolled"
                ) from None
            return Enrollment(name, site, token, reissued=False)
    return _retry(store, digest, name, public_key, token, now)


def _retry(
    store: Store, digest: str, name: str, public_key: str, token: str, now: datetime
) -> Enrollment:
    """The token was not spent now: the same enrollment again, or Forbidden saying why not."""
    with store.tx() as conn:
        et = enrollment_tokens
        row = conn.execute(sa.select(et).where(et.c.token_hash == digest)).first()
        if row is None:
            raise Forbidden("unknown enrollment token")
        if row.revoked_at is not None:
            raise Forbidden("enrollment token revoked")
        expires = _aware(row.expires_at)
        if expires is not None and expires < now:
            raise Forbidden("enrollment token expired")
        if row.used_at is None:  # not expected (the UPDATE would have matched): say so
            raise Forbidden("enrollment token was not spent (a concurrent change?); try again")
        spent = Forbidden(f"enrollment token already used by {row.used_by}")
        if row.used_by != name:
            raise spent
        node = conn.execute(
            sa.select(nodes.c.id, nodes.c.site, nodes.c.public_key, nodes.c.token_hash,
                      nodes.c.revoked_at, nodes.c.last_report_at)
            .where(nodes.c.name == name)
        ).first()  # fmt: skip
        if node is None or node.public_key != public_key or node.site != row.site:
            raise spent
        if node.revoked_at is not None:
            raise Forbidden(f"enrollment token already used by {name}, which is revoked")
        if node.last_report_at is not None:
            raise Forbidden(f"enrollment token already used by {name}, which has reported since")
        # Compare and swap: a concurrent retry, revocation or first report changes the row.
        swapped = conn.execute(
            nodes.update()
            .where(
                nodes.c.id == node.id,
                nodes.c.token_hash == node.token_hash,
                nodes.c.revoked_at.is_(None),
                nodes.c.last_report_at.is_(None),
            )
            .values(token_hash=hash_token(token))
        )
        if swapped.rowcount != 1:
            raise Forbidden(f"enrollment of {name} changed meanwhile (a concurrent retry?)")
        conn.execute(
            retired_tokens.insert().values(
                token_hash=node.token_hash, node_id=node.id, retired_at=now
            )
        )
    log.info("enrollment of %s retried: a new node token issued, the previous one retired", name)
    return Enrollment(name, str(row.site), token, reissued=True)


# --- tokens ------------------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    moment = _aware(value)
    return None if moment is None else format_time(moment)


def list_tokens(store: Store) -> list[dict[str, Any]]:
    """Every admin and enrollment token (never the token: only its hash is stored), admin
    tokens first, each kind by id. ``state``: valid, used, expired or revoked."""
    now = utcnow()
    out: list[dict[str, Any]] = []
    with store.tx() as conn:
        for row in conn.execute(sa.select(admin_tokens).order_by(admin_tokens.c.id)):
            out.append(
                {
                    "id": f"a{row.id}",
                    "kind": "admin",
                    "name": str(row.name),
                    "site": None,
                    "created_at": _time(row.created_at),
                    "expires_at": None,
                    "used_at": None,
                    "used_by": None,
                    "revoked_at": _time(row.revoked_at),
                    "state": "revoked" if row.revoked_at is not None else "valid",
                }
            )
        et = enrollment_tokens
        for row in conn.execute(sa.select(et).order_by(et.c.id)):
            expires = _aware(row.expires_at)
            if row.revoked_at is not None:
                state = "revoked"
            elif row.used_at is not None:
                state = "used"
            elif expires is not None and expires < now:
                state = "expired"
            else:
                state = "valid"
            out.append(
                {
                    "id": f"e{row.id}",
                    "kind": "enrollment",
                    "name": None,
                    "site": str(row.site),
                    "created_at": _time(row.created_at),
                    "expires_at": _time(row.expires_at),
                    "used_at": _time(row.used_at),
                    "used_by": row.used_by,
                    "revoked_at": _time(row.revoked_at),
                    "state": state,
                }
            )
    return out


def parse_token_id(text: str) -> tuple[sa.Table, int]:
    """``a3`` → (admin_tokens, 3); ``e7`` → (enrollment_tokens, 7). ValueError otherwise."""
    match = _TOKEN_ID_RE.fullmatch(text.strip().lower()) if text.isascii() else None
    if match is None:
        raise ValueError(f"{text!r} is not a token id: {TOKEN_ID_PATTERN}, as `tokens list` shows")
    table = admin_tokens if match[1] == "a" else enrollment_tokens
    return table, int(match[2])


@dataclass(frozen=True)
class Revoked:
    what: str  # "admin token a3 (name ops)", "node branch1"
    revoked_at: datetime
    already: bool  # it was revoked before (then revoked_at is that first revocation)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "revoked": self.what,
            "revoked_at": format_time(self.revoked_at),
            "already_revoked": self.already,
        }


def revoke_token(store: Store, token_id: str) -> Revoked:
    """Revoke an admin or enrollment token by id (ValueError: not an id; NotFound)."""
    table, number = parse_token_id(token_id)
    now = utcnow()
    with store.tx() as conn:
        done = conn.execute(
            table.update()
            .where(table.c.id == number, table.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        label = "name" if table is admin_tokens else "site"
        row = conn.execute(
            sa.select(table.c.revoked_at, table.c[label]).where(table.c.id == number)
        ).first()
    kind = "admin token" if table is admin_tokens else "enrollment token"
    if row is None:
        raise NotFound(f"no {kind} {token_id}")
    what = f"{kind} {token_id.strip().lower()} ({label} {row[1]})"
    revoked_at = _aware(row.revoked_at)
    assert revoked_at is not None
    return Revoked(what, revoked_at, already=done.rowcount == 0)


# --- nodes -------------------------------------------------------------------------------------


def list_nodes(store: Store) -> list[dict[str, Any]]:
    """Every node, revoked ones too, by site and name. ``state``: active or revoked."""
    rows = []
    for n in store.nodes():
        rows.append(
            {
                "name": n["name"],
                "site": n["site"],
                "public_key": n["public_key"],
                "listen_port": n["listen_port"],
                "endpoint": n["endpoint"],
                "enrolled_at": _time(n["enrolled_at"]),
                "last_report_at": _time(n["last_report_at"]),
                "revoked_at": _time(n["revoked_at"]),
                "state": "revoked" if n["revoked_at"] is not None else "active",
            }
        )
    return rows


def revoke_node(store: Store, name: str) -> Revoked:
    """Revoke a node: its token is refused (by every API process within its token cache's
    time), and it leaves every peer's desired state with the next fleet view. NotFound (also
    for what is not a node name at all: nothing unchecked reaches the database)."""
    if not grammar.is_name(name):
        raise NotFound(f"no node {grammar.shown(name)}")
    now = utcnow()
    with store.tx() as conn:
        done = conn.execute(
            nodes.update()
            .where(nodes.c.name == name, nodes.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        revoked_at = conn.scalar(sa.select(nodes.c.revoked_at).where(nodes.c.name == name))
    if revoked_at is None:
        raise NotFound(f"no node {name!r}")
    moment = _aware(revoked_at)
    assert moment is not None
    return Revoked(f"node {name}", moment, already=done.rowcount == 0)


def revocation_mark(store: Store) -> tuple[int, datetime | None]:
    """(how many nodes are revoked, the latest revocation): changes with every revocation
    (nodes are never un-revoked or deleted). One aggregate over the nodes table."""
    with store.tx() as conn:
        count, latest = conn.execute(
            sa.select(sa.func.count(nodes.c.revoked_at), sa.func.max(nodes.c.revoked_at))
        ).one()
    return int(count), _aware(latest)


async def watch_revocations(
    store: Store, changed: Callable[[], None], every_s: float = REVOCATION_POLL_S
) -> None:
    """Call ``changed`` whenever a node is revoked, by any process, within ``every_s``: the
    API's fleet view then drops the node at its next recompute. Runs until cancelled; a
    database error is logged and the poll goes on."""
    mark: tuple[int, datetime | None] | None = None
    while True:
        try:
            now_mark = await asyncio.to_thread(revocation_mark, store)
        except Exception:  # never die silently: the view would keep revoked nodes for longer
            log.exception("looking for revoked nodes failed; trying again in %.0f s", every_s)
        else:
            if mark is not None and now_mark != mark:
                changed()
            mark = now_mark
        await asyncio.sleep(every_s)
