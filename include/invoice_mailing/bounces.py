"""Bounce reports: the VERP envelope sender of a delivery, and what one message in the bounce mailbox says.

A relay's 250 is not a delivery (docs/rules.md, rule 9): the failure comes later, as a report mailed to the
envelope sender. Each delivery therefore goes out with a MAIL FROM of its own,
``<local>+<token>@<domain>`` of the bounce address, whose token names the delivery and carries an
HMAC-SHA256 keyed by a secret of the deployment, so that a report can be tied to its delivery and a
forged one cannot move the ledger.

``read_report`` turns the raw bytes of one message of the bounce mailbox into a ``Report``: its kind
(``hard``, ``blocked``, ``delayed``, ``auto_reply``, ``other``, ``unreadable``), the failed recipients
with action, status code and diagnostic text, and what identifies the delivery: the addresses the
report was sent to (one of them is the VERP address) and, as the fallback, the original Message-ID.
It never raises on bad input; every report carries a ``reason`` for the log line. It reads nothing
from the ledger and applies nothing: the mailbox reader decides what to do with a report.

Formats covered (fixtures in ``tests/fixtures/bounces/``):

- RFC 3464 delivery status notifications (``multipart/report; report-type=delivery-status``), read
  with the standard library: Postfix, Sendmail, Exim 4 with DSN, Microsoft Exchange Online /
  Office 365, Gmail; ``Action: failed`` and ``Action: delayed``.
- Older non-standard bounces through flufl.bounce's detectors, as a fallback only: qmail (QSBMF),
  Exim's plain-text bounce (``X-Failed-Recipients``), legacy Microsoft Exchange, and what else the
  library recognises (GroupWise, Yahoo, AOL, Netscape, SMTP32, ...).
- Auto-replies: RFC 3834 ``Auto-Submitted``, ``X-Autoreply``/``X-Autorespond``,
  ``Precedence: auto_reply``, and out-of-office subjects in the demo ERP's languages.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from email import errors
from email.message import EmailMessage, Message
from email.parser import BytesParser, Parser
from email.policy import EmailPolicy
from email.utils import getaddresses, parseaddr
from enum import StrEnum

from flufl.bounce import all_failures

BOUNCE_KEY_VARIABLE = "INVOICE_MAILING_BOUNCE_KEY"
MIN_KEY_BYTES = 32
"""A shorter secret could be guessed; 32 bytes is what ``secrets.token_urlsafe(32)`` gives (and more)."""

MAX_REPORT_BYTES = 10 * 1024 * 1024
"""A report asked for with RET=HDRS is a few kilobytes; a relay that returns the whole message with its
PDFs stays far below this. Anything larger is not read at all (it would only cost memory)."""

READ_BYTES = 256 * 1024
"""What is read of one message: its first 256 kB. A DSN's own parts (text, delivery status, the returned
message's headers) come before the returned message's body, so a report whose relay returned the invoice
whole is still read; the rest would only cost time (the mailbox fetches no more than this)."""
HEADER_BYTES = 64 * 1024
"""A message whose header section is longer is not read: a real report's is a few kB."""
HEADER_CHARS = 2 * 1024
"""A header value is parsed from at most this many characters: the standard library's header parser takes
worse than quadratic time in a value's length (a 0.8 MB header took 50 s), so one message could hold a night."""
MAX_PARTS = 100
"""A message of more MIME parts is not read: a report has three or four."""

MAC_BYTES = 10
"""80 bits of HMAC: base32 gives exactly 16 characters (no padding), a short and valid local part."""

_MAC_DOMAIN = b"invoice-mailing bounce v1\x00"
_TOKEN = re.compile(r"^(?P<delivery>[1-9][0-9]{0,18})-(?P<mac>[a-z2-7]{16})$")
_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.])")
_MESSAGE_ID_LINE = re.compile(r"^Message-ID:[ \t]*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)
_RETURN_PATH_LINE = re.compile(r"^Return-Path:[ \t]*<([^<>\s]+)>", re.IGNORECASE | re.MULTILINE)

class _BoundedPolicy(EmailPolicy):
    """The standard policy, with every header value parsed from its first ``HEADER_CHARS`` characters."""

    def header_fetch_parse(self, name, value):
        return super().header_fetch_parse(name, value[:HEADER_CHARS] if isinstance(value, str) else value)


_POLICY = _BoundedPolicy()
_END_OF_HEADER = re.compile(rb"\r?\n\r?\n")
_DELIMITER = re.compile(rb"^--[^\r\n]", re.MULTILINE)

# Defects that mean the MIME tree is not what the sender built: the parts cannot be trusted.
_STRUCTURAL_DEFECTS = (
    errors.StartBoundaryNotFoundDefect,
    errors.CloseBoundaryNotFoundDefect,
    errors.MultipartInvariantViolationDefect,
    errors.NoBoundaryInMultipartDefect,
    errors.FirstHeaderLineIsContinuationDefect,
)

# Subjects of out-of-office replies that carry no RFC 3834 header (older Outlook/Exchange, webmail
# vacation rules), in the languages of the demo ERP's contacts. Only checked when the message is
# neither a DSN nor a recognised bounce.
_AUTO_REPLY_SUBJECT = re.compile(
    r"out of (the )?office|automatic reply|auto[- ]?reply|autoresponse|vacation|"
    r"abwesenheit|automatische antwort|réponse automatique|absence|"
    r"fraværsmelding|fravær|automatisk svar|automatiskt svar|frånvaro|poissaolo|automaattinen vastaus",
    re.IGNORECASE,
)
# A delay warning that is no DSN ("still trying"), recognised only in a message from the mail system.
_DELAY_SUBJECT = re.compile(r"delayed mail|delivery delayed|\(delay\)|still being retried|warning: could not send",
                            re.IGNORECASE)
_MAILER_DAEMON = re.compile(r"^(mailer-daemon|postmaster|mail delivery (sub)?system)", re.IGNORECASE)


class BounceKeyError(RuntimeError):
    """The deployment's bounce key is missing or too short to be a secret."""


class Kind(StrEnum):
    HARD = "hard"
    """A permanent failure: the address is dead (5.x.x other than 5.7.x, or a bounce that gives up)."""
    BLOCKED = "blocked"
    """A policy refusal (5.7.x): the address may exist, the receiver will not take our mail."""
    DELAYED = "delayed"
    """The relay still tries (``Action: delayed``, 4.x.x): a note against the delivery, nothing more."""
    AUTO_REPLY = "auto_reply"
    """An out-of-office or other automatic answer: no bounce; stays unread in the folder."""
    OTHER = "other"
    """A person's answer or anything not recognised: stays unread in the folder."""
    UNREADABLE = "unreadable"
    """Too large or broken: not read at all; the ``reason`` says why."""


# The order of severity when one report lists several recipients.
_SEVERITY = (Kind.HARD, Kind.BLOCKED, Kind.DELAYED)


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient of a report: what the reporting MTA says happened to it."""

    recipient: str
    """The final recipient's address (``Final-Recipient``, or the address a non-DSN bounce names)."""
    action: str
    """``failed`` or ``delayed`` (DSN ``Action``; for a non-DSN bounce what flufl.bounce concluded)."""
    status: str | None
    """The enhanced status code, e.g. ``5.1.1``; None when the report gives none."""
    diagnostic: str
    """The remote server's words (``Diagnostic-Code``, or the bounce's paragraph on this recipient)."""
    kind: Kind


@dataclass(frozen=True)
class Report:
    """What one message of the bounce mailbox is, and what identifies the delivery it is about."""

    kind: Kind
    reason: str
    """One line for the log: why this kind, and anything odd met on the way."""
    recipients: tuple[FailedRecipient, ...] = ()
    addressed_to: tuple[str, ...] = ()
    """Addresses the report was delivered to, most reliable first: one of them is the VERP address."""
    original_message_id: str | None = None
    """The Message-ID of the returned message (the fallback when no VERP address verifies)."""
    envelope_id: str | None = None
    """The DSN's ``Original-Envelope-Id`` (the ENVID of RFC 3461), as the relay returned it."""
    message_id: str | None = None
    """The report's own Message-ID, for the log."""
    subject: str = ""

    @property
    def is_bounce(self) -> bool:
        """A report that tells something about a delivery (a failure or a delay)."""
        return self.kind in _SEVERITY

    def delivery_id(self, bounce_address: str, key: bytes) -> int | None:
        """The delivery whose VERP address this report was sent to, or None (not ours, or forged)."""
        for address in self.addressed_to:
            delivery = delivery_of(address, bounce_address, key)
            if delivery is not None:
                return delivery
        return None


@dataclass
class _Finding:
    """What the DSN reader or the non-DSN reader found, before the identity of the delivery is added."""

    kind: Kind
    reason: str
    recipients: list[FailedRecipient] = field(default_factory=list)
    senders: list[str] = field(default_factory=list)
    """Envelope senders the report itself names (Postfix's X-Postfix-Sender)."""
    envelope_id: str | None = None
    text: str = ""
    """The plain text of a non-DSN bounce, which may hold the returned message's headers inline."""


# --- VERP ---------------------------------------------------------------------------------------------


def bounce_key_from_environment(environ: Mapping[str, str] | None = None) -> bytes:
    """The deployment's secret for VERP tokens, from ``INVOICE_MAILING_BOUNCE_KEY``.

    Refused when missing or shorter than ``MIN_KEY_BYTES``: with no secret, anybody could forge a
    report that marks an invoice bounced. The key is never in the repository.
    """
    value = (os.environ if environ is None else environ).get(BOUNCE_KEY_VARIABLE, "")
    key = value.strip().encode("utf-8")
    if not key:
        raise BounceKeyError(
            f"{BOUNCE_KEY_VARIABLE} is not set: bounces need a secret of at least {MIN_KEY_BYTES} bytes "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'), kept out of the repository")
    if len(key) < MIN_KEY_BYTES:
        raise BounceKeyError(
            f"{BOUNCE_KEY_VARIABLE} is {len(key)} bytes long; at least {MIN_KEY_BYTES} are needed so that "
            "VERP tokens cannot be guessed (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return key


def _mac(delivery_id: int, key: bytes) -> str:
    if len(key) < MIN_KEY_BYTES:
        raise BounceKeyError(f"the bounce key is {len(key)} bytes long; at least {MIN_KEY_BYTES} are needed")
    digest = hmac.new(key, _MAC_DOMAIN + str(delivery_id).encode("ascii"), hashlib.sha256).digest()
    return base64.b32encode(digest[:MAC_BYTES]).decode("ascii").lower()


def _split_address(address: str) -> tuple[str, str] | None:
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return local, domain


def verp_sender(bounce_address: str, delivery_id: int, key: bytes) -> str:
    """The envelope sender (MAIL FROM) of one delivery: ``<local>+<id>-<mac>@<domain>``.

    The token is the delivery id, a hyphen and 16 base32 characters of HMAC-SHA256: letters, digits
    and a hyphen only, a valid local part, and lower-case so that a relay folding case changes nothing.
    """
    if delivery_id <= 0:
        raise ValueError(f"a delivery id is a positive integer, not {delivery_id!r}")
    parts = _split_address(bounce_address)
    if parts is None:
        raise ValueError(f"the bounce address {bounce_address!r} is not local@domain")
    local, domain = parts
    return f"{local}+{delivery_id}-{_mac(delivery_id, key)}@{domain}"


def delivery_of(address: str, bounce_address: str, key: bytes) -> int | None:
    """The delivery id in a VERP address, or None when the address is not ours or its MAC fails.

    Compared case-insensitively (relays may fold the case of a local part); the MAC is compared in
    constant time. ``address`` may be a header value such as ``<a+1-x@b>`` or ``Name <a+1-x@b>``.
    """
    bounce = _split_address(bounce_address.strip().lower())
    found = _split_address(parseaddr(address)[1].strip().lower())
    if bounce is None or found is None:
        return None
    (local, domain), (found_local, found_domain) = bounce, found
    prefix = local + "+"
    if found_domain != domain or not found_local.startswith(prefix):
        return None
    token = _TOKEN.match(found_local[len(prefix):])
    if token is None:
        return None
    delivery_id = int(token["delivery"])
    if not hmac.compare_digest(_mac(delivery_id, key), token["mac"]):
        return None
    return delivery_id


# --- Reading a report -------------------------------------------------------------------------------


def read_report(raw: bytes, size: int | None = None) -> Report:
    """What one message of the bounce mailbox is. Never raises: bad input gives ``unreadable`` or ``other``.

    ``size`` is the message's size in the mailbox when ``raw`` is its first bytes only (the mailbox fetches
    at most ``READ_BYTES``); a longer ``raw`` is read from its first ``READ_BYTES`` all the same."""
    size = max(size or 0, len(raw))
    if size > MAX_REPORT_BYTES:
        return Report(Kind.UNREADABLE, f"not read: {size:,} bytes, above the limit of {MAX_REPORT_BYTES:,}")
    try:
        msg, refused = _parsed(raw)
        if refused:
            return Report(Kind.UNREADABLE, f"not read: {refused}")
        report = _read_message(msg, cut=size > READ_BYTES)
    except Exception as exc:  # noqa: BLE001 - a report must never stop the mailbox reader; the reason is logged
        return Report(Kind.UNREADABLE, f"not read: {type(exc).__name__}: {exc}")
    if size > READ_BYTES:
        report = dataclasses.replace(report, reason=f"{report.reason}; read from its first {READ_BYTES:,} of "
                                                    f"{size:,} bytes")
    return report


def _parsed(raw: bytes) -> tuple[EmailMessage | None, str | None]:
    """The message of ``raw``'s first ``READ_BYTES``, or why it is not read. Parsing is linear in the input
    (header values are parsed only when read, each from at most ``HEADER_CHARS``), so the limits on the
    header section and the parts are checked before any value is read."""
    raw = raw[:READ_BYTES]
    end = _END_OF_HEADER.search(raw)
    header = end.start() if end else len(raw)
    if header > HEADER_BYTES:
        return None, f"its header section is {header:,} bytes, above the limit of {HEADER_BYTES:,}"
    delimiters = len(_DELIMITER.findall(raw))  # every part starts at one; a text has a few more ("-- " above a
    if delimiters > 2 * MAX_PARTS:             # signature): twice the limit is surely more than its parts
        return None, f"{delimiters:,} MIME boundary lines, above the limit of {2 * MAX_PARTS}"
    msg = BytesParser(policy=_POLICY).parsebytes(raw)
    parts = sum(1 for _ in msg.walk())
    if parts > MAX_PARTS:
        return None, f"{parts:,} MIME parts, above the limit of {MAX_PARTS}"
    return msg, None


def report_text(raw: bytes) -> str:
    """A report as a person reads it, for the auditors' page: its subject, its text parts and its
    delivery-status fields, without the MIME structure and encodings of the raw message. Never raises."""
    notes: list[str] = []
    try:
        msg, refused = _parsed(raw)
        if refused:
            return f"(the report is not shown: {refused})"
        parts = [f"Subject: {_header(msg, 'subject', notes)}", _plain_text(msg, notes)]
        for part in msg.walk():
            if part.get_content_type() == "message/delivery-status":
                parts += [_fields(block, notes) for block in part.get_payload() if isinstance(block, Message)]
    except Exception as exc:  # noqa: BLE001 - a broken report still gets a page, saying why its text is missing
        return f"(the report could not be read: {type(exc).__name__})"
    return "\n\n".join(p.strip() for p in parts if p.strip())


def _read_message(msg: EmailMessage, *, cut: bool = False) -> Report:
    notes: list[str] = []
    subject = _header(msg, "subject", notes)
    message_id = _header(msg, "message-id", notes) or None
    if not msg.keys():
        return Report(Kind.UNREADABLE, "not an email message: no header lines")
    broken = _structural_defects(msg, cut=cut)
    if broken:
        return Report(Kind.UNREADABLE, f"broken MIME structure ({', '.join(broken)}): not read",
                      message_id=message_id, subject=subject)

    addressed_to = _addressed_to(msg, notes)
    status_parts = [part for part in msg.walk() if part.get_content_type() == "message/delivery-status"]
    original = _original_headers(msg, notes)
    finding = _read_dsn(status_parts, notes) if status_parts else _read_non_dsn(msg, notes)

    returned_sender = original.get("return-path") or _search(_RETURN_PATH_LINE, finding.text)
    return Report(
        finding.kind,
        "; ".join([finding.reason, *notes]),
        recipients=tuple(finding.recipients),
        addressed_to=_unique(addressed_to + finding.senders + ([returned_sender] if returned_sender else [])),
        original_message_id=original.get("message-id") or _search(_MESSAGE_ID_LINE, finding.text),
        envelope_id=finding.envelope_id,
        message_id=message_id,
        subject=subject,
    )


def _read_dsn(status_parts: list[Message], notes: list[str]) -> _Finding:
    """RFC 3464: the first block holds the per-message fields, each further block one recipient."""
    recipients: list[FailedRecipient] = []
    actions: list[str] = []
    sender: list[str] = []
    envelope_id = None
    for part in status_parts:
        blocks = part.get_payload()
        if not isinstance(blocks, list) or not blocks:
            notes.append("a delivery-status part without field blocks")
            continue
        per_message, per_recipient = blocks[0], blocks[1:]
        envelope_id = envelope_id or _field_value(per_message, "original-envelope-id", notes) or None
        # Postfix names the envelope sender (our VERP address) in the report itself.
        postfix_sender = _field_value(per_message, "x-postfix-sender", notes)
        if postfix_sender:
            sender.append(postfix_sender)
        for block in per_recipient:
            action = _header(block, "action", notes).split("(")[0].strip().lower()
            actions.append(action or "none")
            if action.startswith(("fail", "error")):  # opensmtpd writes "error"
                action_kind, action = Kind.HARD, "failed"
            elif action.startswith("delayed"):
                action_kind, action = Kind.DELAYED, "delayed"
            else:
                continue  # delivered, relayed, expanded: no failure
            diagnostic = _field_value(block, "diagnostic-code", notes)
            status = _status_code(_header(block, "status", notes)) or _status_code(diagnostic)
            recipient = (_field_value(block, "final-recipient", notes)
                         or _field_value(block, "original-recipient", notes))
            recipients.append(FailedRecipient(
                recipient=_bare_address(recipient), action=action, status=status, diagnostic=diagnostic,
                kind=_refine(action_kind, status)))
    if not recipients:
        return _Finding(Kind.OTHER, f"a delivery status notification with no failure (actions: "
                                    f"{', '.join(actions) or 'none'})", senders=sender, envelope_id=envelope_id)
    kind = _most_severe(recipients)
    return _Finding(kind, f"delivery status notification: {_summary(recipients)}", recipients=recipients,
                    senders=sender, envelope_id=envelope_id)


def _read_non_dsn(msg: EmailMessage, notes: list[str]) -> _Finding:
    """An older bounce (flufl.bounce's detectors), then an auto-reply, then anything else."""
    text = _plain_text(msg, notes)
    try:
        temporary, permanent = all_failures(msg)
    except Exception as exc:  # noqa: BLE001 - a heuristic detector tripping over odd input is no bounce
        notes.append(f"bounce detectors failed: {type(exc).__name__}")
        temporary, permanent = frozenset(), frozenset()
    recipients = [_detected(address, "failed", Kind.HARD, text) for address in sorted(permanent)]
    recipients += [_detected(address, "delayed", Kind.DELAYED, text) for address in sorted(temporary - permanent)]
    if recipients:
        return _Finding(_most_severe(recipients), f"non-standard bounce: {_summary(recipients)}",
                        recipients=recipients, text=text)

    auto_reply = _auto_reply_sign(msg, notes)
    if auto_reply:
        return _Finding(Kind.AUTO_REPLY, f"automatic reply ({auto_reply})")
    subject = _header(msg, "subject", notes)
    sender = _header(msg, "from", notes)
    if _DELAY_SUBJECT.search(subject) and (_MAILER_DAEMON.match(parseaddr(sender)[1]) or
                                           _MAILER_DAEMON.match(sender)):
        return _Finding(Kind.DELAYED, f"delay warning from the mail system, no recipient named (subject {subject!r})",
                        text=text)
    return _Finding(Kind.OTHER, "neither a bounce nor an automatic reply (a person's answer?)")


def _detected(address: bytes, action: str, kind: Kind, text: str) -> FailedRecipient:
    recipient = address.decode("ascii", "replace")
    paragraph = _paragraph_about(text, recipient)
    status = _status_code(paragraph)
    return FailedRecipient(recipient=recipient, action=action, status=status, diagnostic=paragraph,
                           kind=_refine(kind, status))


def _refine(kind: Kind, status: str | None) -> Kind:
    """A failure with a 5.7.x status is a policy block; a delay stays a delay whatever its code."""
    if kind is Kind.HARD and status and status.startswith("5.7."):
        return Kind.BLOCKED
    return kind


def _most_severe(recipients: Iterable[FailedRecipient]) -> Kind:
    kinds = {r.kind for r in recipients}
    return next(kind for kind in _SEVERITY if kind in kinds)


def _summary(recipients: list[FailedRecipient]) -> str:
    return ", ".join(f"{r.recipient} {r.action} {r.status or 'without status'}" for r in recipients)


def _auto_reply_sign(msg: EmailMessage, notes: list[str]) -> str | None:
    """Which header or subject says that a program answered (RFC 3834 and the common non-standard ones)."""
    auto_submitted = _header(msg, "auto-submitted", notes).split(";")[0].strip().lower()
    if auto_submitted and auto_submitted != "no":
        return f"Auto-Submitted: {auto_submitted}"
    for name in ("x-autoreply", "x-autorespond", "x-autoresponder"):
        if _header(msg, name, notes):
            return name
    for name in ("precedence", "x-precedence"):
        if _header(msg, name, notes).strip().lower() == "auto_reply":
            return f"{name}: auto_reply"
    subject = _header(msg, "subject", notes)
    if _AUTO_REPLY_SUBJECT.search(subject):
        return f"subject {subject!r}"
    return None


def _addressed_to(msg: EmailMessage, notes: list[str]) -> list[str]:
    """Where the report was delivered, most reliable first.

    The mail system that delivers into the mailbox records the envelope recipient (the VERP address):
    ``Delivered-To`` (Postfix local/virtual, Dovecot, qmail, Gmail), ``X-Original-To`` (Postfix, before
    alias expansion), ``Envelope-To`` (Exim). Every bounce generator also writes the envelope sender it
    answers into ``To``.
    """
    found: list[str] = []
    for name in ("delivered-to", "x-original-to", "envelope-to", "to"):
        values = [_decoded(value, notes) for value in msg.get_all(name, [])]
        found += [address for _, address in getaddresses(values) if "@" in address]
    return found


def _original_headers(msg: EmailMessage, notes: list[str]) -> dict[str, str]:
    """Return-Path and Message-ID of the returned message (``message/rfc822`` or ``text/rfc822-headers``)."""
    for part in msg.walk():
        content_type = part.get_content_type()
        if content_type in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            returned = payload[0] if isinstance(payload, list) and payload else None
        elif content_type in ("text/rfc822-headers", "message/global-headers"):
            returned = Parser(policy=_POLICY).parsestr(_part_text(part, notes), headersonly=True)
        else:
            continue
        if returned is None:
            continue
        return_path = parseaddr(_header(returned, "return-path", notes))[1]
        message_id = _header(returned, "message-id", notes).strip()
        return {"return-path": return_path, "message-id": message_id}
    return {}


def _plain_text(msg: EmailMessage, notes: list[str]) -> str:
    """The text of every text/plain part outside a returned message (older bounces are plain text)."""
    texts = [_part_text(part, notes) for part in msg.walk()
             if part.get_content_type() == "text/plain" and not part.is_multipart()]
    return "\n".join(texts)


def _part_text(part: Message, notes: list[str]) -> str:
    try:
        return part.get_content()
    except (LookupError, UnicodeError, AttributeError, KeyError) as exc:
        # An unknown or lying charset: read the bytes as UTF-8 with replacement characters.
        notes.append(f"text in charset {part.get_content_charset()!r} read with replacements ({type(exc).__name__})")
        payload = part.get_payload(decode=True)
        return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else str(payload or "")


def _header(msg: Message, name: str, notes: list[str]) -> str:
    return _decoded(msg.get(name, ""), notes)


def _decoded(value: object, notes: list[str]) -> str:
    """A header's text; an undecodable one (unknown charset in an encoded word) gives what can be read."""
    try:
        text = str(value or "")
    except Exception as exc:  # noqa: BLE001 - the email package raises many kinds here on bad headers
        notes.append(f"a header could not be decoded ({type(exc).__name__})")
        return ""
    # The email package keeps undecodable bytes as surrogates; they would break a log line.
    return text.encode("utf-8", "replace").decode("utf-8")


def _fields(block: Message, notes: list[str]) -> str:
    """A delivery-status block as its fields read, decoded: ``str(block)`` would write a non-ASCII value back as
    RFC 2047 encoded words (``=?unknown-8bit?q?=C2=ABkari=40bol...?=``), where no masker sees the address."""
    return "\n".join(f"{name}: {' '.join(_decoded(value, notes).split())}" for name, value in block.items())


def _field_value(block: Message, name: str, notes: list[str]) -> str:
    """A DSN field ``type; value`` without its type (``rfc822;``, ``smtp;``, ``dns;``), unfolded."""
    value = " ".join(_header(block, name, notes).split())
    kind, semicolon, rest = value.partition(";")
    return rest.strip() if semicolon and " " not in kind.strip() else value


def _bare_address(value: str) -> str:
    return parseaddr(value)[1] or value.strip("<> ")


def _status_code(text: str) -> str | None:
    match = _STATUS.search(text or "")
    return ".".join(match.groups()) if match else None


def _paragraph_about(text: str, address: str) -> str:
    """The bounce's paragraph on ``address``: for older formats, the closest thing to a diagnostic.

    A paragraph that starts with the address (qmail's ``<addr>:``, Exim's indented address, Exchange's
    ``addr on <date>``) is preferred to one that merely mentions it (``To: addr`` in a returned copy).
    """
    lines = text.splitlines()
    lowered = address.lower()
    starts = [i for i, line in enumerate(lines) if line.strip().lstrip("<").lower().startswith(lowered)]
    mentions = [i for i, line in enumerate(lines) if lowered in line.lower()]
    for index in starts[:1] or mentions[:1]:
        paragraph = [lines[index].strip()]
        for following in lines[index + 1:]:
            if not following.strip():
                break
            paragraph.append(following.strip())
        return " ".join(" ".join(paragraph).split())[:1000]
    return ""


def _structural_defects(msg: Message, *, cut: bool = False) -> list[str]:
    """The defects that make the MIME tree untrustworthy; a missing close boundary is what cutting a message
    after ``READ_BYTES`` leaves, and is no defect then."""
    names = []
    for part in msg.walk():
        names += [type(defect).__name__ for defect in part.defects if isinstance(defect, _STRUCTURAL_DEFECTS)
                  and not (cut and isinstance(defect, errors.CloseBoundaryNotFoundDefect))]
    return sorted(set(names))


def _search(pattern: re.Pattern[str], text: str) -> str | None:
    match = pattern.search(text or "")
    return match.group(1) if match else None


def _unique(addresses: Iterable[str]) -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for address in addresses:
        seen.setdefault(address.lower(), address)
    return tuple(seen.values())
