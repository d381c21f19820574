"""One EN 16931 validator per worker: Saxon loaded once, shared by every task process the worker forks.

Saxon costs about two seconds and 200 MB in each process that starts it, and its GraalVM isolate does not
survive a fork, so the process that forks task processes (the scheduler with its LocalExecutor, a Celery
worker) cannot load it for its children. Instead ``start()``, called there by ``preload.warm()``, opens a
listening Unix socket in a private folder and spawns validator processes, new interpreters (``python -m``,
not forks) that accept on it; the socket's path goes into the environment (``INVOICE_MAILING_VALIDATOR_SOCKET``)
that the task processes inherit, and their ``einvoice_check.checker()`` is then a ``ServiceChecker``: it sends
each XML there and reads the violations back later (``submit``), so that a task process renders the next
document while a validator checks this one, and reads the answer before anything of this one is claimed.
The validators exit with the process that started them.

Fail closed: a task process that cannot reach the service (gone, no answer within the timeout, an answer it
cannot read) checks in its own process, and logs why; a check is never skipped.

Settings (environment of the scheduler or Celery worker): ``INVOICE_MAILING_VALIDATOR_PROCESSES`` (default one
per eight cores, at least one), ``INVOICE_MAILING_VALIDATOR_SERVICE=false`` to check in each task process.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import functools
import json
import logging
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from include.invoice_mailing.einvoice import EInvoiceError, Violation
from include.invoice_mailing.einvoice_check import SOCKET_ENV, SYNTAXES, Checker, Result, require_syntax

log = logging.getLogger(__name__)

PROCESSES_ENV = "INVOICE_MAILING_VALIDATOR_PROCESSES"
ENABLED_ENV = "INVOICE_MAILING_VALIDATOR_SERVICE"
ANSWER_TIMEOUT = 120.0  # seconds for one answer: the validators' start (2 s, more on a loaded host) and a queue
_REQUEST = struct.Struct("!3sI")  # syntax ("CII"/"UBL"), length of the XML that follows
_LENGTH = struct.Struct("!I")
_MAX_XML = 64 * 1024 * 1024


class ProtocolError(Exception):
    """The other side sent something that is not a request or an answer."""


# --- the wire: one request and one answer per connection ---------------------------------------

def _receive(connection: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = connection.recv(min(left, 1 << 20))
        if not chunk:
            raise ProtocolError(f"the connection closed {left} bytes short")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _violations(rows) -> tuple[Violation, ...]:
    return tuple(Violation(*row) for row in rows)


def _rows(violations) -> list[tuple[str, ...]]:
    return [dataclasses.astuple(v) for v in violations]


def answer(checker: Checker, syntax: str, xml: bytes) -> dict:
    """What a validator sends back: the result, or the violations of a check that could not run."""
    try:
        result = checker.result(xml, syntax)
    except EInvoiceError as error:  # VALIDATOR: the check could not run; the client raises it, fail closed
        return {"error": _rows(error.violations), "pid": os.getpid()}
    return {"fatal": _rows(result.fatal), "warnings": _rows(result.warnings), "pid": os.getpid()}


def serve(listener: socket.socket, parent: int, folder: str | None = None) -> None:
    """A validator process: answer one connection at a time until the parent exits. The artefacts are loaded
    at the first check (about 2 s, the task processes that ask meanwhile wait in the socket's queue), so that
    a worker that mails no e-invoice never holds Saxon's 200 MB."""
    checker = Checker()
    log.info("EN 16931 validator %d listening for the task processes of pid %d", os.getpid(), parent)
    threading.Thread(target=_exit_with, args=(parent, folder), daemon=True, name="parent-watch").start()
    while True:
        connection, _ = listener.accept()
        with connection:
            try:
                connection.settimeout(30)
                syntax, size = _REQUEST.unpack(_receive(connection, _REQUEST.size))
                if syntax.decode("ascii", "replace") not in SYNTAXES or size > _MAX_XML:
                    raise ProtocolError(f"not a request: syntax {syntax!r}, {size} bytes")
                reply = json.dumps(answer(checker, syntax.decode("ascii"), _receive(connection, size))).encode()
                connection.sendall(_LENGTH.pack(len(reply)) + reply)
            except (OSError, ProtocolError, struct.error) as error:  # that client's problem, not the service's
                log.warning("EN 16931 validator %d: a request failed: %s", os.getpid(), error)


def _exit_with(parent: int, folder: str | None) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    os._exit(0)


# --- the worker's side: start the validators ------------------------------------------------------

def wanted_processes() -> int:
    value = os.environ.get(PROCESSES_ENV)
    if value:
        return max(1, int(value))
    return max(1, (os.cpu_count() or 1) // 8)


def start(processes: int | None = None) -> list[subprocess.Popen]:
    """Spawn the validators for the task processes this process will fork; sets ``SOCKET_ENV`` here.

    Nothing is started if this process already has a service (its socket set and answering)."""
    if _reachable(os.environ.get(SOCKET_ENV)):
        return []
    folder = tempfile.mkdtemp(prefix="invoice-mailing-validator-")  # 0700: only this user's processes connect
    path = os.path.join(folder, "socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(128)  # a task process that asks before a validator is ready waits here, not refused
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop(SOCKET_ENV, None)
    children = [
        subprocess.Popen([sys.executable, "-m", "include.invoice_mailing.validator_service", "--fd",
                          str(listener.fileno()), "--parent", str(os.getpid()), "--folder", folder],
                         pass_fds=(listener.fileno(),), stdin=subprocess.DEVNULL, env=env, cwd=root)
        for _ in range(processes or wanted_processes())]
    listener.close()  # the validators hold it; with all of them gone a client is refused at once
    os.environ[SOCKET_ENV] = path
    atexit.register(_remove, folder, os.getpid())  # forked children inherit the handler, and must not run it
    log.info("EN 16931 validators %s started for the task processes of pid %d (socket %s)",
             [child.pid for child in children], os.getpid(), path)
    return children


def _remove(folder: str, owner: int) -> None:
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


def _reachable(path: str | None) -> bool:
    if not path:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


# --- the task process's side ------------------------------------------------------------------------

class ServiceChecker:
    """``Checker``'s interface, answered by the worker's validators; in this process if they cannot answer."""

    def __init__(self, path: str, timeout: float = ANSWER_TIMEOUT):
        self.path = path
        self.timeout = timeout
        self._local: Checker | None = None  # once the service failed, the rest of this process checks here
        self._answered = False

    def _send(self, xml: bytes, syntax: str) -> socket.socket:
        connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            connection.settimeout(self.timeout)
            connection.connect(self.path)
            connection.sendall(_REQUEST.pack(syntax.encode("ascii"), len(xml)) + xml)
        except BaseException:
            connection.close()
            raise
        return connection

    @staticmethod
    def _reply(connection: socket.socket) -> dict:
        with connection:
            (size,) = _LENGTH.unpack(_receive(connection, _LENGTH.size))
            return json.loads(_receive(connection, size))

    def ask(self, xml: bytes, syntax: str) -> dict:
        """One request and its answer, as the validator sends it."""
        return self._reply(self._send(xml, syntax))

    def submit(self, xml: bytes, syntax: str) -> Callable[[], Result]:
        """Send the XML to a validator and return at once; the returned function reads the answer, waiting for it
        if need be (a validator answers in the order it accepted). A request or an answer that fails is checked
        in this process instead: a check is never skipped."""
        require_syntax(syntax)
        if self._local is None:
            try:
                return functools.partial(self._answer, self._send(xml, syntax), xml, syntax)
            except OSError as error:
                self._fall_back(error)
        return functools.partial(self._local.result, xml, syntax)

    def result(self, xml: bytes, syntax: str) -> Result:
        return self.submit(xml, syntax)()

    def _answer(self, connection: socket.socket, xml: bytes, syntax: str) -> Result:
        try:
            reply = self._reply(connection)
            if not self._answered:
                log.info("EN 16931 checks by the worker's validator process %s (%s)", reply["pid"], self.path)
                self._answered = True
            if "error" in reply:
                raise EInvoiceError(_violations(reply["error"]))
            return Result(_violations(reply["fatal"]), _violations(reply["warnings"]))
        except (OSError, ProtocolError, ValueError, KeyError, TypeError, struct.error) as error:
            self._fall_back(error)
        return self._local.result(xml, syntax)

    def _fall_back(self, error: Exception) -> None:
        if self._local is None:
            log.warning("The EN 16931 validator service at %s did not answer (%s: %s); this process checks "
                        "its e-invoices itself from now on", self.path, type(error).__name__, error)
            self._local = Checker()

    def warm(self) -> ServiceChecker:
        """Wait until a validator answers (or this process has loaded its own)."""
        self.result(b"<ping/>", "CII")  # not an invoice: an answer with XSD errors, from a loaded validator
        return self

    @property
    def local(self) -> bool:
        """Whether this process checks by itself (the service could not answer)."""
        return self._local is not None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="An EN 16931 validator process (started by start())")
    parser.add_argument("--fd", type=int, required=True, help="the listening Unix socket, inherited")
    parser.add_argument("--parent", type=int, required=True, help="exit when this process has exited")
    parser.add_argument("--folder", help="the socket's folder, removed on exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve(socket.socket(fileno=args.fd), args.parent, args.folder)


if __name__ == "__main__":
    main()
