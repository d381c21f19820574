"""The worker's EN 16931 validators: task processes check through them, get what an in-process check finds,
and check by themselves (never skip) when the validators cannot answer; the validators end with their worker."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from include.invoice_mailing import einvoice, einvoice_check, ledger, validator_service
from include.invoice_mailing.einvoice import EInvoiceError
from include.invoice_mailing.einvoice_check import Checker
from include.invoice_mailing.validator_service import SOCKET_ENV, ServiceChecker
from tests.conftest import ROOT
from tests.test_einvoice import document, render, slipped_past
from tests.test_einvoice_mailing import MIXED


@pytest.fixture(scope="module")
def service():
    """One validator process, as a worker starts it; this test process is its worker."""
    before = os.environ.pop(SOCKET_ENV, None)
    children = validator_service.start(processes=1)
    path = os.environ.pop(SOCKET_ENV)
    if before is not None:
        os.environ[SOCKET_ENV] = before
    yield path
    for child in children:
        child.terminate()
        child.wait(10)


@pytest.fixture(scope="module")
def local() -> Checker:
    return Checker().warm()


@pytest.mark.parametrize("syntax", ["CII", "UBL"])
def test_the_validator_service_reports_exactly_what_a_check_in_the_task_process_reports(service, local, syntax):
    """A valid invoice, a buyer in no country (a code-list rule), a VAT number without its country prefix
    (BR-CO-09) and totals that disagree (BR-CO-15): the same rule ids, texts and flags by the service as in
    this process, answered by another process."""
    remote = ServiceChecker(service)
    valid = render(syntax, document())
    no_country = slipped_past(syntax, document(), country_code="XX")
    bare_vat = slipped_past(syntax, document(), vat_number="987654325")
    broken_total = render(syntax, document()).replace(b">5789.86<", b">5789.96<")
    for xml in (valid, no_country, bare_vat, broken_total):
        assert remote.result(xml, syntax) == local.result(xml, syntax)
    assert remote.result(valid, syntax).ok
    assert "BR-CO-09" in {v.rule for v in remote.result(bare_vat, syntax).fatal}
    assert {v.rule for v in remote.result(broken_total, syntax).fatal} >= {"BR-CO-15"}
    assert remote.ask(valid, syntax)["pid"] != os.getpid()
    assert not remote.local


def test_checks_sent_one_after_another_are_each_answered_with_their_own_result(service, local):
    """A task process sends the next document's check before it reads this one's answer: each answer is its
    own document's, in whichever order they are read."""
    remote = ServiceChecker(service)
    valid = render("UBL", document())
    broken_total = render("CII", document()).replace(b">5789.86<", b">5789.96<")
    bare_vat = slipped_past("UBL", document(), vat_number="987654325")
    verdicts = [remote.submit(valid, "UBL"), remote.submit(broken_total, "CII"), remote.submit(bare_vat, "UBL")]
    assert verdicts[2]() == local.result(bare_vat, "UBL")
    assert verdicts[0]().ok
    assert verdicts[1]() == local.result(broken_total, "CII")
    assert not remote.local


def test_a_task_process_that_cannot_reach_the_service_checks_by_itself_and_says_so(tmp_path, caplog, local):
    remote = ServiceChecker(str(tmp_path / "no-such-socket"))
    caplog.set_level(logging.WARNING, logger="include.invoice_mailing.validator_service")
    broken_total = render("CII", document()).replace(b">5789.86<", b">5789.96<")
    assert {v.rule for v in remote.result(broken_total, "CII").fatal} >= {"BR-CO-15"}  # still checked: fails
    assert remote.local
    assert remote.result(render("CII", document()), "CII").ok
    assert "did not answer" in caplog.text and "checks its e-invoices itself" in caplog.text


def answering(tmp_path: Path, reply: bytes) -> str:
    """A socket that answers every request with ``reply`` (a service gone wrong)."""
    path = str(tmp_path / "odd.socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)

    def run():
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            with connection:
                connection.recv(1 << 20)
                connection.sendall(reply)

    threading.Thread(target=run, daemon=True).start()
    return path


def test_an_answer_that_cannot_be_read_is_no_pass(tmp_path, local):
    remote = ServiceChecker(answering(tmp_path, b"\x00\x00\x00\x05{\"ok\""))
    broken_total = render("UBL", document()).replace(b">5789.86<", b">5789.96<")
    assert {v.rule for v in remote.result(broken_total, "UBL").fatal} >= {"BR-CO-15"}
    assert remote.local


def test_a_check_the_service_could_not_run_fails_the_document(tmp_path):
    """The validator could not load its stylesheet: the task process raises it (VALIDATOR), it does not pass."""
    error = {"error": [["VALIDATOR", "fatal", "cannot compile the schematron x.xslt", ""]], "pid": 1}
    body = json.dumps(error).encode()
    remote = ServiceChecker(answering(tmp_path, len(body).to_bytes(4, "big") + body))
    with pytest.raises(EInvoiceError, match="VALIDATOR cannot compile"):
        remote.result(render("CII", document()), "CII")


def test_a_service_with_a_broken_artefact_answers_validator_not_pass(tmp_path):
    broken = Checker({**Checker().paths, "CII-schematron": tmp_path / "missing.xslt"})
    reply = validator_service.answer(broken, "CII", render("CII", document()))
    assert reply["error"][0][0] == "VALIDATOR" and "fatal" not in reply


def running(pid: str) -> bool:
    """Alive and not a zombie (a container's first process may not reap the orphans it adopts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_the_validators_end_with_the_worker_that_started_them():
    """A worker killed with SIGKILL runs no clean-up: its validators notice and exit, and remove the socket."""
    script = textwrap.dedent('''
        import os, time
        from include.invoice_mailing import einvoice, einvoice_check, ledger, validator_service
        children = validator_service.start(processes=2)
        print(" ".join(str(c.pid) for c in children), os.environ["INVOICE_MAILING_VALIDATOR_SOCKET"], flush=True)
        time.sleep(600)
    ''')
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT)
    *pids, path = worker.stdout.readline().split()
    assert len(pids) == 2 and Path(path).exists()
    worker.kill()
    worker.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(running(pid) for pid in pids):
        time.sleep(0.2)
    assert not [pid for pid in pids if running(pid)], "validators outlived their worker"
    assert not Path(path).parent.exists()


def test_a_worker_that_mails_no_e_invoice_never_holds_saxon():
    """The validator loads Saxon (about 200 MB) at its first check, not at its start."""
    import psutil

    before = os.environ.pop(SOCKET_ENV, None)
    [validator] = validator_service.start(processes=1)
    path = os.environ.pop(SOCKET_ENV)
    if before is not None:
        os.environ[SOCKET_ENV] = before
    try:
        time.sleep(5)  # an eager validator would have loaded everything by now (1.5 s here)
        idle = psutil.Process(validator.pid).memory_info().rss
        ServiceChecker(path).warm()
        checked = psutil.Process(validator.pid).memory_info().rss
    finally:
        validator.terminate()
        validator.wait(10)
    assert idle < 120 * 2**20 < checked, (idle / 2**20, checked / 2**20)


def test_a_night_renders_the_next_document_while_one_is_checked_and_claims_it_only_after_the_answer(
        service, erp, run_dag, sink, ledger_db, monkeypatch):
    """Three EHF invoices in one batch, checked by the worker's validator: each document's check is sent before
    the previous one's answer is read (the task process rendered it meanwhile), and a document is claimed only
    after its own answer was read. The broken one in the middle is never claimed and fails naming its rule,
    while its neighbours go out."""
    contact = erp.contact("10001", "kari@bolgen.example", preferred_format="EHF")
    erp.customer("10001", invoice_contact_id=contact)  # one customer: one batch, one task process
    erp.address("10001")
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing", "To")
    for ref in ("INV000101", "INV000102", "INV000103"):
        erp.invoice(ref, "10001", lines=MIXED)

    built = einvoice.build  # a buyer VAT number without its country prefix that slipped past build()'s check

    def build(document, *args):
        invoice = built(document, *args)
        if document.ref_nbr != "INV000102":
            return invoice
        return dataclasses.replace(invoice, buyer=dataclasses.replace(invoice.buyer, vat_number="987654325"))

    events: list[tuple[str, str]] = []
    remote = ServiceChecker(service)

    class Recording:
        def submit(self, xml: bytes, syntax: str):
            ref = re.search(rb"INV\d{6}", xml).group().decode()
            events.append(("check sent", ref))
            verdict = remote.submit(xml, syntax)

            def answer():
                result = verdict()
                events.append(("answer read", ref))
                return result

            return answer

    claim = ledger.claim

    def claiming(db, ids, *args, **kwargs):
        refs = {r["ref_nbr"] for r in ledger.all_deliveries(db) if r["id"] in ids}
        events.extend(("claimed", ref) for ref in sorted(refs))
        return claim(db, ids, *args, **kwargs)

    monkeypatch.setattr(einvoice, "build", build)
    monkeypatch.setattr(einvoice_check, "checker", Recording)
    monkeypatch.setattr(ledger, "claim", claiming)

    run_dag()

    assert sorted(m.message["X-Invoice-Document"] for m in sink.received) == ["INV INV000101", "INV INV000103"]
    (failed,) = ledger.all_deliveries(ledger_db, ledger.delivery.c.ref_nbr == "INV000102")
    assert (failed["status"], failed["reason"]) == ("failed", "config_error")
    assert "BR-CO-09" in failed["detail"]
    at = {event: position for position, event in enumerate(events)}
    assert len(at) == len(events) == 8, events  # each check sent and read once; the two valid ones claimed once
    assert ("claimed", "INV000102") not in at
    for ref in ("INV000101", "INV000103"):
        assert at[("check sent", ref)] < at[("answer read", ref)] < at[("claimed", ref)], events
    assert at[("check sent", "INV000102")] < at[("answer read", "INV000101")], events
    assert at[("check sent", "INV000103")] < at[("answer read", "INV000102")], events
    assert not remote.local


@pytest.fixture
def listener(tmp_path):
    """A local HTTP server, in its own process (Saxon runs in this one and holds its thread while it fetches),
    that records every request: where an external DTD or entity would be fetched."""
    log = tmp_path / "asked.log"
    code = (
        "import sys\n"
        "from http.server import BaseHTTPRequestHandler, HTTPServer\n"
        "class Record(BaseHTTPRequestHandler):\n"
        "    def do_GET(self):\n"
        "        open(sys.argv[1], 'a').write(self.path + '\\n')\n"
        "        body = b'<!ENTITY leak \"fetched\">'\n"
        "        self.send_response(200)\n"
        "        self.send_header('Content-Length', str(len(body)))\n"
        "        self.end_headers()\n"
        "        self.wfile.write(body)\n"
        "    def log_message(self, *args):\n"
        "        pass\n"
        "server = HTTPServer(('127.0.0.1', 0), Record)\n"
        "print(server.server_address[1], flush=True)\n"
        "server.serve_forever()\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(log)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(process.stdout.readline())
        yield f"http://127.0.0.1:{port}", lambda: log.read_text().split() if log.exists() else []
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("syntax", ["CII", "UBL"])
def test_an_e_invoice_with_a_doctype_is_refused_before_saxon_reads_it(service, local, listener, tmp_path, syntax):
    """Issue 31, finding 5: lxml parsed safely, but the raw bytes went on to Saxon, which fetched external DTDs
    and entities over http:// and file://. Any DOCTYPE is now refused (an e-invoice has none), in this process
    and by the validator service, and nothing is fetched."""
    url, asked = listener
    secret = tmp_path / "secret.txt"
    secret.write_text("the host's secret")
    valid = render(syntax, document())
    declaration, root = valid.split(b"?>", 1) if valid.startswith(b"<?xml") else (b"", valid)
    name = root.lstrip()[1:].split(b" ", 1)[0].split(b">", 1)[0].decode()
    doctypes = [
        f'<!DOCTYPE {name} SYSTEM "{url}/external.dtd">',
        f'<!DOCTYPE {name} [<!ENTITY % remote SYSTEM "{url}/parameter-entity"> %remote;]>',
        f'<!DOCTYPE {name} [<!ENTITY secret SYSTEM "file://{secret}"><!ENTITY sent SYSTEM "{url}/?x">]>',
    ]
    for doctype in doctypes:
        xml = (declaration + b"?>" if declaration else b"") + doctype.encode() + root
        for checker in (local, ServiceChecker(service)):
            result = checker.result(xml, syntax)
            assert not result.ok
            assert [v.text for v in result.fatal] == ["a DOCTYPE declaration is not allowed in an e-invoice "
                                                      "(EN 16931 XML has none; its entities could read files "
                                                      "or the network)"]
    assert asked() == []
