"""A local SMTP server (aiosmtpd) that keeps every message it accepts: for the demo and the tests.

Each message is kept in memory with its envelope and, given a folder, written there as an ``.eml``
file whose first headers record the envelope (Bcc recipients appear only there). The sink also counts
the SMTP sessions open at once and keeps the peak, as a relay with a session limit counts them.
With ``dsn=True`` it offers DSN (RFC 3461) and PIPELINING (RFC 2920) as a production relay does, and
keeps the MAIL FROM and RCPT TO parameters of each message, so that tests can read what was asked for.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import ssl
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP


@dataclass
class Received:
    envelope_from: str
    envelope_to: list[str]
    data: bytes
    mail_options: list[str] = field(default_factory=list)        # e.g. ["SIZE=1234", "RET=HDRS", "ENVID=..."]
    rcpt_options: list[list[str]] = field(default_factory=list)  # per envelope_to, e.g. [["NOTIFY=FAILURE,DELAY"]]

    @property
    def message(self) -> EmailMessage:
        return message_from_bytes(self.data, policy=policy.default)


@dataclass
class Faults:
    """Misbehaviour on purpose, for fault-injection tests. Lists and counters are used up as served."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)        # address (lower case) -> "550 5.1.1 ..."
    rcpt_queue: dict[str, list[str]] = field(default_factory=dict)    # address -> next answers, e.g. ["451 ..."]
    mail_replies: list[str | None] = field(default_factory=list)      # next MAIL FROM answers ("421 ...", None: normal)
    mail_delays: list[float] = field(default_factory=list)            # seconds before the next MAIL answers
    data_replies: list[str] = field(default_factory=list)             # next end-of-DATA answers, e.g. ["451 ..."]
    drop_in_data: int = 0        # close the connection when the message arrived, without keeping it
    accept_then_drop: int = 0    # keep the message, then close without answering, this many times
    data_delay: float = 0.0      # seconds to wait before answering end-of-DATA
    # (n, pid, keep): at the n-th message, SIGKILL the sending process, after keeping the message or not
    kill_at_data: tuple[int, int, bool] | None = None
    data_seen: int = 0
    auth_replies: list[str] = field(default_factory=list)  # next AUTH answers, e.g. ["534 5.7.9 ..."]
    auth_seen: int = 0
    # The EHLO answer's keywords, reshaped: drop these (e.g. {"SMTPUTF8"}), replace by keyword
    # (e.g. {"SIZE": "SIZE"} for a bare SIZE), add these lines (e.g. ["X-UNKNOWN-EXTENSION a b"]).
    ehlo_drop: set[str] = field(default_factory=set)
    ehlo_replace: dict[str, str] = field(default_factory=dict)
    ehlo_add: list[str] = field(default_factory=list)


class SinkHandler:
    def __init__(self, directory: Path | None = None, faults: Faults | None = None):
        self.directory = Path(directory) if directory else None
        self.faults = faults or Faults()
        self.received: list[Received] = []
        self.sessions_open = 0
        self.peak_sessions = 0  # the most SMTP sessions that were open at once
        # For each MAIL FROM, what the client had sent after it when it was answered: the RCPT commands of a
        # client that pipelines (RFC 2920), nothing from one that waits for each answer.
        self.waiting_at_mail: list[bytes] = []
        self._lock = threading.Lock()
        if self.directory:
            self.directory.mkdir(parents=True, exist_ok=True)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        lines = [r[4:] for r in responses]  # "250-SIZE 33554432" -> "SIZE 33554432"; the last is "HELP"
        shaped = []
        for line in lines[:-1]:
            keyword = line.split(" ", 1)[0].upper()
            if keyword in self.faults.ehlo_drop:
                continue
            shaped.append(self.faults.ehlo_replace.get(keyword, line))
        shaped += [*self.faults.ehlo_add, lines[-1]]
        return [f"250-{line}" for line in shaped[:-1]] + [f"250 {shaped[-1]}"]

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        if self.faults.mail_delays:
            await asyncio.sleep(self.faults.mail_delays.pop(0))
        self.waiting_at_mail.append(bytes(server._reader._buffer))  # aiosmtpd's input not yet read
        if self.faults.mail_replies and (reply := self.faults.mail_replies.pop(0)) is not None:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.rcpt_params = []  # per accepted recipient, in the order of rcpt_tos
        return "250 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        queued = self.faults.rcpt_queue.get(address.lower())
        reply = queued.pop(0) if queued else self.faults.rcpt_replies.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_params.append(list(rcpt_options))
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        faults = self.faults
        faults.data_seen += 1
        content = envelope.original_content or envelope.content
        if faults.kill_at_data and faults.kill_at_data[0] == faults.data_seen:
            _, pid, keep = faults.kill_at_data
            if keep:
                self.keep(envelope.mail_from, list(envelope.rcpt_tos), content, **_options(envelope))
            os.kill(pid, signal.SIGKILL)
            server.transport.close()
            return "421 closing"
        if faults.data_delay:
            await asyncio.sleep(faults.data_delay)
        if faults.drop_in_data > 0:
            faults.drop_in_data -= 1
            server.transport.close()
            return "421 closing"
        if faults.data_replies:
            return faults.data_replies.pop(0)
        self.keep(envelope.mail_from, list(envelope.rcpt_tos), content, **_options(envelope))
        if faults.accept_then_drop > 0:
            faults.accept_then_drop -= 1
            server.transport.close()
            return "421 closing"
        return "250 Message accepted"

    def session_opened(self) -> None:
        with self._lock:
            self.sessions_open += 1
            self.peak_sessions = max(self.peak_sessions, self.sessions_open)

    def session_closed(self) -> None:
        with self._lock:
            self.sessions_open -= 1

    def keep(self, envelope_from: str, envelope_to: list[str], data: bytes, *, mail_options: list[str],
             rcpt_options: list[list[str]]) -> None:
        with self._lock:
            item = Received(envelope_from, envelope_to, data, mail_options, rcpt_options)
            self.received.append(item)
            if self.directory:
                message_id = item.message.get("Message-ID", "") or f"message-{len(self.received)}"
                stem = re.sub(r"[^A-Za-z0-9._-]+", "_", message_id.strip("<>"))[:80]
                existing = len(list(self.directory.glob("*.eml")))
                path = self.directory / f"{existing + 1:04d}-{stem}.eml"
                head = f"X-Envelope-From: {envelope_from}\r\nX-Envelope-To: {', '.join(envelope_to)}\r\n"
                path.write_bytes(head.encode() + data)


def _options(envelope) -> dict:
    """The MAIL FROM parameters, and the RCPT TO parameters of each accepted recipient."""
    return {"mail_options": list(envelope.mail_options), "rcpt_options": list(getattr(envelope, "rcpt_params", []))}


class _CountingSmtp(SMTP):
    """aiosmtpd's server, telling the handler when a client's connection opens and closes (a STARTTLS
    upgrade calls ``connection_made`` again on the same session: not a new one)."""

    def connection_made(self, transport) -> None:
        if self.transport is None:
            self.event_handler.session_opened()
        super().connection_made(transport)

    def connection_lost(self, error) -> None:
        super().connection_lost(error)
        self.event_handler.session_closed()


class _DsnSmtp(_CountingSmtp):
    """Takes the DSN parameters of RFC 3461 (aiosmtpd answers 555 to any MAIL or RCPT parameter it does
    not know): they are left out of the parameters it checks, and reach the handler with the others."""

    DSN_PARAMETERS = frozenset({"RET", "ENVID", "NOTIFY", "ORCPT"})

    def _getparams(self, params):
        checked = super()._getparams(params)
        if checked is None:
            return None
        return {name: value for name, value in checked.items() if name not in self.DSN_PARAMETERS}


class _SinkController(Controller):
    def __init__(self, handler, *, dsn: bool = False, **kwargs):
        self.dsn = dsn
        super().__init__(handler, **kwargs)

    def factory(self):
        return (_DsnSmtp if self.dsn else _CountingSmtp)(self.handler, **self.SMTP_kwargs)


class _Authenticator:
    def __init__(self, logins: dict[str, str], faults: Faults):
        self.logins, self.faults = logins, faults

    def __call__(self, server, session, envelope, mechanism, auth_data):
        from aiosmtpd.smtp import AuthResult, LoginPassword

        self.faults.auth_seen += 1
        if self.faults.auth_replies:  # the platform's own refusal, e.g. Google's 534 5.7.9
            return AuthResult(success=False, handled=False, message=self.faults.auth_replies.pop(0))
        ok = isinstance(auth_data, LoginPassword) and self.logins.get(
            auth_data.login.decode()) == auth_data.password.decode()
        return AuthResult(success=ok, handled=False)


def self_signed_tls(host: str = "127.0.0.1") -> ssl.SSLContext:
    """A server-side TLS context with a fresh self-signed certificate for ``host`` (clients that check
    certificates refuse it: connect with the connection extra ``ssl_context: none``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    start = datetime.now(UTC) - timedelta(minutes=5)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + timedelta(days=1)).sign(key, hashes.SHA256()))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory() as folder:
        cert_path, key_path = Path(folder, "cert.pem"), Path(folder, "key.pem")
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        context.load_cert_chain(cert_path, key_path)
    return context


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


class SmtpSink:
    """Start and stop the server; ``received`` holds what arrived."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, directory: Path | None = None,
                 faults: Faults | None = None, size_limit: int | None = None,
                 logins: dict[str, str] | None = None, tls: str | None = None, dsn: bool = False,
                 auth_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")):
        """``logins`` (user -> password): the server offers AUTH and refuses MAIL FROM before a login.
        ``tls``: "starttls" offers STARTTLS, "ssl" speaks TLS from the start (a self-signed certificate).
        ``dsn``: the server offers DSN and PIPELINING (it reads commands in order, so pipelined ones work).
        ``auth_mechanisms``: what AUTH offers (Exchange Online offers LOGIN alone for a password)."""
        self.handler = SinkHandler(directory, faults)
        if dsn:
            self.handler.faults.ehlo_add += ["PIPELINING", "DSN"]
        kwargs = {"data_size_limit": size_limit} if size_limit else {}
        if logins:  # with STARTTLS, AUTH only once the session is encrypted
            kwargs.update(authenticator=_Authenticator(logins, self.handler.faults), auth_required=True,
                          auth_require_tls=tls == "starttls",
                          auth_exclude_mechanism=[m for m in ("PLAIN", "LOGIN") if m not in auth_mechanisms])
        context = self_signed_tls(host) if tls else None
        if tls == "starttls":
            kwargs["tls_context"] = context
        self.controller = _SinkController(self.handler, dsn=dsn, hostname=host, port=port or free_port(host),
                                          ssl_context=context if tls == "ssl" else None, server_kwargs=kwargs)

    @property
    def received(self) -> list[Received]:
        return self.handler.received

    @property
    def faults(self) -> Faults:
        return self.handler.faults

    @property
    def peak_sessions(self) -> int:
        return self.handler.peak_sessions

    @property
    def waiting_at_mail(self) -> list[bytes]:
        return self.handler.waiting_at_mail

    @property
    def port(self) -> int:
        return self.controller.port

    def start(self) -> SmtpSink:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8025)
    parser.add_argument("--dir", type=Path, required=True, help="folder for the .eml files")
    args = parser.parse_args()
    sink = SmtpSink(args.host, args.port, args.dir).start()
    print(f"SMTP sink listening on {args.host}:{sink.port}, writing to {args.dir}", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    sink.stop()


if __name__ == "__main__":
    main()
