"""Spec section 9 in the ledger: a report moves a sent delivery to bounced once, a delay is a note, and a
hard-bounced address is skipped for later documents until the ERP holds another one or an operator lifts it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.exc import DBAPIError

from include.invoice_mailing import bounce_apply, ledger, night_audit
from include.invoice_mailing.bounces import Kind, read_report
from include.invoice_mailing.ledger import PlannedDelivery, bounce_report, delivery
from tests.test_bounce_reports import BOUNCE_ADDRESS, KEY, fixture

STAMP = datetime(2026, 11, 24, 1, 5, tzinfo=UTC)
AFTER = STAMP + timedelta(days=1)  # when the reports of these tests arrive (a token is trusted alone for 90 days)


def sent_row(row_id: int, recipient: str, message_id: str, *, ref_nbr: str = "INV010042", status: str = "sent",
             mode: str = "live") -> dict:
    return dict(id=row_id, run_id="scheduled__2026-11-24", last_run_id="scheduled__2026-11-24", doc_type="INV",
                ref_nbr=ref_nbr, customer_id="10042", mailing_id="INVOICE", recipient=recipient,
                recipient_key=recipient.casefold(), add_to="To", format="PDF", mode=mode, generation=0,
                status=status, message_id=message_id, attempts=1, sender="faktura@fjordlys.example",
                sent_at=STAMP if status == "sent" else None, created_at=STAMP, updated_at=STAMP)


@pytest.fixture
def engine(backend):
    engine = backend["engines"][1]
    ledger.ensure_schema(engine)
    return engine


def add(engine, *rows: dict) -> None:
    with engine.begin() as conn:
        conn.execute(insert(delivery), list(rows))


def row(engine, row_id: int) -> dict:
    return ledger.all_deliveries(engine, delivery.c.id == row_id)[0]


def reports(engine) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(bounce_report).order_by(bounce_report.c.id)).mappings()]


def apply(engine, name: str, **kwargs) -> list[bounce_apply.Outcome]:
    raw = fixture(name)
    kwargs.setdefault("received_at", AFTER)
    return bounce_apply.apply_report(engine, read_report(raw), raw, bounce_address=BOUNCE_ADDRESS, key=KEY, **kwargs)


HARD = ("postfix-5.1.1-hard.eml", 101, "ap@nordvik-bygg.example",
        "<10042.pdf.3f1c2a9be07d4c6a81b2e5f0@fjordlys.example>")


def test_a_hard_bounce_moves_the_sent_delivery_to_bounced_once_and_keeps_the_report(engine):
    name, row_id, recipient, message_id = HARD
    add(engine, sent_row(row_id, recipient, message_id))

    first = apply(engine, name, run_id="scheduled__2026-11-25")
    after_first = row(engine, row_id)
    again = apply(engine, name, run_id="scheduled__2026-11-26")

    assert [(o.effect, o.delivery_id) for o in first] == [("bounced", row_id)]
    assert after_first["status"] == "bounced" and after_first["reason"] == "hard_bounce"
    assert after_first["detail"].startswith("5.1.1 ") and "nordvik" in after_first["detail"].lower()
    assert after_first["bounced_at"] is not None and after_first["sent_at"] is not None
    assert [(o.effect, o.applied) for o in again] == [("already_applied", True)]
    assert row(engine, row_id) == after_first  # the second reading changed nothing
    [kept] = reports(engine)
    assert (kept["delivery_id"], kept["effect"], kept["kind"], kept["status_code"], kept["recipient"]) == (
        row_id, "bounced", "hard", "5.1.1", recipient)
    assert kept["raw"] == fixture(name) and kept["raw_path"] is None  # no archive: the ledger keeps it
    assert kept["run_id"] == "scheduled__2026-11-25"


@pytest.mark.parametrize("driver", ["psycopg2", "psycopg"])
def test_with_either_postgresql_driver_a_bounce_moves_the_delivery(postgres_databases, driver):
    """psycopg 3 reports no rowcount for an INSERT ... RETURNING: the report was once taken for applied
    before and the delivery stayed sent, in the real topology only (the tests ran psycopg2)."""
    from sqlalchemy import create_engine

    engine = create_engine(postgres_databases["engines"][1].url.set(drivername=f"postgresql+{driver}"))
    ledger.ensure_schema(engine)
    name, row_id, recipient, message_id = HARD
    add(engine, sent_row(row_id, recipient, message_id))

    first, again = apply(engine, name), apply(engine, name)

    assert [o.effect for o in first] == ["bounced"] and [o.effect for o in again] == ["already_applied"]
    assert row(engine, row_id)["status"] == "bounced"
    engine.dispose()


def test_the_tasks_engine_uses_the_pinned_postgresql_driver(monkeypatch):
    """A postgres connection's engine is psycopg2's, the driver requirements.txt pins and the tests run."""
    from include.invoice_mailing import tasks

    monkeypatch.setenv("AIRFLOW_CONN_LEDGER_DRIVER_PROBE", "postgres://postgres@127.0.0.1:5432/ledger")
    tasks.engine_for.cache_clear()
    try:
        assert tasks.engine_for("ledger_driver_probe").dialect.driver == "psycopg2"
    finally:
        tasks.engine_for.cache_clear()


def test_a_policy_refusal_is_blocked_and_a_bounced_row_is_final(engine):
    add(engine, sent_row(102, "okonomi@vestby-transport.example",
                         "<10043.pdf.9d2e41c07a6b5f3e28c1d0a4@fjordlys.example>"))
    [outcome] = apply(engine, "postfix-5.7.1-blocked.eml")
    assert outcome.effect == "bounced"
    assert (row(engine, 102)["status"], row(engine, 102)["reason"]) == ("bounced", "blocked")
    for values, match in [({"status": "sent"}, "may only move forward"), ({"status": "pending"}, "may only move forward"),
                          ({"detail": "rewritten"}, "final delivery is never changed"),
                          ({"bounced_at": STAMP}, "final delivery is never changed")]:
        with pytest.raises(DBAPIError, match=match), engine.begin() as conn:
            conn.execute(update(delivery).where(delivery.c.id == 102).values(**values))
    with pytest.raises(DBAPIError, match="never deleted"), engine.begin() as conn:
        conn.execute(delivery.delete().where(delivery.c.id == 102))


@pytest.mark.parametrize("status", ["pending", "failed", "skipped"])
def test_the_trigger_allows_bounced_only_after_sent(engine, status):
    add(engine, sent_row(7, "kari@bolgen.example", "<x@fjordlys.example>", status=status))
    with pytest.raises(DBAPIError, match="may only move forward"), engine.begin() as conn:
        conn.execute(update(delivery).where(delivery.c.id == 7)
                     .values(status="bounced", reason="hard_bounce", bounced_at=STAMP))


@pytest.mark.parametrize("values", [
    {"reason": "recipient_rejected", "bounced_at": STAMP},            # not a bounce's reason
    {"reason": "hard_bounce"},                                        # no bounced_at
    {"reason": "hard_bounce", "bounced_at": STAMP, "recipient": "someone.else@bolgen.example"},
    {"reason": "hard_bounce", "bounced_at": STAMP, "sent_at": STAMP.replace(day=25)},
])
def test_the_step_to_bounced_sets_only_reason_detail_and_bounced_at(engine, values):
    add(engine, sent_row(7, "kari@bolgen.example", "<x@fjordlys.example>"))
    with pytest.raises(DBAPIError, match="a bounce sets only"), engine.begin() as conn:
        conn.execute(update(delivery).where(delivery.c.id == 7).values(status="bounced", **values))
    assert row(engine, 7)["status"] == "sent"


def test_a_delay_is_a_note_and_the_delivery_stays_sent(engine):
    add(engine, sent_row(103, "regnskap@kvamme-el.example", "<10044.pdf.51be0c7d93a2e4f6b8d1c2a0@fjordlys.example>"))
    before = row(engine, 103)
    [outcome] = apply(engine, "postfix-4.4.1-delayed.eml")
    [again] = apply(engine, "postfix-4.4.1-delayed.eml")
    assert (outcome.effect, again.effect) == ("noted", "already_applied")
    assert row(engine, 103) == before
    assert [(r["delivery_id"], r["effect"], r["kind"], r["status_code"]) for r in reports(engine)] == [
        (103, "noted", "delayed", "4.4.1")]


def test_a_report_naming_no_delivery_is_not_applied(engine):
    [outcome] = apply(engine, HARD[0])  # its VERP address names delivery 101, which this ledger lacks
    assert (outcome.effect, outcome.applied, outcome.reason) == ("not_applied", False, "delivery 101 does not exist")
    raw = fixture(HARD[0])
    [outcome] = bounce_apply.apply_report(engine, read_report(raw), raw)  # no key: only the fallback, no match
    assert (outcome.effect, outcome.delivery_id) == ("not_applied", None)
    assert "names no delivery" in outcome.reason
    assert reports(engine) == []


@pytest.mark.parametrize("status, mode, why", [
    ("pending", "live", "is pending, not sent"),
    ("skipped", "live", "is skipped, not sent"),
    ("sent", "dry_run", "is a dry_run delivery"),
    ("sent", "redirect", "is a redirect delivery"),
])
def test_a_report_on_a_delivery_that_was_not_sent_live_is_not_applied(engine, status, mode, why):
    name, row_id, recipient, message_id = HARD
    add(engine, sent_row(row_id, recipient, message_id, status=status, mode=mode))
    before = row(engine, row_id)
    [outcome] = apply(engine, name)
    assert outcome.effect == "not_applied" and why in outcome.reason
    assert row(engine, row_id) == before and reports(engine) == []


def test_a_report_that_is_no_bounce_is_not_applied(engine):
    name, row_id, recipient, message_id = HARD
    add(engine, sent_row(row_id, recipient, message_id))
    raw = fixture("person-reply.eml")
    outcome = bounce_apply.apply_bounce(engine, row_id, read_report(raw), raw, received_at=AFTER)
    assert outcome.effect == "not_applied" and row(engine, row_id)["status"] == "sent"


@pytest.mark.parametrize("days, applied", [(89, True), (91, False)])
def test_a_verp_token_alone_applies_a_report_only_within_90_days_of_the_sending(engine, days, applied):
    """Issue 31, finding 10: the token is in the message the recipient keeps, and it never expired, so a bounce
    forged with it years later still moved the delivery. After 90 days a report is not applied by its token
    alone: the delivery stays sent, nothing is recorded, and the reader leaves the report for a person."""
    name, row_id, recipient, message_id = HARD
    add(engine, sent_row(row_id, recipient, message_id))

    [outcome] = apply(engine, name, received_at=STAMP + timedelta(days=days))

    if applied:
        assert (outcome.effect, row(engine, row_id)["status"]) == ("bounced", "bounced")
    else:
        assert (outcome.effect, outcome.applied, outcome.delivery_id) == ("not_applied", False, row_id)
        assert outcome.reason == (f"delivery {row_id} was sent on 2026-11-24, more than 90 days before the report: "
                                  "a token that old is not trusted alone")
        assert row(engine, row_id)["status"] == "sent" and reports(engine) == []


def test_a_signed_message_id_alone_applies_a_report_only_within_90_days(engine):
    """The same window for a report matched by its keyed Message-ID (Microsoft 365, Google: no VERP)."""
    raw, minted = signed(*LEGACY)
    add(engine, sent_row(40, "Innkjop@Kystnett.example", minted, ref_nbr="INV010061"))
    late = bounce_apply.apply_report(engine, read_report(raw), raw, bounce_address=BOUNCE_ADDRESS, key=KEY,
                                     received_at=STAMP + timedelta(days=120))
    assert [(o.effect, o.delivery_id) for o in late] == [("not_applied", 40)]
    assert row(engine, 40)["status"] == "sent" and reports(engine) == []


def signed(name: str, message_id: str, key: bytes = KEY) -> tuple[bytes, str]:
    """A fixture report whose original Message-ID is the one this deployment minted: signed under ``key``."""
    minted = ledger.sign_message_id(message_id, key)
    return fixture(name).replace(message_id.encode(), minted.encode()), minted


def apply_raw(engine, raw: bytes, key: bytes = KEY) -> list[bounce_apply.Outcome]:
    return bounce_apply.apply_report(engine, read_report(raw), raw, bounce_address=BOUNCE_ADDRESS, key=key,
                                     received_at=AFTER)


LEGACY = ("exchange-legacy-no-verp.eml", "<10061.pdf.5a4b3c2d1e0f9a8b7c6d5e4f@fjordlys.example>")


def test_without_a_verp_match_the_original_message_id_and_recipient_name_the_delivery(engine):
    raw, message_id = signed(*LEGACY)
    add(engine, sent_row(40, "Innkjop@Kystnett.example", message_id, ref_nbr="INV010061"),
        sent_row(41, "regnskap@kystnett.example", message_id, ref_nbr="INV010061"))  # same message, not named
    [outcome] = apply_raw(engine, raw)
    assert (outcome.effect, outcome.delivery_id) == ("bounced", 40)
    assert (row(engine, 40)["status"], row(engine, 41)["status"]) == ("bounced", "sent")


@pytest.mark.parametrize("where", ["inside the quotes", "before the MAC"])
def test_a_nul_byte_in_the_original_message_id_names_nothing_and_raises_nothing(engine, where):
    """Issue 31: a NUL byte in a quoted Message-ID made the PostgreSQL query raise (text cannot hold one), and
    the mailbox reader with it. Such a Message-ID names no delivery, on either ledger."""
    raw, minted = signed(*LEGACY)
    add(engine, sent_row(40, "Innkjop@Kystnett.example", minted, ref_nbr="INV010061"))
    local, domain = minted[1:-1].rsplit("@", 1)
    body, mac = local.rsplit(".", 1)
    nul = f'<"{local}\x00"@{domain}>' if where == "inside the quotes" else f"<{body}\x00.{mac}@{domain}>"
    [outcome] = apply_raw(engine, raw.replace(minted.encode(), nul.encode()))
    assert (outcome.effect, outcome.delivery_id) == ("not_applied", None)
    assert row(engine, 40)["status"] == "sent" and reports(engine) == []


def test_a_forged_report_naming_an_unsigned_message_id_is_not_applied_and_stops_no_address(engine):
    """Issue 31: the Message-ID was an unkeyed hash of public values (document, mailing, format, mode), so a
    stranger who knew a document number and an address could mail one forged DSN and stop every later
    document to that address. A Message-ID is accepted only when its MAC verifies under the deployment's key."""
    name, message_id = LEGACY
    unsigned = ledger.message_id_for("INV", "INV010061", "INVOICE", "PDF", "live", "", "fjordlys.example")
    raw = fixture(name).replace(message_id.encode(), unsigned.encode())
    add(engine, sent_row(40, "Innkjop@Kystnett.example", unsigned, ref_nbr="INV010061"))
    [outcome] = apply_raw(engine, raw)
    assert outcome.effect == "not_applied" and "verified MAC" in outcome.reason
    assert row(engine, 40)["status"] == "sent" and reports(engine) == []
    later = PlannedDelivery("INV", "INV010099", "10061", "INVOICE", "innkjop@kystnett.example", "To", "PDF", "pending")
    assert [p.status for p in ledger.refuse_bounced_addresses(engine, [later], set())] == ["pending"]

    # Signed under another deployment's key, or with its MAC cut off: not ours either.
    for forged in (ledger.sign_message_id(unsigned, b"another-deployment-key-32-bytes-long!!"),
                   ledger.sign_message_id(unsigned, KEY)[:-6] + "0000>"):
        assert apply_raw(engine, fixture(name).replace(message_id.encode(), forged.encode()))[0].effect == "not_applied"
    # Without a key nothing can be verified: the report is left for a person.
    assert apply_raw(engine, signed(*LEGACY)[0], key=None)[0].effect == "not_applied"


def test_the_message_id_is_stable_for_its_delivery_and_carries_its_mac():
    minted = ledger.message_id_for("INV", "INV010061", "INVOICE", "PDF", "live", "", "fjordlys.example", KEY)
    assert minted == ledger.message_id_for("INV", "INV010061", "INVOICE", "PDF", "live", "", "fjordlys.example", KEY)
    assert ledger.message_id_verifies(minted, KEY) and not ledger.message_id_verifies(minted, KEY + b"!")
    assert minted.startswith("<INV010061.pdf.") and minted.endswith("@fjordlys.example>")


@pytest.mark.parametrize("ref_nbr", ["INV\r\n010061", "INV>010061", "INV 010061<x@y>"])
def test_a_document_number_with_cr_lf_or_angle_brackets_makes_a_valid_message_id(ref_nbr):
    """Issue 31, finding 6: a CR or LF from invoice.ref_nbr went into the header; a '>' cut it short."""
    from email.headerregistry import HeaderRegistry

    minted = ledger.message_id_for("INV", ref_nbr, "INVOICE", "PDF", "live", "", "fjordlys.example", KEY)
    assert not set(minted) & set("\r\n ") and minted.count("<") == minted.count(">") == 1
    assert str(HeaderRegistry()("Message-ID", minted)) == minted and ledger.message_id_verifies(minted, KEY)
    assert minted != ledger.message_id_for("INV", "INV-010061", "INVOICE", "PDF", "live", "", "fjordlys.example", KEY)


def test_a_forged_verp_address_and_an_unverified_message_id_name_nothing(engine):
    name, row_id, recipient, message_id = HARD
    add(engine, sent_row(row_id, recipient, message_id))
    raw = fixture(name)
    other_key = b"another-deployment-key-32-bytes-long!!"
    outcomes = bounce_apply.apply_report(engine, read_report(raw), raw, bounce_address=BOUNCE_ADDRESS, key=other_key)
    # The VERP MAC fails, and the Message-ID carries no MAC of this key: the report names no delivery.
    assert [(o.effect, o.delivery_id) for o in outcomes] == [("not_applied", None)]
    assert row(engine, row_id)["status"] == "sent"


def test_with_the_archive_configured_the_raw_report_is_kept_there(engine, tmp_path, monkeypatch):
    from include.invoice_mailing import archive

    monkeypatch.setenv(archive.ARCHIVE_ENV, str(tmp_path / "archive"))
    name, row_id, recipient, message_id = HARD
    add(engine, sent_row(row_id, recipient, message_id))
    apply(engine, name)
    [kept] = reports(engine)
    assert kept["raw"] is None and kept["raw_path"].endswith(f"{kept['sha256']}.eml")
    assert archive.read(kept["raw_path"]) == fixture(name)


# --- The rules that follow ------------------------------------------------------------------------

def planned(recipient: str, ref_nbr: str) -> PlannedDelivery:
    return PlannedDelivery("INV", ref_nbr, "10042", "INVOICE", recipient, "To", "PDF", "pending",
                           sender_domain="fjordlys.example", sender="faktura@fjordlys.example")


def night(engine, run_id: str, *rows: PlannedDelivery, lift: tuple[str, ...] = ()) -> dict[tuple, dict]:
    """Record a night's plan as the pipeline does (its parameters on the run's row first)."""
    ledger.start_run(engine, run_id, STAMP, "live", {"lift_bounces": list(lift)})
    ledger.record_plan(engine, list(rows), run_id=run_id, mode="live", resend=False)
    return {(r["ref_nbr"], r["recipient_key"], r["generation"]): r for r in ledger.all_deliveries(engine)}


def bounce(engine, row_id: int, kind: Kind = Kind.HARD) -> None:
    """A sent delivery, and a report of ``kind`` applied to it (the postfix fixture, its recipient line)."""
    raw = fixture(HARD[0] if kind == Kind.HARD else "postfix-5.7.1-blocked.eml")
    outcome = bounce_apply.apply_bounce(engine, row_id, read_report(raw), raw)
    assert outcome.effect == "bounced"


def send(engine, row_ids: list[int]) -> None:
    token = ledger.claimant()
    claimed, _ = ledger.claim(engine, row_ids, token, run_id="r")
    ledger.finish(engine, claimed, token, "sent")


def sent_and_bounced(engine) -> int:
    """Night n1 mails INV010042 to ap@nordvik-bygg.example, and a hard bounce comes back: its delivery id."""
    rows = night(engine, "n1", planned("ap@nordvik-bygg.example", "INV010042"))
    first = rows[("INV010042", "ap@nordvik-bygg.example", 0)]["id"]
    send(engine, [first])
    bounce(engine, first)
    return first


def test_an_address_that_hard_bounced_is_skipped_for_later_documents(engine):
    sent_and_bounced(engine)

    rows = night(engine, "n2", planned("AP@nordvik-bygg.example", "INV010050"),
                 planned("kari@nordvik-bygg.example", "INV010050"))

    later = rows[("INV010050", "ap@nordvik-bygg.example", 0)]
    assert (later["status"], later["reason"]) == ("skipped", "address_bounced")
    assert "lift_bounces" in later["detail"] and later["message_id"] is None
    assert rows[("INV010050", "kari@nordvik-bygg.example", 0)]["status"] == "pending"  # the others still get it
    assert ledger.bounced_addresses(engine, ["ap@nordvik-bygg.example", "kari@nordvik-bygg.example"]).keys() == {
        "ap@nordvik-bygg.example"}


def test_a_blocked_bounce_does_not_stop_the_address(engine):
    rows = night(engine, "n1", planned("okonomi@vestby-transport.example", "INV010043"))
    first = rows[("INV010043", "okonomi@vestby-transport.example", 0)]["id"]
    send(engine, [first])
    bounce(engine, first, Kind.BLOCKED)
    rows = night(engine, "n2", planned("okonomi@vestby-transport.example", "INV010051"))
    assert rows[("INV010051", "okonomi@vestby-transport.example", 0)]["status"] == "pending"


def test_an_operator_lifts_a_bounce_and_a_success_since_clears_it(engine):
    first = sent_and_bounced(engine)
    night(engine, "n2", planned("ap@nordvik-bygg.example", "INV010050"))  # skipped

    rows = night(engine, "n3", planned("ap@nordvik-bygg.example", "INV010042"),
                 planned("ap@nordvik-bygg.example", "INV010050"), lift=("ap@nordvik-bygg.example",))

    # The skipped later document is re-decided, and the bounced one is mailed again as a new generation.
    assert rows[("INV010050", "ap@nordvik-bygg.example", 0)]["status"] == "pending"
    again = rows[("INV010042", "ap@nordvik-bygg.example", 1)]
    assert (again["status"], again["resend_of"]) == ("pending", first)
    assert again["message_id"] != rows[("INV010042", "ap@nordvik-bygg.example", 0)]["message_id"]
    send(engine, [again["id"]])
    # Sent after the bounce: the next night mails the address without a lift.
    rows = night(engine, "n4", planned("ap@nordvik-bygg.example", "INV010060"))
    assert rows[("INV010060", "ap@nordvik-bygg.example", 0)]["status"] == "pending"


def test_a_corrected_address_in_the_erp_is_mailed_the_bounced_document(engine):
    sent_and_bounced(engine)
    assert ledger.settled_documents(engine, [("INV", "INV010042")]) == set()  # due again

    rows = night(engine, "n2", planned("faktura@nordvik-bygg.example", "INV010042"))

    assert rows[("INV010042", "faktura@nordvik-bygg.example", 0)]["status"] == "pending"
    assert rows[("INV010042", "ap@nordvik-bygg.example", 0)]["status"] == "bounced"


def test_the_run_summary_counts_bounced_and_the_bounces_applied(engine):
    rows = night(engine, "n1", planned("ap@nordvik-bygg.example", "INV010042"),
                 planned("kari@nordvik-bygg.example", "INV010042"))
    send(engine, [r["id"] for r in rows.values()])
    bounce(engine, rows[("INV010042", "ap@nordvik-bygg.example", 0)]["id"])
    summary = night_audit.audit(engine, "r")
    assert summary["by_status"] == {"bounced": 1, "sent": 1}
    assert summary["undelivered"] == []  # a bounce alone does not turn the night red
    raw = fixture("postfix-4.4.1-delayed.eml")
    bounce_apply.apply_bounce(engine, rows[("INV010042", "kari@nordvik-bygg.example", 0)]["id"], read_report(raw),
                              raw, run_id="n2")
    assert ledger.summarize_run(engine, "n2")["bounce_reports"] == {"noted": 1}
