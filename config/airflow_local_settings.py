"""Airflow local settings of the invoice mailing project (on the path as ``AIRFLOW_HOME/config`` or PYTHONPATH).

- In the processes that fork task processes (the scheduler with its LocalExecutor, a Celery worker)
  import the pipeline and warm its renderer once, so that task processes inherit it.
- The cluster policy ``task_instance_mutation_hook``: the scheduler names each ``mail_customers``
  instance with its batch's label as it creates it (``include/invoice_mailing/labels.py``; on the
  Airflow versions it was tested on, and a database error is the scheduler's to handle).
"""

__all__ = ["task_instance_mutation_hook"]  # what Airflow takes from this module into its settings


def task_instance_mutation_hook(task_instance, dag_run):  # no default: pluggy passes only named arguments
    try:
        from include.invoice_mailing.labels import label_mapped_instance
    except ImportError:  # the project is not on this process's path: nothing to name
        return
    label_mapped_instance(task_instance, dag_run)


try:
    from include.invoice_mailing import preload as _preload

    if _preload.wanted():
        _preload.warm()
except Exception:  # noqa: BLE001 - a failed warm-up costs speed, never the scheduler
    import logging as _logging

    _logging.getLogger(__name__).warning("Invoice mailing: no renderer warm-up", exc_info=True)
