"""A failed night always alerts, once: the DAG run with dag.test() against a real SMTP server as the
``mailing_alerts`` connection, with open_night, extract or audit failing.

audit mails the deliveries not sent (it reads them from the ledger); every other failed run is mailed
by the DAG's failure callback, which needs neither the ledger nor the pipeline.
"""

from __future__ import annotations

import json

import pytest

from include.invoice_mailing import tasks
from tests.conftest import OPS, night_events, sqlite_connection


@pytest.fixture
def one_invoice(erp):
    erp.customer("10001", invoice_email="kari@bolgen.example")
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing")
    erp.invoice("INV000101", "10001")
    return erp


def body_of(message) -> str:
    return message.get_body(("html",)).get_content()


def states(run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in run.get_task_instances()}


def test_a_wrong_parameter_fails_open_night_and_mails_one_alert_naming_it(one_invoice, run_dag, alerting, sink):
    run = run_dag(conf={"redirect_to": "not-an-address"})

    assert run.state == "failed"
    assert states(run)["open_night"] == "failed" and states(run)["audit"] == "upstream_failed"
    (alert,) = alerting()
    assert "open_night" in alert["Subject"] and "redirect_to is not a valid address" in alert["Subject"]
    body = body_of(alert)
    assert "ParamError: redirect_to is not a valid address" in body
    assert f"/runs/{run.run_id.replace(':', '%3A').replace('+', '%2B')}/tasks/open_night\"" in body
    assert [m for m in sink.received if m.envelope_to != [OPS]] == []  # no customer was mailed


def unreachable_ledger(kind: str, tmp_path) -> str:
    if kind == "sqlite":
        return sqlite_connection(tmp_path / "no-such-folder" / "ledger.db")
    return json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": 1, "login": "postgres",
                       "schema": "ledger"})


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_an_unreachable_ledger_fails_open_night_and_still_alerts(kind, one_invoice, run_dag, alerting, monkeypatch,
                                                                   tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_LEDGER", unreachable_ledger(kind, tmp_path))
    tasks.engine_for.cache_clear()

    run = run_dag()

    assert run.state == "failed" and states(run)["open_night"] == "failed"
    (alert,) = alerting()
    assert "open_night" in alert["Subject"] and "OperationalError" in alert["Subject"]
    assert "OperationalError" in body_of(alert)


def test_an_unreachable_erp_fails_open_night_and_the_alert_says_why(one_invoice, run_dag, alerting, monkeypatch,
                                                                     tmp_path, sink):
    monkeypatch.setenv("AIRFLOW_CONN_ERP_DB", sqlite_connection(tmp_path / "no-such-folder" / "erp.db"))
    tasks.engine_for.cache_clear()

    run = run_dag()

    assert run.state == "failed" and states(run)["open_night"] == "failed"
    (alert,) = alerting()
    assert "open_night" in alert["Subject"] and "OperationalError" in alert["Subject"]
    assert "unable to open database file" in body_of(alert) and "[SQL" not in body_of(alert)
    assert [m for m in sink.received if m.envelope_to != [OPS]] == []


def test_an_erp_lost_after_open_night_fails_extract_and_the_alert_names_extract_and_why(one_invoice, run_dag, alerting,
                                                                                        monkeypatch, tmp_path):
    opened = tasks.open_night

    def open_then_lose_the_erp(**kwargs):
        opened(**kwargs)  # the ERP answered the contract check; then it went away
        monkeypatch.setenv("AIRFLOW_CONN_ERP_DB", sqlite_connection(tmp_path / "no-such-folder" / "erp.db"))
        tasks.engine_for.cache_clear()

    monkeypatch.setattr(tasks, "open_night", open_then_lose_the_erp)

    run = run_dag()

    assert run.state == "failed"
    assert states(run)["extract"] == "failed" and states(run)["audit"] == "failed"
    (alert,) = alerting()  # audit has no deliveries to list: the failure callback mails, once
    assert "extract" in alert["Subject"] and "OperationalError" in alert["Subject"]
    body = body_of(alert)
    assert "unable to open database file" in body and "/tasks/extract\"" in body
    assert "extract did not finish" in body  # and audit's own failure, on its row
    # data teams see the red night too: publish_red published what audit found
    [event] = night_events(run.run_id)
    assert (event["status"], event["why"]) == ("red", "extract did not finish, nothing was mailed")


@pytest.fixture
def ledger_goes_down_at_audit(backend, run_dag, monkeypatch, request):
    """The night's ledger on SQLite or PostgreSQL, reachable until audit starts, then gone."""
    from include.invoice_mailing import pipeline

    erp_engine, ledger_engine = backend["engines"]
    monkeypatch.setenv("AIRFLOW_CONN_ERP_DB", backend["connections"][0])
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_LEDGER", backend["connections"][1])
    tasks.engine_for.cache_clear()
    audit = pipeline.audit

    def gone_then_audit(engine, run_id):
        engine.dispose()
        if backend["name"] == "sqlite":
            path = request.getfixturevalue("tmp_path") / "ledger.db"
            if path.is_file():  # audit's retries find it gone too
                path.unlink()
                path.mkdir()  # a folder where the file was: SQLite cannot open it
        else:
            from sqlalchemy import create_engine

            from tests.conftest import POSTGRES_ADMIN_URL

            admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{ledger_engine.url.database}" WITH (FORCE)')
            admin.dispose()
        return audit(engine, run_id)

    monkeypatch.setattr(pipeline, "audit", gone_then_audit)
    from tests.erp import TinyErp

    erp = TinyErp(erp_engine)
    erp.customer("10001", invoice_email="kari@bolgen.example")
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing")
    erp.invoice("INV000101", "10001")
    return run_dag


def test_a_ledger_down_at_audit_still_alerts(ledger_goes_down_at_audit, alerting, sink):
    run = ledger_goes_down_at_audit()

    assert run.state == "failed"
    assert states(run)["mail_customers"] == "success" and states(run)["audit"] == "failed"
    assert [m.envelope_to for m in sink.received if m.envelope_to != [OPS]] == [["kari@bolgen.example"]]
    (alert,) = alerting()
    assert "audit" in alert["Subject"]
    body = body_of(alert)
    assert "/tasks/audit\"" in body and ("OperationalError" in body or "ProgrammingError" in body)
    [event] = night_events(run.run_id)  # audit could not count: the night is still published, red
    assert event["status"] == "red" and "audit could not read the ledger" in event["why"]


def test_a_red_night_is_mailed_once_by_audit_with_its_deliveries(one_invoice, run_dag, alerting, sink):
    sink.faults.rcpt_replies["kari@bolgen.example"] = "550 5.1.1 <kari@bolgen.example>: no such user"

    run = run_dag()

    assert run.state == "failed"
    (alert,) = alerting()  # audit's list; the failure callback sees audit mailed and stays silent
    assert "1 delivery not sent (1 customer)" in alert["Subject"]
    assert "recipient_rejected" in body_of(alert)
    [event] = night_events(run.run_id)  # published red, counted, without the customer's address
    assert (event["status"], event["undelivered"], event["by_status"]) == ("red", 1, {"failed": 1})
    assert "bolgen" not in json.dumps(event)


def test_a_red_night_is_published_red_and_again_green_once_mended(one_invoice, run_dag, alerting, sink):
    sink.faults.rcpt_replies["kari@bolgen.example"] = "451 4.7.1 <kari@bolgen.example>: greylisted"
    run = run_dag()
    assert run.state == "failed"

    sink.faults.rcpt_replies.clear()  # the relay recovered; the operator clears the run
    assert run_dag(rerun=run).state == "success"

    assert [(e["status"], e["by_status"]) for e in night_events(run.run_id)] == [
        ("red", {"pending": 1}), ("green", {"sent": 1})]


def test_a_run_cleared_before_the_failure_callback_runs_is_not_alerted_again(one_invoice, run_dag, alerting, sink):
    """The dag-processor runs the failure callback seconds after the run failed. An operator who clears the
    run meanwhile starts audit's next try, which removes its XCom "alerted": the callback must not then
    mail a second, reasonless alert (seen in the real topology). The new try alerts if it fails again."""
    from types import SimpleNamespace

    from airflow.models.taskinstance import TaskInstance, clear_task_instances
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import delete, select

    from include.invoice_mailing.alerts import NightFailed

    sink.faults.rcpt_replies["kari@bolgen.example"] = "451 4.7.1 <kari@bolgen.example>: greylisted"
    run = run_dag()
    assert run.state == "failed" and len(alerting()) == 1  # audit's list
    context = {"dag": SimpleNamespace(dag_id=run.dag_id), "run_id": run.run_id, "reason": "task_failure"}
    with create_session() as session:
        failed = session.scalars(select(TaskInstance).where(
            TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id,
            TaskInstance.state.in_(["failed", "upstream_failed"]))).all()
        clear_task_instances(failed, session)
        session.execute(delete(XComModel).where(XComModel.run_id == run.run_id, XComModel.task_id == "audit"))

    NightFailed()(context)

    assert len(alerting()) == 1


def test_a_run_mended_before_the_failure_callback_runs_is_not_alerted_again(one_invoice, run_dag, alerting, sink):
    """On a fast machine the operator's clear and its new tries can finish before the dag-processor comes
    round to the failure callback (seen in CI): audit's new try removed its "alerted" and every instance is
    green. The callback must stay silent then too, not mail "no reason recorded" about a mended night."""
    from types import SimpleNamespace

    from include.invoice_mailing.alerts import NightFailed

    sink.faults.rcpt_replies["kari@bolgen.example"] = "451 4.7.1 <kari@bolgen.example>: greylisted"
    run = run_dag()
    assert run.state == "failed" and len(alerting()) == 1  # audit's list
    sink.faults.rcpt_replies.clear()
    assert run_dag(rerun=run).state == "success"  # cleared and mended

    NightFailed()({"dag": SimpleNamespace(dag_id=run.dag_id), "run_id": run.run_id, "reason": "task_failure"})

    assert len(alerting()) == 1


def test_a_green_night_mails_no_alert_and_is_published_once(one_invoice, run_dag, alerting):
    run = run_dag()
    assert run.state == "success"
    assert alerting() == []
    assert [e["status"] for e in night_events(run.run_id)] == ["green"]


def test_a_failure_with_no_reason_recorded_still_alerts_with_airflows_reason(airflow_db, alerting):
    """An instance killed before it could record why (or a deadlock, where Airflow blames no instance)."""
    from types import SimpleNamespace

    from include.invoice_mailing.alerts import NightFailed

    NightFailed()({"dag": SimpleNamespace(dag_id="invoice_mailing"), "run_id": "manual__gone",
                   "reason": "all_tasks_deadlocked"})

    (alert,) = alerting()
    assert alert["Subject"] == ("Invoice mailing manual__gone: the night failed: no reason recorded "
                                "(Airflow says: all_tasks_deadlocked); see the log")
    assert "/dags/invoice_mailing/runs/manual__gone\"" in body_of(alert)
