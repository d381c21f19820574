"""Warm workers: a process that forks task processes builds the renderer once; the children inherit it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from include.invoice_mailing import preload
from tests.conftest import ROOT


@pytest.mark.parametrize("argv, forks", [
    (["airflow", "scheduler"], True),
    (["airflow", "celery", "worker", "--celery-hostname", "w1"], True),
    (["airflow", "api-server", "--port", "8080"], False),
    (["airflow", "dag-processor"], False),
    (["airflow", "tasks", "test", "invoice_mailing", "extract"], False),
])
def test_only_the_processes_that_fork_task_processes_warm_up(argv, forks):
    assert preload.forks_task_processes(argv) is forks


@pytest.mark.parametrize("argv, executors, checks", [
    (["airflow", "scheduler"], "LocalExecutor", True),
    (["airflow", "scheduler"], "CeleryExecutor,LocalExecutor", True),
    (["airflow", "scheduler"], "airflow.executors.local_executor.LocalExecutor", True),
    (["airflow", "scheduler"], "CeleryExecutor", False),  # docker-compose: the workers check, not the scheduler
    (["airflow", "celery", "worker"], "CeleryExecutor", True),
])
def test_validators_are_started_only_where_task_processes_check(argv, executors, checks):
    assert preload.checks_here(argv, executors) is checks


def test_a_forked_task_process_inherits_the_warm_renderer_and_leaves_the_parents_fonts_alone():
    """As a LocalExecutor's scheduler: airflow_local_settings warms the renderer, then each task process
    is a fork that renders without parsing a stylesheet again; the parent never starts Saxon (its GraalVM
    isolate does not survive a fork) and neither do the children: they check their e-invoices through the
    validator process the warm-up spawned (one for all of them); a child's exit does not delete the parent's
    fonts."""
    script = textwrap.dedent('''
        import os, sys
        sys.argv = ["airflow", "scheduler"]
        import airflow_local_settings  # warms, as the scheduler's start does
        from datetime import date
        from decimal import Decimal
        from include.invoice_mailing import tasks
        from include.invoice_mailing.rules import Customer, Document
        renderer = tasks.renderer()
        folder = renderer.font_config._folder
        misses = renderer.stylesheets.cache_info().misses
        from include.invoice_mailing import einvoice_check
        from include.invoice_mailing.rules import CustomerAddress, DocumentLine
        line = DocumentLine(1, "Kaffebønner", Decimal("1"), Decimal("80"), Decimal("25"), Decimal("80"))
        doc = Document("INV", "INV000101", "10001", "Open", date(2026, 11, 23), None, "NOK", Decimal("100"), Decimal("20"),
                       lines=(line,))
        address = CustomerAddress("10001", "NO", "Bryggen 3", "5003", "Bergen", "987654325", "NO987654325MVA")
        saxon_in_parent = einvoice_check._saxon_pid
        for _ in range(2):
            pid = os.fork()
            if pid == 0:  # the task process
                pdf = tasks.renderer().attachment(doc, Customer("10001", "Bølgen", "DOMESTIC"), None, "invoice", "PDF", "nb_NO")
                fresh = tasks.renderer().stylesheets.cache_info().misses - misses
                ehf = tasks.renderer().attachment(doc, Customer("10001", "Bølgen", "DOMESTIC"), None, "invoice", "EHF",
                                                  "nb_NO", address=address)  # checked by the worker's validator
                by = einvoice_check.checker()
                print(f"child pdf={pdf.content[:5]!r} parsed_again={fresh} ehf={ehf.content[:5]!r} "
                      f"saxon_here={einvoice_check._saxon_pid is not None} "
                      f"by_service={type(by).__name__ == 'ServiceChecker' and not by.local}", flush=True)
                sys.exit(0)  # a normal exit: finalisers run
            os.waitpid(pid, 0)
        print(f"parent fonts_kept={folder is None or folder.exists()} saxon_started={saxon_in_parent is not None}")
    ''')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": f"{ROOT}:{ROOT / 'config'}", "PATH": "/usr/bin:/bin",
                                 "AIRFLOW_HOME": str(ROOT / "demo" / "preload-test")})
    lines = [line for line in result.stdout.splitlines() if line.startswith(("child", "parent"))]
    assert lines == ["child pdf=b'%PDF-' parsed_again=0 ehf=b'<?xml' saxon_here=False by_service=True"] * 2 + [
        "parent fonts_kept=True saxon_started=False"], result.stderr[-3000:]
