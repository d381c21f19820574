"""The audit plugin's app with FastAPI's test client: Airflow's auth decides, masks and downloads follow it."""

from __future__ import annotations

import csv
import importlib
import io
import sys
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient

from tests.audit_access import EDITS_THE_DAG, ROUTES, assert_read_access_is_needed, assert_sees_as_edit_access_allows
from tests.audit_seed import NIGHT_2, archived_delivery, seed
from tests.conftest import ROOT, sqlite_connection


@pytest.fixture(scope="module")
def plugin():
    sys.path.insert(0, str(ROOT / "plugins"))
    return importlib.import_module("invoice_mailing_audit")


@pytest.fixture
def ids(ledger_db, ledger_path, monkeypatch):
    from include.invoice_mailing import tasks

    monkeypatch.setenv("AIRFLOW_CONN_MAILING_LEDGER", sqlite_connection(ledger_path))
    tasks.engine_for.cache_clear()
    yield seed(ledger_db)
    tasks.engine_for.cache_clear()


@pytest.fixture
def client(airflow_db, plugin, ids):
    yield from _client(plugin)


def _client(plugin):
    from airflow.api_fastapi.app import create_auth_manager

    create_auth_manager().init()
    with TestClient(plugin.app, base_url="http://testserver/invoice-mailing", root_path="/invoice-mailing") as c:
        yield c


def token(role: str | None) -> dict:
    """A JWT signed by Airflow's auth manager (SimpleAuthManager: a user without a role may read nothing)."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    user = SimpleAuthManagerUser(username=role or "outsider", role=role)
    return {"Authorization": f"Bearer {get_auth_manager().generate_jwt(user)}"}


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_needs_a_token_and_read_access_to_the_dag(client, route):
    assert_read_access_is_needed(client, route, outsider=token(None), reader=token("viewer"))


def test_the_ui_cookie_authenticates_the_embedded_page(client):
    client.cookies.set("_token", token("viewer")["Authorization"].removeprefix("Bearer "))
    assert client.get("/nights").status_code == 200


@pytest.mark.parametrize("role", EDITS_THE_DAG)
def test_a_viewer_sees_masked_addresses_and_no_message_and_an_editor_sees_both(client, ledger_db, tmp_path, role):
    archived, _ = archived_delivery(ledger_db, tmp_path / "archive")
    assert_sees_as_edit_access_allows(client, token(role), EDITS_THE_DAG[role], archived)


def test_the_csv_is_the_filtered_list_with_the_documented_columns(client, plugin):
    from include.invoice_mailing.audit import EXPORT_COLUMNS

    answer = client.get("/deliveries.csv", params={"customer": "10002", "status": "failed"}, headers=token("op"))

    assert answer.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert tuple(rows[0]) == EXPORT_COLUMNS
    assert [(r["ref_nbr"], r["status"], r["reason"]) for r in rows] == [("INV000201", "failed", "recipient_rejected")]


def test_a_filter_that_cannot_be_right_is_a_400(client):
    assert client.get("/api/deliveries", params={"status": "lost"}, headers=token("viewer")).status_code == 400


def test_a_failed_delivery_links_to_its_task_instance_and_try(client):
    page = client.get("/deliveries", params={"status": "failed"}, headers=token("viewer")).text
    assert ('href="/dags/invoice_mailing/runs/scheduled__2026-11-24T01%3A00%3A00%2B00%3A00/tasks/mail_customers/'
            'mapped/0?try_number=2" target="_top"') in page


def test_the_tabs_show_the_night_and_the_batch(client):
    night = client.get(f"/runs/invoice_mailing/{NIGHT_2}", headers=token("viewer")).text
    assert "INV000201" in night and "INV000202" in night and "INV000101" not in night
    batch = client.get(f"/tasks/invoice_mailing/{NIGHT_2}/mail_customers/0", headers=token("viewer")).text
    assert "customers 10002" in batch and "INV000201" in batch
    other = client.get(f"/tasks/invoice_mailing/{NIGHT_2}/extract/-1", headers=token("viewer")).text
    assert "mailed no customers" in other


def test_the_archived_messages_check_is_shown(client, ids, ledger_db, tmp_path):
    _, path = archived_delivery(ledger_db, tmp_path / "archive")

    assert '<span class="match">match</span>' in client.get("/documents/INV000103", headers=token("user")).text
    with open(path.removeprefix("file://"), "ab") as stored:
        stored.write(b"tampered")
    assert '<span class="changed">changed</span>' in client.get("/documents/INV000103", headers=token("viewer")).text
    assert client.get(f"/messages/{ids['cc']}.eml", headers=token("user")).status_code == 404


def test_the_plugin_registers_the_app_and_the_views(plugin):
    assert plugin.InvoiceMailingAuditPlugin.fastapi_apps[0]["url_prefix"] == "/invoice-mailing"
    destinations = {v["destination"]: v["href"] for v in plugin.InvoiceMailingAuditPlugin.external_views}
    assert destinations == {"nav": "/invoice-mailing/nights",
                            "dag_run": "/invoice-mailing/runs/{DAG_ID}/{RUN_ID}",
                            "task_instance": "/invoice-mailing/tasks/{DAG_ID}/{RUN_ID}/{TASK_ID}/{MAP_INDEX}"}


def test_the_openapi_page_documents_the_json(client):
    spec = client.get("/openapi.json", headers=token("viewer")).json()
    assert {"/api/nights", "/api/deliveries", "/deliveries.csv"} <= set(spec["paths"])


def test_the_api_pages_read_the_spec_under_the_plugins_prefix(client):
    for page in ("/docs", "/redoc"):
        assert "/invoice-mailing/openapi.json" in client.get(page, headers=token("viewer")).text
    assert client.get("/openapi.json", headers=token("viewer")).json()["servers"] == [{"url": "/invoice-mailing"}]


def test_a_viewer_sees_internationalised_and_dotless_addresses_masked_in_server_answers(client, ids, ledger_db):
    from sqlalchemy import insert

    from include.invoice_mailing import ledger
    from tests.audit_seed import NIGHT_2, at, row

    answer = "550 5.1.1 <åse@bølgen.no>: user unknown; 550 5.1.1 <ola@intranet>: no such user"
    with ledger_db.begin() as conn:  # final rows are fixed (migration 0004): the night writes its own
        conn.execute(insert(ledger.delivery).values(**row(
            NIGHT_2, "INV000203", "10002", "åse@bølgen.no", "failed", at(24, 1, 4), reason="recipient_rejected",
            attempts=1, last_error=answer)))

    masked = "550 5.1.1 <å***@bølgen.no>: user unknown; 550 5.1.1 <o***@intranet>: no such user"
    viewer = client.get("/api/deliveries", params={"status": "failed"}, headers=token("viewer")).json()
    assert [r["last_error"] for r in viewer if r["ref_nbr"] == "INV000203"] == [masked]
    for route in ("/deliveries?status=failed", "/deliveries.csv?status=failed", "/documents/INV000203"):
        text = client.get(route, headers=token("viewer")).text
        assert "å***@bølgen.no" in text and "o***@intranet" in text, route
        assert "åse@" not in text and "ola@" not in text, route
    editor = client.get("/api/deliveries", params={"status": "failed"}, headers=token("user")).json()
    assert [r["last_error"] for r in editor if r["ref_nbr"] == "INV000203"] == [answer]


def test_a_viewer_sees_a_nights_lifted_bounces_and_test_address_masked(client, ids, ledger_db):
    """Only redirect_to was masked: the addresses an operator lifted (lift_bounces) showed whole to viewers."""
    from sqlalchemy import insert

    from include.invoice_mailing import ledger
    from tests.audit_seed import at

    with ledger_db.begin() as conn:
        conn.execute(insert(ledger.mailing_run).values(
            run_id="manual__lifted", logical_date=at(26, 1), mode="live", started_at=at(26, 1),
            params={"lift_bounces": ["kari@bolgen.example"], "redirect_to": "test@fjordlys.example"}))
    for route in ("/nights", "/api/nights", "/nights.csv"):
        text = client.get(route, headers=token("viewer")).text
        assert "kari@bolgen.example" not in text and "test@fjordlys.example" not in text, route
    [night] = [n for n in client.get("/api/nights", headers=token("viewer")).json() if n["run_id"] == "manual__lifted"]
    assert night["params"]["lift_bounces"] == ["k***@bolgen.example"]
    [night] = [n for n in client.get("/api/nights", headers=token("user")).json() if n["run_id"] == "manual__lifted"]
    assert night["params"]["lift_bounces"] == ["kari@bolgen.example"]


def test_the_csv_download_shows_a_formula_as_text(client, ids, ledger_db):
    from sqlalchemy import insert

    from include.invoice_mailing import ledger
    from tests.audit_seed import NIGHT_2, at, row

    with ledger_db.begin() as conn:  # a valid address that a spreadsheet would read as a formula
        conn.execute(insert(ledger.delivery).values(**row(
            NIGHT_2, "INV000203", "10002", "=2+5@bolgen.example", "sent", at(24, 1, 3), format="HTML")))

    for role, cell in (("user", "'=2+5@bolgen.example"), ("viewer", "'=***@bolgen.example")):
        rows = csv.DictReader(io.StringIO(client.get("/deliveries.csv", headers=token(role)).text))
        assert cell in {r["recipient"] for r in rows}, role


# --- More than a download holds: on SQLite and on PostgreSQL ------------------------------------------

MANY = 5001


@pytest.fixture
def many(airflow_db, plugin, backend, monkeypatch):
    """A night of 5,001 deliveries, one more than a download holds, in the ledger the plugin reads."""
    from sqlalchemy import insert

    from include.invoice_mailing import ledger, tasks
    from tests.audit_seed import at, row

    engine = backend["engines"][1]
    seed(engine)
    with engine.begin() as conn:
        conn.execute(insert(ledger.delivery), [
            row(NIGHT_2, f"INV9{n:05d}", "10009", f"kunde{n}@havet.example", "sent", at(24, 2)) for n in range(MANY)])
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_LEDGER", backend["connections"][1])
    tasks.engine_for.cache_clear()
    yield from _client(plugin)
    tasks.engine_for.cache_clear()


def test_a_download_cut_at_5000_rows_says_so_and_where_to_get_them_all(many):
    query = {"customer": "10009"}

    answer = many.get("/deliveries.csv", params=query, headers=token("viewer"))
    assert len(list(csv.DictReader(io.StringIO(answer.text)))) == 5000
    assert answer.headers["x-total-count"] == str(MANY)
    assert 'filename="invoice-mailing-deliveries-newest-5000-of-5001.csv"' in answer.headers["content-disposition"]
    assert "the newest 5,000 of 5,001 deliveries" in answer.headers["x-export-cut"]
    assert "make audit-export" in answer.headers["x-export-cut"]
    json_answer = many.get("/api/deliveries", params=query, headers=token("viewer"))
    assert len(json_answer.json()) == 5000 and json_answer.headers["x-export-cut"] == answer.headers["x-export-cut"]
    page = many.get("/deliveries", params=query, headers=token("viewer")).text
    assert 'id="cut"' in page and "The downloads stop at the newest 5,000 of these 5,001 deliveries" in page
    assert "make audit-export DATE=YYYY-MM-DD" in page


def test_a_download_that_holds_every_row_says_nothing_of_a_cut(many):
    answer = many.get("/deliveries.csv", params={"customer": "10002"}, headers=token("viewer"))
    assert answer.headers["x-total-count"] == "2" and "x-export-cut" not in answer.headers
    assert 'filename="invoice-mailing-deliveries.csv"' in answer.headers["content-disposition"]
    assert 'id="cut"' not in many.get("/deliveries", params={"customer": "10002"}, headers=token("viewer")).text


def test_the_nights_page_says_when_it_shows_only_the_newest_100_and_the_downloads_hold_them_all(many, backend):
    from sqlalchemy import insert

    from include.invoice_mailing import ledger
    from tests.audit_seed import at

    with backend["engines"][1].begin() as conn:  # 4 runs seeded, and a year of nights before them
        conn.execute(insert(ledger.mailing_run), [
            dict(run_id=f"scheduled__2025-{n:03d}", logical_date=at(1, 1), mode="live", params={},
                 started_at=at(1, 1).replace(year=2025, month=1) + timedelta(days=n)) for n in range(200)])

    page = " ".join(many.get("/nights", headers=token("viewer")).text.split())
    assert "The newest 100 of 204 runs are shown; the downloads hold them all (up to 5,000)." in page
    answer = many.get("/nights.csv", headers=token("viewer"))
    assert len(list(csv.DictReader(io.StringIO(answer.text)))) == 204 and answer.headers["x-total-count"] == "204"
    assert len(many.get("/api/nights", headers=token("viewer")).json()) == 204


# --- Bounces (spec section 9) ---------------------------------------------------------------------

@pytest.fixture
def bounced(client, ledger_db):
    from tests.audit_seed import bounced_delivery

    return bounced_delivery(ledger_db)


@pytest.mark.parametrize("role", EDITS_THE_DAG)
def test_the_bounced_filter_shows_the_report_and_only_an_editor_gets_the_raw_report(client, bounced, role):
    from tests.audit_seed import BOUNCED_RECIPIENT, bounced_report_raw

    delivery_id, report_id = bounced
    edits = EDITS_THE_DAG[role]
    page = client.get("/deliveries", params={"status": "bounced"}, headers=token(role)).text
    assert "INV000204" in page and "INV000201" not in page
    assert "hard_bounce" in page and "bounced (hard) 5.1.1" in page and "Recipient address rejected" in page
    assert f"/bounce-reports/{report_id}.txt" in page
    assert (f"/bounce-reports/{report_id}.eml" in page) is edits

    document = client.get("/documents/INV000204", headers=token(role)).text
    assert 'id="bounce-reports"' in document and f'<tr data-id="{report_id}">' in document

    text = client.get(f"/bounce-reports/{report_id}.txt", headers=token(role)).text
    assert "Status: 5.1.1" in text and "User unknown" in text
    raw = client.get(f"/bounce-reports/{report_id}.eml", headers=token(role))
    if edits:
        assert BOUNCED_RECIPIENT in page and BOUNCED_RECIPIENT in text
        assert raw.status_code == 200 and raw.content == bounced_report_raw()
    else:
        for shown in (page, document, text):
            assert "ap@nordvik" not in shown and "a***@nordvik-bygg.example" in shown
        assert "bounces+101-" not in text  # the VERP token is an address too
        assert raw.status_code == 403


def test_the_nights_page_draws_the_last_60_nights_as_stacked_bars(client, bounced):
    import re

    page = client.get("/nights", headers=token("viewer")).text

    svg = page[page.index("<svg"):page.index("</svg>")]
    assert 'role="img"' in svg and '<title id="chart-title">' in svg and '<desc id="chart-desc">' in svg
    nights = re.findall(r'<g class="night" data-night="([\d-]+)"', svg)
    assert len(nights) == 60 and (nights[0], nights[-1]) == ("2026-09-27", "2026-11-25")
    night_2 = svg[svg.index('data-night="2026-11-24"'):]
    night_2 = night_2[:night_2.index("</g>")]
    bars = {status: (int(count), float(height)) for status, count, height in re.findall(
        r'<rect class="(\w+)" data-count="(\d+)" x="0" y="[\d.]+" width="10" height="([\d.]+)"', night_2)}
    assert set(bars) == {"sent", "bounced", "failed"}  # one of each on the 24th; the busiest night has 3
    assert all(height == pytest.approx(count * 160 / 3, abs=0.01) for count, height in bars.values())
    assert "2026-11-24: sent 1, bounced 1, failed 1, skipped 0" in svg
    numbers = page[page.index('id="chart-numbers"'):]
    assert re.search(r"<td>2026-11-24</td>(<td class=\"num\">1</td>){3}<td class=\"num\">0</td>", numbers)
    assert "bounced 1" in page  # and in the runs table, on NIGHT_2's row


def test_the_json_and_csv_carry_the_bounce_columns(client, bounced):
    delivery_id, _ = bounced
    [row] = client.get("/api/deliveries", params={"status": "bounced"}, headers=token("viewer")).json()
    assert (row["id"], row["bounce_kind"], row["bounce_status_code"]) == (delivery_id, "hard", "5.1.1")
    assert "<a***@nordvik-bygg.example>" in row["bounce_diagnostic"]
    table = list(csv.DictReader(io.StringIO(client.get("/deliveries.csv", params={"status": "bounced"},
                                                       headers=token("user")).text)))
    assert table[0]["bounce_status_code"] == "5.1.1" and "<ap@nordvik-bygg.example>" in table[0]["bounce_diagnostic"]
