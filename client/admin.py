"""`warp admin`: what an operator does beside the API, with the API's own settings.

These commands open the server's database directly (and Redis for revocations), so they run
where the API runs: `docker compose run --rm api warp admin create-key --name me --admin`.
The server modules load only when a command runs, so the client commands stay fast.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from client.output import JsonOption, console, emit

admin = typer.Typer(
    no_args_is_help=True,
    help="Operate a server: API keys and the database schema (reads WARP_DATABASE_URL and "
    "WARP_REDIS_URL like the API).",
)


@admin.command("create-key")
def create_key_command(
    name: Annotated[str, typer.Option(help="Who or what the key is for.")],
    is_admin: Annotated[bool, typer.Option("--admin", help="Sees and cancels every job.")] = False,
    rate_limit: Annotated[
        int | None, typer.Option(min=1, help="Requests per minute (default: the setting).")
    ] = None,
    max_active_jobs: Annotated[
        int | None, typer.Option(min=1, help="Queued or running jobs (default: the setting).")
    ] = None,
) -> None:
    """Create an API key and print it, once: only its hash is stored."""
    from api.auth import create_key
    from api.db import session_scope

    with session_scope() as session:
        row, secret = create_key(session, name, is_admin, rate_limit, max_active_jobs)
        key_id = row.id
    role = "admin" if is_admin else "user"
    console.print(f"created {role} key {key_id} ({name}); the key is shown once:")
    print(secret)


@admin.command("list-keys")
def list_keys_command(as_json: JsonOption = False) -> None:
    """Every key: id, name, admin, limits, created, revoked (never the key itself)."""
    from sqlalchemy import select

    from api.db import session_scope
    from api.models import ApiKey

    columns = ("id", "name", "admin", "rate_limit_per_minute", "max_active_jobs")
    with session_scope() as session:
        rows = [
            {**{c: getattr(k, c) for c in columns}, "revoked": k.revoked_at is not None}
            for k in session.scalars(select(ApiKey).order_by(ApiKey.created_at))
        ]
    emit(rows, as_json, lambda keys: [Console().print(key, highlight=False) for key in keys])


@admin.command("revoke-key")
def revoke_key_command(key_id: str) -> None:
    """Revoke a key: its next request is a 401. Its jobs keep running."""
    import redis

    from api.auth import announce_revocation, revoke_key
    from api.db import session_scope
    from service.config import settings
    from service.protocol import redis_client

    with session_scope() as session:
        if revoke_key(session, key_id) is None:
            console.print(f"[red]error:[/red] no key {key_id}")
            raise typer.Exit(1)
    try:
        announce_revocation(redis_client(settings.resolved_redis_url), key_id)
    except redis.RedisError as exc:
        console.print(
            f"[yellow]warning:[/yellow] Redis unreachable ({exc}): API processes that looked "
            f"the key up in the last {settings.auth_cache_s:g} s accept it until then"
        )
    console.print(f"revoked {key_id}")


@admin.command("migrate")
def migrate_command() -> None:
    """Bring the database schema to the newest revision (idempotent)."""
    from api.migrate import upgrade

    upgrade()
    console.print("database schema is up to date")
