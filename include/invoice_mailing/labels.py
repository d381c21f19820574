"""Name each mapped instance from the moment the scheduler creates it, not only once a worker runs it.

Airflow 3.3 renders ``map_index_template`` in the worker at the start of a try, so an instance
waiting for its first try shows a bare number in the grid and the REST API. The scheduler calls the
cluster policy ``task_instance_mutation_hook`` for every instance it expands; there the batch labels
are already in ``extract``'s XCom, so ``config/airflow_local_settings.py`` names the instance with
``label_mapped_instance``.

This is the project's one shim on Airflow's private parts (the ORM column ``_rendered_map_index``,
which has no public setter), so it is guarded by version: it runs on the Airflow minor versions it
was tested on (``TESTED_ON``) and, on any other, only logs once that it is off. A label that cannot
be made from the XCom (an unexpected shape) leaves the instance as it is, with a warning; a database
error is raised: swallowing it would leave the scheduler's transaction aborted (PostgreSQL refuses
every later statement of it) and the real cause hidden behind the next, unrelated, failure.

Cost: one read of ``extract``'s XCom per expansion (the scheduler's transaction), then a dictionary
look-up per instance (``tests/test_labels.py`` measures it per expansion).
"""

from __future__ import annotations

import logging
import weakref

log = logging.getLogger(__name__)

DAG_ID, TASK_ID, SOURCE_TASK_ID = "invoice_mailing", "mail_customers", "extract"
TESTED_ON = ("3.3",)  # Airflow major.minor versions on which _rendered_map_index was checked
_cache: dict[tuple, tuple] = {}  # (dag_id, run_id) -> (weak reference to the transaction, labels)
_warned: list[str] = []


def applies(version: str | None = None) -> bool:
    """Whether this Airflow is one the shim was tested on; logs once when it is not."""
    if version is None:
        from airflow import __version__ as version
    if ".".join(version.split(".")[:2]) in TESTED_ON:
        return True
    if not _warned:
        _warned.append(version)
        log.warning("Airflow %s: mapped instances are not named before their first try (the shim in %s was "
                    "tested on %s; check whether Airflow names them itself, then extend TESTED_ON)",
                    version, __name__, ", ".join(TESTED_ON))
    return False


def label_mapped_instance(task_instance, dag_run=None) -> None:
    if (task_instance.dag_id, task_instance.task_id) != (DAG_ID, TASK_ID) or task_instance.map_index < 0:
        return
    if not applies():
        return
    try:
        labels = _labels(task_instance.dag_id, task_instance.run_id, dag_run)
    except (LookupError, TypeError, ValueError):  # the XCom's shape, not the database: no label, no harm
        log.warning("Could not label %s", task_instance, exc_info=True)
        return
    if task_instance.map_index < len(labels) and labels[task_instance.map_index] \
            and not task_instance._rendered_map_index:
        task_instance._rendered_map_index = labels[task_instance.map_index]


def _labels(dag_id: str, run_id: str, dag_run) -> list[str]:
    """The batch labels of ``extract``'s XCom, read once per run and scheduler transaction.

    The scheduler expands a night's instances in one transaction, so the XCom is read once per
    expansion; a cleared ``extract`` writes its XCom in another transaction, so a later expansion
    reads it anew."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select
    from sqlalchemy.orm import object_session

    session = object_session(dag_run) if dag_run is not None else None
    if session is None:
        return []
    cached = _cache.get((dag_id, run_id))
    if cached is not None and cached[0]() is session.get_transaction() is not None:
        return cached[1]
    row = session.execute(select(XComModel.value).where(
        XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == SOURCE_TASK_ID,
        XComModel.map_index == -1, XComModel.key == "return_value")).first()  # a row with .value, as it wants
    batches = (XComModel.deserialize_value(row) if row is not None else None) or []
    found = [b.get("label", "") if isinstance(b, dict) else "" for b in batches]
    _cache.clear()  # one night is expanded at a time; keep no more than its labels
    _cache[(dag_id, run_id)] = (weakref.ref(session.get_transaction()), found)
    return found
