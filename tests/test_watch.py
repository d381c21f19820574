"""The morning watch asks Airflow for tonight's run of invoice_mailing: missing, failed, still running
or paused alerts the operators (through a real SMTP server), a night that succeeded does not."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.conftest import ROOT, smtp_connection

OPS = "ops@fjordlys.example"


@pytest.fixture(scope="module")
def dags(airflow_db):
    """Both DAGs, known to Airflow's metadata database as the dag-processor would record them."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db
    from airflow.settings import Session

    with Session() as session:
        DagBundlesManager().sync_bundles_to_db(session=session)
        session.commit()
    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    sync_bag_to_db(bag, "dags-folder", None)
    return bag


@pytest.fixture
def night(dags, sink, monkeypatch):
    """A fresh night (its own date, so tests do not see each other's runs); returns a function that
    records tonight's run of invoice_mailing in a state, pauses or unpauses it, and runs the watch. The
    runs it recorded go afterwards: the metadata database is the test session's, and a run left queued or
    running would make the hourly bounce DAG of a later test skip."""
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.settings import Session

    monkeypatch.setenv("AIRFLOW_CONN_MAILING_ALERTS", smtp_connection(sink.port, to=OPS))
    # a winter night: 02:00 Oslo is 01:00 UTC; the watch runs at 06:00 Oslo, 05:00 UTC
    n = uuid.uuid4().int
    day = datetime(2100 + n % 7000, 1, 1 + n % 28, tzinfo=UTC)
    tonight, morning = day.replace(hour=1), day.replace(hour=5)

    def watch(state: str | None, paused: bool = False, logical_date: datetime = tonight):
        with Session() as session:
            session.query(DagModel).filter(DagModel.dag_id == "invoice_mailing").update({"is_paused": paused})
            if state is not None:
                session.add(DagRun(dag_id="invoice_mailing", run_id=f"scheduled__{logical_date.isoformat()}",
                                   logical_date=logical_date, run_after=logical_date, run_type="scheduled",
                                   state=state, data_interval=(logical_date, logical_date)))
            session.commit()
        run = dags.get_dag("invoice_mailing_watch").test(logical_date=morning)
        return run.state, [m.message["Subject"] for m in sink.received if m.envelope_to == [OPS]]

    watch.day = day
    yield watch
    with Session() as session:
        session.query(DagModel).filter(DagModel.dag_id == "invoice_mailing").update({"is_paused": True})
        session.query(DagRun).filter(DagRun.dag_id == "invoice_mailing",
                                     DagRun.logical_date.between(day - timedelta(days=1), day + timedelta(days=1))
                                     ).delete(synchronize_session=False)
        session.commit()


def test_a_night_that_succeeded_is_quiet(night):
    assert night("success") == ("success", [])


@pytest.mark.parametrize(("state", "paused", "problem"), [
    ("failed", False, "tonight's run failed"),
    ("running", False, "tonight's run has not finished"),
    ("queued", False, "tonight's run has not finished"),
    (None, False, "no run tonight (is the scheduler running?)"),
    (None, True, "no run tonight: the DAG is paused"),
    ("success", True, "the DAG is paused: tomorrow's night will not run"),
])
def test_a_night_not_done_by_the_morning_alerts_and_fails_the_watch(night, state, paused, problem):
    assert night(state, paused) == ("failed", [f"Invoice mailing {night.day.date().isoformat()}: {problem}"])


def test_only_tonights_run_counts(night):
    """Yesterday's success does not make up for a night that never ran."""
    state, alerts = night("success", logical_date=night.day.replace(hour=1) - timedelta(days=1))
    assert state == "failed" and alerts and "no run tonight" in alerts[0]


@pytest.mark.parametrize(("watch_utc", "night_utc"), [
    ("2026-11-24T05:00:00+00:00", "2026-11-24T01:00:00+00:00"),  # winter: 06:00 and 02:00 in Oslo
    ("2026-06-24T04:00:00+00:00", "2026-06-24T00:00:00+00:00"),  # summer
    ("2026-06-24T23:30:00+00:00", "2026-06-24T00:00:00+00:00"),  # a watch at 01:30 Oslo: the night before
])
def test_tonight_is_the_last_two_oclock_in_oslo(watch_utc, night_utc):
    from include.invoice_mailing import tasks

    assert tasks.tonight(datetime.fromisoformat(watch_utc)) == datetime.fromisoformat(night_utc)
