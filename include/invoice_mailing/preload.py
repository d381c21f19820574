"""Warm the processes that fork task processes, so that every task instance starts with the renderer ready.

A LocalExecutor's workers are forked from the scheduler, and each task process is forked from a
worker (a Celery worker forks its pool the same way). Importing the pipeline and building the
renderer there once (WeasyPrint, its fonts, the parsed stylesheets, the compiled templates) lets
every task process inherit them instead of paying for them again: ``config/airflow_local_settings.py``
calls ``warm()`` in the scheduler and in Celery workers. It also starts that worker's EN 16931 validators
(``validator_service``), which the task processes send their e-invoices to. ``INVOICE_MAILING_PRELOAD=false`` turns it off.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger(__name__)


def _command(argv: list[str] | None) -> list[str]:
    """``airflow``'s command words, without options: ``["celery", "worker"]``."""
    return [a for a in (sys.argv if argv is None else argv)[1:] if not a.startswith("-")]


def _switched_on(name: str) -> bool:
    return os.environ.get(name, "true").lower() not in ("0", "false", "no")


def forks_task_processes(argv: list[str]) -> bool:
    """``airflow scheduler`` (LocalExecutor workers fork from it) or ``airflow celery worker``."""
    words = _command(argv)
    return words[:1] == ["scheduler"] or words[:2] == ["celery", "worker"]


def checks_here(argv: list[str] | None = None, executors: str | None = None) -> bool:
    """Whether this process's task processes will check e-invoices: a Celery worker's do; a scheduler's only
    with a LocalExecutor among its executors (with Celery alone, its validators would idle in the scheduler)."""
    if _command(argv)[:1] != ["scheduler"]:
        return True
    if executors is None:
        from airflow.configuration import conf

        executors = conf.get("core", "executor", fallback="LocalExecutor")
    return any(name.strip().rsplit(".", 1)[-1].split(":")[-1] == "LocalExecutor" for name in executors.split(","))


def wanted(argv: list[str] | None = None) -> bool:
    return _switched_on("INVOICE_MAILING_PRELOAD") and forks_task_processes(argv)


def warm() -> float:
    """Import the pipeline and warm this process's renderer; returns the seconds it took."""
    started = time.perf_counter()
    from include.invoice_mailing import tasks

    tasks.renderer().warm()
    # Not the EN 16931 validator in this process: Saxon's GraalVM isolate does not survive a fork (its
    # garbage collector aborts the forked task process). Validators of their own, spawned, check for the
    # task processes this process forks; they find them through the environment they inherit.
    from include.invoice_mailing import validator_service

    if _switched_on(validator_service.ENABLED_ENV) and checks_here():
        validator_service.start()

    # A forked child inherits the font configuration's folder of @font-face files. Task processes end
    # with os._exit (no finaliser runs); any other forked child must not delete the parent's folder.
    os.register_at_fork(after_in_child=tasks.renderer().disown_font_files)
    took = time.perf_counter() - started
    log.info("Invoice mailing: renderer warmed in %.2f s for the task processes forked from pid %d", took,
             os.getpid())
    return took
