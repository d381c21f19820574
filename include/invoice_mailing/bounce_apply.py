"""Apply a bounce report to the ledger (docs/rules.md, rule 9): a sent delivery becomes ``bounced``, a delay is noted.

The mailbox reader hands over one report (``bounces.Report``) and its raw bytes; this module finds the
delivery it is about (by its VERP address, else by the original Message-ID and recipient), and records
it once: the report's SHA-256 and the delivery's id are ``bounce_report``'s unique key, so reading the
same report again, on a retry or the next night, changes nothing. A permanent failure (``hard``,
``blocked``) moves a live ``sent`` delivery to ``bounced``; a temporary one (``delayed``) is only
noted. Anything else is not applied, with a reason for the log: the reader leaves such a report
unread in the folder. The raw report goes to the archive when ``INVOICE_MAILING_ARCHIVE`` is set
(content-addressed, like the messages sent) and into the ledger otherwise, so auditors can read it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select, update

from include.invoice_mailing import archive, clock, ledger
from include.invoice_mailing.bounces import FailedRecipient, Kind, Report
from include.invoice_mailing.ledger import BLOCKED, BOUNCED, HARD_BOUNCE, SENT, bounce_report, delivery
from include.invoice_mailing.masking import mask_address, mask_text

log = logging.getLogger(__name__)

BOUNCED_EFFECT, NOTED = "bounced", "noted"
ALREADY_APPLIED, NOT_APPLIED = "already_applied", "not_applied"
_REASON = {Kind.HARD: HARD_BOUNCE, Kind.BLOCKED: BLOCKED}
TOKEN_WINDOW = timedelta(days=90)
"""How long after a delivery was sent its VERP token or keyed Message-ID alone still applies a report. A DSN
comes within days (an MTA gives up after five); the token is in the message the recipient holds, so an older
one could be replayed for ever. A later report is not applied and stays in the mailbox for a person."""


@dataclass(frozen=True)
class Outcome:
    """What applying one report to one delivery did: ``bounced``, ``noted``, ``already_applied`` or
    ``not_applied`` (then ``reason`` says why, for the log)."""

    effect: str
    delivery_id: int | None
    reason: str

    @property
    def applied(self) -> bool:
        """The report is now in the ledger (this time or before): the reader may move it to processed."""
        return self.effect in (BOUNCED_EFFECT, NOTED, ALREADY_APPLIED)


def deliveries_named(engine: Engine, report: Report, *, bounce_address: str | None = None,
                     key: bytes | None = None) -> list[int]:
    """The deliveries a report is about: the one its VERP address names (MAC verified), else those
    whose message had the report's original Message-ID, that Message-ID's own MAC verifying under the key
    (``ledger.message_id_verifies``), and went to a recipient the report names. Without the key: none."""
    if bounce_address and key:
        verp = report.delivery_id(bounce_address, key)
        if verp is not None:
            return [verp]
    recipients = {r.recipient.casefold() for r in report.recipients
                  if r.recipient and ledger.fit(r.recipient, 254) == r.recipient}  # a value no address can be names none
    message_id = report.original_message_id
    if not recipients or not message_id or ledger.fit(message_id, 250) != message_id:  # NUL or too long: no row has it
        return []
    if not ledger.message_id_verifies(message_id, key):
        return []
    with engine.connect() as conn:
        return list(conn.execute(
            select(delivery.c.id).where(delivery.c.message_id == message_id,
                                        func.lower(delivery.c.recipient_key).in_(sorted(recipients)))
            .order_by(delivery.c.id)).scalars())


def apply_report(engine: Engine, report: Report, raw: bytes, *, bounce_address: str | None = None,
                 key: bytes | None = None, run_id: str | None = None,
                 received_at: datetime | None = None) -> list[Outcome]:
    """Apply a report to every delivery it names; one ``not_applied`` outcome when it names none."""
    ids = deliveries_named(engine, report, bounce_address=bounce_address, key=key)
    if not ids:
        return [Outcome(NOT_APPLIED, None, "the report names no delivery of this ledger "
                                           "(no verified VERP address, no Message-ID of ours with a verified MAC "
                                           "and a matching recipient)")]
    return [apply_bounce(engine, delivery_id, report, raw, run_id=run_id, received_at=received_at)
            for delivery_id in ids]


def apply_bounce(engine: Engine, delivery_id: int, report: Report, raw: bytes, *, run_id: str | None = None,
                 received_at: datetime | None = None) -> Outcome:
    """Apply one report to one delivery, once. The report row and the delivery's move commit together."""
    if report.kind not in (Kind.HARD, Kind.BLOCKED, Kind.DELAYED):
        return Outcome(NOT_APPLIED, delivery_id, f"the report is {report.kind.value}, not a bounce ({report.reason})")
    sha256 = archive.digest(raw)
    with engine.begin() as conn:
        row = conn.execute(select(delivery).where(delivery.c.id == delivery_id)).mappings().first()
        if row is None:
            return Outcome(NOT_APPLIED, delivery_id, f"delivery {delivery_id} does not exist")
        if conn.execute(select(bounce_report.c.id).where(bounce_report.c.sha256 == sha256,
                                                         bounce_report.c.delivery_id == delivery_id)).first():
            return Outcome(ALREADY_APPLIED, delivery_id, f"report {sha256[:12]} was applied to delivery {delivery_id} before")
        if row["mode"] != "live":
            return Outcome(NOT_APPLIED, delivery_id,
                           f"delivery {delivery_id} is a {row['mode']} delivery: a bounce changes only live ones")
        if row["status"] not in (SENT, BOUNCED):
            return Outcome(NOT_APPLIED, delivery_id,
                           f"delivery {delivery_id} is {row['status']}, not sent: the report cannot be about it")
        reference = clock.utc(received_at) or ledger.now()
        sent_at = clock.utc(row["sent_at"])
        if sent_at is not None and sent_at < reference - TOKEN_WINDOW:
            return Outcome(NOT_APPLIED, delivery_id,
                           f"delivery {delivery_id} was sent on {sent_at:%Y-%m-%d}, more than {TOKEN_WINDOW.days} "
                           "days before the report: a token that old is not trusted alone")
        failed = _recipient_of(report.recipients, row)
        kind = failed.kind if failed else report.kind
        if kind not in (Kind.HARD, Kind.BLOCKED, Kind.DELAYED):
            kind = report.kind
        stamp = ledger.now()
        effect = BOUNCED_EFFECT if kind in _REASON and row["status"] == SENT else NOTED
        inserted = ledger.insert_once(conn, bounce_report, dict(
            sha256=sha256, delivery_id=delivery_id, effect=effect, kind=kind.value,
            recipient=ledger.fit(failed.recipient if failed else None, 254),
            status_code=ledger.fit(failed.status if failed else None, 16),
            diagnostic=ledger.fit(failed.diagnostic if failed else report.reason, DIAGNOSTIC_CHARS),
            report_message_id=ledger.fit(report.message_id, 250),
            run_id=run_id, received_at=received_at, applied_at=stamp, **_kept(raw)))
        if not inserted:  # another reader applied it a moment ago
            return Outcome(ALREADY_APPLIED, delivery_id, f"report {sha256[:12]} was applied to delivery {delivery_id} before")
        if effect == BOUNCED_EFFECT:
            conn.execute(update(delivery).where(delivery.c.id == delivery_id, delivery.c.status == SENT)
                         .values(status=BOUNCED, reason=_REASON[kind], detail=ledger.fit(_detail(failed, report),
                                                                                  DIAGNOSTIC_CHARS),
                                 bounced_at=stamp, updated_at=stamp))
    if effect == BOUNCED_EFFECT:
        log.warning("Delivery %s to %s bounced (%s): %s", delivery_id, mask_address(row["recipient"]),
                    _REASON[kind], mask_text(_detail(failed, report)))  # task logs are read by viewers
        return Outcome(BOUNCED_EFFECT, delivery_id, f"{_REASON[kind]}: {_detail(failed, report)}")
    why = "a delay" if kind == Kind.DELAYED else f"delivery {delivery_id} had bounced already"
    log.info("Report %s noted against delivery %s (%s)", sha256[:12], delivery_id, why)
    return Outcome(NOTED, delivery_id, f"noted: {why}")


DIAGNOSTIC_CHARS = 2000  # a remote server's words, as kept: enough for any real answer


def _recipient_of(recipients: Iterable[FailedRecipient], row) -> FailedRecipient | None:
    """The report's line about this delivery's recipient (or its redirect), else its first line."""
    recipients = list(recipients)
    wanted = {row["recipient_key"].casefold(), (row["redirected_to"] or "").casefold()} - {""}
    for failed in recipients:
        if failed.recipient.casefold() in wanted:
            return failed
    return recipients[0] if recipients else None


def _detail(failed: FailedRecipient | None, report: Report) -> str:
    """The delivery's detail: the status code and the remote server's words."""
    if failed is None:
        return report.reason
    return " ".join(part for part in (failed.status, failed.diagnostic or report.reason) if part)


def _kept(raw: bytes) -> dict:
    """Where the raw report is kept: the archive when configured and it took the bytes, else the ledger."""
    store = archive.Archive.from_env()
    path = store.keep(raw) if store else None
    return {"raw_path": path, "raw": None} if path else {"raw_path": None, "raw": raw}
