"""Bring the database to the newest schema: `python -m api.migrate` (what compose's
`migrate` service, embedded mode and the tests run).

The Alembic configuration and revisions ship inside the package (`api/migrations/`), so an
installed service migrates from any directory. Authoring a revision from a checkout:
`alembic -c api/migrations/alembic.ini revision --autogenerate -m "..."`.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

ALEMBIC_INI = Path(__file__).resolve().parent / "migrations" / "alembic.ini"


def upgrade(revision: str = "head") -> None:
    command.upgrade(Config(str(ALEMBIC_INI)), revision)


if __name__ == "__main__":
    upgrade()
