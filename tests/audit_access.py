"""What each of Airflow's default roles gets from the auditors' pages, checked alike under either auth manager.

``tests/test_audit_api.py`` runs these checks with the simple auth manager (FastAPI's test client, tokens
signed in the test), ``tests/e2e/test_audit_fab.py`` with FAB's (a real api-server, users made by ``airflow
users create``, tokens from ``POST /auth/token``). ``client`` is an HTTP client whose base URL is the
plugin's prefix; ``headers`` carry a user's token. Both run on the ledger of ``tests/audit_seed.py``.
"""

from __future__ import annotations

from tests.audit_seed import ARCHIVED_MESSAGE, NIGHT_2

ROUTES = ["/nights", "/deliveries", "/api/nights", "/api/deliveries", "/nights.csv", "/deliveries.csv",
          "/documents/INV000101", "/customers/10001", f"/runs/invoice_mailing/{NIGHT_2}",
          f"/tasks/invoice_mailing/{NIGHT_2}/mail_customers/0",
          "/docs", "/redoc", "/openapi.json"]  # FastAPI serves these three outside the app's dependencies

# Airflow's default roles (the simple auth manager's names; FAB's are capitalised) and whether each may
# edit the DAG: an editor sees recipient addresses whole and downloads the archived .eml, a reader does not.
EDITS_THE_DAG = {"viewer": False, "user": True, "op": True, "admin": True}

REFUSED = "ola@fjellheimen.example"
REFUSED_MASKED = "o***@fjellheimen.example"


def assert_read_access_is_needed(client, route: str, *, outsider: dict, reader: dict) -> None:
    """No token: 401; a user who may not read the DAG: 403; one who may: 200."""
    assert client.get(route).status_code == 401, route
    assert client.get(route, headers=outsider).status_code == 403, route
    assert client.get(route, headers=reader).status_code == 200, route


def assert_sees_as_edit_access_allows(client, headers: dict, edits: bool, archived_id: int) -> None:
    """An editor sees the refused recipient whole and downloads the archived message; a reader sees the
    address masked in the JSON, the server's answer, the page and the CSV, and gets 403 for the message."""
    failed = client.get("/api/deliveries", params={"status": "failed"}, headers=headers).json()
    page = client.get("/deliveries", params={"status": "failed"}, headers=headers).text
    csv_text = client.get("/deliveries.csv", headers=headers).text
    message = client.get(f"/messages/{archived_id}.eml", headers=headers)

    shown = REFUSED if edits else REFUSED_MASKED
    assert [r["recipient"] for r in failed] == [shown]
    assert failed[0]["last_error"] == f"550 5.1.1 <{shown}>: user unknown"
    assert shown in page
    assert "@bolgen.example" in csv_text and "@fjellheimen.example" in csv_text
    if edits:
        assert "kari@bolgen.example" in csv_text and REFUSED in csv_text
        assert message.status_code == 200 and message.content == ARCHIVED_MESSAGE
        assert message.headers["x-archive-check"] == "match"
    else:
        for text in (page, csv_text):
            assert "kari@" not in text and "ola@" not in text
        assert message.status_code == 403
