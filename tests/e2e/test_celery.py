"""One night on the distributed engine: CeleryExecutor, two workers, one of them SIGKILLed mid-send.

The topology of docker-compose.yaml as processes on this machine (dev/airflow_stack.py): api-server,
scheduler, dag-processor, triggerer and two Celery workers (as root each on its own "host": host name
and process namespace), PostgreSQL for Airflow's metadata, the ledger and the ERP (48 invoices of 24
customers, each to a To and a Cc recipient), Redis as the broker, and an aiosmtpd server. The night is triggered through the REST API; when a worker holds a
delivery claimed for sending and some mail has arrived, that worker is killed with everything it
started. The scheduler finds its task instance without a heartbeat, retries it on the other worker,
which takes the dead worker's claims over once their lease has expired (by the database's clock).

Run it with ``make e2e-celery`` (about two minutes); ``make test`` leaves it out.
"""

from __future__ import annotations

import re
import time
from collections import Counter

import pendulum
import pytest
from sqlalchemy import select

from dev.airflow_stack import REDIS_URL, AirflowStack
from include.invoice_mailing import ledger
from tests.conftest import _server_missing, postgres_pair, smtp_connection
from tests.erp import TinyErp

DAG_ID = "invoice_mailing"
WORKERS = ("worker-a", "worker-b")
LEASE_SECONDS = 15       # production: 900; a live worker must finish a message within it (here: < 1 s)
HEARTBEAT_TIMEOUT = 20   # production: 300 (Airflow's default)
SMTP_SESSIONS = 3        # the relay's sessions at once (no max_sessions in its extra): 4 worker slots, 3 sessions
CUSTOMERS = 24


@pytest.fixture
def redis_broker():
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
    except Exception as exc:  # noqa: BLE001 - any failure to connect means: no server here
        _server_missing(f"Redis at {REDIS_URL}", exc)


# The night of 2026-11-24, triggered by hand in a stack whose clock reads midday after it (libfaketime): no
# 02:00 or 06:00 Oslo passes while the test runs, whatever the hour of the real clock (unpausing creates no run).
NIGHT = pendulum.datetime(2026, 11, 24, 2, 0, tz="Europe/Oslo")
MIDDAY = NIGHT.replace(hour=12)


def seed_erp(engine, night: pendulum.DateTime) -> None:
    """Every customer's invoicing contact in To and its own address in Cc; two invoices each, due tonight."""
    erp = TinyErp(engine)
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing", "To")
    erp.recipient(setting, "Customer", "Cc")
    released = night.in_tz("UTC").naive().subtract(days=1)
    for n in range(1, CUSTOMERS + 1):
        customer = f"{10000 + n}"
        erp.customer(customer, f"Kunde {n} AS", invoice_email=f"faktura{n}@kunde{n}.example",
                     email=f"post@kunde{n}.example")
        for k in (1, 2):
            erp.invoice(f"INV{n:04d}{k:02d}", customer, released=released)


def test_a_night_on_celery_workers_survives_a_killed_worker_and_sends_every_document_once(
        postgres_admin, redis_broker, sink, faked_clock):
    databases = postgres_pair(postgres_admin)
    erp_engine, ledger_db = databases["engines"]
    night = NIGHT
    seed_erp(erp_engine, night)
    sink.faults.data_delay = 0.5  # a relay that takes its time: the kill lands while a message is in flight
    env = {
        "AIRFLOW_CONN_ERP_DB": databases["connections"][0],
        "AIRFLOW_CONN_MAILING_LEDGER": databases["connections"][1],
        "AIRFLOW_CONN_SMTP_DEFAULT": smtp_connection(sink.port, timeout=30),
        "AIRFLOW_CONN_MAILING_ALERTS": smtp_connection(sink.port, to="ops@fjordlys.example",
                                                       from_email="airflow@fjordlys.example"),
        "INVOICE_MAILING_SMTP_SESSIONS": str(SMTP_SESSIONS),
        "INVOICE_MAILING_CONCURRENCY": str(2 * len(WORKERS)),  # every worker slot: the session slots cap the relay
        "INVOICE_MAILING_CLAIM_LEASE_SECONDS": str(LEASE_SECONDS),
        "INVOICE_MAILING_RETRY_DELAY_SECONDS": "2",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
    }
    try:
        with AirflowStack(executor="CeleryExecutor", workers=WORKERS, extra_env=env, fake_time=MIDDAY) as stack:
            client = stack.client()
            client.wait_for_dag(DAG_ID)
            started = time.monotonic()
            run_id = client.trigger(DAG_ID, logical_date=night.in_tz("UTC").isoformat())["dag_run_id"]
            client.unpause(DAG_ID)

            victim, in_flight, arrived_before = stack.wait_until(
                "a worker holding a claimed delivery after some mail arrived",
                lambda: _worker_in_flight(stack, ledger_db, sink), timeout=240, interval=0.05)
            killed_at = time.monotonic() - started
            stack.kill_worker(victim)

            run = client.wait_for_run(DAG_ID, run_id, {"success", "failed"}, timeout=360)
            wall = time.monotonic() - started
            per_worker = _task_instances_per_worker(stack, client, run_id)
            most_at_once = _most_mailing_instances_at_once(client, run_id)
            runs = client.runs(DAG_ID)
    finally:
        rows = ledger.all_deliveries(ledger_db, ledger.delivery.c.mode == "live")
        databases["cleanup"]()

    arrived = Counter((m.message["Message-ID"], rcpt.lower()) for m in sink.received for rcpt in m.envelope_to)
    sent = {(r["message_id"], r["recipient"].lower()): r for r in rows if r["status"] == "sent"}
    taken_over = [r for r in rows if "stale claim" in (r["last_error"] or "")]
    copies = {pair: n for pair, n in arrived.items() if n > 1}
    by_lease = sum("lease" in r["last_error"] for r in taken_over)
    print(f"\nmake e2e-celery: the night of {night.date()} on the CeleryExecutor "
          f"({'each worker on its own host' if stack.separate_hosts else 'workers on one host'})\n"
          f"  wall time        {wall:.1f} s from trigger to {run['state']} (run {run_id})\n"
          f"  task instances   " + ", ".join(f"{w}: {n}" for w, n in sorted(per_worker.items())) + "\n"
          f"  the kill         SIGKILL to {victim} at {killed_at:.1f} s, holding {in_flight} claimed deliveries, "
          f"when {arrived_before} messages had arrived\n"
          f"  SMTP sessions    at most {sink.peak_sessions} at once at the relay (its limit {SMTP_SESSIONS}), "
          f"{most_at_once} mailing instances at once (worker slots {2 * len(WORKERS)}; no pool)\n"
          f"  taken over       {len(taken_over)} claimed deliveries by the retry: {by_lease} after the lease of "
          f"{LEASE_SECONDS} s, {len(taken_over) - by_lease} as the claimant's process was gone "
          f"(heartbeat timeout {HEARTBEAT_TIMEOUT} s)\n"
          f"  delivered        {len(sent)} deliveries in {len({m for m, _ in sent})} messages; arrived "
          f"{sum(arrived.values())}, of which {sum(copies.values()) - len(copies)} window copies with the "
          f"first copy's Message-ID", flush=True)

    assert run["state"] == "success"
    assert [r["dag_run_id"] for r in runs] == [run_id], "the trigger took the unpaused night's place"
    assert set(per_worker) == set(WORKERS) and all(per_worker.values()), per_worker
    assert {r["status"] for r in rows} <= {"sent", "skipped", "failed"}
    assert all(r["reason"] not in ledger.SMTP_FAILURES for r in rows if r["status"] == "failed")
    assert sent and set(arrived) == set(sent), "every delivery the ledger shows as sent arrived, and nothing else"
    assert taken_over, "the killed worker's claims were taken over"
    if stack.separate_hosts:  # another host's process table is not ours to read: only the lease applies
        assert by_lease == len(taken_over)
    assert most_at_once <= 2 * len(WORKERS) and sink.peak_sessions <= SMTP_SESSIONS
    # A copy can only be a message in flight when the worker died (the window): it carries the same Message-ID.
    assert {pair for pair in copies} <= {(r["message_id"], r["recipient"].lower()) for r in taken_over}


def _worker_in_flight(stack: AirflowStack, ledger_db, sink):
    """(worker, its claims, messages arrived) when a worker holds deliveries claimed for sending."""
    if len(sink.received) < 10:  # in the middle of the night, not at its start
        return None
    with ledger_db.connect() as conn:
        claims = conn.execute(select(ledger.delivery.c.claimed_by)
                              .where(ledger.delivery.c.status == ledger.SENDING)).scalars().all()
    holders = Counter(filter(None, (_worker_of(stack, claimant) for claimant in claims)))
    if not holders:
        return None
    worker, count = holders.most_common(1)[0]
    return worker, count, len(sink.received)


def _worker_of(stack: AirflowStack, claimant: str) -> str | None:
    """The worker whose process made a claim: by host name on separate hosts, else by process ancestry."""
    host, pid = claimant.split(":")[0].split("/")[0], int(claimant.split(":")[1])
    if stack.separate_hosts:
        return host if host in WORKERS else None
    import psutil

    try:
        ancestors = {p.pid for p in psutil.Process(pid).parents()}
    except psutil.Error:
        return None
    return next((w for w in WORKERS if stack.processes[f"worker {w}"].pid in ancestors), None)


def _most_mailing_instances_at_once(client, run_id: str) -> int:
    """The most tries of the mapped mailing task that ran at the same moment (capped by INVOICE_MAILING_CONCURRENCY)."""
    events = []
    for ti in client.task_instances(DAG_ID, run_id):
        if ti["task_id"] == "mail_customers":
            for attempt in client.tries(DAG_ID, run_id, "mail_customers", ti["map_index"]):
                if attempt.get("start_date") and attempt.get("end_date"):
                    events += [(attempt["start_date"], 1), (attempt["end_date"], -1)]
    running = most = 0
    for _, step in sorted(events, key=lambda e: (pendulum.parse(e[0]), e[1])):
        running += step
        most = max(most, running)
    return most


def _task_instances_per_worker(stack: AirflowStack, client, run_id: str) -> dict[str, int]:
    """Task instance tries each worker ran: their host names (separate hosts), else the workers' logs."""
    if not stack.separate_hosts:
        pattern = re.compile(r"Executing workload in Celery")
        return {w: len(pattern.findall((stack.home / f"worker {w}.log").read_text(errors="replace")))
                for w in WORKERS}
    hosts: Counter = Counter()
    for ti in client.task_instances(DAG_ID, run_id):
        for attempt in client.tries(DAG_ID, run_id, ti["task_id"], ti["map_index"]):
            if attempt.get("hostname"):
                hosts[attempt["hostname"]] += 1
    return dict(hosts)

