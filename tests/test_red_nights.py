"""A red night is red whatever failed: the DAG run with dag.test() against a real SMTP server.

A mapped instance that fails before it writes a ledger row (the ERP changed under the night, an exception
that escapes the per-delivery handling) leaves nothing in the ledger to count; audit asks Airflow for the
instances' states, counts the batch's documents as not mailed, fails the run and mails the operators the
customers and the first line of the error. An ERP that lacks a column of the contract is refused by
open_night before anything is read, in one line. (A worker SIGKILLed past its retries needs processes
of its own: tests/e2e/test_red_night.py, in a real Airflow.)
"""

from __future__ import annotations

import html

import pytest
from sqlalchemy import text

from include.invoice_mailing import audit, ledger, source
from include.invoice_mailing.erp_contract import ErpContractError, check, missing
from tests.conftest import night_events
from tests.test_alerts import body_of

pytestmark = pytest.mark.usefixtures("alerting")


@pytest.fixture
def two_customers(erp):
    for customer, address in (("10001", "kari@bolgen.example"), ("10002", "ola@havet.example")):
        erp.customer(customer, invoice_email=address)
        erp.recipient(erp.setting(customer_id=customer), "Invoicing")
    erp.invoice("INV000101", "10001")
    erp.invoice("INV000201", "10002")
    erp.invoice("INV000202", "10002")
    return erp


def audit_summary(run) -> dict:
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.execute(select(XComModel.value).where(
            XComModel.run_id == run.run_id, XComModel.task_id == "audit", XComModel.key == "summary")).first()
    return XComModel.deserialize_value(value)


def states(run) -> dict:
    return {(ti.task_id, ti.map_index): ti.state for ti in run.get_task_instances()}


def test_an_erp_column_gone_mid_night_turns_the_night_red_and_names_the_customer(
        two_customers, run_dag, alerting, sink, ledger_db, monkeypatch):
    """The ERP's schema changes after open_night checked it (an ERP upgrade at 02:10): customer 10002's
    instance fails in its first query, before any row; 10001's was mailed."""
    load_batch = source.load_batch

    def load_then_lose_a_column(erp, keys):
        if any(ref.startswith("INV0002") for _, ref in keys):
            with erp.begin() as conn:
                conn.execute(text("ALTER TABLE contact DROP COLUMN preferred_format"))
        return load_batch(erp, keys)

    monkeypatch.setattr(source, "load_batch", load_then_lose_a_column)

    run = run_dag()

    assert run.state == "failed"
    assert states(run)[("audit", -1)] == "failed"
    assert [m.envelope_to for m in sink.received if m.envelope_to != ["ops@fjordlys.example"]] == [
        ["kari@bolgen.example"]]
    summary = audit_summary(run)
    assert summary["status"] == "red"
    assert summary["why"] == "1 of 2 mailing instances did not succeed (customer 10002), 2 deliveries not sent"
    [unfinished] = summary["unfinished_instances"]
    assert unfinished["customers"] == ["10002"] and unfinished["state"] == "failed"
    assert "no such column" in unfinished["error"] and "SELECT" not in unfinished["error"]
    not_mailed = {u["document"]: u["reason"] for u in summary["undelivered"]}
    assert not_mailed == {"INV INV000201": "task_failed", "INV INV000202": "task_failed"}
    (alert,) = alerting()
    assert "1 mailing instance failed, 2 deliveries not sent (1 customer)" in alert["Subject"]
    body = body_of(alert)
    assert "customer 10002" in body and "no such column" in body and "[SQL" not in body and "SELECT" not in body
    [event] = night_events(run.run_id)
    assert (event["status"], event["unfinished_instances"], event["undelivered"]) == ("red", 1, 2)
    [night] = audit.nights(ledger_db)
    assert (night["status"], night["by_status"]) == ("red", {"sent": 1})  # the Nights page's verdict, not "sent 1"


def test_an_exception_escaping_rendering_turns_the_night_red(two_customers, run_dag, alerting, sink, ledger_db,
                                                             monkeypatch):
    """Not a RenderError (which is the document's config_error) but a bug's exception: the instance fails;
    the night must not be green for want of rows."""
    from include.invoice_mailing.render import Renderer

    context = Renderer.document_context

    def broken_for_10002(self, document, customer, *args, **kwargs):
        if customer.customer_id == "10002":
            raise ZeroDivisionError("decimal division by zero")
        return context(self, document, customer, *args, **kwargs)

    monkeypatch.setattr(Renderer, "document_context", broken_for_10002)

    run = run_dag()

    assert run.state == "failed"
    summary = audit_summary(run)
    assert summary["status"] == "red"
    assert [u["error"] for u in summary["unfinished_instances"]] == ["ZeroDivisionError: decimal division by zero"]
    (alert,) = alerting()
    assert "ZeroDivisionError: decimal division by zero" in body_of(alert) and "customer 10002" in body_of(alert)
    assert audit.nights(ledger_db)[0]["status"] == "red"

    monkeypatch.setattr(Renderer, "document_context", context)  # mended: the operator clears the run
    again = run_dag(rerun=run)
    assert again.state == "success"
    assert audit.nights(ledger_db)[0]["status"] == "green"
    assert sorted(r["ref_nbr"] for r in ledger.all_deliveries(ledger_db, ledger.delivery.c.status == "sent")) == [
        "INV000101", "INV000201", "INV000202"]


def test_an_erp_lacking_a_contract_column_fails_open_night_in_one_line(two_customers, erp_path, run_dag, alerting,
                                                                       sink):
    with two_customers.engine.begin() as conn:
        conn.execute(text("ALTER TABLE contact DROP COLUMN preferred_format"))

    run = run_dag()

    assert run.state == "failed"
    assert states(run)[("open_night", -1)] == "failed"
    assert states(run)[("extract", -1)] == "upstream_failed"
    (alert,) = alerting()  # nothing else was sent
    assert len(sink.received) == 1
    line = ("the ERP database of connection 'erp_db' does not hold the tables the project reads: table contact "
            "lacks column preferred_format (the contract: docs/erp-contract.md)")
    body = html.unescape(body_of(alert))
    assert line in body and "Traceback" not in body and "[SQL" not in body
    assert alert["Subject"].startswith("Invoice mailing manual__") and "lacks column preferred_format" in alert["Subject"]


def test_the_contract_check_names_every_gap_and_allows_an_absent_optional_table(erp):
    with erp.engine.begin() as conn:
        conn.execute(text("DROP TABLE customer_address"))
    assert missing(erp.engine) == {}  # optional: PDF and HTML go without the buyer's address
    with erp.engine.begin() as conn:
        conn.execute(text("ALTER TABLE invoice DROP COLUMN customer_ref"))
        conn.execute(text("ALTER TABLE invoice DROP COLUMN dont_email"))
        conn.execute(text("DROP TABLE mailing_recipient"))
        conn.execute(text("CREATE TABLE customer_address (customer_id VARCHAR(10), city VARCHAR(60))"))

    with pytest.raises(ErpContractError) as refused:
        check(erp.engine, "erp_db")

    said = str(refused.value)
    assert "\n" not in said
    assert "table customer_address lacks columns street, postal_code, country_code, org_number, vat_number, peppol_id" in said
    assert "table invoice lacks columns customer_ref, dont_email" in said
    assert "no table mailing_recipient" in said


def test_a_database_without_any_contract_table_is_named_as_not_the_erp(tmp_path):
    from sqlalchemy import create_engine

    with pytest.raises(ErpContractError, match=r"connection 'erp_db' holds none of the tables the project reads "
                                               r"\(customer, invoice, \.\.\.\): is it the ERP's database\?"):
        check(create_engine(f"sqlite:///{tmp_path / 'empty.db'}"), "erp_db")
