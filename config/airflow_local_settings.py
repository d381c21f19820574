"""Airflow local settings of the invoice mailing project (on the path as ``AIRFLOW_HOME/config`` or PYTHONPATH).

Only one thing: in the processes that fork task processes (the scheduler with its LocalExecutor,
a Celery worker) import the pipeline and warm its renderer once, so that task processes inherit it.
"""

__all__: list[str] = []  # Airflow copies a local settings module's public names into its settings

try:
    from include.invoice_mailing import preload as _preload

    if _preload.wanted():
        _preload.warm()
except Exception:  # noqa: BLE001 - a failed warm-up costs speed, never the scheduler
    import logging as _logging

    _logging.getLogger(__name__).warning("Invoice mailing: no renderer warm-up", exc_info=True)
