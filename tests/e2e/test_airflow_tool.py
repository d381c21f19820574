"""`make airflow` for people (dev/airflow_tool.py): it runs detached, a stop and a start keep the login and the
history, a stop ends exactly its processes, and a PostgreSQL that is not running is one line saying how to start it.

The real commands (``python -m dev.airflow_tool start|stop``, what the make targets run) with a home, a
metadata database and ports of the test's own, so that a developer's running instance is never touched.
"""

from __future__ import annotations

import json
import os
import smtplib
import subprocess
import sys
import time
import uuid
from email.message import EmailMessage

import httpx
import psutil
import pytest
from sqlalchemy import text

from dev.airflow_stack import ADMIN, free_port
from tests.conftest import ROOT

DAG = "invoice_mailing"


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
def instance(postgres_admin, tmp_path):
    """The tool's arguments for an instance of this test's own; whatever runs is stopped, the database dropped."""
    database = f"airflow_tool_test_{uuid.uuid4().hex[:8]}"
    port = free_port()
    args = ["--home", tmp_path / "airflow", "--port", port, "--smtp-port", free_port(), "--database", database]
    yield {"args": args, "home": tmp_path / "airflow", "url": f"http://127.0.0.1:{port}", "database": database}
    tool("stop", *args)
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
    run = api.post(f"/dags/{DAG}/dagRuns", json={"logical_date": "2026-11-24T01:00:00Z", "conf": {}})
    assert run.status_code == 200, run.text  # the DAG stays paused: the run waits in the history, nothing is sent
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
