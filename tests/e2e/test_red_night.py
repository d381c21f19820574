"""A red night is red in the real topology, whatever failed: Airflow's four components as processes, the REST API
the UI calls, the plugin's Nights page.

Three customers: 10001's invoice goes out; 10002's instance raises a bug's exception while rendering (not a
RenderError, so the per-delivery handling does not catch it, and no row is written); 10003's task process is
SIGKILLed at the start of its batch on both of its tries. The run must end failed, the alert must name both
customers with the first line of each error, and the Nights page must say red. Then the same ERP loses a
column the contract holds: the next night fails in open_night with one line, and nothing is mailed. The faults
come from tests/faults/sitecustomize.py, on the task processes' path only. About two minutes.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from dev.airflow_stack import ROOT, AirflowStack
from dev.smtp_sink import SmtpSink
from tests.conftest import smtp_connection, sqlite_connection
from tests.erp import TinyErp

DAG = "invoice_mailing"
OPS = "ops@fjordlys.example"
FAULTS = Path(__file__).resolve().parents[1] / "faults"


def test_failed_and_killed_instances_turn_the_night_red_and_a_missing_column_stops_it_at_open_night(
        tmp_path, postgres_databases):
    erp = TinyErp(create_engine(f"sqlite:///{tmp_path / 'erp.db'}"))
    for customer, address in (("10001", "kari@bolgen.example"), ("10002", "ola@havet.example"),
                              ("10003", "per@fjell.example")):
        erp.customer(customer, invoice_email=address)
        erp.recipient(erp.setting(customer_id=customer), "Invoicing")
        erp.invoice(f"INV{customer}", customer)
    with SmtpSink() as relay, SmtpSink() as operators:
        env = {
            "PYTHONPATH": f"{FAULTS}:{ROOT}:{ROOT / 'config'}",
            "INVOICE_MAILING_TEST_FAULTS": json.dumps({"render_error": ["10002"], "sigkill": ["10003"]}),
            "AIRFLOW_CONN_ERP_DB": sqlite_connection(tmp_path / "erp.db"),
            "AIRFLOW_CONN_MAILING_LEDGER": postgres_databases["connections"][1],
            "AIRFLOW_CONN_SMTP_DEFAULT": smtp_connection(relay.port),
            "AIRFLOW_CONN_MAILING_ALERTS": smtp_connection(operators.port, to=OPS, from_email="airflow@fjordlys.example"),
            "INVOICE_MAILING_RETRIES": "1",
            "INVOICE_MAILING_RETRY_DELAY_SECONDS": "1",
        }
        with AirflowStack(extra_env=env) as stack:
            api = stack.client()
            api.wait_for_dag(DAG)
            api.unpause(DAG)
            run_id = api.trigger(DAG, logical_date="2026-11-24T01:00:00Z")["dag_run_id"]
            assert api.wait_for_run(DAG, run_id, {"success", "failed"}, timeout=300)["state"] == "failed"
            # by map index: a process killed before it ran has no rendered label ("customer 10003") in Airflow
            instances = {ti["map_index"]: ti for ti in api.task_instances(DAG, run_id, "mail_customers")}
            summary = api.request("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/audit/xcomEntries/summary",
                                  params={"map_index": -1})["value"]
            alert = stack.wait_until("the red night's alert", lambda: next(
                (m.message for m in operators.received if m.envelope_to == [OPS]), None), timeout=60)
            with httpx.Client(base_url=f"{stack.url}/invoice-mailing", timeout=60,
                              headers={"Authorization": f"Bearer {stack.token()}"}) as pages:
                nights_page = pages.get("/nights").text
                nights_json = pages.get("/api/nights").json()

            # The ERP loses a column of the contract: the next night stops at once, in one line.
            with erp.engine.begin() as conn:
                conn.execute(text("ALTER TABLE contact DROP COLUMN preferred_format"))
            operators.received.clear()
            second = api.trigger(DAG, logical_date="2026-11-25T01:00:00Z")["dag_run_id"]
            assert api.wait_for_run(DAG, second, {"success", "failed"}, timeout=300)["state"] == "failed"
            second_states = {ti["task_id"]: ti["state"] for ti in api.task_instances(DAG, second)}
            contract_alert = stack.wait_until("the failed night's alert", lambda: next(
                (m.message for m in operators.received if m.envelope_to == [OPS]), None), timeout=90)

    if isinstance(summary, str):
        summary = json.loads(summary)
    assert [m.envelope_to for m in relay.received] == [["kari@bolgen.example"]]
    assert {index: ti["state"] for index, ti in instances.items()} == {0: "success", 1: "failed", 2: "failed"}
    assert instances[2]["try_number"] == 2  # 10003's, killed on its retry too
    assert summary["status"] == "red" and summary["why"].startswith("2 of 3 mailing instances did not succeed (customer 10002, customer 10003)")
    errors = {u["label"]: u["error"] for u in summary["unfinished_instances"]}
    assert errors["customer 10002"] == "ZeroDivisionError: decimal division by zero"
    assert errors["customer 10003"].startswith("failed without recording why: the task process was killed")
    assert {u["document"] for u in summary["undelivered"]} == {"INV INV10002", "INV INV10003"}
    body = html.unescape(alert.get_body(("html",)).get_content())
    assert "2 mailing instances failed" in alert["Subject"]
    assert "customer 10002" in body and "ZeroDivisionError: decimal division by zero" in body
    assert "customer 10003" in body and "the task process was killed" in body
    [night] = [n for n in nights_json if n["run_id"] == run_id]
    # 10002's delivery was decided before its rendering raised: pending; 10003's batch died before any row
    assert night["status"] == "red" and night["by_status"] == {"pending": 1, "sent": 1}
    assert 'class="night red"' in nights_page

    assert second_states["open_night"] == "failed" and second_states["extract"] == "upstream_failed"
    said = html.unescape(contract_alert.get_body(("html",)).get_content())
    assert ("the ERP database of connection 'erp_db' does not hold the tables the project reads: table contact "
            "lacks column preferred_format (the contract: docs/erp-contract.md)") in said
    assert "[SQL" not in said and "Traceback" not in said
