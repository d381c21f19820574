"""The same DAG run with the ERP and the ledger on the PostgreSQL server, as in production."""

from __future__ import annotations

from include.invoice_mailing import ledger
from tests.erp import TinyErp


def test_dag_run_on_postgresql_sends_once_and_records_the_ledger(postgres_databases, run_dag, sink, monkeypatch):
    from include.invoice_mailing import tasks

    erp_engine, ledger_engine = postgres_databases["engines"]
    monkeypatch.setenv("AIRFLOW_CONN_ERP_DB", postgres_databases["connections"][0])
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_LEDGER", postgres_databases["connections"][1])
    tasks.engine_for.cache_clear()
    erp = TinyErp(erp_engine)
    erp.customer("10001", "Bølgen Kafé AS", invoice_email="kari@bolgen.example", email="post@bolgen.example")
    erp.customer("10002", "Havet AS", status="Inactive")
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing", "To")
    erp.recipient(setting, "Customer", "Cc")
    erp.invoice("INV000101", "10001")
    erp.invoice("CRM000045", "10001", lines=((1, "Retur, skadet vare", "1", "500", "25"),))
    erp.invoice("INV000102", "10002")

    first = run_dag()
    run_dag(rerun=first)

    assert first.state == "success"
    assert sorted(m.message["X-Invoice-Document"] for m in sink.received) == ["CRM CRM000045", "INV INV000101"]
    credit = next(m.message for m in sink.received if m.message["X-Invoice-Document"] == "CRM CRM000045")
    assert next(credit.iter_attachments()).get_filename() == "Kreditnota CRM000045.pdf"
    rows = ledger.all_deliveries(ledger_engine)
    assert sorted((r["ref_nbr"], r["recipient"], r["status"], r["reason"]) for r in rows) == [
        ("CRM000045", "kari@bolgen.example", "sent", None),
        ("CRM000045", "post@bolgen.example", "sent", None),
        ("INV000101", "kari@bolgen.example", "sent", None),
        ("INV000101", "post@bolgen.example", "sent", None),
        ("INV000102", "", "skipped", "customer_inactive"),
    ]
