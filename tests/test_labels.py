"""The cluster policy that names waiting mapped instances: what it costs the scheduler per expansion,
that a database error reaches the scheduler, and that it is off on an Airflow it was not tested on."""

from __future__ import annotations

import logging
import time
import uuid
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine, event, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from include.invoice_mailing import labels


def instance(map_index: int, run_id: str = "scheduled__2026-11-24T01:00:00+00:00"):
    return SimpleNamespace(dag_id="invoice_mailing", task_id="mail_customers", map_index=map_index, run_id=run_id,
                           _rendered_map_index=None)


def attached_run(session: Session, run_id: str = "scheduled__2026-11-24T01:00:00+00:00"):
    """A DagRun in the scheduler's session, as the policy receives it (not flushed: no row is needed)."""
    from airflow.models.dagrun import DagRun

    run = DagRun(dag_id="invoice_mailing", run_id=run_id)
    session.add(run)
    return run


@pytest.fixture(params=["sqlite", "postgresql"])
def broken_session(request, tmp_path):
    """A scheduler session whose database fails under the policy: SQLite without Airflow's tables, and a
    PostgreSQL connection the server terminated (the OperationalError of a restart or failover)."""
    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'empty.db'}")
        with Session(engine, autoflush=False) as session:
            yield session
        engine.dispose()
        return
    admin = request.getfixturevalue("postgres_admin")
    engine = create_engine(str(admin.url.set(drivername="postgresql+psycopg2")), pool_pre_ping=False)
    with Session(engine, autoflush=False) as session:
        pid = session.execute(text("select pg_backend_pid()")).scalar_one()
        with admin.connect() as conn:
            conn.execute(text("select pg_terminate_backend(:pid)"), {"pid": pid})
        yield session
    engine.dispose()


def test_a_database_error_in_the_policy_reaches_the_scheduler(broken_session, monkeypatch):
    monkeypatch.setattr(labels, "_cache", {})
    ti = instance(0)

    with pytest.raises(OperationalError):
        labels.label_mapped_instance(ti, attached_run(broken_session))
    assert ti._rendered_map_index is None


def test_an_xcom_of_an_unexpected_shape_leaves_the_instance_unnamed_with_a_warning(monkeypatch, caplog):
    def odd(*args):
        raise TypeError("'int' object is not iterable")

    monkeypatch.setattr(labels, "_labels", odd)
    ti = instance(0)
    with caplog.at_level(logging.WARNING, logger=labels.__name__):
        labels.label_mapped_instance(ti, object())
    assert ti._rendered_map_index is None and "Could not label" in caplog.text


def test_the_shim_is_off_on_an_airflow_it_was_not_tested_on(monkeypatch, caplog):
    import airflow

    monkeypatch.setattr(labels, "_labels", lambda *args: ["customer 10001"])
    monkeypatch.setattr(labels, "_warned", [])
    ti = instance(0)
    labels.label_mapped_instance(ti, object())
    assert ti._rendered_map_index == "customer 10001"  # this Airflow (3.3): on

    monkeypatch.setattr(airflow, "__version__", "3.4.0")
    later = instance(1)
    with caplog.at_level(logging.WARNING, logger=labels.__name__):
        labels.label_mapped_instance(later, object())
        labels.label_mapped_instance(later, object())
    assert later._rendered_map_index is None
    assert caplog.text.count("Airflow 3.4.0: mapped instances are not named") == 1


@pytest.fixture(params=["sqlite", "postgresql"])
def xcom_table(request, tmp_path):
    """Airflow's xcom table (its columns and indexes, not its foreign keys) on SQLite and PostgreSQL."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import Column, Index, MetaData, Table

    if request.param == "sqlite":
        engine = create_engine(f"sqlite:///{tmp_path / 'metadata.db'}")
    else:
        engine = request.getfixturevalue("postgres_databases")["engines"][0]
    source = XComModel.__table__
    table = Table(source.name, MetaData(), *(Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                                            for c in source.columns))
    for index in source.indexes:
        Index(index.name, *(table.c[c.name] for c in index.columns))
    table.create(engine)
    yield request.param, engine, table
    engine.dispose()


@pytest.mark.parametrize("instances", [200, 1000])
def test_what_the_policy_costs_the_scheduler_per_expansion(xcom_table, instances, monkeypatch, capsys):
    """The scheduler expands a night's instances in one transaction; the policy runs once per instance."""
    from datetime import UTC, datetime

    backend, engine, table = xcom_table
    monkeypatch.setattr(labels, "_cache", {})
    run_id = f"scheduled__{uuid.uuid4().hex}"
    batches = [{"label": f"customer {10000 + i}", "customers": [str(10000 + i)], "documents": []}
               for i in range(instances)]
    with engine.begin() as conn:
        conn.execute(table.insert().values(dag_run_id=1, task_id="extract", map_index=-1, key="return_value",
                                           dag_id="invoice_mailing", run_id=run_id, value=batches,
                                           timestamp=datetime.now(UTC)))
    statements = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    with Session(engine, autoflush=False) as session:
        run = attached_run(session, run_id)
        tis = [instance(i, run_id) for i in range(instances)]
        started = time.perf_counter()
        for ti in tis:
            labels.label_mapped_instance(ti, run)
        took = time.perf_counter() - started
    event.remove(engine, "before_cursor_execute", count)
    assert [ti._rendered_map_index for ti in tis] == [b["label"] for b in batches]
    assert len(statements) == 1  # one read of the XCom per expansion, whatever the number of instances
    with capsys.disabled():
        print(f"\nlabel policy on {backend}: {took * 1000:.0f} ms per expansion of {instances} instances "
              f"({took * 1e6 / instances:.0f} µs each, {len(statements)} statements)")


def test_a_cleared_extract_is_read_anew_by_the_next_expansion(xcom_table, monkeypatch):
    from datetime import UTC, datetime

    _, engine, table = xcom_table
    monkeypatch.setattr(labels, "_cache", {})
    run_id = f"scheduled__{uuid.uuid4().hex}"
    where = (table.c.run_id == run_id)
    with engine.begin() as conn:
        conn.execute(table.insert().values(dag_run_id=1, task_id="extract", map_index=-1, key="return_value",
                                           dag_id="invoice_mailing", run_id=run_id,
                                           value=[{"label": "customer 10001"}], timestamp=datetime.now(UTC)))
    with Session(engine, autoflush=False) as session:
        first = instance(0, run_id)
        labels.label_mapped_instance(first, attached_run(session, run_id))
    with engine.begin() as conn:  # extract cleared and run again: it regrouped
        conn.execute(table.update().where(where).values(value=[{"label": "customers 10001..10002 (2)"}],
                                                        timestamp=datetime.now(UTC)))
    with Session(engine, autoflush=False) as session:
        again = instance(0, run_id)
        labels.label_mapped_instance(again, attached_run(session, run_id))
    assert (first._rendered_map_index, again._rendered_map_index) == ("customer 10001", "customers 10001..10002 (2)")
