"""The ledger's schema, changed only through these Alembic migrations (the library Airflow itself uses).

A ledger holds a company's audit history, so a new release upgrades it in place: nothing that exists
is dropped or rewritten. ``upgrade(engine)`` brings any ledger to the head revision:

- an empty database gets every migration from the first;
- a ledger made by release 1 (tables created by ``create_all``, no ``alembic_version``) is stamped
  as revision 0001, which is exactly that schema, then upgraded;
- a ledger at the head costs one query.

Operators may also run it by hand: ``python -m include.invoice_mailing.migrations upgrade URL``.
"""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, inspect, text

HERE = Path(__file__).resolve().parent
FIRST = "0001"
_LOCK_KEY = 0x1A7E_D6E5  # a PostgreSQL advisory lock: one migrating process at a time


@cache
def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(HERE))


def head() -> str:
    return _script().get_current_head()


def current(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _config(conn: Connection):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(HERE))
    config.attributes["connection"] = conn
    return config


def upgrade(engine: Engine, revision: str = "head") -> str:
    """Migrate the ledger to ``revision`` (the head by default); returns the revision it is at."""
    from alembic import command

    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        found = current(conn)
        target = head() if revision == "head" else revision
        if found == target:
            return found
        config = _config(conn)
        if found is None and inspect(conn).has_table("delivery"):
            command.stamp(config, FIRST)  # release 1 made this ledger: its schema is revision 0001
        command.upgrade(config, revision)
        return current(conn)


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in ("upgrade", "current"):
        print("usage: python -m include.invoice_mailing.migrations upgrade|current SQLALCHEMY_URL", file=sys.stderr)
        return 2
    engine = create_engine(argv[2])
    if argv[1] == "upgrade":
        print(f"ledger at revision {upgrade(engine)} (head {head()})")
    else:
        with engine.connect() as conn:
            print(f"ledger at revision {current(conn)} (head {head()})")
    return 0
