"""The auditors' pages in the Airflow UI: wiring and access control only (the queries are in include/).

A FastAPI app mounted by Airflow's API server at ``/invoice-mailing``, shown in the UI through
``external_views``: "Invoice mailing" in the navigation, and a "Deliveries" tab on the DAG run page
(the night) and on the task instance page (the batch of customers). Airflow does not authenticate a
plugin's app, so the app itself depends on Airflow's auth manager: every route needs read access to
the ``invoice_mailing`` DAG (no token: 401; no access: 403); recipient addresses are masked and the
archived messages withheld for readers without edit access to it. The app's OpenAPI pages
(``/invoice-mailing/docs``, ``/redoc``, ``/openapi.json``) need the same access.
"""

from __future__ import annotations

from datetime import date, datetime
from functools import cache
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from airflow.api_fastapi.app import API_ROOT_PATH, get_auth_manager
from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from pydantic import BaseModel, create_model
from sqlalchemy import Engine

from include.invoice_mailing import archive, audit, bounces, clock
from include.invoice_mailing.audit import DeliveryFilter, FilterError
from include.invoice_mailing.ledger import delivery

DAG_ID = "invoice_mailing"
URL_PREFIX = "/invoice-mailing"
CHART_HEIGHT = 160  # the nights chart's plot, in SVG units (pixels at 100 %)
TEMPLATES = Path(__file__).resolve().parents[1] / "include" / "templates" / "audit"


# --- Who asks, and the ledger ---------------------------------------------------------------------

class Reader:
    """The authenticated user, and whether they may see addresses and archived messages (edit access)."""

    def __init__(self, user):
        self.name = user.get_name()
        self.can_edit = get_auth_manager().is_authorized_dag(method="PUT", details=DagDetails(id=DAG_ID), user=user)

    def rows(self, rows: list[dict]) -> list[dict]:
        return rows if self.can_edit else audit.mask_rows(rows)


def reader(user: GetUserDep) -> Reader:
    return Reader(user)


@cache
def _migrated(engine: Engine) -> Engine:
    from include.invoice_mailing import ledger

    ledger.ensure_schema(engine)  # one query when the DAG has already brought the ledger to the head
    return engine


def ledger_engine() -> Engine:
    """The DAG's own ledger connection, ``mailing_ledger``."""
    from include.invoice_mailing.tasks import LEDGER_CONN_ID, engine_for

    return _migrated(engine_for(LEDGER_CONN_ID))


ReaderDep = Annotated[Reader, Depends(reader)]
LedgerDep = Annotated[Engine, Depends(ledger_engine)]


def _root(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def delivery_filter(request: Request) -> DeliveryFilter:
    try:
        return DeliveryFilter.from_query(request.query_params)
    except FilterError as exc:
        raise HTTPException(400, str(exc)) from exc


FilterDep = Annotated[DeliveryFilter, Depends(delivery_filter)]

app = FastAPI(
    title="Invoice mailing audit",
    description="Read-only views of the invoice mailing ledger. Every route needs read access to the "
                f"`{DAG_ID}` DAG; recipient addresses are masked without edit access to it.",
    dependencies=[Depends(requires_access_dag("GET", param_dag_id=DAG_ID))],
    # FastAPI serves its own /docs, /redoc and /openapi.json outside every dependency: they are the
    # routes below instead, behind the same access check as the rest.
    docs_url=None, redoc_url=None, openapi_url=None,
)


@app.get("/openapi.json", include_in_schema=False)
def openapi_json(request: Request) -> JSONResponse:
    return JSONResponse({**app.openapi(), "servers": [{"url": _root(request) or "/"}]})


@app.get("/docs", include_in_schema=False)
def swagger_page(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(openapi_url=f"{_root(request)}/openapi.json", title=f"{app.title} - API")


@app.get("/redoc", include_in_schema=False)
def redoc_page(request: Request) -> HTMLResponse:
    return get_redoc_html(openapi_url=f"{_root(request)}/openapi.json", title=f"{app.title} - ReDoc")


# --- JSON ---------------------------------------------------------------------------------------

def _field(column: str):
    if column == "night":
        return date | None, None
    if column in audit.BOUNCE_COLUMNS:
        return str | None, None
    col = delivery.c[column]
    return (col.type.python_type | None, None) if col.nullable else (col.type.python_type, ...)


# One ledger row with the export's columns (times in UTC, ISO 8601), typed from the ledger's table.
Delivery = create_model("Delivery", **{column: _field(column) for column in audit.EXPORT_COLUMNS})


class Night(BaseModel):
    """One DAG run: its parameters, and its deliveries counted by status and by status and reason."""

    run_id: str
    night: date | None
    logical_date: datetime | None
    mode: str
    params: dict[str, Any]
    by_status: dict[str, int]
    counts: list[dict[str, Any]]
    started_at: datetime
    finished_at: datetime | None
    status: str = ""  # audit's verdict: green, red or rejected; empty until audit has run
    why: str = ""


def _nights(engine: Engine, who: Reader) -> tuple[list[dict], dict[str, str]]:
    """A download's runs (at most ``MAX_ROWS``) and headers that say how many there are."""
    runs = audit.nights(engine, limit=audit.MAX_ROWS)
    total = audit.count_nights(engine) if len(runs) >= audit.MAX_ROWS else len(runs)
    return who.rows(runs), _count_headers(len(runs), total, "runs")


def _deliveries(engine: Engine, who: Reader, flt: DeliveryFilter) -> tuple[list[dict], int, dict[str, str]]:
    """A download's rows (at most ``MAX_ROWS``), how many the filter selects, and headers that say so."""
    rows = audit.deliveries(engine, flt, exact_recipient=not who.can_edit)
    total = (audit.count_deliveries(engine, flt, exact_recipient=not who.can_edit)
             if len(rows) >= audit.MAX_ROWS else len(rows))
    return who.rows(rows), total, _count_headers(len(rows), total, "deliveries")


def _count_headers(shown: int, total: int, what: str) -> dict[str, str]:
    cut = audit.cut_note(shown, total, what)
    return {"X-Total-Count": str(total), **({"X-Export-Cut": cut} if cut else {})}


@app.get("/api/nights", response_model=list[Night], tags=["JSON"])
def nights_json(engine: LedgerDep, who: ReaderDep, response: Response):
    """The runs, newest first (at most 5,000; ``X-Total-Count`` says how many there are)."""
    runs, headers = _nights(engine, who)
    response.headers.update(headers)
    fields = set(Night.model_fields)
    return [{k: v for k, v in n.items() if k in fields} for n in runs]


@app.get("/api/deliveries", response_model=list[Delivery], tags=["JSON"])
def deliveries_json(engine: LedgerDep, who: ReaderDep, flt: FilterDep, response: Response):
    """Deliveries, newest first. Query: customer, document, recipient, status, reason, format, mode,
    run_id, since, until (YYYY-MM-DD, Oslo days, by sent or last change), customers (comma-separated).
    At most the newest 5,000: ``X-Total-Count`` says how many match, ``X-Export-Cut`` when some are left out."""
    rows, _, headers = _deliveries(engine, who, flt)
    response.headers.update(headers)
    return audit.export_records(rows)


@app.get("/nights.csv", response_class=PlainTextResponse, tags=["CSV"])
def nights_csv(engine: LedgerDep, who: ReaderDep):
    runs, headers = _nights(engine, who)
    return _csv(audit.csv_text(audit.night_records(runs), audit.NIGHT_COLUMNS), "nights", headers)


@app.get("/deliveries.csv", response_class=PlainTextResponse, tags=["CSV"])
def deliveries_csv(engine: LedgerDep, who: ReaderDep, flt: FilterDep):
    """The same rows, filters and headers as ``/api/deliveries``, with the export's documented columns; a
    download cut at 5,000 rows says so in its file name."""
    rows, total, headers = _deliveries(engine, who, flt)
    name = f"deliveries-newest-{len(rows)}-of-{total}" if total > len(rows) else "deliveries"
    return _csv(audit.to_csv(rows), name, headers)


def _csv(text: str, name: str, headers: dict[str, str] | None = None) -> Response:
    return Response(text, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="invoice-mailing-{name}.csv"', **(headers or {})})


@app.get("/messages/{delivery_id}.eml", tags=["Archive"],
         dependencies=[Depends(requires_access_dag("PUT", param_dag_id=DAG_ID))])
def message(delivery_id: int, engine: LedgerDep):
    """The exact bytes sent for this delivery, from the archive (edit access to the DAG only)."""
    row = audit.delivery_row(engine, delivery_id)
    if row is None or not row["message_path"]:
        raise HTTPException(404, "no archived message for this delivery")
    try:
        data = archive.read(row["message_path"])
    except (FileNotFoundError, OSError) as exc:
        raise HTTPException(410, "the archived message is gone from the archive") from exc
    match = "match" if archive.digest(data) == row["message_sha256"] else "changed"
    return Response(data, media_type="message/rfc822", headers={
        "Content-Disposition": f'attachment; filename="{row["ref_nbr"]}-{delivery_id}.eml"',
        "X-Message-SHA256": row["message_sha256"], "X-Archive-Check": match})


def _bounce_report(engine: Engine, report_id: int) -> tuple[dict, bytes]:
    row = audit.bounce_report_row(engine, report_id)
    if row is None:
        raise HTTPException(404, "no such bounce report")
    if row["raw"] is not None:
        return row, row["raw"]
    try:
        return row, archive.read(row["raw_path"])
    except (FileNotFoundError, OSError, TypeError) as exc:
        raise HTTPException(410, "the bounce report is gone from the archive") from exc


@app.get("/bounce-reports/{report_id}.txt", response_class=PlainTextResponse, tags=["Archive"])
def bounce_report_text(report_id: int, engine: LedgerDep, who: ReaderDep):
    """A bounce report's text (subject, text parts, delivery-status fields); addresses masked without edit access."""
    _, raw = _bounce_report(engine, report_id)
    text = bounces.report_text(raw)
    return PlainTextResponse(text if who.can_edit else audit.mask_rows([{"text": text}])[0]["text"])


@app.get("/bounce-reports/{report_id}.eml", tags=["Archive"],
         dependencies=[Depends(requires_access_dag("PUT", param_dag_id=DAG_ID))])
def bounce_report_raw(report_id: int, engine: LedgerDep):
    """The bounce report's exact bytes as the mailbox held them (edit access to the DAG only)."""
    row, raw = _bounce_report(engine, report_id)
    return Response(raw, media_type="message/rfc822", headers={
        "Content-Disposition": f'attachment; filename="bounce-{row["delivery_id"]}-{report_id}.eml"',
        "X-Report-SHA256": row["sha256"]})


# --- Pages --------------------------------------------------------------------------------------

def _when(moment: datetime | None) -> Markup | str:
    """A moment as ``<time>``: UTC, labelled, in the page; the page's script shows it in the user's Airflow time
    zone (the UI's own setting, kept in the browser), labelled with that zone. Exports stay in UTC."""
    if moment is None:
        return ""
    moment = clock.utc(moment)
    return Markup('<time datetime="{}">{} UTC</time>').format(moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
                                                              moment.strftime("%Y-%m-%d %H:%M"))


_pages = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=select_autoescape(default=True),
                     trim_blocks=True, lstrip_blocks=True)
_pages.filters["when"] = _when
_pages.filters["chart_total"] = lambda night: sum(night[s] for s in audit.CHART_STATUSES)


def _ui(path: str) -> str:
    return f"{API_ROOT_PATH.rstrip('/')}/{path}"


def grid_url(run_id: str) -> str:
    return _ui(f"dags/{DAG_ID}/runs/{quote(run_id, safe='')}")


def task_url(row: dict) -> str:
    return _ui(f"dags/{DAG_ID}/runs/{quote(row['last_run_id'], safe='')}/tasks/mail_customers/mapped/"
               f"{row['map_index']}?try_number={row['try_number']}")


def _page(request: Request, who: Reader, template: str, title: str, **values) -> HTMLResponse:
    base = _root(request)
    html = _pages.get_template(template).render(
        base=base, title=title, user_name=who.name, masked=not who.can_edit, can_edit=who.can_edit,
        grid_url=grid_url, task_url=task_url, max_rows=f"{audit.MAX_ROWS:,}", **values)
    return HTMLResponse(html)


def _deliveries_page(request: Request, engine: Engine, who: Reader, flt: DeliveryFilter, title: str, *,
                     rows: list[dict] | None = None, verify: bool = False, show_form: bool = True,
                     nights: list[dict] | None = None) -> HTMLResponse:
    if rows is None:
        rows = audit.deliveries(engine, flt, exact_recipient=not who.can_edit, limit=500)
    if verify:
        for row in rows:
            row["archive"] = archive.verify(row["message_path"], row["message_sha256"]) if row["message_path"] else None
    base = _root(request)
    qs = "?" + urlencode(flt.query_values()) if flt.query_values() else ""
    total = audit.count_deliveries(engine, flt, exact_recipient=not who.can_edit)
    return _page(request, who, "deliveries.html.j2", title, rows=who.rows(rows), query=flt.query_values(), total=total,
                 choices={"status": audit.STATUSES, "format": audit.FORMATS, "mode": audit.MODES},
                 csv_url=f"{base}/deliveries.csv{qs}", json_url=f"{base}/api/deliveries{qs}", show_form=show_form,
                 cut=total > audit.MAX_ROWS,
                 nights=who.rows(nights) if nights else None,
                 reports=who.rows(audit.bounce_reports(engine, [r["id"] for r in rows])) if verify else None)


@app.get("/", include_in_schema=False)
def home(request: Request):
    return RedirectResponse(f"{_root(request)}/nights")


@app.get("/nights", response_class=HTMLResponse, tags=["Pages"])
def nights_page(request: Request, engine: LedgerDep, who: ReaderDep):
    """The runs, newest first, under a chart of the last 60 nights' live deliveries by status."""
    counts = audit.night_counts(engine)
    return _page(request, who, "nights.html.j2", "Nights", nights=who.rows(audit.nights(engine)),
                 total=audit.count_nights(engine), chart=counts, bars=audit.stacked_bars(counts, CHART_HEIGHT),
                 plot_height=CHART_HEIGHT,
                 chart_statuses=audit.CHART_STATUSES)


@app.get("/deliveries", response_class=HTMLResponse, tags=["Pages"])
def deliveries_page(request: Request, engine: LedgerDep, who: ReaderDep, flt: FilterDep):
    return _deliveries_page(request, engine, who, flt, "Deliveries")


@app.get("/documents/{ref_nbr}", response_class=HTMLResponse, tags=["Pages"])
def document_page(request: Request, ref_nbr: str, engine: LedgerDep, who: ReaderDep):
    """One document across nights, resends and previews, oldest first, with the archive's check."""
    return _deliveries_page(request, engine, who, DeliveryFilter(document=ref_nbr), f"Document {ref_nbr}",
                            rows=audit.document_history(engine, ref_nbr), verify=True, show_form=False)


@app.get("/customers/{customer_id}", response_class=HTMLResponse, tags=["Pages"])
def customer_page(request: Request, customer_id: str, engine: LedgerDep, who: ReaderDep, flt: FilterDep):
    """What one customer got between two days (``since``, ``until``)."""
    flt = DeliveryFilter(customer=customer_id, since=flt.since, until=flt.until)
    return _deliveries_page(request, engine, who, flt, f"Customer {customer_id}")


@app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse, tags=["Pages"])
def run_tab(request: Request, dag_id: str, run_id: str, engine: LedgerDep, who: ReaderDep):
    """The DAG run page's "Deliveries" tab: this night."""
    if dag_id != DAG_ID:
        return _page(request, who, "nights.html.j2", f"{dag_id} is not the invoice mailing DAG", nights=[])
    return _deliveries_page(request, engine, who, DeliveryFilter(run_id=run_id), f"Night {run_id}",
                            nights=audit.nights(engine, run_ids=[run_id]))


@app.get("/tasks/{dag_id}/{run_id}/{task_id}/{map_index}", response_class=HTMLResponse, tags=["Pages"])
def task_tab(request: Request, dag_id: str, run_id: str, task_id: str, map_index: int, engine: LedgerDep,
             who: ReaderDep):
    """The task instance page's "Deliveries" tab: this batch of customers in this night."""
    customers = audit.task_customers(engine, run_id, map_index) if dag_id == DAG_ID else ()
    if not customers:
        return _page(request, who, "nights.html.j2", f"{task_id} [{map_index}] mailed no customers", nights=[])
    flt = DeliveryFilter(run_id=run_id, customers=customers)
    return _deliveries_page(request, engine, who, flt, f"{run_id} · {task_id} [{map_index}]: customers "
                            f"{', '.join(customers)}")


class InvoiceMailingAuditPlugin(AirflowPlugin):
    name = "invoice_mailing_audit"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Invoice mailing audit"}]
    external_views = [
        {"name": "Invoice mailing", "href": f"{URL_PREFIX}/nights", "destination": "nav",
         "url_route": "invoice-mailing", "nav_top_level": True},
        {"name": "Deliveries", "href": f"{URL_PREFIX}/runs/{{DAG_ID}}/{{RUN_ID}}", "destination": "dag_run",
         "url_route": "invoice-mailing-night"},
        {"name": "Deliveries", "href": f"{URL_PREFIX}/tasks/{{DAG_ID}}/{{RUN_ID}}/{{TASK_ID}}/{{MAP_INDEX}}",
         "destination": "task_instance", "url_route": "invoice-mailing-batch"},
    ]
