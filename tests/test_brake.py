"""The approval brake: which nights wait for a person, what the person is shown, and what the ledger keeps.

The rules (``brake.compare``) on their own; then the night's own steps on SQLite and PostgreSQL: extract
records tonight's volume, ``approve_night``'s question compares it with the ledger's history, and the
answer is written once. The real wait (Approve, Reject, timeout) is in tests/test_operators_e2e.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from sqlalchemy import select

from include.invoice_mailing import brake, ledger, pipeline, tasks
from include.invoice_mailing.brake import BrakeSettings, Volume

NIGHT = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)  # 02:00 in Oslo
SETTINGS = BrakeSettings(factor=3, first=500, timeout=timedelta(hours=4))


def usual(documents: int, nok: str = "10000") -> Volume:
    return Volume(documents, documents, {"NOK": Decimal(nok)})


def compare(volume, history, *, mode="live", resend=False, scoped=False, settings=SETTINGS):
    return brake.compare(volume, history, mode=mode, resend=resend, scoped=scoped, settings=settings)


HISTORY = [usual(n) for n in (40, 50, 60, 45, 55)]  # median 50 documents, NOK 10,000


def test_a_normal_night_never_waits():
    assert not compare(usual(140, "29000"), HISTORY).braked  # below 3 x 50 documents and 3 x NOK 10,000


def test_a_night_of_more_than_three_times_the_median_documents_waits_and_says_why():
    comparison = compare(usual(151, "20000"), HISTORY)
    assert comparison.median_documents == 50 and comparison.nights == 5
    assert comparison.reasons == ("151 documents, more than 3 × the median 50 of the last 5 nights",)


def test_a_night_of_a_usual_count_but_three_times_the_amount_in_one_currency_waits():
    comparison = compare(Volume(50, 40, {"NOK": Decimal("30000.01"), "EUR": Decimal("10")}),
                         HISTORY + [Volume(50, 50, {"EUR": Decimal("100")})])
    assert comparison.reasons == ("NOK 30000.01 in all, more than 3 × the median NOK 10000 of the last 6 nights",)


def test_the_median_is_of_the_last_fourteen_nights_that_mailed_something():
    # 14 usual nights, then older giant nights (outside the window) and empty nights (not counted)
    history = [usual(10)] * 7 + [Volume(0, 0)] * 5 + [usual(10)] * 7 + [usual(5000)] * 20
    assert compare(usual(31), history).reasons[0].endswith("the median 10 of the last 14 nights")


def test_without_history_only_a_night_of_more_than_the_first_limit_waits():
    assert not compare(usual(500), []).braked
    assert compare(usual(501), []).reasons == ("501 documents and no earlier night to compare with (the limit is 500)",)


@pytest.mark.parametrize(("scoped", "braked"), [(False, True), (True, False)])
def test_a_resend_of_everything_waits_a_resend_of_named_documents_does_not(scoped, braked):
    assert compare(usual(3), HISTORY, resend=True, scoped=scoped).braked is braked


@pytest.mark.parametrize("mode", ["dry_run", "redirect"])
def test_runs_that_mail_no_customer_never_wait(mode):
    assert not compare(usual(5000), [], mode=mode, resend=True).braked


def test_the_request_states_the_numbers_the_median_and_the_parameters():
    comparison = compare(Volume(151, 120, {"EUR": Decimal("900.5"), "NOK": Decimal("1234567.8")}), HISTORY)
    subject, body = brake.request_text("scheduled__2026-11-24T01:00:00+00:00", comparison, {"resend": False},
                                       SETTINGS)
    assert subject.endswith("approve mailing 151 documents to 120 customers?")
    assert "| documents | 151 | 50 |" in body and "| customers | 120 | |" in body
    assert "| NOK | 1,234,567.80 | 10,000.00 |" in body and "| EUR | 900.50 | - |" in body
    assert "Run parameters: none (a normal night)" in body and "within 4 h" in body
    _, body = brake.request_text("r", comparison, {"resend": True, "customers": [], "lookback_days": 30}, SETTINGS)
    assert "Compared with 5 nights" in body and "Run parameters: resend=true, lookback_days=30." in body


def test_the_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("INVOICE_MAILING_BRAKE_FACTOR", "2.5")
    monkeypatch.setenv("INVOICE_MAILING_BRAKE_FIRST", "40")
    monkeypatch.setenv("INVOICE_MAILING_BRAKE_TIMEOUT", "90")
    assert BrakeSettings.from_env() == BrakeSettings(factor=2.5, first=40, timeout=timedelta(seconds=90))


# --- in the ledger: SQLite and PostgreSQL --------------------------------------------------------------


@pytest.fixture
def night(backend, monkeypatch):
    """An ERP with 4 invoices of 2 customers due tonight, and the ledger's history of earlier nights."""
    from tests.erp import TinyErp

    erp_engine, ledger_db = backend["engines"]
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_LEDGER", backend["connections"][1])
    tasks.engine_for.cache_clear()
    erp = TinyErp(erp_engine)
    for number in ("10001", "10002"):
        erp.customer(number, invoice_email=f"ap@{number}.example")
        erp.invoice(f"INV{number}1", number)
        erp.invoice(f"INV{number}2", number)
    ledger.ensure_schema(ledger_db)
    yield erp, ledger_db
    tasks.engine_for.cache_clear()


def earlier_night(ledger_db, run_id: str, documents: int, *, days_ago: int, **params) -> None:
    ledger.start_run(ledger_db, run_id, NIGHT - timedelta(days=days_ago), "live", params)
    ledger.record_volume(ledger_db, run_id, usual(documents).as_json())


def extract_tonight(erp, ledger_db, run_id: str = "tonight", **params) -> None:
    pipeline.extract(erp.engine, ledger_db, pipeline.RunContext.from_airflow(run_id, NIGHT, NIGHT, params))


def test_extract_records_tonights_volume_with_the_total_per_currency(night):
    erp, ledger_db = night
    extract_tonight(erp, ledger_db)
    # each TinyErp invoice: 2 x 199.50 + 15 % VAT = 458.85
    assert ledger.night_volume(ledger_db, "tonight") == {"documents": 4, "customers": 2,
                                                         "totals": {"NOK": "1835.40"}}


def test_a_night_four_times_the_usual_is_held_and_the_question_is_in_the_ledger(night):
    erp, ledger_db = night
    for day in range(1, 4):
        earlier_night(ledger_db, f"night-{day}", 1, days_ago=day)
    earlier_night(ledger_db, "one-customer", 40, days_ago=1, customers=["10001"])  # scoped: not a night's volume
    extract_tonight(erp, ledger_db)

    subject, body = tasks.hold_night(run_id="tonight", logical_date=NIGHT, data_interval_end=NIGHT, params={})
    assert "approve mailing 4 documents to 2 customers" in subject
    assert "4 documents, more than 3 × the median 1 of the last 3 nights" in body
    [asked] = ledger.approvals(ledger_db, "tonight")
    assert asked["request"]["documents"] == 4 and asked["request"]["median_documents"] == 1
    assert asked["decision"] is None

    said = tasks.night_decided(run_id="tonight", approved=False, timed_out=False,
                               responded_by={"id": "7", "name": "kari.ops"},
                               responded_at=datetime(2026, 11, 24, 6, 5, tzinfo=UTC))
    assert said == "Rejected by kari.ops at 2026-11-24 07:05 CET: nothing was mailed (4 documents to 2 customers, NOK 1,835.40)"
    [decided] = ledger.approvals(ledger_db, "tonight")
    assert (decided["decision"], decided["decided_by"]) == ("rejected", "kari.ops")
    # answered once: a second answer finds no open question and changes nothing
    assert ledger.decide_approval(ledger_db, "tonight", "approved", "someone", None) is None
    assert ledger.approvals(ledger_db, "tonight")[0]["decision"] == "rejected"

    # a rejected night does not raise the median of the nights after it
    assert [v["documents"] for v in ledger.night_history(ledger_db, "tomorrow")] == [1, 1, 1]


def test_a_usual_night_passes_without_a_question(night):
    erp, ledger_db = night
    for day in range(1, 4):
        earlier_night(ledger_db, f"night-{day}", 3, days_ago=day)
    extract_tonight(erp, ledger_db)
    assert tasks.hold_night(run_id="tonight", logical_date=NIGHT, data_interval_end=NIGHT, params={}) is None
    assert ledger.approvals(ledger_db, "tonight") == []


def test_a_night_that_timed_out_is_recorded_as_such(night):
    erp, ledger_db = night
    extract_tonight(erp, ledger_db, resend=True)
    assert tasks.hold_night(run_id="tonight", logical_date=NIGHT, data_interval_end=NIGHT,
                            params={"resend": True}) is not None
    said = tasks.night_decided(run_id="tonight", approved=False, timed_out=True, responded_by=None,
                               responded_at=datetime(2026, 11, 24, 5, 0, tzinfo=UTC))
    assert said.startswith("No answer within the approval's time (until 2026-11-24 06:00 CET): rejected")
    [decided] = ledger.approvals(ledger_db, "tonight")
    assert (decided["decision"], decided["decided_by"]) == ("timed_out", None)
    assert "a resend of every due document" in decided["request"]["reasons"][0]


def test_a_night_from_before_the_brake_counts_the_documents_it_sent(night):
    """A ledger upgraded from release 4 has nights without a recorded volume: their sent documents count."""
    erp, ledger_db = night
    ledger.start_run(ledger_db, "old-night", NIGHT - timedelta(days=1), "live", {})
    rows = [ledger.PlannedDelivery(doc_type="INV", ref_nbr=f"OLD{i}", customer_id="10001", mailing_id="INVOICE",
                                   recipient=f"a{i}@x.example", add_to="To", format="PDF", status="pending",
                                   sender_domain="fjordlys.example") for i in range(3)]
    ledger.record_plan(ledger_db, rows, run_id="old-night", mode="live", resend=False)
    with ledger_db.connect() as conn:
        ids = list(conn.execute(select(ledger.delivery.c.id).where(ledger.delivery.c.run_id == "old-night")).scalars())
    token = ledger.claimant()
    claimed, _ = ledger.claim(ledger_db, ids, token, run_id="old-night")
    ledger.finish(ledger_db, claimed[:2], token, "sent")
    assert ledger.night_history(ledger_db, "tonight")[0]["documents"] == 2
