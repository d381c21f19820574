"""Crash test: a real DAG run, in its own process, is SIGKILLed at seeded random points; the run is then
cleared and run again. At the SMTP server every expected (document, recipient) must have arrived, and
the only duplicates allowed are those of the documented window (the server took the message, the
ledger had not yet recorded it), which carry the same Message-ID.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

import pytest
from sqlalchemy import create_engine

from dev.smtp_sink import SmtpSink
from include.invoice_mailing import ledger
from tests.conftest import ROOT, postgres_pair, smtp_connection, sqlite_connection
from tests.erp import TinyErp

TRIALS = int(os.environ.get("CRASH_TRIALS", "30"))
SEED = 20261124
STEPS = ("after_claim", "during_smtp", "after_data_accepted", "before_commit")
WINDOW = {"after_data_accepted", "before_commit"}  # where a second copy is the documented outcome
LOGICAL_DATE, RUN_AFTER = "2026-11-24T00:00:00+00:00", "2026-11-24T01:00:00+00:00"


def build_erp(engine) -> set[tuple[str, str]]:
    """Three customers, six documents, nine messages; returns the expected (document, recipient) pairs."""
    erp = TinyErp(engine)
    expected = set()
    bookkeeper = erp.contact(None, "regnskap@fjordlys.example", "Ingrid Regnskap", is_employee=True)
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing", "To")
    erp.recipient(setting, "Primary", "Cc")
    erp.recipient(setting, "Employee", "Bcc", contact_id=bookkeeper)
    for n, name in enumerate(("Bølgen Kafé AS", "Havet Fisk AS", "Åsen Bakeri AS")):
        customer_id = f"1000{n + 1}"
        erp.customer(customer_id, name, invoice_email=f"faktura@kunde{n + 1}.example")
        primary = erp.contact(customer_id, f"leder@kunde{n + 1}.example", preferred_format="HTML" if n else None)
        with engine.begin() as conn:
            conn.execute(ledger_free_update(customer_id, primary))
        for d in range(2):
            ref = erp.invoice(f"INV00{n + 1}{d}01", customer_id)
            expected |= {(ref, f"faktura@kunde{n + 1}.example"), (ref, f"leder@kunde{n + 1}.example"),
                         (ref, "regnskap@fjordlys.example")}
    return expected


def ledger_free_update(customer_id, contact_id):
    from include.invoice_mailing import source

    return source.customer.update().where(source.customer.c.customer_id == customer_id).values(
        primary_contact_id=contact_id)


MESSAGES = 2 + 2 * 2 * 2  # customer 1: one PDF message per document; 2 and 3: a PDF and an HTML message each


@pytest.fixture(scope="module")
def airflow_homes(tmp_path_factory):
    """One Airflow home per worker process slot, migrated once, each with its warm run server
    (``tests.dag_runner serve``), which forks a child for every run."""
    homes: Queue = Queue()
    servers = []
    for slot in range(2):
        home = tmp_path_factory.mktemp(f"airflow-{slot}")
        env = _airflow_env(home)
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
        server = subprocess.Popen([sys.executable, "-m", "tests.dag_runner", "serve"], env=env, cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        servers.append(server)
        homes.put(RunServer(home, server))
    yield homes
    for server in servers:
        server.stdin.close()
        server.wait(timeout=60)


class RunServer:
    """A warm ``tests.dag_runner serve`` process of one Airflow home: each run is a child it forks."""

    def __init__(self, home: Path, process: subprocess.Popen):
        self.home, self.process = home, process

    def start(self, env: dict, stderr: Path) -> int:
        """Fork a run; returns the child's pid."""
        self.process.stdin.write(json.dumps({"env": env, "stderr": str(stderr), "logical_date": LOGICAL_DATE,
                                             "run_after": RUN_AFTER}) + "\n")
        answer = self.process.stdout.readline()
        assert answer.startswith("pid "), f"the run server answered {answer!r}"
        return int(answer.split()[1])

    def wait(self) -> int:
        """The run's exit code (minus the signal's number if a signal ended it)."""
        answer = self.process.stdout.readline()
        assert answer.startswith("exit "), f"the run server answered {answer!r}"
        return int(answer.split()[1])


def _airflow_env(home: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AIRFLOW")}
    env.update({"PYTHONPATH": str(ROOT), "AIRFLOW_HOME": str(home),
                "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "ERROR"})
    return env


def run_trial(trial: int, backend: str, homes: Queue, make_databases) -> dict:
    rng = random.Random(SEED * 100 + trial)
    step = STEPS[trial % len(STEPS)]
    nth = rng.randint(1, MESSAGES)
    erp_engine, ledger_engine, connections, cleanup = make_databases(trial)
    expected = build_erp(erp_engine)
    server = homes.get()
    try:
        with SmtpSink() as sink:
            env = {"AIRFLOW_CONN_ERP_DB": connections[0], "AIRFLOW_CONN_MAILING_LEDGER": connections[1],
                   "AIRFLOW_CONN_SMTP_DEFAULT": smtp_connection(sink.port)}
            crash_env = dict(env)
            if step in ("after_claim", "before_commit"):
                crash_env["INVOICE_MAILING_CRASH_AT"] = f"{step}:{nth}"
            first_log, rerun_log = (server.home / f"trial-{backend}-{trial}-{n}.log" for n in ("first", "rerun"))
            first = server.start(crash_env, first_log)
            if step in ("during_smtp", "after_data_accepted"):
                sink.faults.kill_at_data = (nth, first, step == "after_data_accepted")
            killed = server.wait() == -signal.SIGKILL
            first_err = first_log.read_text(errors="replace")
            server.start(env, rerun_log)
            assert server.wait() == 0, rerun_log.read_text(errors="replace")[-3000:]
            received = list(sink.received)
        rows = ledger.all_deliveries(ledger_engine)
    finally:
        homes.put(server)
        cleanup()
    by_pair: dict[tuple[str, str], list[str]] = defaultdict(list)
    for mail in received:
        ref = mail.message["X-Invoice-Document"].split()[-1]
        for rcpt in mail.envelope_to:
            by_pair[(ref, rcpt)].append(mail.message["Message-ID"])
    return {"trial": trial, "step": step, "nth": nth, "killed": killed, "expected": expected, "by_pair": by_pair,
            "unsent_rows": [r for r in rows if r["status"] != "sent"], "first_err": first_err[-500:]}


@pytest.fixture
def make_databases(backend, tmp_path, request):
    if backend["name"] == "sqlite":
        def make(trial):
            paths = [tmp_path / f"erp-{trial}.db", tmp_path / f"ledger-{trial}.db"]
            engines = [create_engine(f"sqlite:///{p}") for p in paths]
            return (*engines, [sqlite_connection(p) for p in paths], lambda: [e.dispose() for e in engines])
        return make

    admin = request.getfixturevalue("postgres_admin")

    def make(trial):
        pair = postgres_pair(admin)
        return (*pair["engines"], pair["connections"], pair["cleanup"])
    return make


def test_sigkill_at_random_points_then_rerun_delivers_everything_once_but_for_the_window(
        backend, airflow_homes, make_databases, capsys):
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda t: run_trial(t, backend["name"], airflow_homes, make_databases),
                                range(TRIALS)))

    table: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        counts = table[r["step"]]
        counts["trials"] += 1
        counts["killed"] += r["killed"]
        assert r["killed"], f"trial {r['trial']} ({r['step']} #{r['nth']}) was not killed: {r['first_err']}"
        missing = r["expected"] - set(r["by_pair"])
        assert not missing, f"trial {r['trial']}: never arrived: {sorted(missing)}"
        assert not r["unsent_rows"], f"trial {r['trial']}: ledger rows not sent: {r['unsent_rows']}"
        counts["expected"] += len(r["expected"])
        for pair, message_ids in r["by_pair"].items():
            counts["arrived"] += len(message_ids)
            if len(message_ids) > 1:
                assert r["step"] in WINDOW, f"trial {r['trial']} ({r['step']}): {pair} arrived {len(message_ids)}x"
                assert len(set(message_ids)) == 1, f"trial {r['trial']}: {pair} with different Message-IDs"
                counts["duplicates_same_message_id"] += len(message_ids) - 1

    with capsys.disabled():
        print(f"\ncrash test on {backend['name']}: {TRIALS} trials, seed {SEED}")
        print(f"  {'killed at':<22}{'trials':>7}{'killed':>7}{'expected':>9}{'arrived':>8}{'dup (window)':>13}")
        for step in STEPS:
            c = table[step]
            print(f"  {step:<22}{c['trials']:>7}{c['killed']:>7}{c['expected']:>9}{c['arrived']:>8}"
                  f"{c['duplicates_same_message_id']:>13}")
