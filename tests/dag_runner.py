"""A real DAG run in its own process (for the crash test): python -m tests.dag_runner LOGICAL_DATE RUN_AFTER.

The same RUN_AFTER a second time is the same run cleared and run again, as an operator does in the UI.
Exits 0 when the run succeeded. ``python -m tests.dag_runner serve`` runs them on request, each in a
child forked from one warm process (see ``serve``). With ``INVOICE_MAILING_CRASH_AT=step:n`` this process SIGKILLs itself
the n-th time a send passes ``step``: ``after_claim`` (its deliveries claimed, nothing sent) or
``before_commit`` (the SMTP server answered, the ledger not yet told). The hook wraps the ledger's
claim and the sender here, so that the pipeline itself carries no test seam.
"""

from __future__ import annotations

import os
import signal
import sys
from functools import cache
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


def run(logical_date: str, run_after: str) -> int:
    """One DAG run in this process; 0 when it succeeded."""
    if os.environ.get("INVOICE_MAILING_CRASH_AT"):
        install_crash(os.environ["INVOICE_MAILING_CRASH_AT"])
    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("invoice_mailing")
    result = dag.test(logical_date=pendulum.parse(logical_date), run_after=pendulum.parse(run_after))
    return 0 if result.state == "success" else 1


def serve() -> None:
    """Runs on request, each in a child forked from this process once Airflow is imported and its
    in-process execution API built: these take about 11 s of a 16 s run on 2 cores, and the crash
    test makes 120 runs. The child is an ordinary process as far as the run is concerned: it has its
    own pid (which the test's SMTP server may SIGKILL), its environment, its connections, its stderr.

    Requests on stdin, one JSON object a line: ``{"env": {...}, "stderr": PATH, "logical_date": ...,
    "run_after": ...}``. Answers on stdout: ``pid N`` once the child is forked, then ``exit CODE``
    (minus the signal's number when a signal ended it)."""
    import json

    from airflow import settings
    from airflow.sdk.execution_time import supervisor

    # dag.test() would build the execution API anew for every task (Cadwyn's routes, about 1 s each):
    # build it once, here, without starting its event loop thread (a thread does not survive a fork).
    supervisor.in_process_api_server = cache(supervisor.in_process_api_server)
    supervisor.in_process_api_server().app._cadwyn_initialize()
    settings.engine.dispose()
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.environ.update(request["env"])
                err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(err, 2)
                settings.engine.dispose(close=False)  # the parent's pooled connections stay the parent's
                code = run(request["logical_date"], request["run_after"])
            except BaseException:  # noqa: BLE001 - the child must never return into the server's loop
                import traceback

                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {os.waitstatus_to_exitcode(status)}", flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        serve()
    else:
        sys.exit(run(*sys.argv[1:3]))
