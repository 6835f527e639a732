"""``fleetvpn controller …``: run the controller, and bootstrap its first admin token."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import click

from fleetvpn.controller.config import ConfigError, ControllerConfig, load, plain_http_refusal

if TYPE_CHECKING:  # the store pulls in SQLAlchemy: only the controller's own commands load it
    from fleetvpn.controller.store import Store

config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=Path("/etc/fleetvpn/controller.yml"),
    show_default=True,
    help="Controller config file (YAML).",
)


def _config(path: Path) -> ControllerConfig:
    try:
        return load(path)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


def _open_store(config: ControllerConfig) -> Store:
    from fleetvpn.controller.store import Store

    if config.database.startswith("sqlite:///"):
        db_file = Path(config.database.removeprefix("sqlite:///"))
        db_file.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        return Store.open(config.database)
    except Exception as e:  # any driver error is one line for the operator
        raise click.ClickException(f"cannot open the database {config.database}: {e}") from None


def _metrics_token(config: ControllerConfig) -> str | None:
    from fleetvpn.controller.config import read_token_file

    if config.metrics_token_file is None:
        return None
    try:
        return read_token_file(config.metrics_token_file)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None


@click.group()
def controller() -> None:
    """The controller: stores reports, decides MTU and keepalive, answers `health`."""


@controller.command("admin-token")
@config_option
@click.option("--name", default="admin", show_default=True, help="Who the token is for.")
def admin_token(config_path: Path, name: str) -> None:
    """Create an admin token (printed once; only its hash is stored)."""
    from fleetvpn import grammar

    try:
        name = grammar.note(name, "--name", limit=64)
    except grammar.GrammarError as e:
        raise click.ClickException(str(e)) from None
    store = _open_store(_config(config_path))
    click.echo(store.create_admin_token(name))


# --- nodes and tokens: listed and revoked on the store, like admin-token (no API needed) -----

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@controller.group()
def nodes() -> None:
    """List and revoke nodes. A revoked node's token is refused, and it leaves every peer's
    desired state within seconds (each controller looks for revocations every 5 s)."""


@nodes.command("list")
@config_option
@json_option
def nodes_list(config_path: Path, as_json: bool) -> None:
    """Every node, revoked ones too."""
    from fleetvpn.controller import admin_cli, tokens

    rows = tokens.list_nodes(_open_store(_config(config_path)))
    if as_json:
        click.echo(admin_cli.json_document("nodes", rows))
    else:
        admin_cli.print_table(admin_cli.nodes_table(rows), "no nodes enrolled", len(rows))


@nodes.command("revoke")
@config_option
@json_option
@click.argument("name")
def nodes_revoke(config_path: Path, as_json: bool, name: str) -> None:
    """Revoke node NAME (for good: enroll it again under a new name and key)."""
    from fleetvpn.controller import admin_cli, tokens
    from fleetvpn.controller.store import NotFound

    try:
        done = tokens.revoke_node(_open_store(_config(config_path)), name)
    except NotFound as e:
        raise click.ClickException(str(e)) from None
    click.echo(admin_cli.revoked_json(done) if as_json else admin_cli.revoked_line(done))


@controller.group("tokens")
def tokens_group() -> None:
    """List and revoke admin and enrollment tokens (node tokens: `nodes revoke`). Only each
    token's hash is stored: a token is shown once, when it is made, never again."""


@tokens_group.command("list")
@config_option
@json_option
def tokens_list(config_path: Path, as_json: bool) -> None:
    """Every admin and enrollment token: id, kind, name or site, times and state."""
    from fleetvpn.controller import admin_cli, tokens

    rows = tokens.list_tokens(_open_store(_config(config_path)))
    if as_json:
        click.echo(admin_cli.json_document("tokens", rows))
    else:
        admin_cli.print_table(admin_cli.tokens_table(rows), "no tokens", len(rows))


@tokens_group.command("revoke")
@config_option
@json_option
@click.argument("token_id", metavar="ID")
def tokens_revoke(config_path: Path, as_json: bool, token_id: str) -> None:
    """Revoke token ID as `tokens list` shows it: a3 (admin token 3), e7 (enrollment token 7).
    Every controller refuses a revoked admin token within its auth_cache_s."""
    from fleetvpn.controller import admin_cli, tokens
    from fleetvpn.controller.store import NotFound

    try:
        tokens.parse_token_id(token_id)
        done = tokens.revoke_token(_open_store(_config(config_path)), token_id)
    except (ValueError, NotFound) as e:
        raise click.ClickException(str(e)) from None
    click.echo(admin_cli.revoked_json(done) if as_json else admin_cli.revoked_line(done))


@controller.command()
@config_option
def serve(config_path: Path) -> None:
    """Serve the HTTP API (and the probe responder, when configured) in the foreground."""
    import uvicorn

    from fleetvpn.controller.api import create_app
    from fleetvpn.net.keys import KeyFileError, load_key

    config = _config(config_path)
    refusal = plain_http_refusal(config, str(config_path))
    if refusal is not None:
        raise click.ClickException(refusal)
    store = _open_store(config)
    responder = None
    if config.responder_listen is not None and config.responder_key_file is not None:
        try:
            responder = (config.responder_listen, load_key(config.responder_key_file))
        except KeyFileError as e:
            raise click.ClickException(str(e)) from None
    app = create_app(
        store,
        max_body_bytes=config.max_body_bytes,
        retention=timedelta(days=config.retention_days),
        responder=responder,
        responder_key_file=config.responder_key_file,
        tunnel=config.tunnel,
        view_min_interval_s=float(config.view_interval_s),
        view_process=config.view_process,
        auth_cache_s=float(config.auth_cache_s),
        report_rate_per_min=float(config.report_rate_per_min),
        report_burst=config.report_burst,
        max_reports_per_node=config.max_reports_per_node,
        metrics_token=_metrics_token(config),
    )
    host, port = config.listen
    uvicorn.run(
        app,
        host=host,
        port=port,
        ssl_certfile=os.fspath(config.tls_cert) if config.tls_cert else None,
        ssl_keyfile=os.fspath(config.tls_key) if config.tls_key else None,
        log_level="info",
        access_log=config.access_log,
    )
