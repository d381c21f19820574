"""Name each mapped instance from the moment the scheduler creates it, not only once a worker runs it.

Airflow 3.3 renders ``map_index_template`` in the worker at the start of a try, so an instance
waiting for its first try shows a bare number in the grid and the REST API. The scheduler calls the
cluster policy ``task_instance_mutation_hook`` for every instance it expands; there the batch labels
are already in ``extract``'s XCom, so ``config/airflow_local_settings.py`` names the instance with
``label_mapped_instance``. Anything unexpected leaves the instance as it is: a label is never worth
a scheduler error.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

DAG_ID, TASK_ID, SOURCE_TASK_ID = "invoice_mailing", "mail_customers", "extract"
_cache: dict[tuple, list[str]] = {}


def label_mapped_instance(task_instance, dag_run=None) -> None:
    if (task_instance.dag_id, task_instance.task_id) != (DAG_ID, TASK_ID) or task_instance.map_index < 0:
        return
    try:
        labels = _labels(task_instance.dag_id, task_instance.run_id, dag_run)
        if task_instance.map_index < len(labels) and not task_instance._rendered_map_index:
            task_instance._rendered_map_index = labels[task_instance.map_index]
    except Exception:  # noqa: BLE001 - see the module's docstring
        log.warning("Could not label %s", task_instance, exc_info=True)


def _labels(dag_id: str, run_id: str, dag_run) -> list[str]:
    """The batch labels of ``extract``'s XCom, read once per run and XCom (a cleared extract writes anew)."""
    from airflow.models.xcom import XComModel
    from sqlalchemy import select
    from sqlalchemy.orm import object_session

    session = object_session(dag_run) if dag_run is not None else None
    if session is None:
        return []
    where = (XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == SOURCE_TASK_ID,
             XComModel.map_index == -1, XComModel.key == "return_value")
    stamp = session.scalar(select(XComModel.timestamp).where(*where))
    key = (dag_id, run_id, stamp)
    if key not in _cache:
        row = session.execute(select(XComModel.value).where(*where)).first()  # a row with .value, as it wants
        batches = (XComModel.deserialize_value(row) if row is not None else None) or []
        _cache.clear()  # one night is expanded at a time; keep no more than its labels
        _cache[key] = [b.get("label", "") if isinstance(b, dict) else "" for b in batches]
    return _cache[key]
