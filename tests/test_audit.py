"""The audit's questions as plain functions: nights, filters, histories, masking and the export files."""

from __future__ import annotations

import csv
import io
import json
from datetime import date

import pytest

from include.invoice_mailing import audit
from include.invoice_mailing.audit import DeliveryFilter, FilterError
from tests.audit_seed import NIGHT_1, NIGHT_2, PREVIEW, RESEND, seed


@pytest.fixture
def ids(ledger_db):
    return seed(ledger_db)


def test_mask_rows_masks_addresses_in_server_answers_too():
    rows = audit.mask_rows([{"recipient": "ola@fjellheimen.example", "redirected_to": None,
                             "last_error": "550 5.1.1 <ola@fjellheimen.example>: user unknown", "detail": None}])
    assert rows == [{"recipient": "o***@fjellheimen.example", "redirected_to": None,
                     "last_error": "550 5.1.1 <o***@fjellheimen.example>: user unknown", "detail": None}]


def test_mask_rows_masks_internationalised_and_dotless_addresses_in_server_answers():
    rows = audit.mask_rows([{"recipient": "åse@bølgen.no", "redirected_to": "ola@intranet",
                             "last_error": "550 5.1.1 <åse@bølgen.no>: user unknown",
                             "detail": "451 4.2.0 <ola@intranet>: mailbox busy"}])
    assert rows == [{"recipient": "å***@bølgen.no", "redirected_to": "o***@intranet",
                     "last_error": "550 5.1.1 <å***@bølgen.no>: user unknown",
                     "detail": "451 4.2.0 <o***@intranet>: mailbox busy"}]


@pytest.mark.parametrize(("value", "cell"), [
    ("=2+5@bolgen.example", "'=2+5@bolgen.example"),
    ("+47 22 00 00 00", "'+47 22 00 00 00"),
    ("-1+1", "'-1+1"),
    ("@SUM(A1:A9)", "'@SUM(A1:A9)"),
    ("\tkari@bolgen.example", "'\tkari@bolgen.example"),
    ("\r=1", "'\r=1"),
    ("kari@bolgen.example", "kari@bolgen.example"),
    ("manual__2026-11-24", "manual__2026-11-24"),
    (-3, -3),
    (None, None),
])
def test_a_csv_cell_a_spreadsheet_would_run_as_a_formula_is_shown_as_text(value, cell):
    table = list(csv.DictReader(io.StringIO(audit.to_csv([{"id": 1, "recipient": value, "detail": value}]))))
    expected = "" if cell is None else str(cell)
    assert (table[0]["recipient"], table[0]["detail"]) == (expected, expected)


def test_nights_counts_each_run_by_status_and_reason_newest_first(ledger_db, ids):
    nights = audit.nights(ledger_db)

    assert [n["run_id"] for n in nights] == [RESEND, PREVIEW, NIGHT_2, NIGHT_1]
    first = nights[-1]
    assert first["night"] == date(2026, 11, 23)
    assert first["by_status"] == {"sent": 2, "skipped": 1}
    assert first["counts"] == [{"status": "sent", "reason": "", "deliveries": 2},
                               {"status": "skipped", "reason": "no_address", "deliveries": 1}]
    assert nights[0]["params"] == {"documents": ["INV000101"], "resend": True}


@pytest.mark.parametrize(("query", "expected"), [
    ({}, {"sent", "cc", "refused", "failed", "html", "preview", "resend"}),
    ({"customer": "10002"}, {"failed", "html"}),
    ({"document": "INV000101"}, {"sent", "cc", "preview", "resend"}),
    ({"recipient": "KARI@"}, {"sent", "preview", "resend"}),
    ({"status": "failed"}, {"failed"}),
    ({"reason": "no_address"}, {"refused"}),
    ({"format": "HTML"}, {"html"}),
    ({"format": "EHF"}, set()),  # a format the ERP offers, though this ledger has none of it
    ({"mode": "dry_run"}, {"preview"}),
    ({"run_id": NIGHT_2}, {"failed", "html"}),
    ({"since": "2026-11-24", "until": "2026-11-24"}, {"failed", "html", "preview"}),
    ({"customer": "10001", "since": "2026-11-25"}, {"resend"}),
    ({"status": "", "mode": ""}, {"sent", "cc", "refused", "failed", "html", "preview", "resend"}),
])
def test_deliveries_filter(ledger_db, ids, query, expected):
    rows = audit.deliveries(ledger_db, DeliveryFilter.from_query(query))
    assert {name for name, i in ids.items() if i in {r["id"] for r in rows}} == expected
    assert audit.count_deliveries(ledger_db, DeliveryFilter.from_query(query)) == len(expected)


def test_a_reader_who_sees_masks_can_only_look_up_an_address_they_already_know(ledger_db, ids):
    flt = DeliveryFilter(recipient="kari@")
    assert audit.deliveries(ledger_db, flt, exact_recipient=True) == []
    exact = audit.deliveries(ledger_db, DeliveryFilter(recipient="Kari@Bolgen.example"), exact_recipient=True)
    assert {r["id"] for r in exact} == {ids["sent"], ids["preview"], ids["resend"]}


@pytest.mark.parametrize("query", [{"status": "lost"}, {"mode": "test"}, {"format": "XML"}, {"since": "24.11.2026"},
                                   {"since": "2026-11-25", "until": "2026-11-24"}])
def test_a_filter_that_cannot_be_right_is_refused(query):
    with pytest.raises(FilterError):
        DeliveryFilter.from_query(query)


def test_each_delivery_links_to_the_try_that_last_handled_it(ledger_db, ids):
    failed = audit.delivery_row(ledger_db, ids["failed"])
    assert (failed["night"], failed["map_index"], failed["try_number"]) == (date(2026, 11, 24), 0, 2)
    sent = audit.delivery_row(ledger_db, ids["sent"])
    assert (sent["map_index"], sent["try_number"]) == (0, 1)
    assert audit.delivery_row(ledger_db, ids["resend"])["map_index"] is None  # no try recorded for that run
    assert audit.task_customers(ledger_db, NIGHT_2, 0) == ("10002",)


def test_a_documents_history_shows_nights_previews_and_resends_in_order(ledger_db, ids):
    history = audit.document_history(ledger_db, "INV000101")
    assert [(r["last_run_id"], r["mode"], r["generation"], r["status"]) for r in history] == [
        (NIGHT_1, "live", 0, "sent"), (NIGHT_1, "live", 0, "sent"), (PREVIEW, "dry_run", 0, "skipped"),
        (RESEND, "live", 1, "sent")]
    assert history[-1]["resend_of"] == ids["sent"]


def test_what_a_customer_got_between_two_days(ledger_db, ids):
    rows = audit.customer_history(ledger_db, "10001", date(2026, 11, 23), date(2026, 11, 23))
    assert {r["id"] for r in rows} == {ids["sent"], ids["cc"], ids["refused"]}


def test_the_export_files_have_the_documented_columns(ledger_db, ids, tmp_path):
    csv_path, jsonl_path, n = audit.export_night(ledger_db, date(2026, 11, 24), tmp_path)

    assert n == 3  # NIGHT_2's two rows and the same night's dry-run preview
    table = list(csv.DictReader(io.StringIO(csv_path.read_text())))
    assert tuple(table[0]) == audit.EXPORT_COLUMNS
    records = [json.loads(line) for line in jsonl_path.read_text().splitlines()]
    assert [r["id"] for r in records] == [int(r["id"]) for r in table] == sorted([ids["failed"], ids["html"],
                                                                                 ids["preview"]])
    failed = next(r for r in records if r["id"] == ids["failed"])
    assert failed["recipient"] == "ola@fjellheimen.example"  # the files are the ledger owner's: unmasked
    assert failed["night"] == "2026-11-24" and failed["sent_at"] is None
    assert failed["updated_at"] == "2026-11-24T01:03:00+00:00"


def test_audit_export_command_writes_both_files(ledger_db, ledger_path, ids, tmp_path, capsys):
    assert audit.main(["export", "--date", "2026-11-23", "--ledger", f"sqlite:///{ledger_path}",
                       "--out", str(tmp_path / "out")]) == 0
    assert "3 deliveries of the night of 2026-11-23" in capsys.readouterr().out
    assert (tmp_path / "out" / "deliveries-2026-11-23.jsonl").read_text().count("\n") == 3


@pytest.fixture
def any_ledger(backend):
    """The ledger on SQLite, then on PostgreSQL."""
    return backend["engines"][1]


def test_the_files_show_a_formula_an_operator_or_the_erp_wrote_as_text(any_ledger, tmp_path):
    from sqlalchemy import insert

    from include.invoice_mailing import ledger
    from tests.audit_seed import at, row

    seed(any_ledger)
    run_id = '=HYPERLINK("http://evil.example","night")'  # a run id is an operator's free text
    with any_ledger.begin() as conn:
        conn.execute(insert(ledger.mailing_run).values(run_id=run_id, logical_date=at(24, 12), mode="live",
                                                       params={}, started_at=at(24, 12)))
        conn.execute(insert(ledger.delivery).values(**row(run_id, "INV000301", "10003", "=2+5@bolgen.example",
                                                          "sent", at(24, 12, 1))))

    csv_path, _, _ = audit.export_night(any_ledger, date(2026, 11, 24), tmp_path)
    exported = next(r for r in csv.DictReader(io.StringIO(csv_path.read_text())) if r["ref_nbr"] == "INV000301")
    assert (exported["recipient"], exported["run_id"]) == ("'=2+5@bolgen.example", f"'{run_id}")
    nights = audit.csv_text(audit.night_records(audit.nights(any_ledger)), audit.NIGHT_COLUMNS)
    assert f"'{run_id}" in {r["run_id"] for r in csv.DictReader(io.StringIO(nights))}


def test_audit_export_names_the_ledger_it_read_with_its_password_masked(any_ledger, backend, tmp_path, capsys):
    seed(any_ledger)
    url = any_ledger.url.set(password="s3cret") if backend["name"] == "postgresql" else any_ledger.url

    assert audit.main(["export", "--date", "2026-11-23", "--ledger", url.render_as_string(hide_password=False),
                       "--out", str(tmp_path / "out")]) == 0

    out = capsys.readouterr().out
    assert f"Ledger: {url.render_as_string(hide_password=True)}\n" in out
    assert "3 deliveries of the night of 2026-11-23" in out and "s3cret" not in out
    if backend["name"] == "postgresql":
        assert ":***@" in out


def test_audit_export_without_a_ledger_refuses_instead_of_reading_the_demos(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AIRFLOW_CONN_MAILING_LEDGER", raising=False)

    assert audit.main(["export", "--date", "2026-11-23", "--out", "out"]) == 2

    err = capsys.readouterr().err
    assert "no ledger given, and Airflow has no mailing_ledger connection" in err
    assert "LEDGER=sqlite:///demo/ledger.db" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "demo").exists()


def test_audit_export_refuses_a_sqlite_ledger_that_does_not_exist(tmp_path, capsys):
    missing = tmp_path / "ledgr.db"

    assert audit.main(["export", "--date", "2026-11-23", "--ledger", f"sqlite:///{missing}",
                       "--out", str(tmp_path / "out")]) == 2

    assert f"no ledger at {missing}" in capsys.readouterr().err
    assert not missing.exists()


# --- Bounces (spec section 9) ---------------------------------------------------------------------

def test_a_bounced_delivery_is_found_by_status_with_its_reports_code_and_words(ledger_db, ids):
    from tests.audit_seed import bounced_delivery

    bounced, report_id = bounced_delivery(ledger_db)

    rows = audit.deliveries(ledger_db, DeliveryFilter.from_query({"status": "bounced"}))
    assert [(r["id"], r["reason"], r["bounce_kind"], r["bounce_status_code"], r["bounce_report_id"])
            for r in rows] == [(bounced, "hard_bounce", "hard", "5.1.1", report_id)]
    assert "User unknown" in rows[0]["bounce_diagnostic"]
    assert audit.deliveries(ledger_db, DeliveryFilter(status="sent"))[0]["bounce_kind"] is None
    [report] = audit.bounce_reports(ledger_db, [bounced])
    assert (report["effect"], report["recipient"], report["has_raw"]) == ("bounced", "ap@nordvik-bygg.example", True)


def test_a_bounce_counts_on_the_night_its_delivery_was_sent(ledger_db, ids):
    from tests.audit_seed import bounced_delivery

    bounced_delivery(ledger_db)  # sent by NIGHT_2 (24th), its report applied days later

    counts = {c["night"]: c for c in audit.night_counts(ledger_db)}
    assert len(counts) == audit.CHART_NIGHTS and max(counts) == date(2026, 11, 25)
    assert counts[date(2026, 11, 24)] == {"night": date(2026, 11, 24), "sent": 1, "bounced": 1, "failed": 1,
                                          "skipped": 0}  # the dry-run preview of the 24th is not counted
    assert counts[date(2026, 11, 23)]["skipped"] == 1 and counts[date(2026, 11, 22)]["sent"] == 0
    night_2 = next(n for n in audit.nights(ledger_db) if n["run_id"] == NIGHT_2)
    assert night_2["by_status"]["bounced"] == 1


def test_the_stacked_bars_are_proportional_to_the_counts_and_the_busiest_night_fills_the_plot():
    counts = [{"night": date(2026, 11, 1), "sent": 6, "bounced": 2, "failed": 0, "skipped": 0},
              {"night": date(2026, 11, 2), "sent": 0, "bounced": 0, "failed": 0, "skipped": 0},
              {"night": date(2026, 11, 3), "sent": 2, "bounced": 1, "failed": 1, "skipped": 0}]

    busiest, empty, small = audit.stacked_bars(counts, 160)

    assert [(b.status, b.y, b.height) for b in busiest] == [("sent", 40.0, 120.0), ("bounced", 0.0, 40.0)]
    assert empty == []
    assert [(b.status, b.y, b.height) for b in small] == [("sent", 120.0, 40.0), ("bounced", 100.0, 20.0),
                                                           ("failed", 80.0, 20.0)]


def test_the_export_carries_the_bounce_columns(ledger_db, ids, tmp_path):
    from tests.audit_seed import bounced_delivery

    bounced, _ = bounced_delivery(ledger_db)
    csv_path, jsonl_path, _ = audit.export_night(ledger_db, date(2026, 11, 24), tmp_path)

    table = {int(r["id"]): r for r in csv.DictReader(io.StringIO(csv_path.read_text()))}
    records = {r["id"]: r for r in map(json.loads, jsonl_path.read_text().splitlines())}
    for exported in (table[bounced], records[bounced]):
        assert (exported["status"], exported["bounce_kind"], exported["bounce_status_code"]) == (
            "bounced", "hard", "5.1.1")
        assert "User unknown" in exported["bounce_diagnostic"] and exported["bounced_at"]
    assert records[ids["failed"]]["bounce_kind"] is None and table[ids["failed"]]["bounced_at"] == ""
