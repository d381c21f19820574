"""The DAG file: imports cleanly without touching a database or the network, and is wired as documented."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from datetime import timedelta

import pytest

from tests.conftest import ROOT, load_dag


@pytest.fixture(scope="module")
def dag(airflow_db):
    return load_dag()


def test_dag_file_imports_with_every_database_and_socket_blocked():
    probe = textwrap.dedent(f"""
        import airflow.sdk  # Airflow's own start-up may open its metadata database; the DAG file may not
        import socket, sqlalchemy
        def refuse(*args, **kwargs):
            raise RuntimeError("I/O at import time")
        socket.socket.connect = refuse
        sqlalchemy.create_engine = refuse
        import runpy, sys
        sys.path.insert(0, {str(ROOT)!r})
        namespace = runpy.run_path({str(ROOT / "dags" / "invoice_mailing.py")!r})
        dag = namespace["invoice_mailing"]()
        print(dag.dag_id, len(dag.tasks))
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["invoice_mailing", "7"]


def parse_in_a_fresh_process(then: str, first: str = "") -> str:
    """Import Airflow's SDK, run ``first``, parse the DAG files as the dag-processor does, run ``then``;
    return the last line it printed."""
    probe = textwrap.dedent(f"""
        import json, runpy, sys
        import airflow.sdk
        sys.path.insert(0, {str(ROOT)!r})
        {first}
        before = set(sys.modules)
        dags = {{}}
        for name in ("invoice_mailing", "invoice_mailing_watch", "invoice_mailing_bounces"):
            namespace = runpy.run_path({str(ROOT / "dags")!r} + f"/{{name}}.py")
            dags[name] = namespace[name]()
        imported = sorted(set(sys.modules) - before)
        {then}
    """)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


def test_a_parse_imports_neither_the_pipeline_nor_its_libraries():
    """The dag-processor parses the files every few seconds: what they import is what each parse costs.
    The pipeline (SQLAlchemy tables, Jinja templates, WeasyPrint, Babel, smtplib) is imported by the tasks."""
    imported = set(json.loads(parse_in_a_fresh_process("print(json.dumps(imported))")))

    ours = {m for m in imported if m.startswith("include")}
    assert ours == {"include", "include.invoice_mailing", "include.invoice_mailing.dag_settings",
                    "include.invoice_mailing.clock", "include.invoice_mailing.masking",
                    "include.invoice_mailing.alerts", "include.invoice_mailing.approval"}
    heavy = {"weasyprint", "babel", "smtplib", "email_validator", "pypdf", "fontTools", "psycopg", "psycopg2",
             "airflow.providers.smtp", "airflow.providers.postgres", "airflow.providers.sqlite"}
    assert not {m for m in imported if m.split(".")[0] in heavy or m.rsplit(".", 1)[0] in heavy}


@pytest.mark.parametrize(("env", "expected"), [
    ({}, 4),                                         # the default SMTP sessions of a relay
    ({"INVOICE_MAILING_SMTP_SESSIONS": "3"}, 3),     # the default sessions, so no instance waits for one
    ({"INVOICE_MAILING_CONCURRENCY": "7"}, 7),       # the operators' setting
])
def test_concurrency_is_a_setting_not_the_parsing_hosts_cores(monkeypatch, env, expected):
    for name in ("INVOICE_MAILING_CONCURRENCY", "INVOICE_MAILING_SMTP_SESSIONS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    printed = parse_in_a_fresh_process(  # a dag-processor on a 64-core host
        "print(dags['invoice_mailing'].get_task('mail_customers').max_active_tis_per_dagrun)",
        first="import os; os.cpu_count = lambda: 64")
    assert int(printed) == expected


def test_runs_nightly_at_two_in_oslo_without_catch_up(dag):
    assert dag.timetable.expression == "0 2 * * *"
    assert str(dag.timetable.timezone) == "Europe/Oslo"
    assert dag.catchup is False and dag.max_active_runs == 1


@pytest.mark.parametrize("unpaused_at", ["2026-12-01T02:00:01", "2026-12-01T02:30", "2026-12-01T04:00",
                                         "2026-12-01T23:59", "2026-07-01T02:30"])
def test_a_new_installation_waits_for_the_next_night_whenever_it_is_unpaused(monkeypatch, unpaused_at):
    """No start_date and no grace: the first run the scheduler plans is the next 02:00 Oslo, also when the
    DAG is unpaused shortly after one (Airflow's default would still run that night until 04:24)."""
    import pendulum
    from airflow.serialization.serialized_objects import DagSerialization
    from airflow.timetables import trigger

    now = pendulum.parse(unpaused_at, tz="Europe/Oslo")
    monkeypatch.setattr(trigger, "utcnow", lambda: now.in_tz("UTC"))
    dag = load_dag()
    assert dag.start_date is None
    # As the dag-processor stores it and the scheduler reads it back.
    scheduled = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    first = scheduled.next_dagrun_info(last_automated_run_info=None)
    next_night = now.add(days=1).replace(hour=2, minute=0, second=0, microsecond=0)
    assert first.run_after == next_night
    assert first.run_after.in_tz("Europe/Oslo").hour == 2


def test_a_night_not_finished_by_six_in_oslo_alerts():
    from airflow.dag_processing.dagbag import DagBag

    watch = DagBag(dag_folder=str(ROOT / "dags")).get_dag("invoice_mailing_watch")
    assert watch.timetable.expression == "0 6 * * *" and str(watch.timetable.timezone) == "Europe/Oslo"
    assert watch.start_date is None and watch.catchup is False


def test_has_docs_and_tags_for_the_ui(dag):
    assert "mail_customers" in dag.doc_md and "audit" in dag.doc_md
    assert {"finance", "email"} <= set(dag.tags)


def test_shape_is_bounces_then_extract_then_the_brake_then_mapped_mailing_then_audit_as_teardown(dag):
    night, extract = dag.get_task("open_night"), dag.get_task("extract")
    assert dag.get_task("collect_bounces").upstream_task_ids == {"open_night"}  # the bounces are read first
    assert extract.upstream_task_ids == {"collect_bounces"}
    mail, audit = dag.get_task("mail_customers"), dag.get_task("audit")
    brake = dag.get_task("approve_night")
    assert brake.upstream_task_ids == {"extract"}
    assert mail.upstream_task_ids == {"extract", "approve_night"}  # nothing is mailed before the brake
    # the wait is the human's response_timeout (not execution_timeout), and no answer means Reject
    assert brake.response_timeout == timedelta(hours=4) and brake.execution_timeout is None
    assert brake.defaults == ["Reject"] and brake.options == ["Approve", "Reject"]
    assert audit.upstream_task_ids == {"mail_customers", "open_night"}
    assert mail.map_index_template and "label" in mail.map_index_template
    # audit is open_night's teardown, so clearing any instance also clears audit, and its verdict is the run's
    assert night.is_setup and audit.is_teardown and audit.on_failure_fail_dagrun
    # publish_red follows audit, a teardown too, that never decides the run's state
    publish = dag.get_task("publish_red")
    assert publish.upstream_task_ids == {"audit", "open_night"} and publish.is_teardown
    assert not publish.on_failure_fail_dagrun and publish.outlets == audit.outlets
    assert not extract.is_setup  # a clear of one instance must not re-run extract (it could regroup batches)
    assert extract.retries >= 3 and mail.retries >= 3
    for task in (extract, mail):
        assert task.retry_exponential_backoff and task.max_retry_delay


def test_no_task_needs_a_pool_the_deployment_would_have_to_create(dag):
    """A task whose pool does not exist is never scheduled, and nothing says why: every task is in
    Airflow's default_pool, which every deployment has (the relays' limits are session_slots.py's)."""
    assert {t.task_id: t.pool for t in dag.tasks} == {t.task_id: "default_pool" for t in dag.tasks}
    assert "pool" not in (ROOT / "dags" / "invoice_mailing.py").read_text()


def test_operator_parameters_have_safe_defaults(dag):
    params = {key: dag.params[key] for key in dag.params}
    assert params == {"dry_run": False, "redirect_to": None, "customers": [], "documents": [], "resend": False,
                      "lookback_days": 30, "lift_bounces": []}


def test_bounces_are_read_hourly_between_nights_one_run_at_a_time():
    from airflow.dag_processing.dagbag import DagBag

    hourly = DagBag(dag_folder=str(ROOT / "dags")).get_dag("invoice_mailing_bounces")
    assert hourly.timetable.expression == "30 * * * *" and str(hourly.timetable.timezone) == "Europe/Oslo"
    assert hourly.catchup is False and hourly.max_active_runs == 1
    assert [t.task_id for t in hourly.tasks] == ["collect_bounces"]


def test_reading_bounces_has_a_time_limit_in_both_dags(dag):
    """Issue 31, finding 3: a pass stops itself after 10 minutes; execution_timeout is the backstop."""
    from airflow.dag_processing.dagbag import DagBag

    hourly = DagBag(dag_folder=str(ROOT / "dags")).get_dag("invoice_mailing_bounces")
    for each in (dag, hourly):
        assert each.get_task("collect_bounces").execution_timeout == timedelta(minutes=30)
