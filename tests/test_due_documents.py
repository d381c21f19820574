"""Spec section 1: which documents are due on a run date, and how the night is split into batches."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from include.invoice_mailing import ledger, pipeline, source
from include.invoice_mailing.ledger import PlannedDelivery

NIGHT = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)  # 02:00 in Oslo


def context(**params) -> pipeline.RunContext:
    return pipeline.RunContext.from_airflow("run-1", NIGHT, NIGHT, params)


def due(erp, ledger_db, **params) -> list[str]:
    batches = pipeline.extract(erp.engine, ledger_db, context(**params))
    return sorted(ref for batch in batches for _, ref, _ in batch["documents"])


@pytest.fixture
def customer(erp):
    return erp.customer("10001")


@pytest.mark.parametrize("changes, is_due", [
    ({}, True),
    ({"status": "Closed"}, True),
    ({"status": "Hold", "released_at": None}, False),
    ({"status": "Balanced"}, False),
    ({"status": "Voided"}, False),
    ({"dont_email": True}, False),
    ({"emailed": True}, False),
    ({"released_at": datetime(2026, 11, 24, 0, 59)}, True),   # released before the interval's end
    ({"released_at": datetime(2026, 11, 24, 1, 0)}, False),   # not earlier than the end: tomorrow's
    ({"released_at": datetime(2026, 10, 25, 9, 0)}, True),    # inside the 30-day look-back
    ({"released_at": datetime(2026, 10, 20, 9, 0)}, False),   # older than the look-back
])
def test_document_is_due_when_released_open_and_not_yet_mailed(erp, ledger_db, customer, changes, is_due):
    erp.invoice("INV000101", customer, **changes)
    assert due(erp, ledger_db) == (["INV000101"] if is_due else [])


def test_lookback_days_is_a_parameter(erp, ledger_db, customer):
    erp.invoice("INV000101", customer, released_at=datetime(2026, 10, 20, 9, 0))
    assert due(erp, ledger_db, lookback_days=40) == ["INV000101"]


def test_named_documents_are_due_whatever_their_age(erp, ledger_db, customer):
    erp.invoice("INV000101", customer, released_at=datetime(2026, 1, 5, 9, 0))
    erp.invoice("INV000102", customer)
    assert due(erp, ledger_db, documents=["INV000101"]) == ["INV000101"]


def test_customers_parameter_limits_the_run(erp, ledger_db, customer):
    erp.customer("10002")
    erp.invoice("INV000101", customer)
    erp.invoice("INV000102", "10002")
    assert due(erp, ledger_db, customers=["10002"]) == ["INV000102"]


def sent(ledger_db, ref_nbr: str, status: str = "sent"):
    ledger.ensure_schema(ledger_db)
    row = PlannedDelivery("INV", ref_nbr, "10001", "INVOICE", "kari@bolgen.example", "To", "PDF", "pending",
                          sender_domain="fjordlys.example")
    ledger.record_plan(ledger_db, [row], run_id="earlier", mode="live", resend=False)
    if status == "sent":
        token = ledger.claimant()
        claimed, _ = ledger.claim(ledger_db, [1], token, run_id="earlier")
        ledger.finish(ledger_db, claimed, token, "sent")


def test_a_delivered_document_is_not_due_again(erp, ledger_db, customer):
    erp.invoice("INV000101", customer)
    erp.invoice("INV000102", customer)
    sent(ledger_db, "INV000101")
    assert due(erp, ledger_db) == ["INV000102"]


def test_a_document_with_a_delivery_still_pending_is_due(erp, ledger_db, customer):
    erp.invoice("INV000101", customer)
    sent(ledger_db, "INV000101", status="pending")
    assert due(erp, ledger_db) == ["INV000101"]


def test_resend_includes_delivered_and_emailed_documents(erp, ledger_db, customer):
    erp.invoice("INV000101", customer, emailed=True)
    sent(ledger_db, "INV000101")
    assert due(erp, ledger_db, resend=True, documents=["INV000101"]) == ["INV000101"]


@pytest.mark.parametrize("customers, per_customer, expected", [
    (3, 1, 3),          # a small night: one customer per instance
    (200, 4, 200),      # still small: 200 customers
    (201, 1, 2),        # larger: batches sized by work (201 documents), at least one per worker
    (1000, 4, 14),      # 4,000 documents in batches of about 300
    (5000, 4, 67),      # 20,000 documents
    (50000, 4, 256),    # 200,000 documents: never more than 256 instances
])
def test_batches_are_sized_by_work_and_stay_within_the_instance_limit(customers, per_customer, expected):
    documents = [source.DueDocument("INV", f"INV{c:05d}{n}", f"{10000 + c}")
                 for c in range(customers) for n in range(per_customer)]
    batches = pipeline.group_batches(documents, 200, batch_documents=300, max_instances=256, workers=2)
    assert len(batches) == expected
    assert [c for b in batches for c in b["customers"]] == sorted({d.customer_id for d in documents})
    sizes = [len(b["documents"]) for b in batches]
    assert max(sizes) - min(sizes) <= 2 * per_customer  # balanced, and no customer split
    if customers <= 200:
        assert all(b["label"] == f"customer {b['customers'][0]}" for b in batches)
    else:
        first = batches[0]
        assert first["label"] == f"customers {first['customers'][0]}..{first['customers'][-1]} ({len(first['customers'])})"


@pytest.mark.parametrize("params, message", [
    ({"redirect_to": "not an address"}, "redirect_to"),
    ({"lookback_days": -1}, "lookback_days"),
    ({"lookback_days": "a week"}, "lookback_days"),
    ({"customers": [{"id": 1}]}, "customers"),
])
def test_wrong_run_parameters_stop_the_run_with_a_clear_error(params, message):
    with pytest.raises(pipeline.ParamError, match=message):
        pipeline.RunParams.from_params(params)


def test_a_document_whose_deliveries_all_bounced_is_due_again(erp, ledger_db, customer):
    from include.invoice_mailing import bounce_apply
    from include.invoice_mailing.bounces import read_report
    from tests.test_bounce_reports import fixture

    erp.invoice("INV000101", customer)
    sent(ledger_db, "INV000101")
    assert due(erp, ledger_db) == []
    raw = fixture("postfix-5.1.1-hard.eml")
    assert bounce_apply.apply_bounce(ledger_db, 1, read_report(raw), raw).effect == "bounced"
    assert due(erp, ledger_db) == ["INV000101"]


def test_lift_bounces_takes_addresses_and_refuses_a_wrong_one():
    assert pipeline.RunParams.from_params({"lift_bounces": ["AP@Nordvik-Bygg.example"]}).lift_bounces == (
        "AP@nordvik-bygg.example",)
    with pytest.raises(pipeline.ParamError, match="lift_bounces"):
        pipeline.RunParams.from_params({"lift_bounces": ["not an address"]})
