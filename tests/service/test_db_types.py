"""Timestamps read back as aware UTC from SQLite (embedded mode) as from PostgreSQL, so the
API writes one format whichever database stored them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from sqlalchemy import Column, Integer, MetaData, Table, create_engine, insert, select

from api.db import UtcDateTime


def test_sqlite_timestamps_read_back_as_aware_utc():
    table = Table(
        "stamps", MetaData(), Column("id", Integer, primary_key=True), Column("at", UtcDateTime)
    )
    engine = create_engine("sqlite://")
    table.metadata.create_all(engine)
    written = datetime(2026, 11, 26, 9, 30, 15, 123456, tzinfo=UTC)
    with engine.begin() as connection:
        connection.execute(insert(table).values(id=1, at=written))
        connection.execute(insert(table).values(id=2, at=None))
        read = dict(connection.execute(select(table.c.id, table.c.at)).all())
    assert read[1] == written and read[1].tzinfo is UTC
    assert read[2] is None


def test_a_time_in_another_zone_is_given_in_utc():
    paris = datetime(2026, 11, 26, 10, 30, tzinfo=timezone(timedelta(hours=1)))
    read = UtcDateTime().process_result_value(paris, None)
    assert read == paris and read.tzinfo is UTC and read.hour == 9
