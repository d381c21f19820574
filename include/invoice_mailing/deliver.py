"""Build the EmailMessage, send it through the Airflow SMTP connection, classify the server's answers."""

from __future__ import annotations

import logging
import math
import re
import smtplib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from html import escape

from email_validator import EmailNotValidError, validate_email

from include.invoice_mailing.ledger import now
from include.invoice_mailing.masking import mask_text
from include.invoice_mailing.platform_answers import account_refusal
from include.invoice_mailing.render import Attachment, Notification, one_line
from include.invoice_mailing.session_slots import NoSessionSlot, SessionSlots, Slot
from include.invoice_mailing.smtp_login import (
    SmtpAccount,
    SmtpAccountError,
    SmtpConfigError,
    TransientSmtpError,
    code_text,
)

log = logging.getLogger(__name__)

DEFAULT_SMTP_CONN_ID = "smtp_default"
NO_SMTPUTF8 = "the relay does not offer SMTPUTF8, which an address with a non-ASCII local part needs"


@dataclass
class SendResult:
    """What the server did with one message, per envelope recipient."""

    accepted: list[str] = field(default_factory=list)
    rejected: dict[str, tuple[str, str]] = field(default_factory=dict)  # permanent: address -> (reason, answer)
    deferred: dict[str, str] = field(default_factory=dict)  # transient: address -> "451 ..."
    failure: tuple[str, str] | None = None                  # permanent for all: (reason, text)
    data: bytes = b""                                       # the exact bytes given to the server
    session_fault: bool = False  # deferred because the session failed (not a recipient's 4xx): it will again


@dataclass(frozen=True)
class WireMessage:
    """A message as SMTP carries it, serialized once so that every transaction of it (one per delivery
    with VERP) carries the same bytes. SMTPUTF8 when any envelope address of the message needs it: its
    headers then hold UTF-8, whichever of its transactions carries them."""

    data: bytes
    smtputf8: bool

    @classmethod
    def of(cls, msg: EmailMessage, addresses: Sequence[str]) -> WireMessage:
        smtputf8 = any(not a.isascii() for a in addresses)  # only a non-ASCII local part
        return cls(msg.as_bytes(policy=policy.SMTPUTF8 if smtputf8 else policy.SMTP), smtputf8)


def xtext(value: str) -> str:
    """RFC 3461 xtext, as ENVID and ORCPT carry text: ``+``, ``=``, controls and non-ASCII as ``+HH``."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else "".join(f"+{b:02X}" for b in c.encode())
                   for c in value)


DSN_RET, DSN_NOTIFY = "RET=HDRS", "NOTIFY=FAILURE,DELAY"
"""A failure or delay notice with the original's headers only (RFC 3461): enough to name the delivery,
without the PDFs coming back to the bounce mailbox."""


@dataclass(frozen=True)
class MessageRecipient:
    address: str
    add_to: str
    name: str | None = None


@dataclass(frozen=True)
class Mailbox:
    """An address as SMTP carries it. The ERP's text is kept for display (ledger, log); on the wire the
    domain is in ASCII (IDNA A-labels) whenever the local part is ASCII, so that only a local part
    such as ``åse@...`` needs the relay's SMTPUTF8."""

    local: str
    domain: str

    @classmethod
    def of(cls, address: str) -> Mailbox:
        try:
            checked = validate_email(address.strip(), check_deliverability=False, allow_display_name=False)
        except EmailNotValidError:  # validated when planned; keep the text as it is rather than crash here
            local, _, domain = address.strip().rpartition("@")
            return cls(local, domain)
        if checked.ascii_email:
            local, _, domain = checked.ascii_email.rpartition("@")
            return cls(local, domain)
        return cls(checked.local_part, checked.domain)

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}"


def smtp_address(address: str) -> str:
    return Mailbox.of(address).address


def _address(address: str, name: str | None = None) -> Address:
    box = Mailbox.of(address)
    return Address(display_name=one_line(name or "", 100), username=box.local, domain=box.domain)


def build_message(
    *,
    sender_address: str,
    sender_name: str | None,
    recipients: Sequence[MessageRecipient],
    notification: Notification,
    attachment: Attachment,
    message_id: str,
    document_ref: str,
    redirect_to: str | None = None,
) -> EmailMessage:
    """One message per document and format. Bcc recipients are never written into a header."""
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = _address(sender_address, sender_name)
    html, text = notification.html, notification.text
    if redirect_to:
        listing = "; ".join(f"{r.add_to}: {r.address}" for r in recipients)
        msg["To"] = _address(redirect_to)
        html = (f'<p style="border:1px solid #c00;padding:6px">Test run: redirected. '
                f"Real recipients: {escape(listing)}</p>\n{html}")
        text = f"Test run: redirected. Real recipients: {listing}\n\n{text}"
    else:
        to = [_address(r.address, r.name) for r in recipients if r.add_to == "To"]
        cc = [_address(r.address, r.name) for r in recipients if r.add_to == "Cc"]
        if to:
            msg["To"] = to
        elif not cc:
            msg["To"] = "undisclosed-recipients:;"
        if cc:
            msg["Cc"] = cc
    msg["Subject"] = notification.subject
    msg["Date"] = format_datetime(now())
    msg["Message-ID"] = message_id
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Invoice-Document"] = one_line(document_ref, 40)
    msg.set_content(text)
    msg.add_alternative(html, subtype="html")
    if attachment.maintype == "text":  # stays readable: text with its charset, not opaque bytes
        msg.add_attachment(attachment.content.decode("utf-8"), subtype=attachment.subtype, charset="utf-8",
                           cte="base64", filename=attachment.filename)
    else:
        msg.add_attachment(attachment.content, maintype=attachment.maintype, subtype=attachment.subtype,
                           filename=attachment.filename)
    return msg


def size_limit(keyword: str | None) -> int:
    """The message size a relay takes, from its EHLO ``SIZE`` keyword (RFC 1870): ``SIZE 35882577``.
    A bare ``SIZE``, ``SIZE 0`` or anything but a number means the relay announces no fixed limit."""
    first = (keyword or "").split()[:1]
    return int(first[0]) if first and first[0].isdigit() else 0


_ENHANCED = re.compile(r"\s*([245])\.(\d{1,3})\.(\d{1,3})(?!\S)")
AUTH_CODES = (530, 534, 535, 538)  # RFC 4954: log in first, mechanism too weak, refused, needs TLS
_BY_COMMAND = {"mail": "sender_rejected", "rcpt": "recipient_rejected", "data": "message_rejected"}


def enhanced_code(text: bytes | str) -> tuple[int, int, int] | None:
    """The RFC 3463 status code (class.subject.detail) that opens an answer's text, if any."""
    text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
    found = _ENHANCED.match(text)
    return tuple(int(n) for n in found.groups()) if found else None


def refusal_reason(command: str, code: int, text: bytes | str) -> str | None:
    """Why a 5xx answer refused a message or a recipient, by its enhanced status code first (RFC 3463),
    then by its basic code, and by the command only when neither says more. None: a 4xx, try later.

    Postfix reports sender and relaying restrictions at RCPT (``smtpd_delay_reject``), so a 5.7.x
    to the envelope is the account's refusal, not the recipient's. After DATA a 5.7.x is a policy
    on the message's content (spam, virus): the message's verdict, final like any other.
    """
    if 400 <= code < 500:
        return None
    enhanced = enhanced_code(text)
    if code in AUTH_CODES:
        return "auth_failed"
    if enhanced and enhanced[:2] == (5, 7) and command != "data":  # security or policy: the account's
        return "sender_rejected"
    if enhanced == (5, 3, 4) or (code == 552 and command in ("mail", "data")):  # to MAIL FROM ... SIZE=
        return "too_large"
    return _BY_COMMAND.get(command, "smtp_error")


def max_sessions(conn_id: str, extra: dict, default: int) -> int:
    """How many SMTP sessions the connection's relay takes at once: its extra ``max_sessions``, else ``default``."""
    value = extra.get("max_sessions", default)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SmtpConfigError(f"the SMTP connection {conn_id!r} has max_sessions {value!r} in its extra; "
                              "it must be a whole number of at least 1")
    return value


def pipelined(client: smtplib.SMTP, envelope_from: str, mail_options: Sequence[str], rcpts: Sequence[str],
              rcpt_options: Sequence[str]) -> list[tuple[int, bytes]]:
    """MAIL FROM and every RCPT TO in one write, then their answers in order (RFC 2920 PIPELINING): one
    round trip to the relay instead of one per command, which is what makes a transaction per delivery
    (VERP) cheap on a distant relay. DATA stays a step of its own: its 354 must be seen before the message
    goes. The commands are smtplib's own (``SMTP.mail``, ``SMTP.rcpt``), written together."""
    def line(command: str, address: str, options: Sequence[str]) -> str:
        text = f"{command}:{smtplib.quoteaddr(address)}{(' ' + ' '.join(options)) if options else ''}"
        if "\r" in text or "\n" in text:  # as SMTP.putcmd refuses them: no command smuggled into the batch
            raise ValueError(f"an SMTP command may not contain a line break: {text!r}")
        return f"{text}\r\n"

    if any(option.lower() == "smtputf8" for option in mail_options):
        client.command_encoding = "utf-8"  # as SMTP.mail does for an SMTPUTF8 transaction
    lines = [line("mail FROM", envelope_from, mail_options)] + [line("rcpt TO", a, rcpt_options) for a in rcpts]
    client.send("".join(lines))
    return [client.getreply() for _ in lines]


class SmtpSender:
    """SMTP sessions per connection id, opened as the connection says (``smtp_login.SmtpAccount``), reused
    for a batch.

    This class owns the sessions, the classification of answers and the retries (the SMTP provider's
    ``send_email_smtp`` would retry after DATA was accepted, and its ``get_conn`` retries connecting on
    its own). With ``slots``, each session holds one of its relay's session slots (``session_slots.py``)
    from before it connects until it is closed, so no relay sees more than its connection's
    ``max_sessions`` at once. A session logged in with an OAuth 2.0 token logs in again, on the same
    slot, before a transaction that would start after its token's renewal time; the next transaction
    then runs on the new session, so nothing is sent twice. An account the relay or its identity
    provider refused (``SmtpAccountError``, a wrong setting) is refused for the rest of the batch without
    a session more, and a token endpoint that did not answer keeps the batch's other messages pending.
    """

    def __init__(self, *, attempts: int = 3, backoff: float = 2.0, slots: SessionSlots | None = None):
        self._sessions: dict[str, smtplib.SMTP] = {}
        self._slots: dict[str, Slot] = {}
        self._no_slot: dict[str, NoSessionSlot] = {}  # waited once in vain: the task's next try comes back
        self._accounts: dict[str, SmtpAccount] = {}
        self._renew_at: dict[str, float] = {}         # when the session's token is due for renewal
        self._refused: dict[str, Exception] = {}      # the account's refusal, for the rest of the batch
        self._token_down: dict[str, str] = {}         # the token endpoint did not answer: the batch waits
        self.attempts = attempts
        self.backoff = backoff  # seconds, times the attempt number
        self.slots = slots

    def account(self, conn_id: str) -> SmtpAccount:
        """The connection's settings, read once per sender; SmtpConfigError when they are wrong."""
        if conn_id not in self._accounts:
            self._accounts[conn_id] = SmtpAccount.from_connection(conn_id)
        return self._accounts[conn_id]

    def envelope_sender(self, conn_id: str) -> str | None:
        """``verp`` or ``mailbox`` (the connection's ``envelope_sender``); None when its settings are wrong
        (``send`` then reports them)."""
        try:
            return self.account(conn_id).envelope_sender
        except SmtpConfigError:
            return None

    def _connect(self, conn_id: str) -> smtplib.SMTP:
        """A session opened as the connection says, once the login's token is at hand and one of the relay's
        session slots is ours (a slot already held, by a session being renewed, is kept)."""
        account = self.account(conn_id)
        token = account.token()
        slot = self._slots.pop(conn_id, None) or self._slot(conn_id, account.extra)
        try:
            client = account.open(token)
        except BaseException:
            if slot is not None:
                slot.release()
            raise
        if slot is not None:
            self._slots[conn_id] = slot
        self._renew_at[conn_id] = token.renew_at() if token is not None else math.inf
        return client

    def _slot(self, conn_id: str, extra: dict) -> Slot | None:
        """One of the relay's session slots, waiting for one within the slots' bound; once that wait was in
        vain, this sender does not wait again (every later message of the batch stays pending at once)."""
        if self.slots is None:
            return None
        if conn_id in self._no_slot:
            raise self._no_slot[conn_id]
        try:
            return self.slots.acquire(conn_id, max_sessions(conn_id, extra, self.slots.default_max_sessions))
        except NoSessionSlot as exc:
            self._no_slot[conn_id] = exc
            raise

    def _session(self, conn_id: str) -> smtplib.SMTP:
        if conn_id in self._refused:
            raise self._refused[conn_id]
        if conn_id in self._token_down:
            raise _token_down(self._token_down[conn_id])
        if conn_id in self._sessions and time.time() >= self._renew_at.get(conn_id, math.inf):
            log.info("SMTP %s: the session's OAuth 2.0 token is due for renewal: logging in again with a new one",
                     conn_id)
            self._quit(conn_id)  # between transactions: no message is in flight
        if conn_id not in self._sessions:
            try:
                self._sessions[conn_id] = self._connect(conn_id)
            except (SmtpAccountError, SmtpConfigError) as exc:
                self._refused[conn_id] = exc
                self._drop(conn_id)
                raise
        return self._sessions[conn_id]

    def supports(self, conn_id: str, extension: str) -> bool | None:
        """Whether the relay advertises an ESMTP extension; None when the session cannot be opened now
        (``send`` then meets and classifies the same fault)."""
        try:
            client = self._session(conn_id)
            client.ehlo_or_helo_if_needed()
            return bool(client.has_extn(extension))
        except Exception:  # noqa: BLE001 - the send that follows classifies it
            self._drop(conn_id)
            return None

    def _quit(self, conn_id: str) -> None:
        """End the session politely; its slot stays held (a renewal connects again at once)."""
        client = self._sessions.pop(conn_id, None)
        if client is not None:
            try:
                client.quit()
            except Exception:  # noqa: BLE001
                client.close()

    def _drop(self, conn_id: str) -> None:
        client = self._sessions.pop(conn_id, None)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - a broken session is being thrown away anyway
                pass
        slot = self._slots.pop(conn_id, None)
        if slot is not None:  # after the close: the relay has seen this session end
            slot.release()

    def close(self) -> None:
        for conn_id in list(self._sessions):
            self._quit(conn_id)
        for conn_id in list(self._slots):
            self._drop(conn_id)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, conn_id: str, msg: EmailMessage | WireMessage, envelope_from: str, rcpts: Sequence[str], *,
             envid: str | None = None) -> SendResult:
        """Send with bounded retries of transient faults that happen before the server took the message.

        A fault after DATA was sent is ambiguous (the server may have accepted it): it is not retried
        here but reported as deferred, so the ledger keeps the delivery pending with its Message-ID.
        With ``envid``, where the relay offers DSN, the transaction asks for failure and delay notices
        with headers only, naming the envelope ``envid`` (RFC 3461).
        """
        wire = msg if isinstance(msg, WireMessage) else WireMessage.of(msg, (envelope_from, *rcpts))
        rcpts = list(rcpts)
        result = SendResult(data=wire.data)
        for attempt in range(1, self.attempts + 1):
            try:
                outcome = self._send_once(conn_id, wire, envelope_from, rcpts, envid)
            except TransientSmtpError as exc:
                if attempt == self.attempts or exc.after_data or not exc.retry_now:
                    if exc.token_unavailable:  # the batch's other messages need the same token: they wait
                        self._token_down[conn_id] = str(exc)
                    result.deferred.update({r: str(exc) for r in rcpts})
                    result.session_fault = True
                    return result
                log.warning("SMTP %s: %s; retrying in %.1fs (attempt %d of %d)", conn_id, mask_text(str(exc)),
                            self.backoff * attempt, attempt, self.attempts)
                time.sleep(self.backoff * attempt)
                continue
            result.failure = outcome.failure
            result.accepted += outcome.accepted
            result.rejected.update(outcome.rejected)
            if not outcome.deferred or attempt == self.attempts:
                result.deferred.update(outcome.deferred)
                return result
            rcpts = list(outcome.deferred)  # only the recipients the server deferred
            time.sleep(self.backoff * attempt)
        return result

    def _send_once(self, conn_id: str, wire: WireMessage, envelope_from: str, rcpts: list[str],
                   envid: str | None) -> SendResult:
        """One SMTP transaction, step by step, so that every answer is known with its phase."""
        data, smtputf8 = wire.data, wire.smtputf8
        result = SendResult()
        phase = "connect"
        try:
            client = self._session(conn_id)
            client.ehlo_or_helo_if_needed()
            if smtputf8 and not client.has_extn("smtputf8"):
                result.failure = ("smtputf8_unsupported", NO_SMTPUTF8)
                return result
            limit = size_limit(client.esmtp_features.get("size") if client.has_extn("size") else None)
            if limit and len(data) > limit:
                result.failure = ("too_large", f"the message has {len(data)} bytes; the server takes {limit}")
                return result
            options = (["SMTPUTF8"] if smtputf8 else []) + ([f"SIZE={len(data)}"] if client.has_extn("size") else [])
            dsn = envid is not None and client.has_extn("dsn")
            if dsn:
                options += [DSN_RET, f"ENVID={xtext(envid)}"]
            phase = "mail"
            rcpt_options = [DSN_NOTIFY] if dsn else []
            answers = None
            if client.has_extn("pipelining"):
                (code, text), *answers = pipelined(client, envelope_from, options, rcpts, rcpt_options)
            else:
                code, text = client.mail(envelope_from, options)
            if code != 250:
                if refusal := self._account_refusal(conn_id, "MAIL FROM", code, text):
                    raise refusal
                return self._refused_all(conn_id, result, code, text)
            phase = "rcpt"
            for n, address in enumerate(rcpts):
                code, text = answers[n] if answers is not None else client.rcpt(address, rcpt_options)
                if code in (250, 251):
                    result.accepted.append(address)
                elif 400 <= code < 500:
                    result.deferred[address] = code_text(code, text)
                else:
                    if refusal := self._account_refusal(conn_id, "RCPT TO", code, text):
                        raise refusal
                    result.rejected[address] = (refusal_reason("rcpt", code, text), code_text(code, text))
            if not result.accepted:
                client.rset()
                return result
            phase = "data"
            code, text = client.data(data)
            if code == 250:
                return result
            if refusal := self._account_refusal(conn_id, "the message", code, text):
                raise refusal
            return self._data_refused(result, code, text)
        except smtplib.SMTPDataError as exc:  # DATA itself refused: nothing was transferred
            self._drop(conn_id)
            if refusal := self._account_refusal(conn_id, "the message", exc.smtp_code, exc.smtp_error):
                return SendResult(failure=(refusal.reason, refusal.answer))  # the server took nothing
            return self._data_refused(result, exc.smtp_code, exc.smtp_error)
        except SmtpConfigError as exc:
            result.failure = ("config_error", str(exc))
            return result
        except SmtpAccountError as exc:  # the account refused: no recipient of this transaction was taken
            return SendResult(failure=(exc.reason, exc.answer))
        except NoSessionSlot as exc:  # it waited already: the deliveries stay pending for the task's next try
            error = TransientSmtpError(str(exc))
            error.retry_now = False
            raise error from exc
        except TransientSmtpError:
            if phase == "connect":
                self._drop(conn_id)
            raise
        except Exception as exc:  # dropped connection, timeout, refused connection (the hook wraps some)
            self._drop(conn_id)
            error = TransientSmtpError(f"{type(exc).__name__} during {phase}: {exc}")
            # Once the message was being transferred the server may have taken it: no blind retry.
            error.after_data = phase == "data"
            raise error from exc

    def _account_refusal(self, conn_id: str, command: str, code: int, text) -> SmtpAccountError | None:
        """An answer that refuses the account itself (``platform_answers``): the rest of the batch is refused the
        same, without another transaction. None for an answer about a recipient or a message."""
        answer = code_text(code, text)
        known = account_refusal(code, answer.partition(" ")[2], self.account(conn_id).platform)
        if known is None:
            return None
        self._refused[conn_id] = SmtpAccountError(known.reason, f"{command} refused: {answer}: {known.what_to_do}")
        try:
            if conn_id in self._sessions:
                self._sessions[conn_id].rset()
        except Exception:  # noqa: BLE001
            self._drop(conn_id)
        return self._refused[conn_id]

    @staticmethod
    def _data_refused(result: SendResult, code: int, text) -> SendResult:
        """The message was refused as a whole: every recipient the server had accepted shares the answer."""
        accepted, result.accepted = result.accepted, []
        answer = code_text(code, text)
        if 400 <= code < 500:
            result.deferred.update({a: answer for a in accepted})
        else:
            result.rejected.update({a: (refusal_reason("data", code, text), answer) for a in accepted})
        return result

    def _refused_all(self, conn_id: str, result: SendResult, code: int, text) -> SendResult:
        """MAIL FROM refused: the answer is every recipient's."""
        if 400 <= code < 500 or code < 200:
            self._drop(conn_id)
            raise TransientSmtpError(code_text(code, text))
        result.failure = (refusal_reason("mail", code, text), code_text(code, text))
        try:
            self._session(conn_id).rset()
        except Exception:  # noqa: BLE001
            self._drop(conn_id)
        return result


def _token_down(text: str) -> TransientSmtpError:
    error = TransientSmtpError(text)
    error.retry_now, error.token_unavailable = False, True
    return error
