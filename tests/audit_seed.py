"""A small ledger for the audit tests: two nights, a resend, a dry-run preview, a refusal, a failure."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import insert, select

from include.invoice_mailing import ledger

NIGHT_1 = "scheduled__2026-11-23T01:00:00+00:00"
NIGHT_2 = "scheduled__2026-11-24T01:00:00+00:00"
PREVIEW = "manual__2026-11-24T09:00:00+00:00"
RESEND = "manual__2026-11-25T10:00:00+00:00"


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, day, hour, minute, tzinfo=UTC)


def row(run_id: str, ref_nbr: str, customer_id: str, recipient: str, status: str, moment: datetime, **extra) -> dict:
    values = dict(run_id=run_id, last_run_id=run_id, doc_type="INV", ref_nbr=ref_nbr, customer_id=customer_id,
                  mailing_id="INVOICE", recipient=recipient, recipient_key=recipient.casefold(), add_to="To",
                  format="PDF", mode="live", generation=0, status=status, attempts=1 if status == "sent" else 0,
                  created_at=moment, updated_at=moment,
                  message_id=f"<{ref_nbr}.pdf.x@fjordlys.example>" if recipient else None)
    if status == "sent":
        values["sent_at"] = moment
    values.update(extra)
    return values


def seed(engine) -> dict[str, int]:
    """Write the ledger; returns the ids of the rows the tests name."""
    ledger.ensure_schema(engine)
    runs = [
        dict(run_id=NIGHT_1, logical_date=at(23, 1), mode="live", params={"dry_run": False, "resend": False},
             started_at=at(23, 1), finished_at=at(23, 1, 5)),
        dict(run_id=NIGHT_2, logical_date=at(24, 1), mode="live", params={"dry_run": False, "customers": ["10002"]},
             started_at=at(24, 1), finished_at=at(24, 1, 5)),
        dict(run_id=PREVIEW, logical_date=at(24, 9), mode="dry_run", params={"dry_run": True},
             started_at=at(24, 9), finished_at=at(24, 9, 1)),
        dict(run_id=RESEND, logical_date=at(25, 10), mode="live", params={"documents": ["INV000101"], "resend": True},
             started_at=at(25, 10), finished_at=at(25, 10, 1)),
    ]
    rows = {
        "sent": row(NIGHT_1, "INV000101", "10001", "kari@bolgen.example", "sent", at(23, 1, 2),
                    message_sha256="ab" * 32),
        "cc": row(NIGHT_1, "INV000101", "10001", "post@bolgen.example", "sent", at(23, 1, 2), add_to="Cc"),
        "refused": row(NIGHT_1, "INV000102", "10001", "", "skipped", at(23, 1, 1), reason="no_address",
                       detail="the customer has no address", format="", add_to=""),
        "failed": row(NIGHT_2, "INV000201", "10002", "ola@fjellheimen.example", "failed", at(24, 1, 3),
                      reason="recipient_rejected", attempts=1,
                      last_error="550 5.1.1 <ola@fjellheimen.example>: user unknown"),
        "html": row(NIGHT_2, "INV000202", "10002", "siri@fjellheimen.example", "sent", at(24, 1, 3), format="HTML"),
        "preview": row(PREVIEW, "INV000101", "10001", "kari@bolgen.example", "skipped", at(24, 9), mode="dry_run",
                       reason="dry_run"),
    }
    tasks = [
        dict(run_id=NIGHT_1, map_index=0, try_number=1, label="customer 10001", customers=["10001"],
             started_at=at(23, 1, 1)),
        dict(run_id=NIGHT_2, map_index=0, try_number=1, label="customer 10002", customers=["10002"],
             started_at=at(24, 1, 1)),
        dict(run_id=NIGHT_2, map_index=0, try_number=2, label="customer 10002", customers=["10002"],
             started_at=at(24, 1, 3)),
    ]
    ids = {}
    with engine.begin() as conn:
        conn.execute(insert(ledger.mailing_run), runs)
        for name, values in rows.items():
            ids[name] = conn.execute(insert(ledger.delivery).values(**values)).inserted_primary_key[0]
        ids["resend"] = conn.execute(insert(ledger.delivery).values(**row(
            RESEND, "INV000101", "10001", "kari@bolgen.example", "sent", at(25, 10), generation=1,
            resend_of=ids["sent"]))).inserted_primary_key[0]
        conn.execute(insert(ledger.mailing_task), tasks)
    return ids


ARCHIVED_MESSAGE = b"Subject: Faktura INV000103\r\n\r\nHei\r\n"


def archived_delivery(engine, folder) -> tuple[int, str]:
    """A sent delivery whose message is kept in an archive at ``folder``, as the pipeline leaves it: its id
    and the archive's path of the message."""
    from include.invoice_mailing import archive

    path = archive.Archive(str(folder)).keep(ARCHIVED_MESSAGE)
    with engine.begin() as conn:  # a sent row is final: its hash is written with it, as the pipeline does
        sent = conn.execute(insert(ledger.delivery).values(**row(
            NIGHT_1, "INV000103", "10001", "kari@bolgen.example", "sent", at(23, 1, 4),
            message_sha256=archive.digest(ARCHIVED_MESSAGE)))).inserted_primary_key[0]
    ledger.record_message_path(engine, [sent], path)  # and the archive's path once, after the commit
    return sent, path


BOUNCED_RECIPIENT = "ap@nordvik-bygg.example"  # the recipient the fixture report names


def bounced_report_raw() -> bytes:
    """A real Postfix DSN (5.1.1), its original Message-ID as this deployment mints it: signed under the key."""
    from include.invoice_mailing.bounces import read_report
    from tests.test_bounce_reports import KEY, fixture

    raw = fixture("postfix-5.1.1-hard.eml")
    unsigned = read_report(raw).original_message_id
    return raw.replace(unsigned.encode(), ledger.sign_message_id(unsigned, KEY).encode())


def bounced_delivery(engine) -> tuple[int, int]:
    """A delivery of NIGHT_2 that a real Postfix DSN (5.1.1, user unknown) bounced the next morning, applied
    as the night's mailbox reader applies it (by Message-ID and recipient): its id and the report's id."""
    from include.invoice_mailing import bounce_apply
    from include.invoice_mailing.bounces import read_report
    from tests.test_bounce_reports import KEY

    raw = bounced_report_raw()
    report = read_report(raw)
    with engine.begin() as conn:
        sent = conn.execute(insert(ledger.delivery).values(**row(
            NIGHT_2, "INV000204", "10003", BOUNCED_RECIPIENT, "sent", at(24, 1, 4),
            message_id=report.original_message_id))).inserted_primary_key[0]
    [outcome] = bounce_apply.apply_report(engine, report, raw, key=KEY, received_at=at(24, 6))
    assert outcome.effect == bounce_apply.BOUNCED_EFFECT, outcome
    with engine.connect() as conn:
        report_id = conn.execute(select(ledger.bounce_report.c.id)
                                 .where(ledger.bounce_report.c.delivery_id == sent)).scalar_one()
    return sent, report_id
