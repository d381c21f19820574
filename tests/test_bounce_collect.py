"""Spec section 9, reading the bounce mailbox: a night reads it before it mails, the hourly DAG between
nights; a bad report, or a mailbox that cannot be read, changes nothing and says so in one line.
dag.test() runs against a real IMAP server (Dovecot) and the real SMTP sink, each test with the ERP and
the ledger on SQLite files and then on the PostgreSQL server."""

from __future__ import annotations

import json
import logging
import uuid
from datetime import timedelta

import pytest

from dev.smtp_sink import free_port
from include.invoice_mailing import clock, ledger, tasks
from include.invoice_mailing.bounce_collect import Collected, collect
from include.invoice_mailing.bounce_mailbox import BounceMailbox
from include.invoice_mailing.bounces import BOUNCE_KEY_VARIABLE, verp_sender
from include.invoice_mailing.dag_settings import DAG_ID
from tests.conftest import ROOT, smtp_connection
from tests.erp import TinyErp
from tests.test_bounce_ledger import sent_row
from tests.test_bounce_reports import fixture

BOUNCES = "bounces@fjordlys.example"
KEY = "a-bounce-key-of-this-test-only-32-bytes-or-more"
OPS = "ops@fjordlys.example"
KARI = "kari@bolgen.example"


@pytest.fixture
def databases(backend, connections, monkeypatch) -> dict:
    """The ERP and the ledger of this test on SQLite files, then on the PostgreSQL server: the DAG's
    connections point at them, so every test of this module runs on both."""
    monkeypatch.setenv("AIRFLOW_CONN_ERP_DB", backend["connections"][0])
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_LEDGER", backend["connections"][1])
    tasks.engine_for.cache_clear()
    return backend


@pytest.fixture
def erp(databases) -> TinyErp:
    return TinyErp(databases["engines"][0])


@pytest.fixture
def ledger_db(databases):
    return databases["engines"][1]


@pytest.fixture
def kafe(erp):
    erp.customer("10001", "Bølgen Kafé AS", invoice_email=KARI)
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing", "To")
    erp.invoice("INV000101", "10001")
    return erp


@pytest.fixture
def mailbox(dovecot, monkeypatch, sink) -> str:
    """A fresh login on the module's Dovecot as the connection mailing_bounces, the bounce key, the alerts."""
    login = dovecot.new_login()
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps(dovecot.connection(login, address=BOUNCES)))
    monkeypatch.setenv(BOUNCE_KEY_VARIABLE, KEY)
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_ALERTS", smtp_connection(sink.port, to=OPS))
    return login


def postfix_dsn_for(row: dict) -> bytes:
    """The Postfix fixture's hard bounce, rewritten to be about this delivery: its VERP address, its
    recipient and its message's Message-ID."""
    raw = fixture("postfix-5.1.1-hard.eml")
    raw = raw.replace(b"bounces+101-yqwuy5dschtzxjcm@fjordlys.example",
                      verp_sender(BOUNCES, row["id"], KEY.encode()).encode())
    raw = raw.replace(b"ap@nordvik-bygg.example", row["recipient"].encode())
    return raw.replace(b"<10042.pdf.3f1c2a9be07d4c6a81b2e5f0@fjordlys.example>", row["message_id"].encode())


def collected(run) -> dict:
    """What collect_bounces of a dag.test() run returned (its XCom)."""
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        value = session.execute(select(XComModel.value).where(
            XComModel.dag_id == run.dag_id, XComModel.run_id == run.run_id,
            XComModel.task_id == "collect_bounces", XComModel.key == "return_value")).first()
    return XComModel.deserialize_value(value)


def ops_mail(sink) -> list:
    return [m.message for m in sink.received if m.envelope_to == [OPS]]


def run_hourly(date: str = "2026-11-24T10:30:00+00:00"):
    import pendulum
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("invoice_mailing_bounces")
    return dag.test(logical_date=pendulum.parse(date))


def sent_to_kari(ledger_db) -> dict:
    [row] = ledger.all_deliveries(ledger_db, ledger.delivery.c.recipient == KARI)
    return row


def test_a_night_applies_the_bounce_of_the_night_before_and_leaves_an_auto_reply(kafe, mailbox, dovecot, run_dag,
                                                                                    ledger_db, sink):
    assert run_dag("2026-11-23").state == "success"
    row = sent_to_kari(ledger_db)
    assert row["status"] == "sent" and sink.received[0].envelope_from == verp_sender(BOUNCES, row["id"], KEY.encode())
    report, auto_reply = postfix_dsn_for(row), fixture("auto-reply-rfc3834.eml")
    dovecot.append(mailbox, report)
    dovecot.append(mailbox, auto_reply)

    run = run_dag("2026-11-24")

    assert run.state == "success"  # a bounce alone does not turn a night red
    row = sent_to_kari(ledger_db)
    assert (row["status"], row["reason"]) == ("bounced", "hard_bounce")
    assert row["detail"].startswith("5.1.1 550 5.1.1 <kari@bolgen.example>: Recipient address rejected")
    assert [raw for raw, _ in dovecot.messages(mailbox, "Processed")] == [report.replace(b"\n", b"\r\n")]
    assert dovecot.messages(mailbox) == [(auto_reply.replace(b"\n", b"\r\n"), set())]  # unread, still there
    assert collected(run) | {"why": None} == {"read": True, "why": None, "messages": 2, "bounced": 1, "noted": 0,
                                              "moved": 1, "left": 1, "quarantined": [],
                                              "stopped": None, "read_before": 0}
    assert ops_mail(sink) == []  # nothing to warn about: the morning's watch lists the bounce


def test_a_report_too_long_for_the_ledger_is_applied_clipped_and_one_that_cannot_be_is_quarantined(
        kafe, mailbox, dovecot, run_dag, ledger_db, sink, monkeypatch):
    """Issue 31: a report whose own Message-ID was longer than its column (250) raised DataError on PostgreSQL
    inside collect(): collect_bounces failed, extract, approve_night and mail_customers were upstream_failed,
    and the report stayed in the INBOX to fail every later night the same way. Every value taken from a
    report is clipped to its column, without NUL bytes; a report that still cannot be applied goes to the
    quarantine folder (never deleted) with its reason in the alert, and the night goes on."""
    from include.invoice_mailing import bounce_collect

    assert run_dag("2026-11-23").state == "success"
    row = sent_to_kari(ledger_db)
    long_id = b"<" + b"x" * 300 + b"@relay.example>"
    report = postfix_dsn_for(row).replace(b"<20261124010311.4Xk2Lz1d9Yz9sWc@smtp.fjordlys.example>", long_id)
    report = report.replace(b"Recipient address rejected", b"Recipient\x00 address rejected")
    poison = fixture("postfix-5.1.1-hard.eml").replace(b"Undelivered Mail Returned to Sender", b"Poison report")
    dovecot.append(mailbox, report)
    dovecot.append(mailbox, poison)
    applied = bounce_collect.apply_report

    def apply_or_break(engine, parsed, raw, **kwargs):
        if b"Poison report" in raw:
            raise ValueError("a value the ledger cannot take")
        return applied(engine, parsed, raw, **kwargs)

    monkeypatch.setattr(bounce_collect, "apply_report", apply_or_break)
    run = run_dag("2026-11-24")

    assert run.state == "success"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["collect_bounces"] == states["extract"] == "success", states
    row = sent_to_kari(ledger_db)
    assert row["status"] == "bounced" and "\x00" not in row["detail"]
    [kept] = bounce_reports(ledger_db)
    assert kept["report_message_id"] == long_id.decode()[:250] and "\x00" not in kept["diagnostic"]
    assert [raw for raw, _ in dovecot.messages(mailbox, "Quarantine")] == [crlf(poison)]
    assert dovecot.messages(mailbox) == []  # nothing left to fail the next night
    assert collected(run)["quarantined"] == ["UID 2: ValueError: a value the ledger cannot take"]
    [warning] = ops_mail(sink)
    assert "1 bounce report(s) moved to Quarantine" in warning["Subject"]
    assert "UID 2: ValueError: a value the ledger cannot take" in warning.get_body(("html",)).get_content()


def test_the_morning_watch_lists_new_bounces_with_the_customer_and_the_masked_address(kafe, mailbox, dovecot,
                                                                                      run_dag, ledger_db, sink):
    from airflow.dag_processing.dagbag import DagBag

    run_dag("2026-11-23")
    dovecot.append(mailbox, postfix_dsn_for(sent_to_kari(ledger_db)))
    run_dag("2026-11-24")

    # The watch's own verdict (here: no night at this hour) is unchanged; its mail carries the bounce.
    DagBag(dag_folder=str(ROOT / "dags")).get_dag("invoice_mailing_watch").test(
        logical_date=clock.now() + timedelta(minutes=1))

    [alert] = ops_mail(sink)
    body = alert.get_body(("html",)).get_content()
    assert "1 delivery bounced" in body and "Correct the address in the ERP" in body
    assert "<td>10001</td><td>INV INV000101</td><td>k***@bolgen.example</td><td>hard_bounce</td>" in body
    assert KARI not in body


@pytest.mark.parametrize("failure", ["down", "login refused"])
def test_a_mailbox_that_cannot_be_read_does_not_stop_the_night_and_the_warning_says_so(failure, kafe, mailbox,
                                                                                       dovecot, run_dag, ledger_db,
                                                                                       sink, monkeypatch):
    waiting = crlf(fixture("postfix-5.1.1-hard.eml"))  # a report the night would read if it could log in
    dovecot.append(mailbox, waiting)
    if failure == "down":
        port = free_port()  # nothing listens there
        refused = dict(dovecot.connection("bounces", address=BOUNCES), port=port)
        why = f"(bounces@127.0.0.1:{port}): cannot connect: [Errno 111] Connection refused"
    else:
        refused = dict(dovecot.connection(mailbox, address=BOUNCES), password="not-the-secret")
        why = (f"({mailbox}@127.0.0.1:{dovecot.port}): the server refused the login: [AUTHENTICATIONFAILED] "
               "Authentication failed.")
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps(refused))

    run = run_dag("2026-11-24")

    assert run.state == "success"
    assert sent_to_kari(ledger_db)["status"] == "sent" and bounce_reports(ledger_db) == []
    assert [m.envelope_to for m in sink.received if m.envelope_to != [OPS]] == [[KARI]]  # the night mailed
    assert collected(run)["read"] is False and collected(run)["why"].endswith(why)
    [warning] = ops_mail(sink)
    assert warning["Subject"] == f"Invoice mailing {run.run_id}: the bounces were not read"
    assert why in warning.get_body(("html",)).get_content()
    assert dovecot.messages(mailbox) == [(waiting, set())] and dovecot.folders(mailbox) == ["INBOX"]


def test_without_the_connection_nothing_is_read(kafe, run_dag, ledger_db, sink, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_MAILING_BOUNCES", raising=False)

    run = run_dag("2026-11-24")

    assert run.state == "success"
    assert collected(run) == {"read": False, "why": "no connection mailing_bounces", "messages": 0, "bounced": 0,
                              "noted": 0, "moved": 0, "left": 0, "quarantined": [],
                              "stopped": None, "read_before": 0}
    assert [m.envelope_from for m in sink.received] == ["faktura@fjordlys.example"]  # no VERP either


def test_the_hourly_dag_applies_a_report_and_the_same_report_again_changes_nothing(kafe, mailbox, dovecot,
                                                                                    run_dag, ledger_db):
    run_dag("2026-11-23")
    report = postfix_dsn_for(sent_to_kari(ledger_db))
    dovecot.append(mailbox, report)

    assert run_hourly("2026-11-24T10:30:00+00:00").state == "success"
    bounced = sent_to_kari(ledger_db)
    assert bounced["status"] == "bounced"

    dovecot.append(mailbox, report)  # the relay sent it twice, or someone moved it back
    run = run_hourly("2026-11-24T11:30:00+00:00")

    assert run.state == "success"
    assert sent_to_kari(ledger_db) == bounced
    with ledger_db.connect() as conn:
        assert conn.execute(ledger.select(ledger.func.count()).select_from(ledger.bounce_report)).scalar() == 1
    assert len(dovecot.messages(mailbox, "Processed")) == 2 and dovecot.messages(mailbox) == []


# --- bad input ----------------------------------------------------------------------------------------

ORDRE = "ordre@bakke-verksted.example"
HAVET = "post@havet.example"


def crlf(raw: bytes) -> bytes:
    """A message with the CRLF line ends IMAP serves: appended so, it reads back byte for byte."""
    return raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def seeded(ledger_db) -> list[dict]:
    """Three live deliveries sent last night, straight into the ledger (no night needed to read reports)."""
    ledger.ensure_schema(ledger_db)
    rows = [sent_row(1, KARI, "<10001.pdf.5d0c1e2f3a4b5c6d7e8f9a0b@fjordlys.example>"),
            sent_row(2, ORDRE, "<10074.pdf.2b3c4d5e6f708192a3b4c5d6@fjordlys.example>"),
            sent_row(3, HAVET, "<10075.pdf.0f1e2d3c4b5a69788796a5b4@fjordlys.example>")]
    yesterday = clock.now() - timedelta(days=1)  # the reports arrive now: within the tokens' 90 days
    rows = [row | {"sent_at": yesterday} for row in rows]
    with ledger_db.begin() as conn:
        conn.execute(ledger.insert(ledger.delivery), rows)
    return ledger.all_deliveries(ledger_db, ledger.delivery.c.id.in_([1, 2, 3]))


def bounce_reports(ledger_db) -> list[dict]:
    with ledger_db.connect() as conn:
        return [dict(r) for r in conn.execute(ledger.select(ledger.bounce_report)
                                              .order_by(ledger.bounce_report.c.id)).mappings()]


def test_one_pass_applies_the_good_reports_and_leaves_each_bad_one_as_it_was_with_a_log_line(
        mailbox, dovecot, ledger_db, caplog):
    kari, ordre, havet = seeded(ledger_db)
    havet_verp = verp_sender(BOUNCES, havet["id"], KEY.encode())
    mac = havet_verp.split("-")[-1].split("@")[0]
    stranger = "<10099.pdf.ffffffffffffffffffffffff@fjordlys.example>"  # a Message-ID this ledger never sent
    # Each bad report is about Havet's delivery, by its VERP address: none of them may bounce it.
    broken = fixture("broken-mime.eml").replace(b"bounces+113-vepa7bn3rr2c4sub@fjordlys.example",
                                                havet_verp.encode())
    forged = postfix_dsn_for(havet).replace(mac.encode(), (("b" if mac[0] == "a" else "a") + mac[1:]).encode())
    forged = forged.replace(havet["message_id"].encode(), stranger.encode())
    nobody = postfix_dsn_for(sent_row(999, "ukjent@fjellet.example", stranger))  # a valid token, no such delivery
    huge = postfix_dsn_for(havet) + b"x" * 998 * (20 * 1024 + 10)  # 20 MB, above the reader's limit of 10 MB
    # A report in a charset nobody knows is still read (with replacement characters) and applied.
    charset = fixture("unknown-charset.eml").replace(b"bounces+114-kejngi5hcugcba5m@fjordlys.example",
                                                     verp_sender(BOUNCES, ordre["id"], KEY.encode()).encode())
    inbox = [crlf(raw) for raw in (broken, postfix_dsn_for(kari), forged, nobody, huge, charset)]
    for raw in inbox:
        dovecot.append(mailbox, raw)
    uids = dict(zip(("broken", "kari", "forged", "nobody", "huge", "charset"), range(1, 7), strict=True))

    with caplog.at_level(logging.INFO), BounceMailbox.from_connection() as reader:
        done = collect(ledger_db, reader, key=KEY.encode(), run_id="scheduled__2026-11-25")

    assert done == Collected(read=True, messages=5, bounced=2, noted=0, moved=2, left=4)
    # The bad ones stay in the folder as they came, unread; the good ones moved.
    assert dovecot.messages(mailbox) == [(raw, set()) for raw in (inbox[0], inbox[2], inbox[3], inbox[4])]
    assert dovecot.messages(mailbox, "Processed") == [(inbox[1], set()), (inbox[5], set())]
    after = {row["id"]: row for row in ledger.all_deliveries(ledger_db)}
    assert after[havet["id"]] == havet
    assert (after[kari["id"]]["status"], after[ordre["id"]]["status"]) == ("bounced", "bounced")
    assert "Mottakeren finnes ikke" in after[ordre["id"]]["detail"]
    assert [r["delivery_id"] for r in bounce_reports(ledger_db)] == [kari["id"], ordre["id"]]
    # One line each, naming the message by its UID and saying what was wrong with it.
    assert f"UID {uids['broken']} left in INBOX, unread: unreadable (broken MIME structure" in caplog.text
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert f"UID {uids['broken']} left in INBOX, unread: unreadable" in warnings  # not one more auto-reply
    assert (f"UID {uids['forged']} left in INBOX, unread: a hard report not applied: the report names no "
            "delivery of this ledger (no verified VERP address") in caplog.text
    assert f"UID {uids['nobody']} left in INBOX, unread: a hard report not applied: delivery 999 does not exist" in (
        caplog.text)
    assert f"message UID {uids['huge']} in INBOX is {len(inbox[4])} bytes, above the limit of 10485760: left " \
           "there, unread" in caplog.text
    assert "5 message(s) read, 2 delivery(ies) bounced, 0 noted, 2 report(s) moved to Processed, 4 left in INBOX" in (
        caplog.text)


def test_a_report_larger_than_256_kb_is_read_from_its_first_256_kb_and_applied(mailbox, dovecot, ledger_db):
    """Issue 31, finding 3: every message was fetched and parsed whole (up to 10 MB), and the standard library
    takes worse than quadratic time over a long header. Only a message's first 256 kB are fetched: a DSN's own
    parts come first, so a report with the returned invoice attached is still applied; the ledger keeps what was
    read, and the whole message moves to Processed."""
    from include.invoice_mailing.bounces import READ_BYTES

    kari, _, _ = seeded(ledger_db)
    boundary = b"--4Xk2Lz1d9Yz9sWc.1763946191/smtp.fjordlys.example"
    pdf = b"\n".join([b"JVBERi0xLjcK" * 6] * 6000)  # 430 kB of base64: the returned invoice's PDF
    report = crlf(postfix_dsn_for(kari).replace(boundary + b"--", boundary + b"\nContent-Type: application/pdf\n"
                                                b"Content-Transfer-Encoding: base64\n\n" + pdf + b"\n" + boundary + b"--"))
    assert len(report) > 400_000
    dovecot.append(mailbox, report)

    with BounceMailbox.from_connection() as reader:
        done = collect(ledger_db, reader, key=KEY.encode(), run_id="scheduled__2026-11-25")

    assert (done.messages, done.bounced, done.moved, done.left) == (1, 1, 1, 0)
    assert ledger.all_deliveries(ledger_db, ledger.delivery.c.id == kari["id"])[0]["status"] == "bounced"
    [kept] = bounce_reports(ledger_db)
    assert kept["raw"] == report[:READ_BYTES] and len(kept["raw"]) == 256 * 1024
    assert dovecot.messages(mailbox, "Processed") == [(report, set())]  # the mailbox keeps it whole


def test_a_pass_ends_at_its_time_budget_and_leaves_the_rest_for_the_next(mailbox, dovecot, ledger_db, caplog):
    """A pass reads for at most its budget (10 minutes), between two messages; what it did not reach stays
    in the folder, unread, for the next pass, and the night goes on to mail."""
    kari, _, _ = seeded(ledger_db)
    dovecot.append(mailbox, crlf(postfix_dsn_for(kari)))

    with caplog.at_level(logging.WARNING), BounceMailbox.from_connection() as reader:
        done = collect(ledger_db, reader, key=KEY.encode(), run_id="r", budget=timedelta(0))

    assert done.stopped == "stopped after 0 minutes, at UID 1: the messages from there on wait for the next pass"
    assert (done.messages, done.bounced, done.moved) == (0, 0, 0) and done.stopped in caplog.text
    assert dovecot.messages(mailbox) == [(crlf(postfix_dsn_for(kari)), set())]
    assert ledger.all_deliveries(ledger_db, ledger.delivery.c.id == kari["id"])[0]["status"] == "sent"


def test_a_message_left_for_good_is_parsed_once_until_its_folder_changes_uidvalidity(mailbox, dovecot, ledger_db,
                                                                                     monkeypatch):
    """Issue 31, finding 3: the messages left in the folder (auto-replies, answers, the unreadable) were fetched
    and parsed again on every pass, every hour. The ledger remembers each by the folder's UIDVALIDITY and its
    UID: the next pass fetches only what is new. A report that names no delivery yet is read again (it may
    apply later), and a folder with a new UIDVALIDITY (recreated) is read whole."""
    from include.invoice_mailing import bounce_collect

    kari, _, _ = seeded(ledger_db)
    left = [crlf(fixture("auto-reply-rfc3834.eml")), crlf(fixture("person-reply.eml")), crlf(fixture("broken-mime.eml"))]
    for raw in left:
        dovecot.append(mailbox, raw)
    parsed: list[bytes] = []
    real = bounce_collect.read_report
    monkeypatch.setattr(bounce_collect, "read_report", lambda raw, **kw: parsed.append(raw) or real(raw, **kw))

    def one_pass() -> Collected:
        with BounceMailbox.from_connection() as reader:
            return collect(ledger_db, reader, key=KEY.encode(), run_id="r")

    first = one_pass()
    dovecot.append(mailbox, crlf(postfix_dsn_for(kari)))
    second = one_pass()

    assert (first.messages, first.left, first.read_before) == (3, 3, 0)
    assert (second.messages, second.bounced, second.read_before) == (1, 1, 3)
    assert parsed == [*left, crlf(postfix_dsn_for(kari))]  # each message parsed once
    assert dovecot.messages(mailbox) == [(raw, set()) for raw in left]  # still there, unread
    with ledger_db.begin() as conn:  # the folder was recreated: its UIDs name other messages now
        conn.execute(ledger.update(ledger.mailbox_message).values(uidvalidity=ledger.mailbox_message.c.uidvalidity + 1))
    assert (one_pass().messages, len(parsed)) == (3, 7)


# --- the hourly DAG while a night runs -----------------------------------------------------------------


@pytest.fixture
def night_in_progress(airflow_db):
    """A run of invoice_mailing in Airflow's metadata database, as the scheduler keeps it while a night is
    queued or running: call it with the run's state. The database is the test session's: the run goes after."""
    import pendulum
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import delete, update

    run_id = f"manual__night-in-progress-{uuid.uuid4().hex[:8]}"
    with create_session() as session:
        session.add(DagRun(dag_id=DAG_ID, run_id=run_id, run_type="manual", state="queued",
                           run_after=pendulum.datetime(2026, 11, 24, 1, 0)))

    def set_state(state: str) -> None:
        with create_session() as session:
            session.execute(update(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id)
                            .values(state=state))

    yield set_state
    with create_session() as session:
        session.execute(delete(DagRun).where(DagRun.dag_id == DAG_ID, DagRun.run_id == run_id))


def collect_state(run) -> str:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        return session.scalar(select(TaskInstance.state).where(
            TaskInstance.dag_id == run.dag_id, TaskInstance.run_id == run.run_id,
            TaskInstance.task_id == "collect_bounces"))


def test_the_hourly_dag_skips_while_a_night_is_queued_or_running_and_reads_once_it_has_ended(
        mailbox, dovecot, ledger_db, night_in_progress):
    kari, *_ = seeded(ledger_db)
    report = crlf(postfix_dsn_for(kari))
    dovecot.append(mailbox, report)

    for state, hour in (("queued", "10"), ("running", "11")):
        night_in_progress(state)
        run = run_hourly(f"2026-11-24T{hour}:30:00+00:00")

        assert (run.state, collect_state(run)) == ("success", "skipped"), state
        assert dovecot.messages(mailbox) == [(report, set())] and dovecot.folders(mailbox) == ["INBOX"], state
        assert ledger.all_deliveries(ledger_db, ledger.delivery.c.id == kari["id"]) == [kari], state
        assert bounce_reports(ledger_db) == [], state

    night_in_progress("success")
    run = run_hourly("2026-11-24T12:30:00+00:00")

    assert (run.state, collect_state(run)) == ("success", "success")
    assert collected(run)["bounced"] == 1
    assert ledger.all_deliveries(ledger_db, ledger.delivery.c.id == kari["id"])[0]["status"] == "bounced"
    assert dovecot.messages(mailbox) == [] and dovecot.messages(mailbox, "Processed") == [(report, set())]
