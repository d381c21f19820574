"""A real DAG run in its own process (for the crash test): python -m tests.dag_runner LOGICAL_DATE RUN_AFTER.

The same RUN_AFTER a second time is the same run cleared and run again, as an operator does in the UI.
Exits 0 when the run succeeded. With ``INVOICE_MAILING_CRASH_AT=step:n`` this process SIGKILLs itself
the n-th time a send passes ``step``: ``after_claim`` (its deliveries claimed, nothing sent) or
``before_commit`` (the SMTP server answered, the ledger not yet told). The hook wraps the ledger's
claim and the sender here, so that the pipeline itself carries no test seam.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pendulum
from airflow.dag_processing.dagbag import DagBag

ROOT = Path(__file__).resolve().parents[1]


def install_crash(spec: str) -> None:
    from include.invoice_mailing import ledger
    from include.invoice_mailing.deliver import SmtpSender

    step, _, nth = spec.partition(":")
    passed = 0

    def passing() -> None:
        nonlocal passed
        passed += 1
        if passed == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)

    if step == "after_claim":
        claim = ledger.claim

        def claim_then_crash(*args, **kwargs):
            claimed, busy = claim(*args, **kwargs)
            if claimed:
                passing()
            return claimed, busy

        ledger.claim = claim_then_crash
    elif step == "before_commit":
        send = SmtpSender.send

        def send_then_crash(self, *args, **kwargs):
            result = send(self, *args, **kwargs)
            passing()
            return result

        SmtpSender.send = send_then_crash
    else:
        raise SystemExit(f"unknown crash step {step!r}")


def main(logical_date: str, run_after: str) -> int:
    if os.environ.get("INVOICE_MAILING_CRASH_AT"):
        install_crash(os.environ["INVOICE_MAILING_CRASH_AT"])
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("invoice_mailing")
    run = dag.test(logical_date=pendulum.parse(logical_date), run_after=pendulum.parse(run_after))
    return 0 if run.state == "success" else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
