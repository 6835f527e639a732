"""The controller's store: SQLite by default (one file, WAL), PostgreSQL when given a URL.

Contract (the port the API and the policy loop use):
- ``Store.open(url)`` connects and applies pending schema migrations (numbered, each in its own
  transaction, recorded in ``schema_migrations``); ``close()`` releases the pool.
- Tokens: ``create_admin_token`` / ``create_enrollment_token`` return the secret once; only a
  SHA-256 hash is stored (tokens are 32 random bytes, so a fast hash is enough). ``authenticate``
  maps a presented token to a :class:`Principal` or None (unknown or revoked).
- ``enroll(enrollment_token, name, public_key)`` creates a node and returns its node token; the
  enrollment token is spent. Errors raise :class:`StoreError` subclasses with a message for the
  client (``Conflict``, ``NotFound``, ``Forbidden``).
- ``put_report(node, report_id, created_at, body, links, nat)`` stores a validated report and its
  measurement rows in one transaction; a second put with the same ``report_id`` stores nothing
  and returns False (replays are harmless).
- Reads return plain dicts/dataclasses; nothing here decides anything.

Report ingest is the hot write path (issue 4: 10,000 nodes reporting): ``put_reports`` writes its
rows through the driver's own cursor as plain tuples (SQLite ``executemany``, PostgreSQL
``COPY``), each value as SQLAlchemy's column types would store it; everything else goes through
SQLAlchemy.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
import sqlalchemy.dialects.postgresql
import sqlalchemy.dialects.sqlite
from sqlalchemy.engine import Connection, Engine

metadata = sa.MetaData()

schema_migrations = sa.Table(
    "schema_migrations",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
)
admin_tokens = sa.Table(
    "admin_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)
enrollment_tokens = sa.Table(
    "enrollment_tokens",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("site", sa.String(63), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("used_at", sa.DateTime(timezone=True)),
    sa.Column("used_by", sa.String(63)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),  # migration 3
)
# Node tokens replaced by a new one (an enrollment retried after a lost answer): refused like a
# revoked token, and listed by ``revoked_token_hashes`` so that every API process forgets them
# (migration 3; see fleetvpn/controller/tokens.py).
retired_tokens = sa.Table(
    "retired_tokens",
    metadata,
    sa.Column("token_hash", sa.String(64), primary_key=True),
    sa.Column("node_id", sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    sa.Column("retired_at", sa.DateTime(timezone=True), nullable=False, index=True),
)
nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    sa.Column("site", sa.String(63), nullable=False, index=True),
    sa.Column("public_key", sa.String(44), nullable=False, unique=True),
    sa.Column("listen_port", sa.Integer, nullable=False, default=51820),
    sa.Column("endpoint", sa.String(64)),  # advertised "host:port", for nodes others dial
    sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
    sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
    sa.Column("last_report_at", sa.DateTime(timezone=True)),  # the latest report's created_at
    # The node's two newest reports (by created_at), kept at ingest so that nothing scans the
    # reports table to find them (migration 2). Plain ids, not foreign keys: pruning may drop
    # the report; a missing body reads as no report.
    sa.Column("latest_report_id", sa.String(36)),
    sa.Column("previous_report_id", sa.String(36)),
    sa.Column("previous_report_at", sa.DateTime(timezone=True)),
)
reports = sa.Table(
    "reports",
    metadata,
    sa.Column("report_id", sa.String(36), primary_key=True),
    sa.Column("node_id", sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
    sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("body", sa.Text, nullable=False),
    sa.Index("ix_reports_received_at", "received_at"),  # migration 2
    sa.Index("ix_reports_node_received", "node_id", "received_at"),  # migration 4: the quota
)
link_measurements = sa.Table(
    "link_measurements",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("report_id", sa.ForeignKey("reports.report_id", ondelete="CASCADE"), nullable=False),
    sa.Column("node_id", sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    sa.Column("peer", sa.String(63), nullable=False),
    sa.Column("family", sa.SmallInteger, nullable=False),
    sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("path_mtu", sa.Integer),
    sa.Column("icmp_seen", sa.Boolean),
    sa.Column("rtt_s", sa.Float),
    sa.Column("loss_ratio", sa.Float),
    sa.Column("handshake_age_s", sa.Float),
    sa.Column("rx_bytes", sa.BigInteger),
    sa.Column("tx_bytes", sa.BigInteger),
    sa.Column("endpoint", sa.String(64)),
    sa.Index("ix_link_latest", "node_id", "peer", "family", "measured_at"),
)
nat_measurements = sa.Table(
    "nat_measurements",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("report_id", sa.ForeignKey("reports.report_id", ondelete="CASCADE"), nullable=False),
    sa.Column("node_id", sa.ForeignKey("nodes.id", ondelete="CASCADE"), nullable=False),
    sa.Column("measured_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("nat", sa.Boolean, nullable=False),
    sa.Column("mapped_address", sa.String(64)),
    sa.Column("mapping_lifetime_s", sa.Float),
    sa.Column("resolution_s", sa.Float),
    sa.Column("max_lifetime_s", sa.Float),
    sa.Column("stateful_filter", sa.Boolean, nullable=False),
    sa.Index("ix_nat_latest", "node_id", "measured_at"),
)
overrides = sa.Table(
    "overrides",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("scope", sa.String(8), nullable=False),  # site | node | link
    sa.Column("target", sa.String(130), nullable=False),  # site, node, or "node>peer"
    sa.Column("setting", sa.String(32), nullable=False),  # tunnel_mtu | keepalive_s
    sa.Column("value", sa.Integer, nullable=False),
    sa.Column("note", sa.String(200), nullable=False, default=""),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.UniqueConstraint("scope", "target", "setting"),
)
policy_state = sa.Table(
    "policy_state",
    metadata,
    sa.Column("key", sa.String(160), primary_key=True),  # e.g. "keepalive:site:branch"
    sa.Column("state", sa.Text, nullable=False),  # JSON, owned by the policy
    sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
)


def _v1(conn: Connection) -> None:
    metadata.create_all(conn)


_V2_NODE_COLUMNS = ("latest_report_id", "previous_report_id", "previous_report_at")


def _v2(conn: Connection) -> None:
    """Each node's two newest report ids on its row; reports indexed by arrival. (A database
    created by this version's ``_v1`` already has them: ``_v1`` creates the current tables.)"""
    inspector = sa.inspect(conn)
    have = {c["name"] for c in inspector.get_columns("nodes")}
    for name in _V2_NODE_COLUMNS:
        if name not in have:
            column = nodes.c[name]
            kind = column.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE nodes ADD COLUMN {name} {kind}")
    if "ix_reports_received_at" not in {i["name"] for i in inspector.get_indexes("reports")}:
        sa.Index("ix_reports_received_at", reports.c.received_at).create(conn)
    ranked = sa.select(
        reports.c.node_id,
        reports.c.report_id,
        reports.c.created_at,
        sa.func.row_number()
        .over(partition_by=reports.c.node_id, order_by=reports.c.created_at.desc())
        .label("rank"),
    ).subquery()
    heads: dict[int, dict[str, Any]] = {}
    for node_id, report_id, created_at, rank in conn.execute(
        sa.select(ranked).where(ranked.c.rank <= 2).order_by(ranked.c.node_id, ranked.c.rank)
    ):
        if rank == 1:
            heads[node_id] = {"latest_report_id": report_id, "last_report_at": created_at}
        else:
            heads[node_id] |= {"previous_report_id": report_id, "previous_report_at": created_at}
    for node_id, values in heads.items():
        conn.execute(nodes.update().where(nodes.c.id == node_id).values(**values))


def _v3(conn: Connection) -> None:
    """Enrollment tokens can be revoked; node tokens replaced by a retried enrollment are kept
    (hashed) as retired. (``_v1`` of this version already creates both.)"""
    inspector = sa.inspect(conn)
    if "revoked_at" not in {c["name"] for c in inspector.get_columns("enrollment_tokens")}:
        kind = enrollment_tokens.c.revoked_at.type.compile(dialect=conn.dialect)
        conn.exec_driver_sql(f"ALTER TABLE enrollment_tokens ADD COLUMN revoked_at {kind}")
    retired_tokens.create(conn, checkfirst=True)


def _v4(conn: Connection) -> None:
    """Reports indexed by node and arrival: the per-node quota finds a node's oldest at once.
    (``_v1`` of this version already creates the index.)"""
    have = {i["name"] for i in sa.inspect(conn).get_indexes("reports")}
    if "ix_reports_node_received" not in have:
        sa.Index("ix_reports_node_received", reports.c.node_id, reports.c.received_at).create(conn)


# Append-only: a released migration is never edited; a new schema change is a new function.
MIGRATIONS: list[tuple[int, Callable[[Connection], None]]] = [
    (1, _v1), (2, _v2), (3, _v3), (4, _v4)
]  # fmt: skip
SCHEMA_VERSION = MIGRATIONS[-1][0]


class StoreError(Exception):
    pass


class Conflict(StoreError):
    pass


class NotFound(StoreError):
    pass


class Forbidden(StoreError):
    pass


class Unstorable(StoreError):
    """The database refused this report's values (a data or integrity error of its own)."""


@dataclass(frozen=True)
class Principal:
    kind: str  # "admin" | "node"
    name: str
    node_id: int | None = None
    site: str | None = None


def utcnow() -> datetime:
    return datetime.now(UTC)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def sqlite_url(path: str) -> str:
    return f"sqlite+pysqlite:///{path}"


# put_report's arguments: (principal, report_id, created_at, body, links, nat)
ReportWrite = tuple[
    Principal, str, datetime, "dict[str, Any] | str", list[dict[str, Any]], "dict[str, Any] | None"
]


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect
        self._postgres = dialect.name == "postgresql"
        # How the DateTime columns store a value on this database (SQLite: SQLAlchemy's text
        # format; PostgreSQL: the driver sends the datetime as it is), for the ingest rows.
        process = sa.DateTime(timezone=True).dialect_impl(dialect).bind_processor(dialect)
        self._stamp: Callable[[Any], Any] = process or _same
        # _ADVANCE_HEADS as this driver takes it with named parameters (sqlite3: ":name").
        named = sa.dialects.sqlite.dialect(paramstyle="named") if dialect.name == "sqlite" else None
        self._advance_heads = str(_ADVANCE_HEADS.compile(dialect=named or dialect))

    @classmethod
    def open(cls, url: str) -> Store:
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        engine = sa.create_engine(url, future=True)
        if engine.dialect.name == "sqlite":
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        store = cls(engine)
        store.migrate()
        return store

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    # --- schema -------------------------------------------------------------------------------

    def migrate(self) -> list[int]:
        """Apply pending migrations; returns the versions applied."""
        with self.tx() as conn:
            schema_migrations.create(conn, checkfirst=True)
            done = set(conn.scalars(sa.select(schema_migrations.c.version)))
        applied = []
        for version, step in MIGRATIONS:
            if version in done:
                continue
            with self.tx() as conn:
                step(conn)
                conn.execute(
                    schema_migrations.insert().values(version=version, applied_at=utcnow())
                )
            applied.append(version)
        return applied

    def schema_version(self) -> int:
        with self.tx() as conn:
            return int(conn.scalar(sa.select(sa.func.max(schema_migrations.c.version))) or 0)

    # --- tokens and nodes ---------------------------------------------------------------------

    def create_admin_token(self, name: str = "admin") -> str:
        token = new_token("fva")
        with self.tx() as conn:
            conn.execute(
                admin_tokens.insert().values(
                    token_hash=hash_token(token), name=name, created_at=utcnow()
                )
            )
        return token

    def create_enrollment_token(self, site: str, valid_for: timedelta = timedelta(days=1)) -> str:
        token = new_token("fve")
        now = utcnow()
        with self.tx() as conn:
            conn.execute(
                enrollment_tokens.insert().values(
                    token_hash=hash_token(token),
                    site=site,
                    created_at=now,
                    expires_at=now + valid_for,
                )
            )
        return token

    def enroll(
        self,
        enrollment_token: str,
        name: str,
        public_key: str,
        *,
        listen_port: int = 51820,
        endpoint: str | None = None,
    ) -> tuple[str, str]:
        """Spend an enrollment token on a new node; returns (node token, site). A retry of
        the same enrollment (same token, name and public key) after a lost answer gets a fresh
        token for the same node. See :func:`fleetvpn.controller.tokens.enroll`.

        ``endpoint`` is where other nodes reach this one ("host:port"); a node without one
        (behind a NAT) dials out to the nodes that have one.
        """
        from fleetvpn.controller import tokens  # it builds on this module

        done = tokens.enroll(
            self, enrollment_token, name, public_key, listen_port=listen_port, endpoint=endpoint
        )
        return done.node_token, done.site

    def authenticate(self, token: str) -> Principal | None:
        digest = hash_token(token)
        with self.tx() as conn:
            admin = conn.execute(
                sa.select(admin_tokens).where(
                    admin_tokens.c.token_hash == digest, admin_tokens.c.revoked_at.is_(None)
                )
            ).first()
            if admin is not None:
                return Principal("admin", str(admin.name))
            node = conn.execute(
                sa.select(nodes).where(nodes.c.token_hash == digest, nodes.c.revoked_at.is_(None))
            ).first()
            if node is not None:
                return Principal("node", str(node.name), int(node.id), str(node.site))
        return None

    def principals_by_token_hash(self) -> dict[str, Principal]:
        """Every valid (unrevoked) admin and node token's hash → who it authenticates."""
        out: dict[str, Principal] = {}
        with self.tx() as conn:
            for digest, name in conn.execute(
                sa.select(admin_tokens.c.token_hash, admin_tokens.c.name).where(
                    admin_tokens.c.revoked_at.is_(None)
                )
            ):
                out[str(digest)] = Principal("admin", str(name))
            for digest, name, node_id, site in conn.execute(
                sa.select(nodes.c.token_hash, nodes.c.name, nodes.c.id, nodes.c.site).where(
                    nodes.c.revoked_at.is_(None)
                )
            ):
                out[str(digest)] = Principal("node", str(name), int(node_id), str(site))
        return out

    def revoked_token_hashes(self, since: datetime) -> set[str]:
        """Hashes of the admin and node tokens revoked (or retired) at or after ``since``."""
        with self.tx() as conn:
            queries = [
                sa.select(t.c.token_hash).where(t.c.revoked_at >= since)
                for t in (admin_tokens, nodes)
            ]
            rt = retired_tokens
            queries.append(sa.select(rt.c.token_hash).where(rt.c.retired_at >= since))
            return {str(digest) for query in queries for digest in conn.scalars(query)}

    def revoke_node(self, name: str) -> None:
        with self.tx() as conn:
            done = conn.execute(
                nodes.update().where(nodes.c.name == name).values(revoked_at=utcnow())
            )
            if done.rowcount == 0:
                raise NotFound(f"no node {name!r}")

    def nodes(self) -> list[dict[str, Any]]:
        with self.tx() as conn:
            rows = conn.execute(
                sa.select(
                    nodes.c.id, nodes.c.name, nodes.c.site, nodes.c.public_key,
                    nodes.c.listen_port, nodes.c.endpoint, nodes.c.enrolled_at,
                    nodes.c.revoked_at, nodes.c.last_report_at,
                ).order_by(nodes.c.site, nodes.c.name)
            )  # fmt: skip
            return [
                {k: _aware(v) if isinstance(v, datetime) else v for k, v in r._mapping.items()}
                for r in rows
            ]

    # --- reports ------------------------------------------------------------------------------

    def put_report(
        self,
        principal: Principal,
        report_id: str,
        created_at: datetime,
        body: dict[str, Any] | str,
        links: list[dict[str, Any]],
        nat: dict[str, Any] | None,
    ) -> bool:
        """Store one report; False if this report_id was stored before (nothing changes).

        ``body``: the report as JSON text (the validated request, stored as sent) or as a dict
        (encoded here). One transaction: the report (``INSERT … ON CONFLICT DO NOTHING``), its
        measurement rows and the node's newest-two report ids."""
        (result,) = self.put_reports([(principal, report_id, created_at, body, links, nat)])
        if isinstance(result, Exception):
            raise result
        return result

    def put_reports(self, items: list[ReportWrite]) -> list[bool | StoreError]:
        """Several reports (``put_report``'s arguments each) in one transaction — one commit,
        one fsync, however many: group commit for concurrent requests. Per item: True (stored),
        False (a replay: stored before, nothing changes) or the StoreError it earned (another
        node's report id), in order. Should the transaction fail, each report is tried alone,
        so that one bad report costs the others nothing: a report the database refuses
        (a data or integrity error) earns Unstorable; any other error is raised once all
        were tried (the database itself failed)."""
        answers: list[bool | StoreError | None] = []
        first: dict[str, tuple[int, str, datetime, str, list[dict[str, Any]], Any]] = {}
        for principal, report_id, created_at, body, links, nat in items:
            if principal.kind != "node" or principal.node_id is None:
                answers.append(Forbidden("only a node writes reports"))
                continue
            answers.append(None)  # decided by who owns the id once written
            if report_id not in first:  # a second time in one batch is a replay at best
                text = body if isinstance(body, str) else json.dumps(body, sort_keys=True)
                first[report_id] = (principal.node_id, report_id, created_at, text, links, nat)
        owners: dict[str, tuple[int, bool]] = {}
        refused: dict[str, StoreError] = {}
        if first:
            try:
                owners = self._write_reports(list(first.values()))
            except Exception:  # whatever it was (a driver's own error too), each alone decides
                owners, refused = self._write_each(list(first.values()))
        results: list[bool | StoreError] = []
        written: set[str] = set()
        for (principal, report_id, *_), answer in zip(items, answers, strict=True):
            if answer is not None:
                results.append(answer)
                continue
            if report_id in refused:
                results.append(refused[report_id])
                continue
            owner, inserted = owners[report_id]
            if owner != principal.node_id:
                results.append(Forbidden(f"report {report_id} belongs to another node"))
            else:
                results.append(inserted and report_id not in written)
                written.add(report_id)
        return results

    def _write_each(
        self, accepted: list[tuple[int, str, datetime, str, list[dict[str, Any]], Any]]
    ) -> tuple[dict[str, tuple[int, bool]], dict[str, StoreError]]:
        """Each report in its own transaction: (owners, report id → Unstorable for the
        reports the database refused: a data or integrity error, or any error that is not the
        database's, such as a value the driver cannot encode). A database error of another
        kind (the connection, the server) is raised once all were tried."""
        owners: dict[str, tuple[int, bool]] = {}
        refused: dict[str, StoreError] = {}
        failed: sa.exc.DBAPIError | None = None
        for one in accepted:
            try:
                owners |= self._write_reports([one])
            except (sa.exc.DataError, sa.exc.IntegrityError) as e:
                first_line = str(e.orig).splitlines()[0] if e.orig else str(e)
                refused[one[1]] = Unstorable(f"report {one[1]} could not be stored: {first_line}")
            except sa.exc.DBAPIError as e:
                failed = failed or e
            except Exception as e:  # not the database's error: this report's own
                refused[one[1]] = Unstorable(
                    f"report {one[1]} could not be stored: {type(e).__name__}"
                )
        if failed is not None:
            raise failed
        return owners, refused

    def _write_reports(
        self, accepted: list[tuple[int, str, datetime, str, list[dict[str, Any]], Any]]
    ) -> dict[str, tuple[int, bool]]:
        """Write what is new; report_id → (the node that owns it, written now).

        Through the driver's own cursor, rows as plain tuples: SQLAlchemy's per-row parameter
        handling cost more than the database's work. Values are stored as SQLAlchemy stores
        them (datetimes through the column type's own bind processor, once per report); ids
        come from the database, in row order."""
        stamp = self._stamp
        received_at = stamp(utcnow())
        stamped = [(node_id, report_id, stamp(created_at), text, links, nat)
                   for node_id, report_id, created_at, text, links, nat in accepted]  # fmt: skip
        with self.tx() as conn, _driver_errors(conn):
            cursor = _driver_connection(conn).cursor()
            try:
                inserted = self._insert_reports(
                    cursor,
                    [(report_id, node_id, at, received_at, text)
                     for node_id, report_id, at, text, _, _ in stamped],
                )  # fmt: skip
                out: dict[str, tuple[int, bool]] = {}
                rest = [report_id for _, report_id, *_ in accepted if report_id not in inserted]
                if rest:
                    query = sa.select(reports.c.report_id, reports.c.node_id)
                    for report_id, owner in conn.execute(
                        query.where(reports.c.report_id.in_(rest))
                    ):
                        out[report_id] = (int(owner), False)
                link_rows: list[tuple[Any, ...]] = []
                nat_rows: list[tuple[Any, ...]] = []
                heads: list[dict[str, Any]] = []
                for node_id, report_id, at, _, links, nat in stamped:
                    if report_id not in inserted:
                        continue
                    out[report_id] = (node_id, True)
                    head = (report_id, node_id, at)
                    link_rows += [head + tuple(map(link.get, _LINK_FIELDS)) for link in links]
                    if nat is not None:  # its own measured_at: NAT searches keep their own time
                        at_nat = stamp(nat.get("measured_at"))
                        nat_rows.append((report_id, node_id, at_nat, *map(nat.get, _NAT_FIELDS)))
                    heads.append({"node_id": node_id, "report_id": report_id, "at": at})
                if link_rows:
                    self._insert_rows(cursor, link_measurements, _LINK_COLUMNS, link_rows)
                if nat_rows:
                    self._insert_rows(cursor, nat_measurements, _NAT_COLUMNS, nat_rows)
                if heads:
                    cursor.executemany(self._advance_heads, heads)
            finally:
                cursor.close()
        return out

    def _insert_reports(self, cursor: Any, rows: list[tuple[Any, ...]]) -> set[str]:
        """``INSERT … ON CONFLICT DO NOTHING`` of (report_id, node_id, created_at, received_at,
        body) rows, one statement per 500 (well within both databases' limits on parameters);
        the ids inserted (the others were stored before)."""
        mark = "%s" if self._postgres else "?"
        inserted: set[str] = set()
        for i in range(0, len(rows), 500):
            page = rows[i : i + 500]
            values = ", ".join([f"({mark}, {mark}, {mark}, {mark}, {mark})"] * len(page))
            cursor.execute(
                f"INSERT INTO reports ({', '.join(_REPORT_COLUMNS)}) VALUES {values}"
                " ON CONFLICT (report_id) DO NOTHING RETURNING report_id",
                [value for row in page for value in row],
            )
            inserted.update(report_id for (report_id,) in cursor.fetchall())
        return inserted

    def _insert_rows(
        self, cursor: Any, table: sa.Table, columns: tuple[str, ...], rows: list[tuple[Any, ...]]
    ) -> None:
        """Append rows, in order (ids from the table's sequence/rowid follow it): PostgreSQL by
        COPY (text format: the server parses each value as its column's type), SQLite by
        executemany."""
        names = ", ".join(columns)
        if self._postgres:
            with cursor.copy(f"COPY {table.name} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            marks = ", ".join(["?"] * len(columns))
            cursor.executemany(f"INSERT INTO {table.name} ({names}) VALUES ({marks})", rows)

    def report_heads(self) -> dict[str, tuple[str | None, datetime | None, str | None]]:
        """Every node not revoked → (latest report id, when it arrived, previous report id); ids
        None before its first (second) report. One read of the nodes table, no report bodies."""
        query = sa.select(
            nodes.c.name, nodes.c.latest_report_id, reports.c.received_at,
            nodes.c.previous_report_id,
        ).select_from(
            nodes.outerjoin(reports, reports.c.report_id == nodes.c.latest_report_id)
        ).where(nodes.c.revoked_at.is_(None))  # fmt: skip
        with self.tx() as conn:
            return {
                str(name): (latest, _aware(received_at), previous)
                for name, latest, received_at, previous in conn.execute(query)
            }

    def report_bodies(self, report_ids: list[str]) -> dict[str, tuple[datetime, str]]:
        """report_id → (received_at, body as stored) for those that exist (pruned ones do not)."""
        out: dict[str, tuple[datetime, str]] = {}
        with self.tx() as conn:
            for i in range(0, len(report_ids), 500):
                chunk = report_ids[i : i + 500]
                query = sa.select(reports.c.report_id, reports.c.received_at, reports.c.body)
                for report_id, received_at, body in conn.execute(
                    query.where(reports.c.report_id.in_(chunk))
                ):
                    received = _aware(received_at)
                    assert received is not None
                    out[str(report_id)] = (received, str(body))
        return out

    def nat_received_since(self, since: datetime) -> list[dict[str, Any]]:
        """NAT measurements of the reports that arrived at or after ``since`` (node not revoked),
        with the node's name and site and the row id (for callers that keep what they read)."""
        nm = nat_measurements
        query = (
            sa.select(nm, nodes.c.name.label("node"), nodes.c.site)
            .join(reports, reports.c.report_id == nm.c.report_id)
            .join(nodes, nodes.c.id == nm.c.node_id)
            .where(reports.c.received_at >= since, nodes.c.revoked_at.is_(None))
        )
        with self.tx() as conn:
            return [_row(r) for r in conn.execute(query)]

    def report_count(self, node: str | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(reports)
        if node is not None:
            query = query.join(nodes).where(nodes.c.name == node)
        with self.tx() as conn:
            return int(conn.scalar(query) or 0)

    def latest_links(self) -> list[dict[str, Any]]:
        """The newest measurement of every (node, peer, family), with node and site names."""
        lm = link_measurements
        newest = (
            sa.select(
                lm.c.node_id, lm.c.peer, lm.c.family, sa.func.max(lm.c.measured_at).label("at")
            )
            .group_by(lm.c.node_id, lm.c.peer, lm.c.family)
            .subquery()
        )
        query = (
            sa.select(lm, nodes.c.name.label("node"), nodes.c.site)
            .join(
                newest,
                sa.and_(
                    lm.c.node_id == newest.c.node_id,
                    lm.c.peer == newest.c.peer,
                    lm.c.family == newest.c.family,
                    lm.c.measured_at == newest.c.at,
                ),
            )
            .join(nodes, nodes.c.id == lm.c.node_id)
            .where(nodes.c.revoked_at.is_(None))
        )
        with self.tx() as conn:
            return [_row(r) for r in conn.execute(query)]

    def latest_reports(self, per_node: int = 1) -> dict[str, list[tuple[datetime, dict[str, Any]]]]:
        """node → its ``per_node`` newest reports, newest first, as (received_at, body)."""
        ranked = sa.select(
            reports.c.node_id,
            reports.c.received_at,
            reports.c.body,
            sa.func.row_number()
            .over(partition_by=reports.c.node_id, order_by=reports.c.created_at.desc())
            .label("rank"),
        ).subquery()
        query = (
            sa.select(nodes.c.name, ranked.c.received_at, ranked.c.body)
            .join(nodes, nodes.c.id == ranked.c.node_id)
            .where(ranked.c.rank <= per_node, nodes.c.revoked_at.is_(None))
            .order_by(nodes.c.name, ranked.c.rank)
        )
        out: dict[str, list[tuple[datetime, dict[str, Any]]]] = {}
        with self.tx() as conn:
            for name, received_at, body in conn.execute(query):
                received = _aware(received_at)
                assert received is not None
                out.setdefault(str(name), []).append((received, json.loads(body)))
        return out

    def link_history(self, a: str, b: str, since: datetime) -> list[dict[str, Any]]:
        """Both directions' measurements of the link a–b since ``since``, oldest first."""
        lm = link_measurements
        query = (
            sa.select(lm, nodes.c.name.label("node"))
            .join(nodes, nodes.c.id == lm.c.node_id)
            .where(
                lm.c.measured_at >= since,
                sa.or_(
                    sa.and_(nodes.c.name == a, lm.c.peer == b),
                    sa.and_(nodes.c.name == b, lm.c.peer == a),
                ),
            )
            .order_by(lm.c.measured_at, lm.c.id)
        )
        with self.tx() as conn:
            return [_row(r) for r in conn.execute(query)]

    def nat_history(self, since: datetime) -> list[dict[str, Any]]:
        """Every NAT measurement since ``since``, and each node's newest however old."""
        nm = nat_measurements
        newest = sa.select(sa.func.max(nm.c.id)).group_by(nm.c.node_id)
        query = (
            sa.select(nm, nodes.c.name.label("node"), nodes.c.site)
            .join(nodes, nodes.c.id == nm.c.node_id)
            .where(nodes.c.revoked_at.is_(None))
            .where(sa.or_(nm.c.measured_at >= since, nm.c.id.in_(newest)))
        )
        with self.tx() as conn:
            return [_row(r) for r in conn.execute(query)]

    def latest_nat(self) -> list[dict[str, Any]]:
        nm = nat_measurements
        newest = (
            sa.select(nm.c.node_id, sa.func.max(nm.c.measured_at).label("at"))
            .group_by(nm.c.node_id)
            .subquery()
        )
        query = (
            sa.select(nm, nodes.c.name.label("node"), nodes.c.site)
            .join(
                newest, sa.and_(nm.c.node_id == newest.c.node_id, nm.c.measured_at == newest.c.at)
            )
            .join(nodes, nodes.c.id == nm.c.node_id)
            .where(nodes.c.revoked_at.is_(None))
        )
        with self.tx() as conn:
            return [_row(r) for r in conn.execute(query)]

    def prune(self, older_than: timedelta) -> int:
        """Drop reports (and their measurements) that arrived longer ago than the retention;
        returns how many. By arrival (``received_at``, the controller's clock), not by
        ``created_at``: a node's clock decides nothing about how long its rows stay."""
        cutoff = utcnow() - older_than
        with self.tx() as conn:
            old = sa.select(reports.c.report_id).where(reports.c.received_at < cutoff)
            conn.execute(link_measurements.delete().where(link_measurements.c.report_id.in_(old)))
            conn.execute(nat_measurements.delete().where(nat_measurements.c.report_id.in_(old)))
            done = conn.execute(reports.delete().where(reports.c.received_at < cutoff))
            return int(done.rowcount)

    def trim_reports(self, node_id: int, keep: int) -> int:
        """Keep node ``node_id``'s ``keep`` newest reports by arrival (and the two the view
        reads, its newest by ``created_at``, whenever they arrived); drop the rest and their
        measurements. Returns how many went. The per-node quota (issue 11)."""
        with self.tx() as conn:
            heads = conn.execute(
                sa.select(nodes.c.latest_report_id, nodes.c.previous_report_id).where(
                    nodes.c.id == node_id
                )
            ).first()
            kept = [h for h in (heads or ()) if h is not None]
            old = (
                sa.select(reports.c.report_id)
                .where(reports.c.node_id == node_id, reports.c.report_id.not_in(kept))
                .order_by(reports.c.received_at.desc(), reports.c.report_id.desc())
                .offset(keep)
            )
            ids = list(conn.scalars(old))
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                for table in (link_measurements, nat_measurements):
                    conn.execute(table.delete().where(table.c.report_id.in_(chunk)))
                conn.execute(reports.delete().where(reports.c.report_id.in_(chunk)))
            return len(ids)

    # --- overrides and policy state -----------------------------------------------------------

    def set_override(
        self, scope: str, target: str, setting: str, value: int, note: str = ""
    ) -> None:
        with self.tx() as conn:
            conn.execute(
                overrides.delete().where(
                    overrides.c.scope == scope,
                    overrides.c.target == target,
                    overrides.c.setting == setting,
                )
            )
            conn.execute(
                overrides.insert().values(
                    scope=scope, target=target, setting=setting, value=value, note=note,
                    created_at=utcnow(),
                )
            )  # fmt: skip

    def clear_override(self, scope: str, target: str, setting: str) -> bool:
        with self.tx() as conn:
            done = conn.execute(
                overrides.delete().where(
                    overrides.c.scope == scope,
                    overrides.c.target == target,
                    overrides.c.setting == setting,
                )
            )
            return bool(done.rowcount)

    def overrides(self) -> list[dict[str, Any]]:
        with self.tx() as conn:
            return [_row(r) for r in conn.execute(sa.select(overrides).order_by(overrides.c.id))]

    def load_policy_state(self, key: str) -> dict[str, Any] | None:
        with self.tx() as conn:
            text = conn.scalar(sa.select(policy_state.c.state).where(policy_state.c.key == key))
        return None if text is None else dict(json.loads(text))

    def load_policy_states(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Every saved policy state whose key starts with ``prefix``: key → state (one query)."""
        query = sa.select(policy_state.c.key, policy_state.c.state).where(
            policy_state.c.key.startswith(prefix, autoescape=True)
        )
        with self.tx() as conn:
            return {str(key): dict(json.loads(text)) for key, text in conn.execute(query)}

    def save_policy_states(self, states: dict[str, dict[str, Any]]) -> None:
        """Replace several policy states in one transaction."""
        if not states:
            return
        now = utcnow()
        with self.tx() as conn:
            conn.execute(policy_state.delete().where(policy_state.c.key.in_(list(states))))
            conn.execute(
                policy_state.insert(),
                [{"key": k, "state": json.dumps(v, sort_keys=True), "updated_at": now}
                 for k, v in states.items()],
            )  # fmt: skip

    def save_policy_state(self, key: str, state: dict[str, Any]) -> None:
        with self.tx() as conn:
            conn.execute(policy_state.delete().where(policy_state.c.key == key))
            conn.execute(
                policy_state.insert().values(
                    key=key, state=json.dumps(state, sort_keys=True), updated_at=utcnow()
                )
            )


# The node's newest two reports by created_at, in one statement (every right-hand side reads
# the row as it was): a newer report pushes the latest down to previous; an older one that is
# still newer than the previous replaces it; an older one still is history only.
_AT = sa.bindparam("at", type_=sa.DateTime(timezone=True))
_ID = sa.bindparam("report_id", type_=sa.String(36))
_NEWER = sa.or_(nodes.c.last_report_at.is_(None), nodes.c.last_report_at <= _AT)
_SECOND = sa.or_(nodes.c.previous_report_at.is_(None), nodes.c.previous_report_at <= _AT)
_ADVANCE_HEADS = (
    nodes.update()
    .where(nodes.c.id == sa.bindparam("node_id"))
    .values(
        latest_report_id=sa.case((_NEWER, _ID), else_=nodes.c.latest_report_id),
        last_report_at=sa.case((_NEWER, _AT), else_=nodes.c.last_report_at),
        previous_report_id=sa.case(
            (_NEWER, nodes.c.latest_report_id),
            (_SECOND, _ID),
            else_=nodes.c.previous_report_id,
        ),
        previous_report_at=sa.case(
            (_NEWER, nodes.c.last_report_at),
            (_SECOND, _AT),
            else_=nodes.c.previous_report_at,
        ),
    )
)


# The rows ingest writes (plain tuples, these columns in this order; ids from the database). A
# measurement's missing optional field is NULL, as SQLAlchemy stored a column left out. A new
# column of these tables goes here too (tests/unit/test_store.py reads every column back).
_REPORT_COLUMNS = ("report_id", "node_id", "created_at", "received_at", "body")
_LINK_FIELDS = ("peer", "family", "path_mtu", "icmp_seen", "rtt_s", "loss_ratio",
                "handshake_age_s", "rx_bytes", "tx_bytes", "endpoint")  # fmt: skip
_LINK_COLUMNS = ("report_id", "node_id", "measured_at", *_LINK_FIELDS)
_NAT_FIELDS = ("nat", "mapped_address", "mapping_lifetime_s", "resolution_s", "max_lifetime_s",
               "stateful_filter")  # fmt: skip
_NAT_COLUMNS = ("report_id", "node_id", "measured_at", *_NAT_FIELDS)


def _same(value: Any) -> Any:
    return value


def _driver_connection(conn: Connection) -> Any:
    """The DBAPI driver's own connection under ``conn`` (sqlite3's, psycopg's)."""
    return conn.connection.driver_connection


@contextmanager
def _driver_errors(conn: Connection) -> Iterator[None]:
    """The driver's errors raised as SQLAlchemy raises them from ``conn.execute`` (the same
    ``sa.exc.DBAPIError`` subclass, the driver's error as ``orig``); a connection the error
    says is lost is invalidated, so that the pool does not hand it out again."""
    dialect = conn.dialect
    error = dialect.loaded_dbapi.Error
    try:
        yield
    except error as e:
        lost = bool(dialect.is_disconnect(e, conn.connection.dbapi_connection, None))
        if lost:
            conn.invalidate(e)
        raise sa.exc.DBAPIError.instance(
            None, None, e, error, connection_invalidated=lost, dialect=dialect
        ) from e


def _row(row: sa.Row[Any]) -> dict[str, Any]:
    return {k: _aware(v) if isinstance(v, datetime) else v for k, v in row._mapping.items()}


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()
