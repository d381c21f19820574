"""The exact bytes each customer got: archived content-addressed, recorded on the rows; the night's asset event."""

from __future__ import annotations

import hashlib

import pytest

from include.invoice_mailing import archive, ledger
from tests.conftest import night_events

MESSAGE = b"From: faktura@fjordlys.example\r\nSubject: Faktura INV000101\r\n\r\nHei\r\n"


def test_a_message_is_stored_once_under_its_hash(tmp_path):
    store = archive.Archive(str(tmp_path / "archive"))
    sha256 = hashlib.sha256(MESSAGE).hexdigest()

    first, again = store.keep(MESSAGE), store.keep(MESSAGE)

    assert first == again == (tmp_path / "archive" / sha256[:2] / f"{sha256}.eml").as_uri()
    assert archive.read(first) == MESSAGE
    assert len(list((tmp_path / "archive").rglob("*.eml"))) == 1


@pytest.mark.parametrize(("stored", "expected"), [(MESSAGE, "match"), (MESSAGE + b"tampered", "changed"),
                                                  (None, "missing")])
def test_verify_says_whether_the_stored_bytes_still_have_the_recorded_hash(tmp_path, stored, expected):
    path = tmp_path / "m.eml"
    if stored is not None:
        path.write_bytes(stored)
    assert archive.verify(path.as_uri(), hashlib.sha256(MESSAGE).hexdigest()) == expected


def test_verify_of_a_row_without_an_archived_message_says_none():
    assert archive.verify(None, None) == "none"


def test_a_broken_archive_never_undoes_a_sent_message(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the archive's folder should be")

    assert archive.Archive(str(blocker)).keep(MESSAGE) is None


def test_the_dag_archives_the_exact_bytes_the_server_received_and_publishes_the_counts(
        erp, run_dag, sink, ledger_db, tmp_path, monkeypatch):
    monkeypatch.setenv(archive.ARCHIVE_ENV, str(tmp_path / "archive"))
    erp.customer("10001", "Bølgen Kafé AS", invoice_email="kari@bolgen.example", email="post@bolgen.example")
    setting = erp.setting(class_id="DOMESTIC")
    erp.recipient(setting, "Invoicing", "To")
    erp.recipient(setting, "Customer", "Cc")
    erp.invoice("INV000101", "10001")

    run = run_dag()

    assert run.state == "success"
    rows = ledger.all_deliveries(ledger_db, ledger.delivery.c.status == "sent")
    assert len(rows) == 2 and len(sink.received) == 1
    assert {r["message_sha256"] for r in rows} == {hashlib.sha256(sink.received[0].data).hexdigest()}
    assert {archive.read(r["message_path"]) for r in rows} == {sink.received[0].data}
    assert {archive.verify(r["message_path"], r["message_sha256"]) for r in rows} == {"match"}
    with ledger_db.connect() as conn:  # the try that sent them is known, for the audit's links
        tries = conn.execute(ledger.mailing_task.select()).mappings().all()
    assert [(t["run_id"], t["map_index"], t["try_number"], t["customers"]) for t in tries] == [
        (run.run_id, 0, 1, ["10001"])]
    event = night_events(run.run_id)[-1]
    assert event["run_id"] == run.run_id and event["by_status"] == {"sent": 2}

