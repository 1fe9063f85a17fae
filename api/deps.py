"""Request dependencies as `Annotated` aliases, so route signatures read like prose.

There is deliberately no session dependency: a sync route's dependency exits (and would
release its connection) only after the response is serialized in a second thread-pool
slot, and under load every slot ended up waiting for a connection held by a request waiting
for a slot. Routes open `api.db.session_scope()` themselves and leave it before returning.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

import redis
from fastapi import Depends

from service.config import settings
from service.protocol import redis_client
from service.storage import ArtifactStore


@lru_cache
def get_redis() -> redis.Redis:
    return redis_client(settings.resolved_redis_url)


@lru_cache
def get_store() -> ArtifactStore:
    return ArtifactStore(settings.resolved_artifact_url)


async def _redis() -> redis.Redis:
    return get_redis()


async def _store() -> ArtifactStore:
    return get_store()


# Async getters: FastAPI runs a plain `def` dependency in the thread pool, a hop per request
# for what is a cached object.
RedisDep = Annotated[redis.Redis, Depends(_redis)]
StoreDep = Annotated[ArtifactStore, Depends(_store)]
