"""What an operator sees in a running Airflow: a deferred customer turns the night red, is named, and one clear mends it;
a night that fails before mailing (a wrong parameter) is mailed by the DAG's failure callback in the dag-processor;
the approval brake holds a resend of everything until a person answers (Approve, Reject, or no answer in time);
a new installation unpaused at 02:30 Oslo mails nothing before the next night.

The real topology (api-server, scheduler, dag-processor, triggerer; LocalExecutor; PostgreSQL metadata
and ledger), a real SMTP server that defers one customer's recipient, and nothing but the REST API.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select

from dev.airflow_stack import AirflowStack
from dev.smtp_sink import SmtpSink
from include.invoice_mailing import ledger
from include.invoice_mailing.bounces import BOUNCE_KEY_VARIABLE, delivery_of
from include.invoice_mailing.clock import TIMEZONE
from include.invoice_mailing.dag_settings import BOUNCES_DAG_ID as BOUNCES_DAG
from tests.conftest import smtp_connection, sqlite_connection
from tests.erp import TinyErp
from tests.test_bounce_collect import BOUNCES, KEY, postfix_dsn_for

DAG = "invoice_mailing"
OPS = "ops@fjordlys.example"
DEFERRED = "ola@havet.example"
WATCH = "invoice_mailing_watch"
LATE_SUBJECT = "Invoice mailing 2026-11-24: tonight's run has not finished"
# The watch runs of the night of 2026-11-24 (06:00 Oslo is 05:00 UTC); Airflow keys runs by logical date.
WATCH_LATE, WATCH_CALM = "2026-11-24T05:00:00Z", "2026-11-24T05:30:00Z"
# The clocks of the stacks that run the night of 2026-11-24: midday after it, so that no 02:00 or 06:00 Oslo
# passes while a test runs (it would create a scheduled night or watch run), whatever the hour of the real clock.
MIDDAY = datetime(2026, 11, 24, 12, 0, tzinfo=TIMEZONE)


@pytest.fixture
def erp(tmp_path):
    from sqlalchemy import create_engine

    erp = TinyErp(create_engine(f"sqlite:///{tmp_path / 'erp.db'}"))
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing")
    for number, address in (("10001", "kari@bolgen.example"), ("10002", DEFERRED), ("10003", "per@fjell.example")):
        erp.customer(number, invoice_email=address)
        erp.invoice(f"INV0{number}", number)
    return erp


def airflow_connections(tmp_path, sink: SmtpSink, ledger_connection: str) -> dict[str, str]:
    """The DAG's connections for the stack: the erp fixture's ERP, the ledger, the sink as relay and for alerts."""
    return {
        "AIRFLOW_CONN_ERP_DB": sqlite_connection(tmp_path / "erp.db"),
        "AIRFLOW_CONN_MAILING_LEDGER": ledger_connection,
        "AIRFLOW_CONN_SMTP_DEFAULT": smtp_connection(sink.port),
        "AIRFLOW_CONN_MAILING_ALERTS": smtp_connection(sink.port, to=OPS, from_email="airflow@fjordlys.example"),
    }


def test_a_deferred_customer_turns_the_night_red_is_named_and_one_clear_mends_it(erp, tmp_path, postgres_databases,
                                                                                  faked_clock, dovecot):
    """...and, with the bounce mailbox set (a real Dovecot), every invoice leaves with its own signed bounce
    address, and the hourly invoice_mailing_bounces DAG reads the mailbox in the real topology."""
    ledger_db, ledger_connection = postgres_databases["engines"][1], postgres_databases["connections"][1]
    bounce_login = dovecot.new_login()
    with SmtpSink() as sink:
        sink.faults.rcpt_replies[DEFERRED] = "451 4.7.1 Greylisted, try again later"
        env = {
            **airflow_connections(tmp_path, sink, ledger_connection),
            "AIRFLOW_CONN_MAILING_BOUNCES": json.dumps(dovecot.connection(bounce_login, address=BOUNCES)),
            BOUNCE_KEY_VARIABLE: KEY,
            "INVOICE_MAILING_RETRIES": "1",
            "INVOICE_MAILING_RETRY_DELAY_SECONDS": "20",
            "INVOICE_MAILING_CONCURRENCY": "2",  # long enough for the watch to see the night running
        }
        with AirflowStack(extra_env=env, fake_time=MIDDAY) as stack:
            api = stack.client()
            api.wait_for_dag(DAG)
            api.wait_for_dag(WATCH)
            api.unpause(DAG)
            api.unpause(WATCH)
            run_id = api.trigger(DAG, logical_date="2026-11-24T01:00:00Z")["dag_run_id"]

            # Named from the moment the scheduler creates them: with two instances at a time (two cores),
            # the third waits for its first try, and already carries its customer's label.
            api.wait_for_task(DAG, run_id, lambda ti: ti["task_id"] == "mail_customers" and ti["map_index"] >= 0,
                              "the mapped instances", timeout=240, interval=0.2)
            first_seen = api.task_instances(DAG, run_id, "mail_customers")
            assert sorted(ti["rendered_map_index"] for ti in first_seen) == [
                "customer 10001", "customer 10002", "customer 10003"], first_seen
            assert {ti["state"] for ti in first_seen} & {None, "scheduled", "queued"}, first_seen

            waiting = api.wait_for_task(DAG, run_id, lambda ti: ti["state"] == "up_for_retry",
                                        "an instance up for retry", timeout=240)
            assert waiting["task_id"] == "mail_customers"
            # Airflow 3.3.2 drops the label of an instance up for retry (README, "Finding the culprit")
            assert {ti["map_index"]: ti["rendered_map_index"] for ti in first_seen}[waiting["map_index"]] \
                == "customer 10002"
            # The morning watch, triggered while the night still runs: it alerts and fails.
            late = api.trigger(WATCH, logical_date=WATCH_LATE)["dag_run_id"]
            assert api.wait_for_run(WATCH, late, {"success", "failed"}, timeout=120)["state"] == "failed"

            assert api.wait_for_run(DAG, run_id, {"success", "failed"}, timeout=240)["state"] == "failed"
            assert len(api.runs(DAG)) == 1  # unpausing created no run for a night already past
            instances = {(ti["task_id"], ti["map_index"]): ti for ti in api.task_instances(DAG, run_id)}
            failed = instances[("mail_customers", waiting["map_index"])]
            assert (failed["state"], failed["rendered_map_index"]) == ("failed", "customer 10002")
            assert [ti["rendered_map_index"] for (task, _), ti in sorted(instances.items()) if task == "mail_customers"] \
                == ["customer 10001", "customer 10002", "customer 10003"]
            assert instances[("audit", -1)]["state"] == "failed"
            # a normal night passes the approval brake without asking anyone
            assert instances[("approve_night", -1)]["state"] == "success" and api.hitl_details(DAG, run_id) == []

            log = api.log(DAG, run_id, "mail_customers", failed["try_number"], failed["map_index"])
            assert re.search(r"customer 10002, INV INV010002, to o\*\*\*@havet\.example, PDF: pending deferred: "
                             r"451 4\.7\.1 Greylisted", log), log[-3000:]
            assert "Step 1 - Fetching" not in log and "fontTools" not in log

            alerts = [m for m in sink.received if m.envelope_to == [OPS]]
            assert [m.message["Subject"] for m in alerts][0] == LATE_SUBJECT  # the watch's alert came first
            alerts = [m for m in alerts if m.message["Subject"] != LATE_SUBJECT]
            assert len(alerts) == 1
            body = alerts[0].message.get_body(("html",)).get_content()
            assert "10002" in body and "INV010002" in body and "o***@havet.example" in body and "451" in body
            assert DEFERRED not in alerts[0].data.decode()
            assert f"/tasks/mail_customers/mapped/{failed['map_index']}" in body

            sink.faults.rcpt_replies.clear()  # the relay recovered
            cleared = api.clear(DAG, run_id, [["mail_customers", failed["map_index"]]])  # the API's defaults
            assert {(ti["task_id"], ti["map_index"]) for ti in cleared} == {("mail_customers", failed["map_index"]),
                                                                            ("audit", -1)}
            assert api.wait_for_run(DAG, run_id, {"success", "failed"}, timeout=240)["state"] == "success"

            api.clear(DAG, run_id, only_failed=False)  # the whole run, everything: sends nothing again
            assert api.wait_for_run(DAG, run_id, {"success", "failed"}, timeout=240)["state"] == "success"

            # data teams' DAGs saw the night red, then mended; the whole-run clear published it once more
            events = api.request("GET", "/assets/events", params={"source_run_id": run_id, "order_by": "timestamp"})
            assert [(e["source_task_id"], e["extra"]["status"]) for e in events["asset_events"]] == [
                ("publish_red", "red"), ("audit", "green"), ("audit", "green")]

            calm = api.trigger(WATCH, logical_date=WATCH_CALM)["dag_run_id"]  # tonight succeeded: quiet
            assert api.wait_for_run(WATCH, calm, {"success", "failed"}, timeout=120)["state"] == "success"

            # Later that morning the relay's DSN for Kari reaches the bounce mailbox; the hourly DAG reads it.
            [kari] = ledger.all_deliveries(ledger_db, ledger.delivery.c.recipient == "kari@bolgen.example")
            dovecot.append(bounce_login, postfix_dsn_for(kari))
            api.wait_for_dag(BOUNCES_DAG)
            api.unpause(BOUNCES_DAG)
            hourly = api.trigger(BOUNCES_DAG, logical_date=None)["dag_run_id"]
            assert api.wait_for_run(BOUNCES_DAG, hourly, {"success", "failed"}, timeout=120)["state"] == "success"
            assert "1 delivery(ies) bounced" in api.log(BOUNCES_DAG, hourly, "collect_bounces", 1)
            [bounced] = ledger.all_deliveries(ledger_db, ledger.delivery.c.id == kari["id"])
            assert (bounced["status"], bounced["reason"]) == ("bounced", "hard_bounce"), bounced
            assert bounced["detail"].startswith("5.1.1"), bounced["detail"]
            assert dovecot.messages(bounce_login) == []  # applied, so moved out of the inbox...
            # the report, as IMAP keeps it (CRLF line ends)
            assert [raw for raw, _ in dovecot.messages(bounce_login, "Processed")] == [
                postfix_dsn_for(kari).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")]

    with ledger_db.connect() as conn:
        summary = conn.execute(select(ledger.mailing_run.c.summary)
                               .where(ledger.mailing_run.c.run_id == run_id)).scalar_one()
    summary = summary if isinstance(summary, dict) else json.loads(summary)
    assert summary["by_status"] == {"sent": 3}
    invoices = Counter(m.envelope_to[0] for m in sink.received if m.envelope_to != [OPS])
    assert invoices == {"kari@bolgen.example": 1, DEFERRED: 1, "per@fjell.example": 1}
    invoice_senders = {m.envelope_to[0]: m.envelope_from for m in sink.received if m.envelope_to != [OPS]}
    delivered = {r["recipient"]: r["id"] for r in ledger.all_deliveries(ledger_db, ledger.delivery.c.last_run_id == run_id)}
    assert {to: delivery_of(sender, BOUNCES, KEY.encode()) for to, sender in invoice_senders.items()} == delivered
    ops = [m.message["Subject"] for m in sink.received if m.envelope_to == [OPS]]
    # the watch and audit's list (the failure callback saw audit had mailed); the mended night and the
    # calm watch sent none
    assert len(ops) == 2 and ops.count(LATE_SUBJECT) == 1, ops


def test_before_anything_is_mailed_a_wrong_parameter_or_the_brake_stops_the_night(erp, tmp_path, postgres_databases,
                                                                                  faked_clock):
    """A wrong parameter: open_night refuses it, audit is upstream_failed and sends nothing; the DAG's failure
    callback, which the dag-processor runs, mails the operators with the task, the reason and a link.

    The approval brake, answered through the HITL REST API as Browse → Required Actions does: a resend of
    every document waits; Approve mails them; Reject mails nothing and the night is red with an alert
    naming who; no answer within INVOICE_MAILING_BRAKE_TIMEOUT is a Reject. The ledger keeps each answer."""
    ledger_db = postgres_databases["engines"][1]
    with SmtpSink() as sink:
        env = {**airflow_connections(tmp_path, sink, postgres_databases["connections"][1]),
               "INVOICE_MAILING_RETRIES": "0",
               "INVOICE_MAILING_BRAKE_TIMEOUT": "20",
               "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "2"}  # how often the scheduler ends a wait
        with AirflowStack(extra_env=env, fake_time=MIDDAY) as stack:
            api = stack.client()
            api.wait_for_dag(DAG)
            api.unpause(DAG)
            wrong = api.trigger(DAG, logical_date="2026-11-24T01:00:00Z",
                                conf={"redirect_to": "not-an-address"})["dag_run_id"]
            assert api.wait_for_run(DAG, wrong, {"success", "failed"}, timeout=240)["state"] == "failed"
            states = {ti["task_id"]: ti["state"] for ti in api.task_instances(DAG, wrong)}
            assert (states["open_night"], states["audit"]) == ("failed", "upstream_failed")
            alert = stack.wait_until("the failure alert", lambda: next(
                (m for m in sink.received if m.envelope_to == [OPS] and wrong in m.message["Subject"]), None), 120)
            subject = alert.message["Subject"]
            assert "open_night" in subject and "redirect_to is not a valid address" in subject
            assert "/tasks/open_night" in alert.message.get_body(("html",)).get_content()

            def invoices_sent() -> list[str]:
                return [m.envelope_to[0] for m in sink.received if m.envelope_to != [OPS]]

            def held() -> tuple[str, dict]:
                """A resend of every document, triggered now: it waits for an answer, with the numbers."""
                before = invoices_sent()
                run_id = api.trigger(DAG, logical_date=None, conf={"resend": True})["dag_run_id"]
                waiting = stack.wait_until(f"{run_id} to wait for approval", lambda: next(
                    (d for d in api.hitl_details(DAG, run_id)
             if not d["response_received"] and d["task_instance"]["state"] == "awaiting_input"), None), 240)
                assert waiting["task_instance"]["task_id"] == "approve_night"
                assert "approve mailing 3 documents to 3 customers?" in waiting["subject"]
                assert "a resend of every due document" in waiting["body"] and "| NOK | 1,376.55 |" in waiting["body"]
                assert waiting["defaults"] == ["Reject"]
                assert invoices_sent() == before  # nothing is sent while it waits
                # A person answers minutes later. Airflow 3.3.2 fails a request answered before the scheduler
                # has seen the parked try's process end (the executor's "success" then meets the resumed,
                # queued try): answer once the scheduler logged it, as any person would be slower than that.
                stack.wait_until("the scheduler to see the parked try end", lambda: any(
                    "task_id=approve_night" in line and run_id in line and "state=awaiting_input" in line
                    for line in (stack.logs / "scheduler.log").read_text(errors="replace").splitlines()
                    if "TaskInstance Finished" in line), 60)
                return run_id, waiting

            approved, _ = held()
            api.answer(DAG, approved, "approve_night", ["Approve"])
            assert api.wait_for_run(DAG, approved, {"success", "failed"}, timeout=240)["state"] == "success"
            assert sorted(invoices_sent()) == ["kari@bolgen.example", DEFERRED, "per@fjell.example"]

            rejected, _ = held()
            api.answer(DAG, rejected, "approve_night", ["Reject"])
            assert api.wait_for_run(DAG, rejected, {"success", "failed"}, timeout=240)["state"] == "failed"
            states = {ti["task_id"]: ti["state"] for ti in api.task_instances(DAG, rejected)}
            assert (states["approve_night"], states["mail_customers"]) == ("failed", "upstream_failed")
            alert = stack.wait_until("the rejection's alert", lambda: next(
                (m for m in sink.received if m.envelope_to == [OPS] and rejected in m.message["Subject"]), None), 120)
            assert "approve_night" in alert.message["Subject"] and "Rejected by admin" in alert.message["Subject"]

            timed_out, _ = held()  # and nobody answers
            assert api.wait_for_run(DAG, timed_out, {"success", "failed"}, timeout=240)["state"] == "failed"
            [answer] = api.hitl_details(DAG, timed_out)
            assert answer["chosen_options"] == ["Reject"] and answer["responded_by_user"] is None
            alert = stack.wait_until("the timeout's alert", lambda: next(
                (m for m in sink.received if m.envelope_to == [OPS] and timed_out in m.message["Subject"]), None), 120)
            assert "No answer within the approval's time" in alert.message["Subject"]

    invoices = [m.envelope_to[0] for m in sink.received if m.envelope_to != [OPS]]
    assert len(invoices) == 3  # the approved night's only: the rejected and the timed-out nights mailed nothing
    assert len([m for m in sink.received if m.envelope_to == [OPS] and wrong in m.message["Subject"]]) == 1
    with ledger_db.connect() as conn:
        decisions = conn.execute(select(ledger.night_approval.c.run_id, ledger.night_approval.c.decision,
                                        ledger.night_approval.c.decided_by, ledger.night_approval.c.request)
                                 .order_by(ledger.night_approval.c.id)).all()
    assert [(r.run_id, r.decision, r.decided_by) for r in decisions] == [
        (approved, "approved", "admin"), (rejected, "rejected", "admin"), (timed_out, "timed_out", None)]
    assert all(r.request["documents"] == 3 and r.request["params"]["resend"] is True for r in decisions)


def test_a_new_installation_unpaused_at_half_past_two_mails_nothing_before_the_next_night(erp, tmp_path,
                                                                                         postgres_databases,
                                                                                         faked_clock):
    """The operator unpauses the DAG at 02:30 Oslo with invoices due: Airflow's default timetable would still run
    that morning's 02:00 night (until 04:24); ours waits for the next 02:00. The components' clocks (and the
    metadata database's now(), which decides when the scheduler creates a run) read 02:30 on 2026-11-24."""
    unpaused_at = datetime(2026, 11, 24, 2, 30, tzinfo=TIMEZONE)
    with SmtpSink() as sink:
        env = airflow_connections(tmp_path, sink, postgres_databases["connections"][1])
        with AirflowStack(extra_env=env, components=("api-server", "scheduler", "dag-processor"),
                          fake_time=unpaused_at) as stack:
            api = stack.client()
            api.wait_for_dag(DAG)
            stack.wait_until("the dag-processor's next run", lambda: api.request("GET", f"/dags/{DAG}")
                             ["next_dagrun_run_after"], timeout=60)
            api.unpause(DAG)

            def heartbeat() -> datetime:
                return datetime.fromisoformat(api.request("GET", "/monitor/health")["scheduler"]
                                              ["latest_scheduler_heartbeat"])

            # The scheduler creates a due run in the loop after the unpause; its heartbeat (every 2 s, on the
            # faked clock) moving on by 6 s means several loops have run since.
            unpaused_beat = heartbeat()
            stack.wait_until("three scheduler heartbeats after the unpause",
                             lambda: heartbeat() >= unpaused_beat + timedelta(seconds=6), timeout=90)
            assert unpaused_at <= unpaused_beat < unpaused_at + timedelta(minutes=10)  # the faked clock
            dag = api.request("GET", f"/dags/{DAG}")
            runs = api.runs(DAG)
    assert runs == []
    assert not dag["is_paused"]
    assert datetime.fromisoformat(dag["next_dagrun_run_after"]) == datetime(2026, 11, 25, 2, 0, tzinfo=TIMEZONE)
    assert sink.received == []
