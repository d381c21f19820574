"""The delivery ledger (docs/rules.md, rule 7): one row per delivery, claimed before sending, moved only forward.

A delivery is (document, mailing, recipient address, format, mode, generation). Its life:

    pending --claim--> sending --> sent
       |                  |------> failed      (permanent SMTP answer, or too large)
       |                  '------> pending     (transient answer: retried later, same Message-ID)
       '--> skipped / failed                   (refused by the rules before any attempt)

A row refused by the rules may be re-decided by a later run (the ERP data was fixed, or broke
differently), and so may a relay's refusal of the account; a recipient or a message the SMTP server
refused, and a sent row, are final (``SMTP_FAILURES`` below): never changed again (but for the
archive's path of a sent message, set once). The database enforces these transitions, and that no
delivery is deleted, with triggers on SQLite and PostgreSQL alike (migration 0004); the schema
changes only through the Alembic migrations in ``migrations/``.
``sending`` is taken over by another attempt only when its claim is stale: the claimant's process
is gone (same host, same process namespace) or its lease expired, measured by the database's clock
so that workers on hosts whose clocks disagree still agree on it. The window in which a message can arrive twice is
between the SMTP server accepting DATA and the ``sent`` commit; a resend then carries the same
Message-ID, so mail clients and the audit recognise it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import socket
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import idna
from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    and_,
    case,
    func,
    insert,
    or_,
    select,
    tuple_,
    update,
)

from include.invoice_mailing import clock
from include.invoice_mailing.rules import ADDRESS_BOUNCED, CONFIG_ERROR

ledger = MetaData()

delivery = Table(
    "delivery", ledger,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False),       # the run that created the row
    Column("last_run_id", String(250), nullable=False),  # the run that last decided or tried it
    Column("doc_type", String(3), nullable=False),
    Column("ref_nbr", String(15), nullable=False),
    Column("customer_id", String(10), nullable=False),
    Column("mailing_id", String(20), nullable=False),
    Column("recipient", String(254), nullable=False),     # '' for a refusal of the whole document
    Column("recipient_key", String(254), nullable=False), # recipient, case-folded: the unique part
    Column("add_to", String(3), nullable=False, default=""),
    Column("format", String(10), nullable=False, default=""),
    Column("mode", String(10), nullable=False, default="live"),  # live | dry_run | redirect
    Column("generation", Integer, nullable=False, default=0),    # 0, then 1, 2... for each resend
    Column("resend_of", Integer, nullable=True),
    Column("status", String(10), nullable=False),
    Column("reason", String(40), nullable=True),
    Column("detail", Text, nullable=True),
    Column("message_id", String(250), nullable=True),
    Column("sender", String(254), nullable=True),
    Column("redirected_to", String(254), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", Text, nullable=True),
    Column("claimed_by", String(120), nullable=True),
    Column("claimed_at", DateTime(timezone=True), nullable=True),
    Column("sent_at", DateTime(timezone=True), nullable=True),
    Column("attachment_sha256", String(64), nullable=True),
    Column("message_sha256", String(64), nullable=True),  # the bytes given to SMTP (migration 0003)
    Column("message_path", String(1024), nullable=True),  # where the archive keeps them, a full URL
    Column("bounced_at", DateTime(timezone=True), nullable=True),  # when a bounce report was applied (0006)
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("doc_type", "ref_nbr", "mailing_id", "recipient_key", "format", "mode", "generation",
                     name="uq_delivery"),
    CheckConstraint("status IN ('pending', 'sending', 'sent', 'failed', 'skipped', 'bounced')",
                    name="ck_delivery_status"),
    CheckConstraint("mode IN ('live', 'dry_run', 'redirect')", name="ck_delivery_mode"),
    Index("ix_delivery_status", "status"),  # every night looks for the few rows still open (migration 0004)
)

mailing_run = Table(
    "mailing_run", ledger,
    Column("run_id", String(250), primary_key=True),
    Column("logical_date", DateTime(timezone=True)),
    Column("mode", String(10), nullable=False),
    Column("params", JSON, nullable=False),
    Column("summary", JSON, nullable=True),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=True),
    Column("volume", JSON, nullable=True),  # what extract found due (migration 0005): the brake's history
)

# Each time the brake held a night for a person: the numbers shown, and the answer (migration 0005).
night_approval = Table(
    "night_approval", ledger,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(250), nullable=False, index=True),
    Column("asked_at", DateTime(timezone=True), nullable=False),
    Column("request", JSON, nullable=False),
    Column("decision", String(20), nullable=True),  # approved | rejected | timed_out
    Column("decided_by", String(250), nullable=True),
    Column("decided_at", DateTime(timezone=True), nullable=True),
    CheckConstraint("decision IS NULL OR decision IN ('approved', 'rejected', 'timed_out')",
                    name="ck_night_approval_decision"),
)
APPROVED, REJECTED, TIMED_OUT = "approved", "rejected", "timed_out"

# Each try of a mail_customers instance: links a delivery to the task instance and try that handled it.
mailing_task = Table(
    "mailing_task", ledger,
    Column("run_id", String(250), primary_key=True),
    Column("map_index", Integer, primary_key=True),
    Column("try_number", Integer, primary_key=True),
    Column("label", String(250), nullable=False),
    Column("customers", JSON, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
)

# An attempt that found, after the SMTP server took its message, that another attempt had taken over
# its claim: the message may have arrived twice (migration 0004).
lost_claim = Table(
    "lost_claim", ledger,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", Integer, nullable=False),
    Column("run_id", String(250), nullable=False),
    Column("claimed_by", String(120), nullable=False),  # the attempt that sent, then found its claim gone
    Column("held_by", String(120), nullable=True),      # who held the delivery then
    Column("status", String(10), nullable=False),       # the delivery's status then
    Column("message_sha256", String(64), nullable=True),  # the bytes this attempt had sent
    Column("noted_at", DateTime(timezone=True), nullable=False),
)

# Each bounce report applied to a delivery (migration 0006): a bounce that moved it from ``sent`` to
# ``bounced``, or a delay noted against it. The raw report is kept here, or where the archive keeps it.
bounce_report = Table(
    "bounce_report", ledger,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("sha256", String(64), nullable=False),         # of the raw report's bytes
    Column("delivery_id", Integer, nullable=False, index=True),
    Column("effect", String(10), nullable=False),         # bounced | noted
    Column("kind", String(10), nullable=False),           # bounces.Kind: hard | blocked | delayed
    Column("recipient", String(254), nullable=True),      # the failed recipient the report names
    Column("status_code", String(16), nullable=True),     # e.g. 5.1.1
    Column("diagnostic", Text, nullable=True),            # the remote server's words
    Column("report_message_id", String(250), nullable=True),
    Column("run_id", String(250), nullable=True),         # the run that applied it, if a run did
    Column("received_at", DateTime(timezone=True), nullable=True),
    Column("applied_at", DateTime(timezone=True), nullable=False),
    Column("raw", LargeBinary, nullable=True),            # the report's bytes, when no archive keeps them
    Column("raw_path", String(1024), nullable=True),      # the archive's full URL of the report
    UniqueConstraint("sha256", "delivery_id", name="uq_bounce_report"),
    CheckConstraint("effect IN ('bounced', 'noted')", name="ck_bounce_report_effect"),
)

# The bounce mailbox's messages read and left in their folder for good (migration 0007): parsed once.
mailbox_message = Table(
    "mailbox_message", ledger,
    Column("mailbox", String(500), primary_key=True),   # conn id, login@host:port and folder
    Column("uidvalidity", BigInteger, primary_key=True),
    Column("uid", BigInteger, primary_key=True),
    Column("kind", String(12), nullable=False),          # bounces.Kind: other, auto_reply, unreadable
    Column("reason", Text, nullable=True),               # why it was left (addresses masked)
    Column("read_at", DateTime(timezone=True), nullable=False),
)

PENDING, SENDING, SENT, FAILED, SKIPPED = "pending", "sending", "sent", "failed", "skipped"
# A sent delivery whose relay later reported a permanent failure (migration 0006): final, and not a
# success (docs/rules.md, rule 1): it settles no document. Its reason is HARD_BOUNCE or BLOCKED.
BOUNCED = "bounced"
HARD_BOUNCE, BLOCKED = "hard_bounce", "blocked"
# Why a delivery was not sent decides what a later run may do with it; this is the one definition
# (the pipeline, the audit and the trigger's migrations follow it):
# - FINAL: the server's verdicts on a recipient or a message. Never re-decided; the database refuses
#   to move them (the trigger of migration 0004 lists exactly these: a
#   new final reason needs a new migration, a new re-decided one none).
SMTP_FAILURES = ("recipient_rejected", "message_rejected", "too_large", "smtp_error")
# - RELAY_REFUSALS: the relay's refusals of the account or the connection (a sender or a relaying
#   it will not take, a login, a password login a platform no longer takes, a From it may not send as,
#   TLS, SMTPUTF8) and the identity provider's refusal of its OAuth 2.0 credentials, mended on the
#   relay's or the account's side. Re-decided, and they keep their document due (as a deferred delivery
#   does) until they are sent, within the look-back window; their ``detail`` names the email account and
#   the SMTP connection.
RELAY_REFUSALS = ("sender_rejected", "auth_failed", "tls_unavailable", "smtputf8_unsupported",
                  "basic_auth_disabled", "send_as_denied", "token_refused")
# - A configuration error (a template, a sender, a connection) is re-decided too, and keeps its
#   document open until it is mended: the document is not settled, so not written back.
# - Every other skipped or failed row (a refusal by the rules, a dry run) is re-decided by a later run
#   from the ERP data and settings it then finds; it keeps no document open.
KEEPS_DOCUMENT_OPEN = (*RELAY_REFUSALS, CONFIG_ERROR)


def redecided(status: str, reason: str | None) -> bool:
    """Whether a later run decides this row again: every skipped or failed row but a server's verdict."""
    return status in (SKIPPED, FAILED) and reason not in SMTP_FAILURES


DEFAULT_LEASE = timedelta(minutes=15)
_CHUNK = 500


def ensure_schema(engine: Engine) -> None:
    """Create or upgrade the ledger to this release's schema (Alembic; never drops or rewrites rows)."""
    from include.invoice_mailing import migrations

    migrations.upgrade(engine)


def now() -> datetime:
    return clock.now()


_MESSAGE_ID_MAC = b"invoice-mailing message-id\x00"  # a MAC of its own: never equal to a VERP token's
_NOT_ATEXT = re.compile(r"[^A-Za-z0-9_-]+")


def message_id_for(doc_type: str, ref_nbr: str, mailing_id: str, fmt: str, mode: str, tag: str,
                   domain: str, key: bytes | None = None) -> str:
    """The Message-ID of a delivery's message: a pure function of what it delivers and the deployment's bounce
    key, never random, so a resend after an ambiguous failure carries the same one. With the key it ends in a
    MAC (``<INV000104.pdf.<digest>.<mac>@domain>``): a bounce report is matched by its Message-ID only when
    the MAC verifies, so a stranger who knows a document number cannot forge one. The document number is
    kept to letters, digits, ``-`` and ``_`` (a CR, LF or ``>`` from the ERP cannot break the header)."""
    digest = hashlib.sha256("\x1f".join((doc_type, ref_nbr, mailing_id, fmt, mode, tag)).encode()).hexdigest()
    local = f"{_NOT_ATEXT.sub('-', ref_nbr).strip('-') or 'document'}.{fmt.lower()}.{digest[:24]}"
    message_id = f"<{local}@{_ascii_domain(domain)}>"
    return sign_message_id(message_id, key) if key else message_id


def _ascii_domain(domain: str | None) -> str:
    """The sender's domain as a Message-ID carries it: in ASCII (IDNA A-labels, ``xn--blgen-vua.no`` for
    ``bølgen.no``), so that a message whose headers are otherwise ASCII serializes; a placeholder otherwise."""
    try:
        ascii_domain = idna.encode(domain or "", uts46=True).decode("ascii")
    except idna.IDNAError:
        return "invoice-mailing.invalid"
    return ascii_domain if _DOMAIN.fullmatch(ascii_domain) else "invoice-mailing.invalid"


_DOMAIN = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+")


def sign_message_id(message_id: str, key: bytes) -> str:
    """``<local@domain>`` with the MAC of both under ``key`` as the local part's last dot-separated part."""
    local, _, domain = message_id.strip()[1:-1].rpartition("@")
    return f"<{local}.{_message_id_mac(f'{local}@{domain}', key)}@{domain}>"


def _message_id_mac(body: str, key: bytes) -> str:
    return hmac.new(key, _MESSAGE_ID_MAC + body.encode("utf-8", "replace"), hashlib.sha256).hexdigest()[:20]


def message_id_verifies(message_id: str | None, key: bytes | None) -> bool:
    """Whether ``message_id`` is one this deployment minted under ``key`` (its MAC compared in constant time)."""
    inner = (message_id or "").strip()
    if not key or not (inner.startswith("<") and inner.endswith(">")):
        return False
    local, at, domain = inner[1:-1].rpartition("@")
    body, dot, mac = local.rpartition(".")
    if not at or not dot or not body:
        return False
    return hmac.compare_digest(_message_id_mac(f"{body}@{domain}", key), mac.lower())


@dataclass(frozen=True)
class PlannedDelivery:
    """A row the planner wants in the ledger: to send (``pending``) or refused (``skipped``/``failed``)."""

    doc_type: str
    ref_nbr: str
    customer_id: str
    mailing_id: str
    recipient: str
    add_to: str
    format: str
    status: str
    reason: str | None = None
    detail: str | None = None
    sender_domain: str = ""
    sender: str | None = None
    recipient_key: str = ""  # the normalised address, case-folded (default: the recipient, case-folded)

    @property
    def key(self) -> tuple:
        return (self.doc_type, self.ref_nbr, self.mailing_id, self.recipient_key or self.recipient.casefold(),
                self.format)


def settled_documents(engine: Engine, keys: Iterable[tuple[str, str]]) -> set[tuple[str, str]]:
    """Documents that need nothing tonight: delivered live at least once, with no live delivery still
    open (pending, being sent, refused by the relay for a reason the relay's owner can mend, or failed
    for a configuration error that a later night re-decides once it is mended)."""
    keys = sorted(set(keys))
    settled: set[tuple[str, str]] = set()
    doc = tuple_(delivery.c.doc_type, delivery.c.ref_nbr)
    is_open = or_(delivery.c.status.in_((PENDING, SENDING)),
                  and_(delivery.c.status == FAILED, delivery.c.reason.in_(KEEPS_DOCUMENT_OPEN)))
    with engine.connect() as conn:
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            rows = conn.execute(
                select(delivery.c.doc_type, delivery.c.ref_nbr, func.count().filter(delivery.c.status == SENT),
                       func.count().filter(is_open))
                .where(doc.in_(chunk), delivery.c.mode == "live")
                .group_by(delivery.c.doc_type, delivery.c.ref_nbr)
            ).all()
            settled |= {(doc_type, ref_nbr) for doc_type, ref_nbr, sent, still_open in rows if sent and not still_open}
    return settled


def bounced_addresses(engine: Engine, recipient_keys: Iterable[str]) -> dict[str, datetime]:
    """Of these addresses (recipient keys), those that still count as hard-bounced, with when the bounce
    was applied: a live delivery to the address hard-bounced, and no live delivery was sent to it after
    that bounce was applied (which only an operator's lift, or a race with the night, lets happen).
    A ``blocked`` bounce (a policy refusal, 5.7.x) does not count: the address itself may be good."""
    keys = sorted({k for k in recipient_keys if k})
    found: dict[str, datetime] = {}
    with engine.connect() as conn:
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            bounced = dict(conn.execute(
                select(delivery.c.recipient_key, func.max(delivery.c.bounced_at))
                .where(delivery.c.recipient_key.in_(chunk), delivery.c.status == BOUNCED,
                       delivery.c.reason == HARD_BOUNCE, delivery.c.mode == "live")
                .group_by(delivery.c.recipient_key)).all())
            if not bounced:
                continue
            sent = dict(conn.execute(
                select(delivery.c.recipient_key, func.max(delivery.c.sent_at))
                .where(delivery.c.recipient_key.in_(list(bounced)), delivery.c.status == SENT,
                       delivery.c.mode == "live")
                .group_by(delivery.c.recipient_key)).all())
            found.update((key, at) for key, at in bounced.items() if sent.get(key) is None or sent[key] <= at)
    return found


def lifted_bounces(engine: Engine, run_id: str) -> set[str]:
    """The addresses whose bounce the operator lifted for this run (run parameter ``lift_bounces``, as the
    run's row records it: the audit shows who lifted what, and when), case-folded as recipient keys."""
    with engine.connect() as conn:
        params = conn.execute(select(mailing_run.c.params).where(mailing_run.c.run_id == run_id)).scalar()
    return {str(a).casefold() for a in ((params or {}).get("lift_bounces") or ())}


def refuse_bounced_addresses(engine: Engine, planned: Sequence[PlannedDelivery],
                             lifted: Iterable[str] = ()) -> list[PlannedDelivery]:
    """docs/rules.md, rule 9: a delivery planned to an address that hard-bounced is skipped, reason
    ``address_bounced``, until the ERP's contact holds another address (another key: not refused
    here) or the operator lifts it; the rest of the plan is unchanged."""
    lifted = set(lifted)
    to_send = [p for p in planned if p.status == PENDING]
    bounced = bounced_addresses(engine, [p.key[3] for p in to_send])
    if not bounced:
        return list(planned)
    out = []
    for p in planned:
        at = bounced.get(p.key[3]) if p.status == PENDING and p.key[3] not in lifted else None
        if at is None:
            out.append(p)
            continue
        out.append(replace(p, status=SKIPPED, reason=ADDRESS_BOUNCED, sender=None, detail=(
            f"{p.recipient} hard-bounced ({at:%Y-%m-%d %H:%M} UTC): correct the contact's address in the ERP, "
            "or lift it with the run parameter lift_bounces")))
    return out


def record_plan(engine: Engine, planned: Sequence[PlannedDelivery], *, run_id: str, mode: str,
                resend: bool, message_key: bytes | None = None) -> None:
    """Write the planner's decisions; idempotent, so a retried or cleared task records nothing twice.

    New keys are inserted. A refusal that was never attempted is re-decided. A delivery to send that
    exists already is left as it is (the send step picks it up if still pending), unless the run is an
    operator's resend and the delivery was sent or failed: then a new generation points to it.
    """
    if not planned:
        return
    lifted = lifted_bounces(engine, run_id)
    if mode != "redirect":  # a redirected test run mails the test address, never the bounced one
        planned = refuse_bounced_addresses(engine, planned, lifted)
    stamp = now()
    docs = sorted({(p.doc_type, p.ref_nbr) for p in planned})
    with engine.begin() as conn:
        existing: dict[tuple, list] = {}
        for start in range(0, len(docs), _CHUNK):
            chunk = docs[start : start + _CHUNK]
            for row in conn.execute(
                select(delivery).where(tuple_(delivery.c.doc_type, delivery.c.ref_nbr).in_(chunk),
                                       delivery.c.mode == mode)
            ).mappings():
                key = (row["doc_type"], row["ref_nbr"], row["mailing_id"], row["recipient_key"], row["format"])
                existing.setdefault(key, []).append(row)
        for p in planned:
            rows = sorted(existing.get(p.key, []), key=lambda r: r["generation"])
            latest = rows[-1] if rows else None
            # An operator's resend, and every redirected preview, is a new generation with its own Message-ID.
            # So is a delivery that bounced to an address the operator lifted tonight: it is mailed again.
            again = resend or mode == "redirect" or (
                latest is not None and latest["status"] == BOUNCED and p.key[3] in lifted)
            tag = run_id if again else ""
            values = dict(
                run_id=run_id, last_run_id=run_id, doc_type=p.doc_type, ref_nbr=p.ref_nbr,
                customer_id=p.customer_id, mailing_id=p.mailing_id, recipient=p.recipient,
                recipient_key=p.key[3], add_to=p.add_to, format=p.format, mode=mode,
                status=p.status, reason=p.reason, detail=p.detail, sender=p.sender, attempts=0,
                created_at=stamp, updated_at=stamp,
            )
            if p.status == PENDING:
                values["message_id"] = message_id_for(p.doc_type, p.ref_nbr, p.mailing_id, p.format, mode, tag,
                                                      p.sender_domain, message_key)
            if latest is None:
                _insert_new(conn, dict(generation=0, **values))
            elif p.status != PENDING:
                if redecided(latest["status"], latest["reason"]):
                    conn.execute(
                        update(delivery)
                        .where(delivery.c.id == latest["id"], _REDECIDABLE)
                        .values(status=p.status, reason=p.reason, detail=p.detail, last_run_id=run_id,
                                updated_at=stamp)
                    )
            elif redecided(latest["status"], latest["reason"]):
                # Refused before, sendable now (a missing template was added, say): the same row goes ahead.
                conn.execute(
                    update(delivery)
                    .where(delivery.c.id == latest["id"], _REDECIDABLE)
                    .values(status=PENDING, reason=None, detail=p.detail, add_to=p.add_to, sender=p.sender,
                            message_id=values["message_id"], last_run_id=run_id, updated_at=stamp)
                )
            elif again and latest["run_id"] != run_id and latest["status"] in (SENT, FAILED, BOUNCED):
                _insert_new(conn, dict(generation=latest["generation"] + 1, resend_of=latest["id"], **values))
            elif latest["status"] == PENDING and latest["add_to"] != p.add_to:
                conn.execute(
                    update(delivery).where(delivery.c.id == latest["id"], delivery.c.status == PENDING)
                    .values(add_to=p.add_to, last_run_id=run_id, updated_at=stamp)
                )


def _insert_new(conn, values: dict, table: Table = delivery) -> None:
    """Insert unless a twin attempt inserted the same row a moment ago (the unique key decides)."""
    insert_once(conn, table, values)


def fit(value: str | None, limit: int) -> str | None:
    """A value from outside (a bounce report, a mailbox), as the ledger can hold it whatever the database: no NUL
    byte (PostgreSQL refuses one in text), at most ``limit`` characters (the column's size; PostgreSQL refuses
    more)."""
    if value is None:
        return None
    return str(value).replace("\x00", "")[:limit]


def mailbox_messages_read(engine: Engine, mailbox: str, uidvalidity: int) -> set[int]:
    """The UIDs of ``mailbox`` (under this UIDVALIDITY) read before and left there for good."""
    with engine.connect() as conn:
        return set(conn.execute(select(mailbox_message.c.uid).where(
            mailbox_message.c.mailbox == mailbox, mailbox_message.c.uidvalidity == uidvalidity)).scalars())


def remember_mailbox_message(engine: Engine, mailbox: str, uidvalidity: int, uid: int, kind: str,
                             reason: str | None) -> None:
    """Record that a message was read and left in its folder for good, so that no later pass parses it."""
    with engine.begin() as conn:
        insert_once(conn, mailbox_message, dict(mailbox=fit(mailbox, 500), uidvalidity=uidvalidity, uid=uid,
                                                kind=kind, reason=fit(reason, 2000), read_at=now()))


def insert_once(conn, table: Table, values: dict) -> bool:
    """Insert unless a row with the same unique key exists (a twin inserted it); whether this one did.

    Told by the row RETURNING gives back, not by the cursor's rowcount: psycopg 3 reports -1 for an
    INSERT whose RETURNING SQLAlchemy adds on its own, and a bounce was once counted as applied before."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    statement = dialect_insert(table).values(**values).on_conflict_do_nothing()
    return conn.execute(statement.returning(*table.primary_key.columns)).first() is not None


# ``redecided``, as SQL: the condition of the UPDATE that re-decides a row.
_REDECIDABLE = and_(delivery.c.status.in_((SKIPPED, FAILED)),
                    or_(delivery.c.reason.is_(None), delivery.c.reason.not_in(SMTP_FAILURES)))


def retire_unplanned_failures(engine: Engine, planned: Iterable[PlannedDelivery], *, run_id: str,
                              mode: str) -> int:
    """Failures a later night re-decides (a configuration error, a relay's refusal) of deliveries the
    rules no longer plan for their document, its recipient, format or whole-document refusal having
    changed since: skipped as no longer planned. Else such a row would keep its document unsettled,
    never written back, for good."""
    keys: dict[tuple[str, str], set[tuple]] = {}
    for p in planned:
        keys.setdefault((p.doc_type, p.ref_nbr), set()).add(p.key)
    docs = sorted(keys)
    retired = 0
    with engine.begin() as conn:
        for start in range(0, len(docs), _CHUNK):
            rows = conn.execute(
                select(delivery.c.id, delivery.c.doc_type, delivery.c.ref_nbr, delivery.c.mailing_id,
                       delivery.c.recipient_key, delivery.c.format)
                .where(tuple_(delivery.c.doc_type, delivery.c.ref_nbr).in_(docs[start : start + _CHUNK]),
                       delivery.c.mode == mode, delivery.c.status == FAILED, _REDECIDABLE)
            ).all()
            ids = [r.id for r in rows if tuple(r)[1:] not in keys[(r.doc_type, r.ref_nbr)]]
            if ids:
                retired += conn.execute(
                    update(delivery).where(delivery.c.id.in_(ids), delivery.c.status == FAILED, _REDECIDABLE)
                    .values(status=SKIPPED, reason="no_longer_planned", last_run_id=run_id, updated_at=now(),
                            detail="the ERP no longer names this recipient, format or refusal for this document")
                ).rowcount
    return retired


def open_documents(engine: Engine, mode: str, *, customers: Sequence[str] = (),
                   documents: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """(doc_type, ref_nbr, customer_id) of documents with a delivery of this mode still open (pending,
    or being sent): whatever the ERP says of them now, a run must decide these rows."""
    conditions = [delivery.c.status.in_((PENDING, SENDING)), delivery.c.mode == mode]
    if customers:
        conditions.append(delivery.c.customer_id.in_(list(customers)))
    if documents:
        conditions.append(delivery.c.ref_nbr.in_(list(documents)))
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            select(delivery.c.doc_type, delivery.c.ref_nbr, delivery.c.customer_id).distinct().where(*conditions)
            .order_by(delivery.c.customer_id, delivery.c.doc_type, delivery.c.ref_nbr))]


def documents_with_rows(engine: Engine, keys: Iterable[tuple[str, str]], mode: str) -> set[tuple[str, str]]:
    """The documents among ``keys`` that have any delivery row of this mode."""
    keys = sorted(set(keys))
    found: set[tuple[str, str]] = set()
    with engine.connect() as conn:
        for start in range(0, len(keys), _CHUNK):
            found |= {tuple(r) for r in conn.execute(
                select(delivery.c.doc_type, delivery.c.ref_nbr).distinct()
                .where(tuple_(delivery.c.doc_type, delivery.c.ref_nbr).in_(keys[start : start + _CHUNK]),
                       delivery.c.mode == mode))}
    return found


def open_deliveries(engine: Engine, document_keys: Iterable[tuple[str, str]], mode: str) -> list[dict]:
    """Every row of these documents' messages that is not refused: what to send, and who else is on it."""
    keys = sorted(set(document_keys))
    out: list[dict] = []
    with engine.connect() as conn:
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            out += [dict(r) for r in conn.execute(
                select(delivery).where(
                    tuple_(delivery.c.doc_type, delivery.c.ref_nbr).in_(chunk),
                    delivery.c.mode == mode,
                    delivery.c.message_id.is_not(None),
                ).order_by(delivery.c.id)
            ).mappings()]
    return out


def retire(engine: Engine, ids: Sequence[int], *, run_id: str, reason: str, detail: str,
           status: str = SKIPPED, error: str | None = None) -> int:
    """Settle pending deliveries without sending them: no longer planned or due (skipped), or not
    sendable tonight (failed, e.g. a template error). Never touches a row that is being sent."""
    if not ids:
        return 0
    with engine.begin() as conn:
        return conn.execute(
            update(delivery).where(delivery.c.id.in_(list(ids)), delivery.c.status == PENDING)
            .values(status=status, reason=reason, detail=detail, last_run_id=run_id, updated_at=now(),
                    **({"last_error": error} if error else {}))
        ).rowcount


def _this_host() -> str:
    """The claimant's host as the fast path must see it: the host name, and where Linux tells them, the
    kernel's boot and the process namespace. Two containers may share a host name while their pids
    belong to different namespaces; then they are different hosts, and only the lease applies."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            namespace = f"{boot.read().strip()}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return socket.gethostname()  # no way to tell namespaces apart: no fast path (see _claimant_gone)
    return f"{socket.gethostname()}/{hashlib.sha256(namespace.encode()).hexdigest()[:8]}"


def claimant() -> str:
    """Who claims: host, process and a nonce, so that a dead process's claims can be recognised."""
    return f"{_this_host()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _claimant_gone(claimed_by: str) -> bool:
    """True only when the claimant ran in this host's process namespace and its process is gone."""
    host, _, rest = claimed_by.partition(":")
    pid = rest.partition(":")[0]
    return "/" in host and host == _this_host() and pid.isdigit() and not _process_alive(int(pid))


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is as dead as it gets
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _db_clock(conn):
    """The database server's current time: one clock for every worker, whatever its host's clock says."""
    if conn.dialect.name == "sqlite":
        return func.strftime("%Y-%m-%d %H:%M:%f", "now")  # UTC, milliseconds, as the DateTime column stores it
    return func.now()


def _lease_expired(conn, lease: timedelta):
    """A claim made longer than ``lease`` ago, by the database's clock."""
    if conn.dialect.name == "sqlite":
        start = func.strftime("%Y-%m-%d %H:%M:%f", "now", f"-{lease.total_seconds():.3f} seconds")
    else:
        start = func.now() - lease
    return or_(delivery.c.claimed_at.is_(None), delivery.c.claimed_at <= start)


def claim(engine: Engine, ids: Sequence[int], token: str, *, run_id: str,
          lease: timedelta = DEFAULT_LEASE) -> tuple[list[int], list[int]]:
    """Claim deliveries for sending. Returns (claimed ids, ids still held by another live attempt).

    A conditional UPDATE is the lock: only one attempt can move a row from ``pending`` (or from a
    stale ``sending``) to its own ``sending`` claim, on SQLite and PostgreSQL alike. Claims are
    stamped, and leases measured, with the database's clock.
    """
    if not ids:
        return [], []
    stamp = now()
    busy: list[int] = []
    with engine.begin() as conn:
        conn.execute(
            update(delivery)
            .where(delivery.c.id.in_(list(ids)), delivery.c.status == PENDING)
            .values(status=SENDING, claimed_by=token, claimed_at=_db_clock(conn), attempts=delivery.c.attempts + 1,
                    last_run_id=run_id, updated_at=stamp)
        )
    with engine.begin() as conn:
        expired = _lease_expired(conn, lease)
        held = conn.execute(
            select(delivery.c.id, delivery.c.claimed_by, case((expired, True), else_=False))
            .where(delivery.c.id.in_(list(ids)), delivery.c.status == SENDING, delivery.c.claimed_by != token)
        ).all()
        for row_id, claimed_by, lease_expired in held:
            gone = claimed_by is not None and _claimant_gone(claimed_by)
            if not (lease_expired or gone):
                busy.append(row_id)
                continue
            conn.execute(
                update(delivery)
                .where(delivery.c.id == row_id, delivery.c.status == SENDING, delivery.c.claimed_by == claimed_by,
                       *(() if gone else (expired,)))
                .values(claimed_by=token, claimed_at=_db_clock(conn), attempts=delivery.c.attempts + 1,
                        last_run_id=run_id, updated_at=stamp,
                        last_error=f"took over a stale claim of {claimed_by}"
                                   + ("" if gone else f" (its lease of {lease} expired)"))
            )
        claimed = conn.execute(
            select(delivery.c.id).where(delivery.c.id.in_(list(ids)), delivery.c.claimed_by == token,
                                        delivery.c.status == SENDING)
        ).scalars().all()
    return sorted(claimed), sorted(busy)


def finish(engine: Engine, ids: Sequence[int], token: str, status: str, *, reason: str | None = None,
           error: str | None = None, attachment_sha256: str | None = None,
           redirected_to: str | None = None, detail: str | None = None,
           message_sha256: str | None = None) -> int:
    """Move claimed deliveries on: to ``sent``, ``failed``, or back to ``pending`` after a transient fault."""
    if not ids:
        return 0
    stamp = now()
    values = dict(status=status, updated_at=stamp, claimed_at=None if status == PENDING else stamp)
    if status == SENT:
        values.update(sent_at=stamp, reason=reason, attachment_sha256=attachment_sha256,
                      redirected_to=redirected_to, message_sha256=message_sha256)
    else:
        values.update(reason=reason, last_error=error)
        if detail:
            values["detail"] = detail
        if attachment_sha256:
            values["attachment_sha256"] = attachment_sha256
    with engine.begin() as conn:
        return conn.execute(
            update(delivery)
            .where(delivery.c.id.in_(list(ids)), delivery.c.claimed_by == token, delivery.c.status == SENDING)
            .values(**values)
        ).rowcount


def note_lost_claims(engine: Engine, ids: Sequence[int], token: str, *, run_id: str,
                     message_sha256: str | None = None) -> list[dict]:
    """Of deliveries this attempt has just sent, those whose claim another attempt took over meanwhile
    (its lease expired during the send): the message may have arrived twice. Each is noted in
    ``lost_claim`` and returned with the status and claimant the ledger shows now."""
    if not ids:
        return []
    with engine.begin() as conn:
        lost = [dict(r) for r in conn.execute(
            select(delivery.c.id, delivery.c.recipient, delivery.c.status, delivery.c.claimed_by)
            .where(delivery.c.id.in_(list(ids)), or_(delivery.c.claimed_by.is_(None), delivery.c.claimed_by != token))
            .order_by(delivery.c.id)
        ).mappings()]
        if lost:
            stamp = now()
            conn.execute(insert(lost_claim), [
                dict(delivery_id=r["id"], run_id=run_id, claimed_by=token, held_by=r["claimed_by"],
                     status=r["status"], message_sha256=message_sha256, noted_at=stamp) for r in lost])
    return lost


def lost_claims(engine: Engine, run_id: str) -> list[dict]:
    """What ``note_lost_claims`` noted during this run."""
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(lost_claim).where(lost_claim.c.run_id == run_id).order_by(lost_claim.c.id)).mappings()]


def record_message_path(engine: Engine, ids: Sequence[int], path: str | None) -> None:
    """Where the archive keeps the bytes of these sent deliveries' message: set once (the trigger of
    migration 0004 lets nothing else of a sent row change)."""
    if path and ids:
        with engine.begin() as conn:
            conn.execute(update(delivery).where(delivery.c.id.in_(list(ids)), delivery.c.status == SENT,
                                                delivery.c.message_path.is_(None))
                         .values(message_path=path))


# --- Runs and the audit -------------------------------------------------------------------------

def start_run(engine: Engine, run_id: str, logical_date: datetime | None, mode: str, params: dict) -> None:
    with engine.begin() as conn:
        found = conn.execute(select(mailing_run.c.run_id).where(mailing_run.c.run_id == run_id)).first()
        if found is None:
            conn.execute(insert(mailing_run).values(run_id=run_id, logical_date=logical_date, mode=mode,
                                                    params=params, started_at=now()))


def record_volume(engine: Engine, run_id: str, volume: dict) -> None:
    """What tonight's extract found due (``brake.Volume.as_json``), on the run's row; again on a rerun."""
    with engine.begin() as conn:
        conn.execute(update(mailing_run).where(mailing_run.c.run_id == run_id).values(volume=volume))


def night_volume(engine: Engine, run_id: str) -> dict | None:
    with engine.connect() as conn:
        return conn.execute(select(mailing_run.c.volume).where(mailing_run.c.run_id == run_id)).scalar_one_or_none()


def night_history(engine: Engine, run_id: str, limit: int = 60) -> list[dict]:
    """The volumes of the live nights before ``run_id``, newest first: runs that named no documents or
    customers, and that no person held back (rejected, timed out or still waiting). A night from before
    migration 0005 has no recorded volume: its documents are those its deliveries sent."""
    held = select(night_approval.c.run_id).where(or_(night_approval.c.decision.is_(None),
                                                     night_approval.c.decision != APPROVED))
    with engine.connect() as conn:
        rows = conn.execute(
            select(mailing_run.c.run_id, mailing_run.c.params, mailing_run.c.volume)
            .where(mailing_run.c.mode == "live", mailing_run.c.run_id != run_id, mailing_run.c.run_id.not_in(held))
            .order_by(mailing_run.c.started_at.desc()).limit(limit * 2)
        ).all()
        nights = [(r.run_id, r.volume) for r in rows
                  if not (r.params or {}).get("documents") and not (r.params or {}).get("customers")][:limit]
        older = [run for run, volume in nights if volume is None]
        sent = dict(conn.execute(
            select(delivery.c.run_id, func.count(func.distinct(delivery.c.doc_type + ":" + delivery.c.ref_nbr)))
            .where(delivery.c.run_id.in_(older), delivery.c.status == SENT).group_by(delivery.c.run_id)
        ).all()) if older else {}
    return [volume if volume is not None else {"documents": sent.get(run, 0), "customers": 0, "totals": {}}
            for run, volume in nights]


def ask_approval(engine: Engine, run_id: str, request: dict) -> None:
    with engine.begin() as conn:
        conn.execute(insert(night_approval).values(run_id=run_id, asked_at=now(), request=request))


def decide_approval(engine: Engine, run_id: str, decision: str, decided_by: str | None,
                    decided_at: datetime | None) -> dict | None:
    """Write the answer on the run's open request, once; the request as it was asked (None: none open)."""
    with engine.begin() as conn:
        row = conn.execute(select(night_approval.c.id, night_approval.c.request)
                           .where(night_approval.c.run_id == run_id, night_approval.c.decision.is_(None))
                           .order_by(night_approval.c.id.desc()).limit(1)).first()
        if row is None:
            return None
        conn.execute(update(night_approval).where(night_approval.c.id == row.id, night_approval.c.decision.is_(None))
                     .values(decision=decision, decided_by=decided_by, decided_at=decided_at or now()))
    return row.request


def approvals(engine: Engine, run_id: str) -> list[dict]:
    """Every approval asked for a run, oldest first, with its answer."""
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            select(night_approval).where(night_approval.c.run_id == run_id).order_by(night_approval.c.id))]


def record_task(engine: Engine, *, run_id: str, map_index: int, try_number: int, label: str,
                customers: Sequence[str]) -> None:
    """Note that this try of a mail_customers instance handles these customers (once per try)."""
    with engine.begin() as conn:
        _insert_new(conn, dict(run_id=run_id, map_index=map_index, try_number=try_number, label=label,
                               customers=list(customers), started_at=now()), mailing_task)


def summarize_run(engine: Engine, run_id: str) -> dict:
    """Counts by status and reason of what this run decided or tried, stored on the run's row."""
    with engine.begin() as conn:
        rows = conn.execute(
            select(delivery.c.status, delivery.c.reason, func.count(),
                   func.count(func.distinct(delivery.c.doc_type + ":" + delivery.c.ref_nbr)))
            .where(delivery.c.last_run_id == run_id)
            .group_by(delivery.c.status, delivery.c.reason)
            .order_by(delivery.c.status, delivery.c.reason)
        ).all()
        summary = {
            "by_status": {},
            "rows": [{"status": s, "reason": r or "", "deliveries": n, "documents": d} for s, r, n, d in rows],
        }
        for s, _, n, _ in rows:
            summary["by_status"][s] = summary["by_status"].get(s, 0) + n
        # Reports this run applied (to deliveries of earlier nights, mostly): bounced, or noted delays.
        applied = dict(conn.execute(select(bounce_report.c.effect, func.count()).where(bounce_report.c.run_id == run_id)
                                    .group_by(bounce_report.c.effect)).all())
        if applied:
            summary["bounce_reports"] = applied
        conn.execute(update(mailing_run).where(mailing_run.c.run_id == run_id)
                     .values(summary=summary, finished_at=now()))
    return summary


def record_night_status(engine: Engine, run_id: str, status: str, why: str, unfinished: int = 0) -> None:
    """Keep audit's verdict with the run's summary (green, red or rejected, why, how many mapped instances did
    not succeed), for the Nights page and the export: the deliveries alone cannot tell a night whose
    instances failed before they wrote a row."""
    with engine.begin() as conn:
        summary = conn.execute(select(mailing_run.c.summary).where(mailing_run.c.run_id == run_id)).scalar()
        if summary is None:
            return
        conn.execute(update(mailing_run).where(mailing_run.c.run_id == run_id).values(
            summary={**summary, "status": status, "why": why, "unfinished_instances": unfinished}))


def all_deliveries(engine: Engine, *conditions) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(delivery).where(*conditions).order_by(delivery.c.id)).mappings()]


def bounced_between(engine: Engine, since: datetime, until: datetime) -> list[dict]:
    """Deliveries that a bounce report moved to ``bounced`` in [since, until), for the morning alert: who,
    what, the address and the server's words (``detail``), oldest first."""
    since, until = clock.utc(since), clock.utc(until)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(delivery.c.id, delivery.c.customer_id, delivery.c.doc_type, delivery.c.ref_nbr,
                   delivery.c.recipient, delivery.c.reason, delivery.c.detail, delivery.c.bounced_at)
            .where(delivery.c.status == BOUNCED, delivery.c.bounced_at >= since, delivery.c.bounced_at < until)
            .order_by(delivery.c.bounced_at, delivery.c.id)).mappings()]
