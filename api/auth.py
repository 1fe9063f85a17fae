"""Who is calling: API keys (`Authorization: Bearer <key>`), what each may see, how fast.

A key is created by `warp admin create-key`; the database keeps only its SHA-256. Jobs and
uploaded files belong to the key that created them: another key gets a 404 for them, as if
they did not exist, and only an admin key sees everything. With `WARP_AUTH_REQUIRED=false`
(set by embedded mode, never by default) every caller is an anonymous admin, unlimited.

Each key has a request rate (a per-minute counter in Redis) and a number of jobs it may have
queued or running; past either it gets a 429 with `Retry-After`. When Redis is down the rate
is not counted (status reads keep working from the database); the job limit always holds.

A looked-up key is reused by its API process for `auth_cache_s` seconds, which takes a
database session off every request. Revocation still takes effect at the key's next
request: `warp admin revoke-key` also leaves a marker in Redis, checked in the same round
trip as the rate counter. Only if Redis is unreachable does a revoked key keep working, for
at most `auth_cache_s` seconds, in the processes that had it cached.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Annotated

import redis
from fastapi import Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db import session_scope, utcnow
from api.deps import RedisDep
from api.errors import ApiError
from api.models import ApiKey
from service.config import settings
from service.protocol import rate_key, revoked_key

KEY_PREFIX = "warp_"
REVOKED_TTL_S = 24 * 3600
"""How long a revocation marker stays in Redis: far longer than any process caches a key."""


@dataclass(frozen=True)
class Caller:
    key_id: str | None
    admin: bool
    rate_limit_per_minute: int | None = None
    max_active_jobs: int | None = None

    def owns(self, owner_id: str | None) -> bool:
        return self.admin or owner_id == self.key_id


ANONYMOUS_ADMIN = Caller(key_id=None, admin=True)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(
    session: Session,
    name: str,
    admin: bool = False,
    rate_limit_per_minute: int | None = None,
    max_active_jobs: int | None = None,
) -> tuple[ApiKey, str]:
    """A new key; the secret is returned once and never stored. Limits default to the
    settings' when None."""
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(
        id=uuid.uuid4().hex,
        name=name,
        key_hash=hash_key(secret),
        admin=admin,
        rate_limit_per_minute=rate_limit_per_minute,
        max_active_jobs=max_active_jobs,
        created_at=utcnow(),
    )
    session.add(row)
    return row, secret


def revoke_key(session: Session, key_id: str) -> ApiKey | None:
    row = session.get(ApiKey, key_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = utcnow()
    return row


def announce_revocation(client: redis.Redis, key_id: str) -> None:
    """Tell every API process, at its next request with the key, that it is revoked."""
    client.set(revoked_key(key_id), 1, ex=REVOKED_TTL_S)


class RecentKeys:
    """Valid keys this process looked up lately: key hash -> (expiry, Caller). Made-up keys
    are never kept, so it holds at most one entry per real key."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, Caller]] = {}
        self._lock = threading.Lock()

    def get(self, key_hash: str) -> Caller | None:
        with self._lock:
            expires, caller = self._entries.get(key_hash, (0.0, None))
        return caller if time.monotonic() < expires else None

    def put(self, key_hash: str, caller: Caller) -> None:
        if settings.auth_cache_s > 0:
            with self._lock:
                self._entries[key_hash] = (time.monotonic() + settings.auth_cache_s, caller)

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._entries = {h: e for h, e in self._entries.items() if e[1].key_id != key_id}


RECENT_KEYS = RecentKeys()


REFUSED = "unknown or revoked API key"


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message, headers={"WWW-Authenticate": "Bearer"})


BEARER = HTTPBearer(
    scheme_name="ApiKey",
    description="`Authorization: Bearer <key>`, a key made by `warp admin create-key`",
    auto_error=False,
)
"""Declared as a security scheme, not a header parameter: OpenAPI ignores parameters named
Authorization, and a scheme is what Swagger UI and other clients know to send a key for."""


async def authenticate(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
) -> Caller:
    """The caller of a key; a recently seen key costs no thread hop and no database trip
    (async, so that FastAPI does not run it in the thread pool)."""
    if not settings.auth_required:
        return ANONYMOUS_ADMIN
    key = credentials.credentials.strip() if credentials else ""
    if not key:
        raise _unauthorized("send an API key: `Authorization: Bearer <key>`")
    digest = hash_key(key)
    if cached := RECENT_KEYS.get(digest):
        return cached
    caller = await run_in_threadpool(_look_up, digest)
    RECENT_KEYS.put(digest, caller)
    return caller


def _look_up(digest: str) -> Caller:
    with session_scope() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
        if row is None or row.revoked_at is not None:
            raise _unauthorized(REFUSED)
        return Caller(
            key_id=row.id,
            admin=row.admin,
            rate_limit_per_minute=row.rate_limit_per_minute or settings.rate_limit_per_minute,
            max_active_jobs=row.max_active_jobs or settings.max_active_jobs,
        )


def too_many(code: str, message: str, retry_after_s: int) -> ApiError:
    return ApiError(429, code, message, headers={"Retry-After": str(max(1, retry_after_s))})


async def rate_limited(
    caller: Annotated[Caller, Depends(authenticate)], client: RedisDep
) -> Caller:
    """The caller, if its key is not revoked and within its request rate this minute (a
    fixed window in Redis; one round trip for both, in the thread pool)."""
    if caller.key_id is None or caller.rate_limit_per_minute is None:
        return caller
    now = time.time()
    window = int(now // 60)
    try:
        revoked, count = await run_in_threadpool(_count, client, caller.key_id, window)
    except redis.RedisError:
        return caller  # fail open: reads must work while Redis is down
    if revoked:
        RECENT_KEYS.forget(caller.key_id)
        raise _unauthorized(REFUSED)
    if count > caller.rate_limit_per_minute:
        raise too_many(
            "rate_limited",
            f"more than {caller.rate_limit_per_minute} requests this minute for this key",
            int((window + 1) * 60 - now) + 1,
        )
    return caller


def _count(client: redis.Redis, key_id: str, window: int) -> tuple[bool, int]:
    """Whether the key is revoked, and its requests in this window, this one included."""
    counter = rate_key(key_id, window)
    with client.pipeline() as pipe:
        pipe.exists(revoked_key(key_id)).incr(counter).expire(counter, 120)
        revoked, count, _ = pipe.execute()
    return bool(revoked), count


CallerDep = Annotated[Caller, Depends(rate_limited)]
