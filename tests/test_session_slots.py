"""Each relay sees at most its SMTP connection's ``max_sessions`` at once, across processes, on a SQLite or a
PostgreSQL ledger; one relay's low limit does not throttle another; a killed holder frees its slot;
a batch that waited in vain leaves its deliveries pending for the task's next try."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from email.message import EmailMessage

import pytest
from sqlalchemy import create_engine

from dev.smtp_sink import Faults, SmtpSink
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.session_slots import NoSessionSlot, SessionSlots
from tests.conftest import smtp_connection

SENDER, RECIPIENT = "faktura@fjordlys.example", "kari@bolgen.example"
PROCESSES_PER_RELAY, MESSAGES_PER_PROCESS = 4, 2
FORK = multiprocessing.get_context("fork")  # Airflow's SMTP hook is imported once, here, not in every process


@pytest.fixture
def relays(monkeypatch):
    """Two relays, each a sink whose answer to DATA takes 0.3 s so that sessions overlap: the connection
    relay_one allows 1 session at once, relay_three 3."""
    with SmtpSink(faults=Faults(data_delay=0.3)) as one, SmtpSink(faults=Faults(data_delay=0.3)) as three:
        monkeypatch.setenv("AIRFLOW_CONN_RELAY_ONE", smtp_connection(one.port, max_sessions=1))
        monkeypatch.setenv("AIRFLOW_CONN_RELAY_THREE", smtp_connection(three.port, max_sessions=3))
        yield {"relay_one": one, "relay_three": three}


def ledger_url(backend) -> str:
    return backend["engines"][1].url.render_as_string(hide_password=False)


def message(n: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"], msg["Message-ID"] = SENDER, RECIPIENT, f"Invoice {n}", f"<{n}@test>"
    msg.set_content("Your invoice.")
    return msg


def slots(url: str, wait: float = 60) -> SessionSlots:
    return SessionSlots(create_engine(url), default_max_sessions=4, wait=wait, poll=0.05)


def send_messages(url: str, conn_id: str, start, count: int) -> None:
    """One task process: a session on ``conn_id`` (once it has a slot), ``count`` messages, then QUIT."""
    start.wait()
    with SmtpSender(backoff=0.0, slots=slots(url)) as sender:
        for n in range(count):
            result = sender.send(conn_id, message(f"{conn_id}-{os.getpid()}-{n}"), SENDER, [RECIPIENT])
            assert result.accepted == [RECIPIENT], result


def hold_a_session(url: str, conn_id: str, holding) -> None:
    """A task process that opened its session and then hangs (until it is killed)."""
    sender = SmtpSender(backoff=0.0, slots=slots(url))
    assert sender.send(conn_id, message(f"held-{os.getpid()}"), SENDER, [RECIPIENT]).accepted
    holding.set()
    time.sleep(300)


def test_each_relay_sees_at_most_its_connections_max_sessions_across_processes(backend, relays):
    import airflow.providers.smtp.hooks.smtp  # noqa: F401 - imported before the fork, as a worker has it

    start = FORK.Event()
    processes = [FORK.Process(target=send_messages, args=(ledger_url(backend), conn_id, start, MESSAGES_PER_PROCESS))
                 for conn_id in relays for _ in range(PROCESSES_PER_RELAY)]
    for process in processes:
        process.start()
    began = time.monotonic()
    start.set()
    for process in processes:
        process.join(timeout=120)
    took = time.monotonic() - began
    assert [p.exitcode for p in processes] == [0] * len(processes)
    one, three = relays["relay_one"], relays["relay_three"]
    print(f"{backend['name']}: {len(processes)} processes in {took:.1f} s; peak sessions: relay_one "
          f"{one.peak_sessions}, relay_three {three.peak_sessions}")
    assert one.peak_sessions == 1
    assert 1 < three.peak_sessions <= 3  # not throttled to the other relay's limit
    for sink in (one, three):  # every message arrived, once
        ids = [r.message["Message-ID"] for r in sink.received]
        assert len(ids) == len(set(ids)) == PROCESSES_PER_RELAY * MESSAGES_PER_PROCESS


def test_a_killed_holder_frees_its_slot(backend, relays):
    import airflow.providers.smtp.hooks.smtp  # noqa: F401

    holding = FORK.Event()
    holder = FORK.Process(target=hold_a_session, args=(ledger_url(backend), "relay_one", holding))
    holder.start()
    try:
        assert holding.wait(60), "the holder never opened its session"
        with pytest.raises(NoSessionSlot):  # relay_one's only slot is taken
            slots(ledger_url(backend), wait=0.5).acquire("relay_one", 1)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join(timeout=30)
    began = time.monotonic()
    with SmtpSender(backoff=0.0, slots=slots(ledger_url(backend), wait=10)) as sender:
        assert sender.send("relay_one", message("after-the-kill"), SENDER, [RECIPIENT]).accepted == [RECIPIENT]
    assert time.monotonic() - began < 5


def test_no_slot_within_the_wait_leaves_the_deliveries_pending_for_the_next_try(backend, relays):
    taken = slots(ledger_url(backend)).acquire("relay_one", 1)  # another worker's session
    try:
        with SmtpSender(backoff=0.0, slots=slots(ledger_url(backend), wait=0.5)) as sender:
            first = sender.send("relay_one", message("first"), SENDER, [RECIPIENT])
            began = time.monotonic()
            second = sender.send("relay_one", message("second"), SENDER, [RECIPIENT])
            assert time.monotonic() - began < 0.3  # waited once for the batch, not once per message
    finally:
        taken.release()
    for result in (first, second):
        assert not result.accepted and not result.failure
        assert "SMTP session slots of the connection 'relay_one'" in result.deferred[RECIPIENT]
    assert relays["relay_one"].received == []
    with SmtpSender(backoff=0.0, slots=slots(ledger_url(backend), wait=0.5)) as sender:  # the task's next try
        assert sender.send("relay_one", message("first"), SENDER, [RECIPIENT]).accepted == [RECIPIENT]


def test_a_connection_with_a_wrong_max_sessions_is_a_configuration_error(backend, relays, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RELAY_ONE", smtp_connection(relays["relay_one"].port, max_sessions="many"))
    with SmtpSender(backoff=0.0, slots=slots(ledger_url(backend))) as sender:
        result = sender.send("relay_one", message("first"), SENDER, [RECIPIENT])
    assert result.failure[0] == "config_error" and "max_sessions 'many'" in result.failure[1]
