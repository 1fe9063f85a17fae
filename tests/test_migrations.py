"""The packaged migrations on SQLite, the embedded database: a fresh one reaches the newest
schema, and one made by an older release is upgraded without losing a row (a SQLite batch
migration rebuilds a table, which must not cascade to the rows that reference it)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from alembic.config import Config
from alembic.script import ScriptDirectory

from api.migrate import ALEMBIC_INI

HEAD = ScriptDirectory.from_config(Config(str(ALEMBIC_INI))).get_current_head()


def migrate(home: Path, revision: str = "head") -> None:
    """`api.migrate.upgrade` in a process of its own (the engine is made from WARP_HOME)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WARP_")}
    code = f"from api.migrate import upgrade; upgrade({revision!r})"
    subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "WARP_HOME": str(home)},
        cwd=home.parent,
        check=True,
        capture_output=True,
    )


def schema(db: sqlite3.Connection, table: str) -> tuple[set[str], list[tuple]]:
    columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
    return columns, list(db.execute(f"PRAGMA foreign_key_list({table})"))


def test_a_fresh_embedded_database_reaches_the_newest_schema(tmp_path):
    migrate(tmp_path / "home")
    db = sqlite3.connect(tmp_path / "home" / "warp.db")
    assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
    for table in ("jobs", "files"):
        columns, keys = schema(db, table)
        assert "owner_id" in columns
        assert [(key[2], key[3], key[4]) for key in keys] == [("api_keys", "owner_id", "id")]


def test_an_older_database_is_upgraded_without_losing_rows(tmp_path):
    home = tmp_path / "home"
    migrate(home, "0002")
    db = sqlite3.connect(home / "warp.db")
    now = "2026-11-24 10:00:00.000000"
    db.execute(
        "INSERT INTO api_keys (id, name, key_hash, admin, created_at) VALUES ('k', 'a', 'h', 0, ?)",
        (now,),
    )
    db.execute(
        "INSERT INTO jobs (id, owner_id, status, progress_fraction, progress_step, "
        "progress_total_steps, spec, attempt, last_seq, created_at) "
        "VALUES ('j', 'k', 'succeeded', 1, 2, 2, '{}', 1, 1, ?)",
        (now,),
    )
    db.execute(
        "INSERT INTO job_events (job_id, seq, kind, data, created_at, ingested_at) "
        "VALUES ('j', 1, 'finished', '{}', ?, ?)",
        (now, now),
    )
    db.commit()
    db.close()
    migrate(home)
    db = sqlite3.connect(home / "warp.db")
    assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
    assert db.execute("SELECT id, owner_id FROM jobs").fetchall() == [("j", "k")]
    assert db.execute("SELECT job_id, seq FROM job_events").fetchall() == [("j", 1)]
