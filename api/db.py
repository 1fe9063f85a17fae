"""SQLAlchemy engine, sessions and the declarative base (schema changes go through Alembic)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import DateTime, MetaData, TypeDecorator, create_engine, event
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from service.config import settings

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that always reads back as an aware UTC datetime, so the API writes one
    format (`...Z`) whichever database stored it: SQLite returns naive values, PostgreSQL
    returns them in the session's time zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: datetime | None, _dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def make_engine(url: str) -> Engine:
    """An engine that checks connections before use, so a restarted database is survived."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_read_engine(url: str) -> AsyncEngine:
    """The asyncio engine of the hot read paths (a status poll): the same database through
    psycopg's async mode (aiosqlite for SQLite), in autocommit, so a read is one round trip
    with no BEGIN/COMMIT and no thread-pool hop. Writes stay on the sync engine."""
    if url.startswith("sqlite"):
        url = url.replace("sqlite://", "sqlite+aiosqlite://", 1)
        return create_async_engine(url, connect_args={"timeout": 30}, isolation_level="AUTOCOMMIT")
    # No overflow: past `pool_size` a read waits its turn in the event loop, where a burst
    # of overflow connections, each opened and closed again, cost a fresh PostgreSQL backend
    # per request (100 clients: a tenth of the throughput).
    return create_async_engine(
        url, pool_pre_ping=True, pool_size=20, max_overflow=0, isolation_level="AUTOCOMMIT"
    )


def _sqlite_pragmas(connection, _record) -> None:
    """WAL lets the API read while the ingester writes; foreign keys are off by default."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


engine = make_engine(settings.resolved_database_url)
SessionLocal = sessionmaker(engine, expire_on_commit=False)
read_engine = make_read_engine(settings.resolved_database_url)


@contextmanager
def session_scope() -> Iterator[Session]:
    """A session committed on success and rolled back on error (for background loops)."""
    with SessionLocal() as session, session.begin():
        yield session
