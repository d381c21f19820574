"""The ledger's state machine, enforced by the database itself, and its claims (SQLite and PostgreSQL)."""

from __future__ import annotations

import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError

from include.invoice_mailing import ledger
from include.invoice_mailing.ledger import PlannedDelivery, delivery


def planned(recipient="kari@bolgen.example", **changes) -> PlannedDelivery:
    values = dict(doc_type="INV", ref_nbr="INV000101", customer_id="10001", mailing_id="INVOICE",
                  recipient=recipient, add_to="To", format="PDF", status="pending", sender_domain="fjordlys.example")
    return PlannedDelivery(**{**values, **changes})


@pytest.fixture
def db(backend):
    engine = backend["engines"][1]
    ledger.ensure_schema(engine)
    return engine


def sent_row(db) -> int:
    ledger.record_plan(db, [planned()], run_id="r1", mode="live", resend=False)
    token = ledger.claimant()
    [row_id], _ = ledger.claim(db, [1], token, run_id="r1")
    assert ledger.finish(db, [row_id], token, "sent") == 1
    return row_id


@pytest.mark.parametrize("status", ["pending", "sending", "failed", "skipped"])
def test_the_database_refuses_to_move_a_sent_delivery_back(db, status):
    row_id = sent_row(db)
    with pytest.raises(DBAPIError, match="may only move forward"), db.begin() as conn:
        conn.execute(update(delivery).where(delivery.c.id == row_id).values(status=status))
    assert ledger.all_deliveries(db)[0]["status"] == "sent"


def test_the_database_refuses_an_unknown_status(db):
    ledger.record_plan(db, [planned()], run_id="r1", mode="live", resend=False)
    with pytest.raises(DBAPIError), db.begin() as conn:
        conn.execute(update(delivery).values(status="delivered"))


def test_recording_the_same_plan_twice_keeps_one_row_per_delivery(db):
    for _ in range(2):
        ledger.record_plan(db, [planned(), planned("KARI@bolgen.example")], run_id="r1", mode="live", resend=False)
    assert len(ledger.all_deliveries(db)) == 1


def test_a_refusal_is_re_decided_but_a_server_rejection_is_final(db):
    ledger.record_plan(db, [planned(status="failed", reason="config_error", format="")], run_id="r1", mode="live",
                       resend=False)
    ledger.record_plan(db, [planned(format="")], run_id="r2", mode="live", resend=False)
    assert [(r["status"], r["last_run_id"]) for r in ledger.all_deliveries(db)] == [("pending", "r2")]

    token = ledger.claimant()
    claimed, _ = ledger.claim(db, [1], token, run_id="r2")
    ledger.finish(db, claimed, token, "failed", reason="recipient_rejected", error="550 5.1.1 unknown")
    ledger.record_plan(db, [planned(format="")], run_id="r3", mode="live", resend=False)
    assert [(r["status"], r["reason"]) for r in ledger.all_deliveries(db)] == [("failed", "recipient_rejected")]


def test_a_live_claim_is_respected_and_a_dead_processes_claim_is_taken_over(db):
    ledger.record_plan(db, [planned()], run_id="r1", mode="live", resend=False)
    alive = ledger.claimant()  # this very process: alive
    assert ledger.claim(db, [1], alive, run_id="r1") == ([1], [])
    assert ledger.claim(db, [1], ledger.claimant(), run_id="r1") == ([], [1])

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = f"{ledger.claimant().split(':')[0]}:{gone.stdout.strip()}:deadbeef"
    with db.begin() as conn:
        conn.execute(update(delivery).values(claimed_by=dead))
    heir = ledger.claimant()
    assert ledger.claim(db, [1], heir, run_id="r2") == ([1], [])
    [row] = ledger.all_deliveries(db)
    assert row["attempts"] == 2 and "stale claim" in row["last_error"]


def test_a_claim_from_another_host_is_taken_over_only_after_its_lease(db):
    ledger.record_plan(db, [planned()], run_id="r1", mode="live", resend=False)
    assert ledger.claim(db, [1], "worker-7.example:4242:cafe", run_id="r1") == ([1], [])
    assert ledger.claim(db, [1], ledger.claimant(), run_id="r1") == ([], [1])
    assert ledger.claim(db, [1], ledger.claimant(), run_id="r1", lease=timedelta(0)) == ([1], [])


def test_a_lease_is_measured_by_the_database_clock_not_the_workers(db, monkeypatch):
    ledger.record_plan(db, [planned()], run_id="r1", mode="live", resend=False)
    monkeypatch.setattr(ledger, "now", lambda: datetime.now(UTC) - timedelta(hours=2))  # a worker's clock, behind
    assert ledger.claim(db, [1], "worker-7.example/0a1b2c3d:4242:cafe", run_id="r1") == ([1], [])
    monkeypatch.undo()
    # A worker with a correct clock sees a claim made seconds ago by the database's clock: not stale.
    assert ledger.claim(db, [1], ledger.claimant(), run_id="r1") == ([], [1])
    with db.connect() as conn:
        claimed_at, db_now = conn.execute(select(delivery.c.claimed_at, func.current_timestamp())).one()
    if isinstance(db_now, str):  # SQLite's CURRENT_TIMESTAMP is text, UTC
        db_now = datetime.fromisoformat(db_now)
    assert abs(claimed_at.replace(tzinfo=None) - db_now.astimezone(UTC).replace(tzinfo=None)) < timedelta(minutes=1)


@pytest.mark.parametrize("host", [socket.gethostname(), f"{socket.gethostname()}/0a1b2c3d"],
                         ids=["host name only", "same host name, another process namespace"])
def test_a_claim_whose_process_this_host_cannot_see_waits_for_its_lease(db, host):
    ledger.record_plan(db, [planned()], run_id="r1", mode="live", resend=False)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert ledger.claim(db, [1], f"{host}:{gone.stdout.strip()}:cafe", run_id="r1") == ([1], [])
    assert ledger.claim(db, [1], ledger.claimant(), run_id="r1") == ([], [1])


def test_a_sent_delivery_keeps_what_it_says_it_sent_and_no_delivery_is_deleted(db):
    row_id = sent_row(db)
    ledger.record_message_path(db, [row_id], "file:///archive/a.eml")  # the archive's path: once, after the commit
    ledger.record_message_path(db, [row_id], "file:///archive/b.eml")  # a second path is not written
    for values in ({"sent_at": datetime(2026, 11, 25, tzinfo=UTC)}, {"message_sha256": "0" * 64},
                   {"recipient": "someone.else@bolgen.example"}, {"reason": "dry_run"}, {"attempts": 5}):
        with pytest.raises(DBAPIError, match="final delivery is never changed"), db.begin() as conn:
            conn.execute(update(delivery).where(delivery.c.id == row_id).values(**values))
    with pytest.raises(DBAPIError, match="never deleted"), db.begin() as conn:
        conn.execute(delivery.delete())
    [row] = ledger.all_deliveries(db)
    assert (row["status"], row["recipient"], row["message_path"]) == ("sent", "kari@bolgen.example",
                                                                      "file:///archive/a.eml")
