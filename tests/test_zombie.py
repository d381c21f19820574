"""Two processes run the same customer's send step at once (a zombie and its replacement): one sends."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime

from include.invoice_mailing import ledger, pipeline
from tests.conftest import ROOT, smtp_connection
from tests.erp import TinyErp

NIGHT = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)


def test_twin_attempts_of_one_customer_send_each_delivery_exactly_once(backend, sink, tmp_path, monkeypatch):
    erp_engine, ledger_db = backend["engines"]
    erp = TinyErp(erp_engine)
    erp.customer("10001", invoice_email="kari@bolgen.example", email="post@bolgen.example")
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing", "To")
    erp.recipient(setting, "Customer", "Cc")
    erp.invoice("INV000101", "10001")
    erp.invoice("INV000102", "10001", lines=((1, "Filterkaffe, malt 500 g", "12", "120.19", "15"),))
    ctx = pipeline.RunContext.from_airflow("run-1", NIGHT, NIGHT, {})
    [batch] = pipeline.extract(erp_engine, ledger_db, ctx)
    sink.faults.data_delay = 1.0  # each message takes a second: the twins overlap for sure

    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AIRFLOW_CONN_SMTP_DEFAULT": smtp_connection(sink.port)}
    urls = [e.url.render_as_string(hide_password=False) for e in (erp_engine, ledger_db)]
    twins = [subprocess.Popen([sys.executable, "-m", "tests.twin_attempt", *urls, json.dumps(batch), str(go)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("go.ready.*"))) < 2:  # both have imported everything and wait at the barrier
        assert time.monotonic() < deadline, "the twins never got ready"
        assert all(twin.poll() is None for twin in twins), "a twin died before the barrier"
        time.sleep(0.05)
    go.touch()
    outcomes = []
    for twin in twins:
        out, err = twin.communicate(timeout=120)
        assert twin.returncode == 0, err[-2000:]
        outcomes.append(json.loads(out.strip().splitlines()[-1]))

    arrived = Counter((m.message["Message-ID"], rcpt) for m in sink.received for rcpt in m.envelope_to)
    assert len(arrived) == 4 and set(arrived.values()) == {1}
    # The twins met: one found deliveries claimed by the other, still alive, and left them alone,
    # failing its try so that Airflow retries it later.
    assert any("held by another running attempt" in o.get("pending", "") for o in outcomes), outcomes
    assert {(r["status"], r["attempts"]) for r in ledger.all_deliveries(ledger_db)} == {("sent", 1)}

    from include.invoice_mailing.deliver import SmtpSender
    from include.invoice_mailing.render import Renderer

    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", smtp_connection(sink.port))
    with SmtpSender() as sender:  # that retry, once the twins are gone: nothing left to send
        result = pipeline.mail_batch(erp_engine, ledger_db, ctx, batch, renderer=Renderer(), sender=sender)
    assert result.get("sent", 0) == 0 and len(sink.received) == 2
