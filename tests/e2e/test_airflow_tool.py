"""`make airflow` for people (dev/airflow_tool.py): it runs detached, a stop and a start keep the login and the
history, a stop ends exactly its processes, and a PostgreSQL that is not running is one line saying how to start it.

The real commands (``python -m dev.airflow_tool start|stop``, what the make targets run) with a home, a
metadata database and ports of the test's own, so that a developer's running instance is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

import httpx
import psutil
import pytest
from sqlalchemy import create_engine, text

from dev.airflow_stack import ADMIN, free_port
from dev.airflow_tool import BOUNCE_LOGIN, GONE_CUSTOMER, GONE_DOMAIN
from include.invoice_mailing import ledger
from tests.conftest import ROOT, package_missing

E_INVOICED = ("10047", "10049")  # the demo's customers who get EHF by their mailing and Factur-X by a recipient row

DAG = "invoice_mailing"
BOUNCES = "invoice_mailing_bounces"


def tool(*args) -> subprocess.CompletedProcess:
    """The tool as a developer's shell runs it: no AIRFLOW_* settings of the test session."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    return subprocess.run([sys.executable, "-m", "dev.airflow_tool", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)})


def log_in(url: str, password: str) -> httpx.Client:
    token = httpx.post(f"{url}/auth/token", json={"username": ADMIN, "password": password}, timeout=30)
    assert token.status_code in (200, 201), token.text
    return httpx.Client(base_url=f"{url}/api/v2", timeout=60,
                        headers={"Authorization": f"Bearer {token.json()['access_token']}"})


def wait_for_dag(api: httpx.Client, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while api.get(f"/dags/{DAG}").status_code != 200:
        assert time.monotonic() < deadline, f"{DAG} was not parsed within {timeout:.0f} s"
        time.sleep(1)


@pytest.fixture
def bounce_parts_installed():
    """make airflow shows a bounce with Postfix and Dovecot: skip without them (fail under CI=true)."""
    from dev.dovecot import DovecotMissing, dovecot_version
    from dev.postfix import PostfixMissing, postfix_version

    try:
        dovecot_version(), postfix_version()
    except (DovecotMissing, PostfixMissing) as missing:
        package_missing(f"{missing}; make airflow's bounce needs it")


def wait_for_run(api: httpx.Client, dag_id: str, run_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while (run := api.get(f"/dags/{dag_id}/dagRuns/{run_id}").json())["state"] not in ("success", "failed"):
        assert time.monotonic() < deadline, f"{dag_id} {run_id} still {run['state']} after {timeout:.0f} s"
        time.sleep(2)
    return run


@pytest.fixture
def instance(postgres_admin, bounce_parts_installed):
    """The tool's arguments for an instance of this test's own; whatever runs is stopped, the database dropped.
    The home is open to others, as a checkout is: Postfix's and Dovecot's own users enter its relay and mailbox."""
    database = f"airflow_tool_test_{uuid.uuid4().hex[:8]}"
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="airflow-tool-test-"))
    home.chmod(0o755)
    args = ["--home", home / "airflow", "--port", port, "--smtp-port", free_port(), "--database", database]
    yield {"args": args, "home": home / "airflow", "url": f"http://127.0.0.1:{port}", "database": database}
    tool("stop", *args)
    shutil.rmtree(home, ignore_errors=True)
    with postgres_admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


def test_a_stop_and_a_start_keep_the_login_and_the_history(instance):
    args, home, url = instance["args"], instance["home"], instance["url"]
    first = tool("start", *args)
    assert first.returncode == 0, first.stdout + first.stderr
    secrets_file = home / "secrets.json"
    password = json.loads(secrets_file.read_text())["password"]
    assert f"login {ADMIN} / {password}" in first.stdout
    assert secrets_file.stat().st_mode & 0o777 == 0o600

    # Detached: the command has returned, and the api-server and the SMTP sink still answer.
    api = log_in(url, password)
    wait_for_dag(api)
    # The demo night of four customers, two of them getting e-invoices (10047 EHF, 10049 Factur-X): the DAG
    # stays paused, so the run waits in the history, nothing is sent yet.
    run = api.post(f"/dags/{DAG}/dagRuns", json={"logical_date": "2026-11-24T01:00:00Z",
                                                  "conf": {"customers": ["10001", GONE_CUSTOMER, *E_INVOICED]}})
    assert run.status_code == 200, run.text
    assert "bounces: invoices go through a Postfix" in first.stdout, first.stdout
    run_id = run.json()["dag_run_id"]
    smtp_port = args[args.index("--smtp-port") + 1]
    message = EmailMessage()
    message["From"], message["To"], message["Subject"] = "a@example.test", "b@example.test", "after make airflow"
    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=10) as smtp:
        smtp.send_message(message)
    assert [p.read_text().count("after make airflow") for p in (home / "outbox").glob("*.eml")] == [1]
    assert {"api-server.log", "scheduler.log", "dag-processor.log", "triggerer.log", "smtp-sink.log"} <= {
        p.name for p in (home / "logs").iterdir()}

    again = tool("start", *args)
    assert (again.returncode, again.stdout.strip()) == (0, f"Airflow is already running at {url} (login {ADMIN}, "
                                                           f"password in {secrets_file}); `make airflow-stop` ends it.")

    processes = [psutil.Process(entry["pid"])
                 for entry in json.loads((home / "running.json").read_text())["processes"].values()]
    tree = [member for process in processes for member in (process, *process.children(recursive=True))]
    stopped = tool("stop", *args)
    assert stopped.returncode == 0 and stopped.stdout.startswith(f"Stopped Airflow at {url}: "), stopped.stdout
    assert not [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not (home / "running.json").exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=5)

    second = tool("start", *args)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"login {ADMIN} / {password}" in second.stdout
    runs = log_in(url, password).get(f"/dags/{DAG}/dagRuns").json()["dag_runs"]
    assert run_id in [r["dag_run_id"] for r in runs]

    # A bounce, end to end, as the README's "Seeing a bounce" walks it: the night mails both customers through
    # Postfix, which fails the bakery's mail and sends its report into the bounce mailbox; the hourly DAG
    # applies it.
    api = log_in(url, password)
    assert api.patch(f"/dags/{DAG}", json={"is_paused": False}).status_code == 200
    night = wait_for_run(api, DAG, run_id)
    assert night["state"] in ("success", "failed"), night
    reports = home / "bounce-mailbox" / "mail" / BOUNCE_LOGIN / "Maildir" / "new"
    deadline = time.monotonic() + 60
    while not list(reports.glob("*")):
        assert time.monotonic() < deadline, f"no report from Postfix in {reports}"
        time.sleep(0.5)
    assert api.patch(f"/dags/{BOUNCES}", json={"is_paused": False}).status_code == 200
    hourly = api.post(f"/dags/{BOUNCES}/dagRuns", json={"logical_date": None})
    assert wait_for_run(api, BOUNCES, hourly.json()["dag_run_id"])["state"] == "success"
    rows = ledger.all_deliveries(create_engine(f"sqlite:///{home / 'ledger.db'}"))
    gone = [r for r in rows if r["recipient"].endswith(f"@{GONE_DOMAIN}")]
    assert gone and {(r["customer_id"], r["status"], r["reason"]) for r in gone} == {
        (GONE_CUSTOMER, "bounced", "hard_bounce")}, gone
    assert all(r["detail"].startswith("5.1.1") for r in gone)
    assert {r["status"] for r in rows if r not in gone} == {"sent"}  # the other customer, the bookkeeper's copies
    arrived = {line.split(":", 1)[1].strip() for p in (home / "outbox").glob("*.eml")
               for line in p.read_text(errors="replace").splitlines() if line.startswith("X-Envelope-To:")}
    assert {r["recipient"] for r in rows if r["customer_id"] in ("10001", *E_INVOICED)} <= arrived
    # The e-invoices were made in task processes forked from the warm scheduler, and checked by the validator
    # process it spawned, as their logs say: none of them loaded Saxon or fell back to checking by itself
    assert {(r["customer_id"], r["format"]) for r in rows if r["customer_id"] in E_INVOICED} >= {
        ("10047", "EHF"), ("10049", "FACTURX")}
    task_logs = "".join(p.read_text(errors="replace") for p in (home / "logs").glob(f"dag_id={DAG}/**/*.log"))
    assert "EN 16931 checks by the worker's validator process" in task_logs
    assert "did not answer" not in task_logs
    # Postfix failed the bakery's invoices: they never reached the sink (the bookkeeper's copies did)
    assert not [to for to in arrived if GONE_DOMAIN in to], arrived

    assert tool("stop", *args).returncode == 0
    twice = tool("stop", *args)
    assert (twice.returncode, twice.stdout.strip()) == (0, "Airflow is not running (nothing recorded in "
                                                           f"{home / 'running.json'}).")


def test_a_postgresql_that_is_not_running_is_one_line_that_says_how_to_start_it(tmp_path):
    closed = free_port()  # nothing listens there
    done = tool("start", "--home", tmp_path / "airflow", "--postgres",
                f"postgresql+psycopg2://postgres@127.0.0.1:{closed}/test")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [
        f"PostgreSQL is not answering at 127.0.0.1:{closed}: start it with "
        "`pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`"]


def test_make_audit_ui_prints_the_login_it_takes_on_a_port_of_its_own(tmp_path):
    """`make demo` said the login was in a file that did not exist, and `make audit-ui` wanted make airflow's
    port 8080 with another login: the tool prints the login that works, `make airflow`'s, on 8081."""
    home = tmp_path / "airflow"
    engine = create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    ledger.ensure_schema(engine)
    engine.dispose()
    refused = tool("audit-ui", "--home", tmp_path / "elsewhere" / "airflow")
    assert refused.returncode == 1 and "run `make demo` first" in refused.stderr, refused.stderr

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    server = subprocess.Popen([sys.executable, "-m", "dev.airflow_tool", "audit-ui", "--home", str(home), "--port",
                               str(port)], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        printed = [server.stdout.readline() for _ in range(2)]
        password = json.loads((home / "secrets.json").read_text())["password"]  # what `make airflow` logs in with
        assert f"http://localhost:{port}/plugin/invoice-mailing" in printed[0], printed
        assert f"login {ADMIN} / {password} (the same as `make airflow`'s" in printed[1], printed
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the api-server did not answer within 120 s"
            time.sleep(1)
        token = httpx.post(f"http://127.0.0.1:{port}/auth/token", json={"username": ADMIN, "password": password},
                           timeout=30)
        assert token.status_code == 201, token.text
        page = httpx.get(f"http://127.0.0.1:{port}/invoice-mailing/nights", timeout=30,
                         headers={"Authorization": f"Bearer {token.json()['access_token']}"})
        assert page.status_code == 200 and "<h1>Nights</h1>" in page.text, page.text[:500]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)


def test_each_clone_has_a_metadata_database_of_its_own():
    """Two clones on one machine shared `invoice_mailing_airflow` and saw each other's runs."""
    from dev.airflow_tool import DATABASE, database_for

    assert DATABASE == database_for(ROOT) == database_for(ROOT / "dags" / "..")
    assert database_for(Path("/home/kari/invoice-mailing")) != database_for(Path("/home/ola/invoice-mailing"))
    assert len(DATABASE) <= 63 and DATABASE.replace("_", "").isalnum()
