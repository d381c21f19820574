"""The auditors' questions, as plain functions over the ledger: nights, deliveries, histories, exports.

Every function takes the ledger's engine and returns plain rows (dicts); the UI plugin, the JSON API,
the CSV download and ``make audit-export`` only present them. A "night" is a DAG run; its date is the
run's logical date in the DAG's time zone. Recipient addresses are masked for readers who may not
edit the DAG: ``mask_rows`` is applied by the caller, which knows who asks.

    python -m include.invoice_mailing.audit export --date 2026-11-24 --ledger sqlite:///demo/ledger.db
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import date, datetime, timedelta
from pathlib import Path

from sqlalchemy import URL, Engine, and_, create_engine, func, make_url, select

from include.invoice_mailing import clock, rules
from include.invoice_mailing.clock import night_of
from include.invoice_mailing.ledger import BOUNCED, bounce_report, delivery, mailing_run, mailing_task
from include.invoice_mailing.masking import mask_address, mask_text

STATUSES = ("pending", "sending", "sent", "failed", "skipped", "bounced")
MODES = ("live", "dry_run", "redirect")
FORMATS = rules.FORMATS  # PDF, HTML and the e-invoices FACTURX and EHF
MAX_ROWS = 5000  # a page or a download; narrow the filter for more

# The columns of the CSV and JSON Lines exports, in order (documented in the README).
EXPORT_COLUMNS = (
    "id", "night", "run_id", "last_run_id", "doc_type", "ref_nbr", "customer_id", "mailing_id", "recipient",
    "add_to", "format", "mode", "generation", "resend_of", "status", "reason", "detail", "last_error",
    "message_id", "sender", "redirected_to", "attempts", "sent_at", "attachment_sha256", "message_sha256",
    "message_path", "created_at", "updated_at",
    # The bounce report that moved a bounced delivery from sent (docs/rules.md, rule 9); empty for any other.
    "bounced_at", "bounce_kind", "bounce_status_code", "bounce_diagnostic",
)
# The columns a bounced delivery takes from its report, beside the ledger's own.
BOUNCE_COLUMNS = {"bounce_kind": bounce_report.c.kind, "bounce_status_code": bounce_report.c.status_code,
                  "bounce_diagnostic": bounce_report.c.diagnostic, "bounce_report_id": bounce_report.c.id}
_ROW_COLUMNS = [*(c for c in delivery.columns if c.name not in ("recipient_key", "claimed_by", "claimed_at")),
                *(column.label(name) for name, column in BOUNCE_COLUMNS.items())]


def _with_bounce_report(query):
    """The row's columns and, for a bounced delivery, those of the newest report that bounced it (one at most)."""
    newest = (select(bounce_report.c.delivery_id, func.max(bounce_report.c.id).label("report_id"))
              .where(bounce_report.c.effect == BOUNCED).group_by(bounce_report.c.delivery_id).subquery())
    return query.select_from(
        delivery.outerjoin(newest, and_(newest.c.delivery_id == delivery.c.id, delivery.c.status == BOUNCED))
        .outerjoin(bounce_report, bounce_report.c.id == newest.c.report_id))


# --- Masking ------------------------------------------------------------------------------------

def mask_rows(rows: Iterable[dict]) -> list[dict]:
    masked = []
    for row in rows:
        row = dict(row)
        if isinstance(row.get("params"), dict):  # a night's parameters: the test address, the lifted bounces
            params = dict(row["params"])
            if params.get("redirect_to"):
                params["redirect_to"] = mask_address(params["redirect_to"])
            if params.get("lift_bounces"):
                params["lift_bounces"] = [mask_address(a) for a in params["lift_bounces"]]
            row["params"] = params
        for key in ("recipient", "redirected_to"):
            if key in row:
                row[key] = mask_address(row[key])
        for key in ("detail", "last_error", "bounce_diagnostic", "diagnostic", "text"):
            if key in row:
                row[key] = mask_text(row[key])
        masked.append(row)
    return masked


# --- Filters ------------------------------------------------------------------------------------

class FilterError(ValueError):
    """A filter value that cannot be right (an unknown status, a date that is not a date)."""


@dataclass(frozen=True)
class DeliveryFilter:
    customer: str | None = None
    document: str | None = None
    recipient: str | None = None   # part of the address, any case (exact for readers who see masks)
    status: str | None = None
    reason: str | None = None
    format: str | None = None
    mode: str | None = None
    run_id: str | None = None      # the night that last decided or tried the delivery
    since: date | None = None      # by the day it was sent, or last changed when not sent (Oslo days)
    until: date | None = None
    customers: tuple[str, ...] = ()  # a batch of customers (a task instance's)

    @classmethod
    def from_query(cls, query: Mapping[str, str | None]) -> DeliveryFilter:
        """Parse a query string's values once, at the edge; empty values mean 'any'."""
        values = {f.name: (query.get(f.name) or "").strip() or None for f in fields(cls) if f.name != "customers"}
        values["customers"] = tuple((query.get("customers") or "").replace(",", " ").split())
        for name, allowed in (("status", STATUSES), ("mode", MODES), ("format", FORMATS)):
            if values[name] and values[name] not in allowed:
                raise FilterError(f"{name} must be one of {', '.join(allowed)}, not {values[name]!r}")
        for name in ("since", "until"):
            if values[name]:
                try:
                    values[name] = date.fromisoformat(values[name])
                except ValueError as exc:
                    raise FilterError(f"{name} must be a date (YYYY-MM-DD), not {values[name]!r}") from exc
        if values["since"] and values["until"] and values["since"] > values["until"]:
            raise FilterError("since is after until")
        return cls(**values)

    def query_values(self) -> dict[str, str]:
        """The filter as query-string values (for links and forms)."""
        values = {f.name: str(getattr(self, f.name)) for f in fields(self)
                  if f.name != "customers" and getattr(self, f.name) is not None}
        return values | ({"customers": ",".join(self.customers)} if self.customers else {})

    def conditions(self, *, exact_recipient: bool = False) -> list:
        c = delivery.c
        out = [getattr(c, name) == value for name, value in (
            ("customer_id", self.customer), ("ref_nbr", self.document), ("status", self.status),
            ("reason", self.reason), ("format", self.format), ("mode", self.mode), ("last_run_id", self.run_id),
        ) if value is not None]
        if self.recipient:
            needle = self.recipient.casefold()
            out.append(c.recipient_key == needle if exact_recipient else c.recipient_key.contains(needle, autoescape=True))
        if self.customers:
            out.append(c.customer_id.in_(self.customers))
        moment = func.coalesce(c.sent_at, c.updated_at)
        if self.since:
            out.append(moment >= _day_start(self.since))
        if self.until:
            out.append(moment < _day_start(self.until + timedelta(days=1)))
        return out


def _day_start(day: date) -> datetime:  # a date filter's days are Oslo days
    return clock.utc(clock.day_start(day))


# --- Queries ------------------------------------------------------------------------------------

NIGHTS_SHOWN = 100  # on the nights page; its downloads hold up to MAX_ROWS


def nights(engine: Engine, *, limit: int = NIGHTS_SHOWN, run_ids: Sequence[str] | None = None) -> list[dict]:
    """One row a run, newest first: parameters, and counts by status and reason taken from the deliveries."""
    query = select(mailing_run).order_by(mailing_run.c.started_at.desc()).limit(limit)
    if run_ids is not None:
        query = query.where(mailing_run.c.run_id.in_(list(run_ids)))
    with engine.connect() as conn:
        runs = [dict(r) for r in conn.execute(query).mappings()]
        counts: dict[str, list[dict]] = {r["run_id"]: [] for r in runs}
        for run_id, status, reason, n in conn.execute(
            select(delivery.c.last_run_id, delivery.c.status, delivery.c.reason, func.count())
            .where(delivery.c.last_run_id.in_(list(counts)))
            .group_by(delivery.c.last_run_id, delivery.c.status, delivery.c.reason)
            .order_by(delivery.c.last_run_id, delivery.c.status, delivery.c.reason)
        ):
            counts[run_id].append({"status": status, "reason": reason or "", "deliveries": n})
    for run in runs:
        run["night"] = night_of(run["logical_date"] or run["started_at"])
        run["counts"] = counts[run["run_id"]]
        verdict = run.get("summary") or {}  # audit's (ledger.record_night_status); none while the night runs
        run["status"], run["why"] = verdict.get("status") or "", verdict.get("why") or ""
        run["by_status"] = {}
        for row in run["counts"]:
            run["by_status"][row["status"]] = run["by_status"].get(row["status"], 0) + row["deliveries"]
    return runs


def count_nights(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(mailing_run)).scalar_one()


def deliveries(engine: Engine, flt: DeliveryFilter = DeliveryFilter(), *, exact_recipient: bool = False,
               limit: int = MAX_ROWS, offset: int = 0) -> list[dict]:
    """The deliveries a filter selects, newest first, each with its night and the try that last handled it."""
    query = (_with_bounce_report(select(*_ROW_COLUMNS)).where(*flt.conditions(exact_recipient=exact_recipient))
             .order_by(delivery.c.updated_at.desc(), delivery.c.id.desc()).limit(limit).offset(offset))
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(query).mappings()]
    return _with_nights_and_tries(engine, rows)


def count_deliveries(engine: Engine, flt: DeliveryFilter = DeliveryFilter(), *, exact_recipient: bool = False) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(delivery)
                            .where(*flt.conditions(exact_recipient=exact_recipient))).scalar_one()


def document_history(engine: Engine, ref_nbr: str) -> list[dict]:
    """Every delivery of one document, oldest first: nights, resends (generations) and previews (modes)."""
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(
            _with_bounce_report(select(*_ROW_COLUMNS)).where(delivery.c.ref_nbr == ref_nbr)
            .order_by(delivery.c.created_at, delivery.c.generation, delivery.c.id)).mappings()]
    return _with_nights_and_tries(engine, rows)


def customer_history(engine: Engine, customer_id: str, since: date | None = None,
                     until: date | None = None) -> list[dict]:
    """What one customer got (and did not get) between two days."""
    return deliveries(engine, DeliveryFilter(customer=customer_id, since=since, until=until))


def delivery_row(engine: Engine, delivery_id: int) -> dict | None:
    with engine.connect() as conn:
        row = conn.execute(_with_bounce_report(select(*_ROW_COLUMNS)).where(delivery.c.id == delivery_id)
                           ).mappings().first()
    return _with_nights_and_tries(engine, [dict(row)])[0] if row else None


def task_customers(engine: Engine, run_id: str, map_index: int) -> tuple[str, ...]:
    """The customers a mail_customers instance handled in this run (all its tries name the same batch)."""
    with engine.connect() as conn:
        batches = conn.execute(select(mailing_task.c.customers).where(
            mailing_task.c.run_id == run_id, mailing_task.c.map_index == map_index)).scalars().all()
    return tuple(sorted({c for customers in batches for c in customers}))


# --- Bounces ------------------------------------------------------------------------------------

_REPORT_COLUMNS = [c for c in bounce_report.columns if c.name != "raw"]


def bounce_reports(engine: Engine, delivery_ids: Iterable[int]) -> list[dict]:
    """The bounce reports applied to these deliveries (bounces and noted delays), oldest first, without
    their raw bytes: ``has_raw`` says whether the ledger or the archive keeps them."""
    ids = sorted(set(delivery_ids))
    if not ids:
        return []
    with engine.connect() as conn:
        rows = conn.execute(select(*_REPORT_COLUMNS, (bounce_report.c.raw.is_not(None)
                                                      | bounce_report.c.raw_path.is_not(None)).label("has_raw"))
                            .where(bounce_report.c.delivery_id.in_(ids))
                            .order_by(bounce_report.c.applied_at, bounce_report.c.id)).mappings()
        return [dict(r) for r in rows]


def bounce_report_row(engine: Engine, report_id: int) -> dict | None:
    """One applied report with its raw bytes (``raw``, or the archive's ``raw_path``)."""
    with engine.connect() as conn:
        row = conn.execute(select(bounce_report).where(bounce_report.c.id == report_id)).mappings().first()
    return dict(row) if row else None


CHART_STATUSES = ("sent", "bounced", "failed", "skipped")  # the chart's stack, bottom up
CHART_NIGHTS = 60


def night_counts(engine: Engine, *, nights: int = CHART_NIGHTS, last: date | None = None) -> list[dict]:
    """Live deliveries per night, oldest first, for the ``nights`` nights up to ``last`` (default: the newest
    run's night), a night without a run included with zeros. A delivery counts on the night of the run that
    last decided or sent it, which a bounce does not change: a bounce counts on the night it was sent."""
    with engine.connect() as conn:
        runs = conn.execute(select(mailing_run.c.run_id, mailing_run.c.logical_date, mailing_run.c.started_at)).all()
        night_by_run = {run_id: night_of(logical or started) for run_id, logical, started in runs}
        if last is None:
            last = max(night_by_run.values(), default=None)
        if last is None:
            return []
        first = last - timedelta(days=nights - 1)
        shown = [run_id for run_id, night in night_by_run.items() if first <= night <= last]
        per_night = {first + timedelta(days=n): dict.fromkeys(CHART_STATUSES, 0) for n in range(nights)}
        for run_id, status, n in conn.execute(
            select(delivery.c.last_run_id, delivery.c.status, func.count())
            .where(delivery.c.last_run_id.in_(shown), delivery.c.mode == "live",
                   delivery.c.status.in_(CHART_STATUSES))
            .group_by(delivery.c.last_run_id, delivery.c.status)
        ):
            per_night[night_by_run[run_id]][status] += n
    return [{"night": night, **counts} for night, counts in per_night.items()]


@dataclass(frozen=True)
class Bar:
    """One status's part of one night's bar, in the chart's coordinates (y grows downwards, as in SVG)."""

    status: str
    count: int
    y: float
    height: float


def stacked_bars(counts: Sequence[Mapping], plot_height: float) -> list[list[Bar]]:
    """Each night's stack, bottom up in ``CHART_STATUSES`` order: heights proportional to the counts, the
    busiest night as tall as the plot. A status a night does not have gets no bar."""
    tallest = max((sum(c[s] for s in CHART_STATUSES) for c in counts), default=0)
    scale = plot_height / tallest if tallest else 0.0
    stacks = []
    for night in counts:
        top, stack = plot_height, []
        for status in CHART_STATUSES:
            if night[status]:
                height = night[status] * scale
                top -= height
                stack.append(Bar(status, night[status], max(0.0, round(top, 2)), round(height, 2)))
        stacks.append(stack)
    return stacks


def _with_nights_and_tries(engine: Engine, rows: list[dict]) -> list[dict]:
    run_ids = sorted({r["last_run_id"] for r in rows})
    with engine.connect() as conn:
        runs = dict(conn.execute(select(mailing_run.c.run_id, func.coalesce(mailing_run.c.logical_date,
                                                                           mailing_run.c.started_at))
                                 .where(mailing_run.c.run_id.in_(run_ids))).all())
        tries = [dict(t) for t in conn.execute(select(mailing_task).where(mailing_task.c.run_id.in_(run_ids))
                                               .order_by(mailing_task.c.started_at)).mappings()]
    for row in rows:
        row["night"] = night_of(_as_datetime(runs.get(row["last_run_id"])))
        handled_by = task_try(row, tries)
        row["map_index"] = handled_by["map_index"] if handled_by else None
        row["try_number"] = handled_by["try_number"] if handled_by else None
    return rows


def _as_datetime(value) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))  # coalesce() loses SQLite's DateTime type


def task_try(row: Mapping, tries: Sequence[Mapping]) -> Mapping | None:
    """The try of the row's night that last handled it: its customer's batch, begun before the row last changed."""
    changed = clock.utc(row["updated_at"])
    candidates = [t for t in tries if t["run_id"] == row["last_run_id"] and row["customer_id"] in t["customers"]]
    before = [t for t in candidates if clock.utc(t["started_at"]) <= changed]
    return max(before or candidates, key=lambda t: clock.utc(t["started_at"]), default=None)


# --- Files --------------------------------------------------------------------------------------

NIGHT_COLUMNS = ("night", "run_id", "mode", "dry_run", "redirect_to", "resend", "customers", "documents",
                 *STATUSES, "reasons", "started_at", "finished_at", "status", "why")


def night_records(runs: Iterable[Mapping]) -> list[dict]:
    """One flat record a night (parameters and counts as columns) for CSV; reasons as 'status/reason=n; ...'."""
    records = []
    for run in runs:
        params = run["params"] or {}
        record = {"night": run["night"], "run_id": run["run_id"], "mode": run["mode"],
                  **{k: params.get(k) for k in ("dry_run", "redirect_to", "resend")},
                  "customers": " ".join(params.get("customers") or ()), "documents": " ".join(params.get("documents") or ()),
                  **{s: run["by_status"].get(s, 0) for s in STATUSES},
                  "reasons": "; ".join(f"{c['status']}/{c['reason']}={c['deliveries']}" for c in run["counts"] if c["reason"]),
                  "started_at": run["started_at"], "finished_at": run["finished_at"],
                  "status": run.get("status", ""), "why": run.get("why", "")}
        records.append({k: _cell(v) for k, v in record.items()})
    return records


def _cell(value) -> str | int | None:
    if isinstance(value, datetime):
        return clock.utc(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def export_records(rows: Iterable[Mapping]) -> list[dict]:
    """The rows with exactly the export columns, in order, as JSON-ready values (times in UTC, ISO 8601)."""
    return [{column: _cell(row.get(column)) for column in EXPORT_COLUMNS} for row in rows]


def to_csv(rows: Iterable[Mapping]) -> str:
    return csv_text(export_records(rows), EXPORT_COLUMNS)


# A spreadsheet runs a cell that begins with one of these as a formula (OWASP "CSV injection"), and
# both addresses (``=2+5@bolgen.example`` is a valid one) and run ids (an operator's) can begin so.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value):
    """A text cell a spreadsheet would run as a formula gets a leading ``'``, which shows it as text."""
    return f"'{value}" if isinstance(value, str) and value.startswith(_FORMULA_START) else value


def csv_text(records: Iterable[Mapping], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\r\n")
    writer.writeheader()
    writer.writerows({k: _csv_cell(v) for k, v in record.items()} for record in records)
    return out.getvalue()


def cut_note(shown: int, total: int, what: str = "deliveries") -> str | None:
    """What a list or download that stops short says about the rows it leaves out (None: it has them all)."""
    if total <= shown:
        return None
    if what != "deliveries":
        return f"the newest {shown:,} of {total:,} {what}"
    return (f"the newest {shown:,} of {total:,} deliveries; narrow the filter, or have the ledger's owner run "
            "`make audit-export DATE=YYYY-MM-DD` for every delivery of a night")


def to_jsonl(rows: Iterable[Mapping]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in export_records(rows))


def night_deliveries(engine: Engine, night: date) -> list[dict]:
    """Every delivery that a run of this night decided or tried, in id order (unmasked: for the ledger's owners)."""
    run_ids = [r["run_id"] for r in nights(engine, limit=10_000) if r["night"] == night]
    rows: list[dict] = []
    for run_id in run_ids:
        rows += deliveries(engine, DeliveryFilter(run_id=run_id), limit=10_000_000)
    return sorted(rows, key=lambda r: r["id"])


def export_night(engine: Engine, night: date, folder: Path) -> tuple[Path, Path, int]:
    rows = night_deliveries(engine, night)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path, jsonl_path = folder / f"deliveries-{night}.csv", folder / f"deliveries-{night}.jsonl"
    csv_path.write_text(to_csv(rows), encoding="utf-8")
    jsonl_path.write_text(to_jsonl(rows), encoding="utf-8")
    return csv_path, jsonl_path, len(rows)


class NoLedger(Exception):
    """No ledger was named and Airflow has none here: reading the demo's instead would mislead."""


def ledger_url(given: str | None) -> URL:
    """The ledger to read: the one given, else the DAG's ``mailing_ledger`` connection; never a guess."""
    if not given:
        try:
            from include.invoice_mailing.tasks import LEDGER_CONN_ID, engine_for

            return engine_for(LEDGER_CONN_ID).url
        except Exception as exc:  # noqa: BLE001 - whatever Airflow says, the user must name the ledger
            raise NoLedger(f"no ledger given, and Airflow has no mailing_ledger connection here ({exc}). Name "
                           "it: make audit-export DATE=... LEDGER=<SQLAlchemy URL> (the demo's: "
                           "LEDGER=sqlite:///demo/ledger.db), or set AIRFLOW_CONN_MAILING_LEDGER") from exc
    url = make_url(given)
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:") \
            and not Path(url.database).is_file():
        raise NoLedger(f"no ledger at {url.database} (SQLite would create an empty one); after `make demo` the "
                       "demo's is sqlite:///demo/ledger.db")
    return url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m include.invoice_mailing.audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write one night's deliveries as CSV and JSON Lines")
    export.add_argument("--date", type=date.fromisoformat, required=True, help="the night (YYYY-MM-DD, Oslo)")
    export.add_argument("--ledger", help="SQLAlchemy URL (default: the mailing_ledger Airflow connection)")
    export.add_argument("--out", type=Path, default=Path("exports"), help="the folder to write to")
    args = parser.parse_args(argv)
    try:
        url = ledger_url(args.ledger)
    except NoLedger as exc:
        print(f"Not exported: {exc}", file=sys.stderr)
        return 2
    print(f"Ledger: {url.render_as_string(hide_password=True)}")
    engine = create_engine(url)
    try:
        csv_path, jsonl_path, n = export_night(engine, args.date, args.out)
    finally:
        engine.dispose()
    print(f"{n} deliveries of the night of {args.date}:\n  {csv_path}\n  {jsonl_path}")
    if n == 0:
        print("No run of that night is in the ledger.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
