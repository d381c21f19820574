"""One attempt of the mapped task's send step, as a separate process (for the zombie test).

python -m tests.twin_attempt ERP_URL LEDGER_URL BATCH_JSON GO_FILE: says it is ready (GO_FILE.ready.PID),
waits until GO_FILE exists, then runs
pipeline.mail_batch and prints one JSON line: {"sent": n} or {"pending": message}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import create_engine

from include.invoice_mailing import pipeline
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.render import Renderer


def main(erp_url: str, ledger_url: str, batch: str, go_file: str) -> None:
    erp, ledger_db = create_engine(erp_url), create_engine(ledger_url)
    renderer = Renderer()
    night = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
    ctx = pipeline.RunContext.from_airflow("run-1", night, night, {})
    Path(f"{go_file}.ready.{os.getpid()}").touch()  # imported and connected: ready at the barrier
    while not Path(go_file).exists():
        time.sleep(0.005)
    try:
        with SmtpSender(backoff=0.0) as sender:
            result = pipeline.mail_batch(erp, ledger_db, ctx, json.loads(batch), renderer=renderer, sender=sender)
        print(json.dumps({"sent": result.get("sent", 0)}), flush=True)
    except pipeline.DeliveriesPending as exc:
        print(json.dumps({"pending": str(exc)}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
