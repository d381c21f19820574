"""SMTP session slots per relay connection, shared by every task process and host through the ledger database.

A relay takes a limited number of sessions at once (Office 365 fewer than a local Postfix), and that
limit is the relay's, not the night's: each SMTP connection says its own in the extra ``max_sessions``.
Airflow's task SDK has no pool API and a pool would hold every relay to the lowest limit, so the slots
are locks the database releases when their holder dies (no slot leaks after a SIGKILL):

- PostgreSQL ledger: session-level advisory locks ``(hash of the connection id, slot number)``, each held
  on a connection of its own while the SMTP session is open. Workers on several hosts share only
  the ledger, so the locks live there.
- SQLite ledger (one host by definition): ``flock`` on files beside the database file.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import tempfile
import time
import zlib
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, Engine, text

log = logging.getLogger(__name__)

DEFAULT_WAIT_SECONDS = 60.0
POLL_SECONDS = 0.2


class NoSessionSlot(Exception):
    """Every session slot of the relay stayed taken for the whole wait."""


class Slot(Protocol):
    def release(self) -> None: ...


class _AdvisoryLock:
    def __init__(self, conn: Connection, key: tuple[int, int]):
        self.conn, self.key = conn, key

    def release(self) -> None:
        try:
            self.conn.execute(text("SELECT pg_advisory_unlock(:k1, :k2)"), {"k1": self.key[0], "k2": self.key[1]})
        except Exception:  # noqa: BLE001 - a database session that ends releases its locks too
            log.warning("Could not unlock SMTP session slot %s; closing its database session", self.key, exc_info=True)
            self.conn.invalidate()
        finally:
            self.conn.close()


class _FileLock:
    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        os.close(self.fd)  # closing the descriptor releases its flock


def connection_key(conn_id: str) -> int:
    """A stable signed 32-bit key of a connection id, the first half of its advisory locks' keys."""
    crc = zlib.crc32(f"invoice_mailing.smtp_session:{conn_id}".encode())
    return crc - 2**32 if crc >= 2**31 else crc


class SessionSlots:
    """Take one of a relay connection's ``max_sessions`` slots before its SMTP session opens; release it
    when the session closes. ``wait`` bounds how long to wait for one (polling every ``poll`` seconds);
    ``default_max_sessions`` is the limit of a connection whose extra names none."""

    def __init__(self, ledger_db: Engine, *, default_max_sessions: int, wait: float = DEFAULT_WAIT_SECONDS,
                 poll: float = POLL_SECONDS):
        self.ledger_db, self.default_max_sessions, self.wait, self.poll = ledger_db, default_max_sessions, wait, poll
        self._postgres = ledger_db.dialect.name == "postgresql"
        if not self._postgres:
            database = ledger_db.url.database
            beside = Path(database).parent if database and database != ":memory:" else Path(tempfile.gettempdir())
            self._folder = beside / "smtp-session-slots"

    def acquire(self, conn_id: str, max_sessions: int) -> Slot:
        """A free slot of ``conn_id``; raises NoSessionSlot when none came free within the wait."""
        deadline = time.monotonic() + self.wait
        waiting = False
        while True:
            slot = self._try_any(conn_id, max_sessions)
            if slot is not None:
                if waiting:
                    log.info("Got an SMTP session slot of %r", conn_id)
                return slot
            if not waiting:
                log.info("waiting for an SMTP session slot of %r (%d in use: its max_sessions)", conn_id, max_sessions)
                waiting = True
            if time.monotonic() >= deadline:
                raise NoSessionSlot(f"all {max_sessions} SMTP session slots of the connection {conn_id!r} "
                                    f"(its max_sessions) stayed in use for {self.wait:.0f} s")
            time.sleep(self.poll)

    def _try_any(self, conn_id: str, max_sessions: int) -> Slot | None:
        return self._try_advisory(conn_id, max_sessions) if self._postgres else self._try_files(conn_id, max_sessions)

    def _try_advisory(self, conn_id: str, max_sessions: int) -> Slot | None:
        conn = self.ledger_db.connect().execution_options(isolation_level="AUTOCOMMIT")  # no transaction held open
        try:
            key1 = connection_key(conn_id)
            for number in range(max_sessions):
                if conn.execute(text("SELECT pg_try_advisory_lock(:k1, :k2)"), {"k1": key1, "k2": number}).scalar():
                    return _AdvisoryLock(conn, (key1, number))
        except BaseException:
            conn.close()
            raise
        conn.close()
        return None

    def _try_files(self, conn_id: str, max_sessions: int) -> Slot | None:
        self._folder.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", conn_id)
        for number in range(max_sessions):
            path = self._folder / f"{name}-{zlib.crc32(conn_id.encode()):08x}.{number}.lock"
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            return _FileLock(fd)
        return None
