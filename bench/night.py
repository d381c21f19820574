"""A night of N one-page invoices in a real Airflow, against the plain loop measured in the same run.

1. Generates a synthetic ERP on PostgreSQL: N documents over N/4 customers (default 20,000 and
   5,000), every customer with one invoicing contact in To, one to five lines a document.
2. The baseline: the plain loop (``pipeline.extract`` and one ``pipeline.mail_batch`` in this one
   process) on a 10% sample ERP made the same way, to a local SMTP server: time per document. It runs
   twice, before the night and after it, each on a fresh copy of the same sample, and the baseline is
   the mean of the two: this machine's pace drifts by several percent over the half hour a night takes,
   and a baseline taken only before the night moved the ratio with it.
3. The night: the real topology of ``make airflow`` (``dev/airflow_stack.py``: api-server,
   scheduler with the LocalExecutor, dag-processor, triggerer; PostgreSQL metadata, ERP and ledger)
   on free ports; the night is triggered through the REST API and waited for (its wall time runs from the
   trigger to the run's end_date as Airflow recorded it; the state is polled every 10 s); the SMTP server counts
   what arrives; the task processes' RSS is sampled every half second, and the CPU time of each
   component (the task processes apart), of PostgreSQL, of this process and of the whole machine is taken before and
   after: where the night's core-seconds went, beside the plain loop's CPU per document. That line
   says what moves the ratio: more CPU per document in the tasks than in the plain loop, the other
   components' CPU, or cores left idle.

Prints the figures, and as its last line:

    night: N documents, M customers, T task instances, ratio R, peak_rss_mb P, sent_once yes|no

where R = the night's wall time / (the plain loop's time per document x N / cores): 1.0 would be
the plain loop's speed spread perfectly over every core, with no orchestration at all.
Run: ``make bench-night`` or ``python bench/night.py [--documents 2000]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import secrets
import sys
import threading
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("AIRFLOW_HOME", str(ROOT / "demo" / "bench-airflow"))  # the plain loop reads connections

import psutil  # noqa: E402
from sqlalchemy import create_engine, insert, text  # noqa: E402

from dev.smtp_sink import SinkHandler, SmtpSink  # noqa: E402
from include.invoice_mailing import source  # noqa: E402

POSTGRES = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
PRODUCTS = ("Kaffebønner, hele 1 kg", "Røkt laks, skivet (kg)", "Tyttebærsyltetøy 3 kg", "Kjølevitrine, leie",
            "Engangshansker nitril M, 100 stk", "Filterkaffe, malt 500 g", "Servietter hvite 33x33", "Havredrikk 1 l")
LOCALES = ("nb_NO", "sv_SE", "da_DK", "fi_FI", "nl_NL", "en_GB")


# --- the ERP ------------------------------------------------------------------------------------

def parse_formats(text: str) -> list[tuple[str, float]]:
    """``FACTURX:0.4,EHF:0.4,PDF:0.2`` -> the contacts' preferred formats and their shares."""
    shares = [(name.strip().upper(), float(share)) for name, share in (part.split(":") for part in text.split(","))]
    if abs(sum(share for _, share in shares) - 1) > 1e-6:
        raise SystemExit(f"--formats: the shares add up to {sum(s for _, s in shares)}, not 1")
    return shares


def preferred_formats(customers: int, shares: list[tuple[str, float]]) -> list[str | None]:
    """Each customer's contact's preferred format, in the given shares (None: the mailing's PDF)."""
    chosen: list[str | None] = []
    for name, share in shares:
        chosen += [None if name == "PDF" else name] * round(customers * share)
    return (chosen + [None] * customers)[:customers]


def seed_erp(engine, documents: int, customers: int, released: datetime, seed: int = 20261127,
             formats: list[tuple[str, float]] = (("PDF", 1.0),)) -> None:
    """A synthetic ERP: ``customers`` customers (one invoicing contact each, who prefers a format in the
    ``formats`` shares; those preferring an e-invoice have a ``customer_address``), ``documents`` invoices."""
    rng = random.Random(seed)
    source.create_erp_schema(engine)
    tables = source.erp.tables
    with engine.begin() as conn:
        conn.execute(insert(tables["customer_class"]).values(class_id="DOMESTIC", description="Domestic"))
        conn.execute(insert(tables["email_account"]).values(account_id=1, address="faktura@fjordlys.example",
                                                             display_name="Fjordlys Faktura", smtp_conn_id=None))
        conn.execute(insert(tables["report"]).values(report_id="AR641000", description="Invoice/Memo",
                                                      template_name="invoice"))
        conn.execute(insert(tables["notification_template"]).values(
            template_id="InvoiceNotification", locale="", subject="{{ document.type_label }} {{ document.number }}",
            body_html="<p>Dear {{ customer.name }},</p><p>{{ document.type_label }} {{ document.number }} of "
                      "{{ document.total }} is attached, due {{ document.due_date }}.</p>"))
        conn.execute(insert(tables["mailing_setting"]).values(
            setting_id=1, class_id="DOMESTIC", customer_id=None, mailing_id="INVOICE", email_account_id=1,
            report_id="AR641000", template_id="InvoiceNotification", format="PDF", active=True))
        conn.execute(insert(tables["mailing_recipient"]).values(
            recipient_id=1, setting_id=1, contact_type="Invoicing", contact_id=None, format=None, add_to="To",
            active=True))
        ids = [f"{20000 + c}" for c in range(customers)]
        preferred = preferred_formats(customers, list(formats))
        conn.execute(insert(tables["contact"]), [
            dict(contact_id=c + 1, customer_id=cid, display_name=f"Innkjøp {cid}", email=f"faktura@k{cid}.example",
                 preferred_format=preferred[c], is_employee=False, active=True) for c, cid in enumerate(ids)])
        addresses = [dict(customer_id=cid, street=f"Strandkaien {c % 90 + 1}", postal_code="5013", city="Bergen",
                          country_code="NO", org_number=orgnr, vat_number=f"NO{orgnr}MVA", peppol_id=f"0192:{orgnr}")
                     for c, cid in enumerate(ids) if preferred[c] for orgnr in [org_number(c)]]
        conn.execute(insert(tables["customer"]), [
            dict(customer_id=cid, name=f"Kunde {cid} AS", class_id="DOMESTIC", status="Active",
                 locale=LOCALES[c % len(LOCALES)], email=None, primary_contact_id=None, invoice_contact_id=c + 1,
                 send_invoices_by_email=True) for c, cid in enumerate(ids)])
        if addresses:
            conn.execute(insert(tables["customer_address"]), addresses)
        for start in range(0, documents, 2000):
            heads, lines = [], []
            for n in range(start, min(documents, start + 2000)):
                ref, rows = f"INV{n + 1:07d}", []
                for line_nbr in range(1, rng.randint(1, 5) + 1):
                    quantity, price = Decimal(rng.randint(1, 20)), Decimal(rng.randint(1000, 99999)) / 100
                    rows.append(dict(doc_type="INV", ref_nbr=ref, line_nbr=line_nbr,
                                     description=rng.choice(PRODUCTS), quantity=quantity, unit_price=price,
                                     vat_rate=Decimal(25), amount=(quantity * price).quantize(Decimal("0.01"))))
                net = sum((r["amount"] for r in rows), Decimal(0))
                vat = (net / 4).quantize(Decimal("0.01"))
                heads.append(dict(doc_type="INV", ref_nbr=ref, customer_id=ids[n % customers], status="Open",
                                  released_at=released.replace(tzinfo=None), doc_date=released.date(),
                                  due_date=released.date() + timedelta(days=14), currency="NOK", amount=net + vat,
                                  vat_amount=vat, description=None, customer_ref=f"PO-{n}", dont_email=False,
                                  emailed=False))
                lines += rows
            conn.execute(insert(tables["invoice"]), heads)
            conn.execute(insert(tables["invoice_line"]), lines)


def org_number(n: int) -> str:
    """A valid Norwegian organisation number (MOD11 check digit), a different one for each ``n``."""
    from stdnum.no import orgnr

    for base in range(90_000_000 + n * 10, 99_999_999):
        for digit in "0123456789":
            if orgnr.is_valid(f"{base}{digit}"):
                return f"{base}{digit}"
    raise ValueError(n)


class Databases:
    """Fresh PostgreSQL databases for the run, dropped at the end."""

    def __init__(self):
        self.admin = create_engine(POSTGRES, isolation_level="AUTOCOMMIT")
        self.names: list[str] = []

    def new(self, kind: str) -> tuple[str, object]:
        name = f"bench_{kind}_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        return name, create_engine(f"{POSTGRES.rsplit('/', 1)[0]}/{name}")

    def connection(self, name: str) -> str:
        return json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": 5432, "login": "postgres",
                           "schema": name})

    def drop(self) -> None:
        with self.admin.connect() as conn:
            for name in self.names:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- the SMTP server: counts, keeps no bytes ----------------------------------------------------

class CountingHandler(SinkHandler):
    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()  # (document, envelope recipient) -> copies

    def keep(self, envelope_from: str, envelope_to: list[str], data: bytes, **options) -> None:
        head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        document = next((line.split(":", 1)[1].strip() for line in head.split("\r\n")
                         if line.lower().startswith("x-invoice-document:")), "?")
        with self._lock:
            for rcpt in envelope_to:
                self.counts[(document, rcpt)] += 1


def counting_sink(dsn: bool = False) -> SmtpSink:
    sink = SmtpSink(dsn=dsn)
    sink.handler = sink.controller.handler = CountingHandler()
    return sink


def smtp_connection(port: int) -> str:
    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                       "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 30}})


# --- 1. the plain loop --------------------------------------------------------------------------

def plain_loop(dbs: Databases, documents: int, customers: int, released: datetime, bounces: bool,
               formats: list[tuple[str, float]]) -> dict:
    from include.invoice_mailing import pipeline, tasks
    from include.invoice_mailing.deliver import SmtpSender

    _, erp = dbs.new("plain_erp")
    _, ledger_db = dbs.new("plain_ledger")
    seed_erp(erp, documents, customers, released, formats=formats)
    with counting_sink(dsn=bounces) as sink:
        os.environ["AIRFLOW_CONN_SMTP_DEFAULT"] = smtp_connection(sink.port)
        ctx = pipeline.RunContext.from_airflow("plain", None, datetime.now(UTC), {})
        if any(name != "PDF" for name, _ in formats):  # loaded before the clock starts, as a warm worker has it
            from include.invoice_mailing import einvoice_check

            einvoice_check.checker().warm()
        wall, cpu = time.perf_counter(), time.process_time()
        [batch] = pipeline.extract(erp, ledger_db, ctx, max_batches=0, batch_documents=documents, max_instances=1)
        with SmtpSender() as sender:
            pipeline.mail_batch(erp, ledger_db, ctx, batch, renderer=tasks.renderer(), sender=sender,
                                settings=pipeline.BatchSettings(verp=pipeline.Verp.from_deployment()))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        arrived = sum(sink.handler.counts.values())
    erp.dispose()
    ledger_db.dispose()
    return {"documents": documents, "wall": wall, "cpu": cpu, "per_doc": wall / documents, "arrived": arrived}


def report_plain(when: str, plain: dict) -> dict:
    print(f"plain loop {when}: {plain['documents']} documents in {plain['wall']:.1f} s wall, {plain['cpu']:.1f} s CPU: "
          f"{plain['per_doc'] * 1000:.1f} ms a document ({plain['arrived']} arrived)", flush=True)
    return plain


def bounce_env(bounces: bool) -> dict[str, str]:
    """With ``--bounces``: the connection mailing_bounces (never read here: the night only sends) and a
    fresh key, so that every delivery goes out with its VERP sender and, the sink offering DSN, its DSN
    parameters."""
    if not bounces:
        return {}
    return {"AIRFLOW_CONN_MAILING_BOUNCES": json.dumps({"conn_type": "imap", "host": "127.0.0.1", "login": "bounces",
                                                        "extra": {"address": "bounces@fjordlys.example"}}),
            "INVOICE_MAILING_BOUNCE_KEY": secrets.token_urlsafe(32)}


# --- 2. the night in a real Airflow -------------------------------------------------------------

class RssSampler(threading.Thread):
    """Every half second, the RSS of each process below the scheduler (its executor's workers and task
    processes); keeps the peak of any one process, and apart the peak of its EN 16931 validator processes.
    Every tenth second also their PSS, which counts a page shared with the warm scheduler (the renderer)
    once among the processes that share it, where RSS counts it whole in each.

    The sampler shares the night's two cores, so it does no more than that asks: the list of processes is
    read again every 2 s (a task process lives about 30 s and reaches its peak late), and the PSS, which
    walks each process's memory map in the kernel, every 10 s (it was every 2 s: measured beside an idle
    stack, this thread cost 2% of a core)."""

    def __init__(self, root_pid: int):
        super().__init__(daemon=True)
        self.root = psutil.Process(root_pid)
        self.peak_mb = 0.0
        self.peak_name = ""
        self.peak_pss_mb = 0.0
        self.validator_mb = 0.0
        self.stopped = threading.Event()

    def run(self) -> None:
        tick, children = 0, []
        while not self.stopped.wait(0.5):
            if tick % 4 == 0:
                try:
                    children = self.root.children(recursive=True)
                except psutil.Error:
                    continue
            tick += 1
            for child in children:
                try:
                    rss = child.memory_info().rss / 2**20
                    if is_validator(child):  # the worker's EN 16931 validators, apart
                        self.validator_mb = max(self.validator_mb, rss)
                    elif rss > self.peak_mb:
                        self.peak_mb, self.peak_name = rss, " ".join(child.cmdline())[:80]
                    if tick % 20 == 1:
                        self.peak_pss_mb = max(self.peak_pss_mb, child.memory_full_info().pss / 2**20)
                except psutil.Error:
                    continue


_VALIDATORS: dict[int, bool] = {}


def is_validator(process: psutil.Process) -> bool:
    """An EN 16931 validator process (``validator_service``); each command line is read once; False for a
    process that has ended."""
    if process.pid not in _VALIDATORS:
        try:
            _VALIDATORS[process.pid] = "validator_service" in " ".join(process.cmdline())
        except psutil.Error:
            return False
    return _VALIDATORS[process.pid]


def postmaster() -> psutil.Process | None:
    """The local PostgreSQL server's first process (its backends, the metadata's, the ERP's and the ledger's
    connections, run below it); None when PostgreSQL runs elsewhere (a container, another host)."""
    for process in psutil.process_iter(["name"]):
        try:
            parent = process.parent() if process.info["name"] == "postgres" else None
            if parent is not None and parent.name() != "postgres":
                return process
        except psutil.Error:
            continue
    return None


def cpu_seconds(processes: dict[str, psutil.Process]) -> dict[str, float]:
    """CPU seconds (user + system) so far: each component with every process below it, those that ended
    included (a parent's reaped children), the scheduler's task processes apart from the scheduler itself
    (its EN 16931 validators among them: they check for the tasks; also apart, as "validators");
    this benchmark's own process (the SMTP server's thread, the sampler, the REST polling); and the machine.
    PostgreSQL's, when it runs here, is its server process with its backends, those that ended included."""
    def of(process: psutil.Process, tree: bool = True) -> float:
        total = 0.0
        for member in [process, *(process.children(recursive=True) if tree else [])]:
            try:
                times = member.cpu_times()
                total += times.user + times.system + (times.children_user + times.children_system if tree else 0)
            except psutil.Error:
                continue
        return total

    seconds = {name: of(process) for name, process in processes.items()}
    seconds["tasks"] = seconds.pop("scheduler") - of(processes["scheduler"], tree=False)
    seconds["validators"] = sum(of(child, tree=False) for child in processes["scheduler"].children()
                                if is_validator(child))
    seconds["scheduler"] = of(processes["scheduler"], tree=False)
    own = psutil.Process().cpu_times()
    seconds["benchmark"] = own.user + own.system
    machine = psutil.cpu_times()
    seconds["machine"] = sum(machine) - machine.idle - getattr(machine, "iowait", 0.0)
    return seconds


# How often the benchmark asks the REST API for the run's state. Every request costs the api-server and the
# metadata database CPU on the night's two cores (measured beside an idle stack: twice a second cost 2% of a
# core); the night's end is read from the run's own end_date, so a rarer poll does not lengthen the night.
POLL_SECONDS = 10


def wait_unheld(client, run_id: str, timeout: float) -> dict:
    """The run once it has ended; a RuntimeError at once when the approval brake holds it (nobody answers here)."""
    from dev.airflow_stack import StackError

    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.wait_for_run("invoice_mailing", run_id, {"success", "failed"}, timeout=60,
                                       interval=POLL_SECONDS)
        except StackError:  # still running after a minute: held, or just long
            if client.hitl_details("invoice_mailing", run_id):
                raise RuntimeError("the approval brake holds the night: set INVOICE_MAILING_BRAKE_FIRST") from None
            if time.monotonic() > deadline:
                raise


def night(dbs: Databases, documents: int, customers: int, released: datetime, timeout: float,
          bounces: dict[str, str], formats: list[tuple[str, float]]) -> dict:
    from dev.airflow_stack import AirflowStack

    erp_name, erp = dbs.new("erp")
    ledger_name, _ = dbs.new("ledger")
    seed_erp(erp, documents, customers, released, formats=formats)
    erp.dispose()
    with counting_sink(dsn=bool(bounces)) as sink:
        env = {"AIRFLOW_CONN_ERP_DB": dbs.connection(erp_name), "AIRFLOW_CONN_MAILING_LEDGER": dbs.connection(ledger_name),
               "AIRFLOW_CONN_SMTP_DEFAULT": smtp_connection(sink.port), **bounces,
               # A first night above 500 documents waits for a person (the approval brake): this one is the
               # night being measured, so the brake lets a first night of its size through.
               "INVOICE_MAILING_BRAKE_FIRST": str(documents)}
        with AirflowStack(extra_env=env) as stack:
            client = stack.client()
            client.wait_for_dag("invoice_mailing")
            client.unpause("invoice_mailing")
            sampler = RssSampler(stack.processes["scheduler"].pid)
            sampler.start()
            components = {name: psutil.Process(process.pid) for name, process in stack.processes.items()}
            if (server := postmaster()) is not None:
                components["PostgreSQL"] = server
            before = cpu_seconds(components)
            started, started_at = time.perf_counter(), datetime.now(UTC)
            run = client.trigger("invoice_mailing")
            finished = wait_unheld(client, run["dag_run_id"], timeout)
            window = time.perf_counter() - started  # what the CPU figures cover: to the poll that saw the end
            after = cpu_seconds(components)
            wall = (datetime.fromisoformat(finished["end_date"]) - started_at).total_seconds()
            sampler.stopped.set()
            instances = client.task_instances("invoice_mailing", run["dag_run_id"])
            counts = sink.handler.counts
    mapped = [ti for ti in instances if ti["task_id"] == "mail_customers"]
    return {"state": finished["state"], "wall": wall, "window": window, "task_instances": len(instances), "mapped": len(mapped),
            "peak_rss_mb": sampler.peak_mb, "peak_process": sampler.peak_name, "peak_pss_mb": sampler.peak_pss_mb,
            "validator_rss_mb": sampler.validator_mb,
            "cpu": {name: after[name] - before[name] for name in after},
            "arrived": sum(counts.values()), "distinct": len(counts), "max_copies": max(counts.values(), default=0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=20_000)
    parser.add_argument("--customers", type=int, help="default: documents / 4")
    parser.add_argument("--sample", type=float, default=0.10, help="the plain loop's share of the night")
    parser.add_argument("--timeout", type=float, default=4 * 3600)
    parser.add_argument("--bounces", action="store_true",
                        help="with mailing_bounces: one transaction per delivery, VERP senders, DSN (issue 16)")
    parser.add_argument("--formats", type=parse_formats, default=[("PDF", 1.0)],
                        help="the customers' formats and shares, e.g. FACTURX:0.4,EHF:0.4,PDF:0.2 (default PDF:1)")
    args = parser.parse_args(argv)
    # aiosmtpd logs every SMTP command at INFO (Airflow's logging configuration lets it through). The SMTP
    # server runs in this process, beside the plain loop: its log lines were the plain loop's cost, about
    # 110,000 of them a run, which made the baseline slower and the ratio look better than it was.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    customers = args.customers or max(1, args.documents // 4)
    cores = os.cpu_count() or 1
    released = datetime.now(UTC) - timedelta(days=1)
    print(f"machine: {cores} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB; "
          f"concurrency {os.environ.get('INVOICE_MAILING_CONCURRENCY') or cores}, "
          f"preload {os.environ.get('INVOICE_MAILING_PRELOAD', 'true')}", flush=True)
    bounces = bounce_env(args.bounces)
    os.environ.update(bounces)  # the plain loop reads them here; the night's processes get them through the stack
    dbs = Databases()
    try:
        sample = (dbs, max(1, round(args.documents * args.sample)), max(1, round(customers * args.sample)), released,
                  args.bounces, args.formats)
        before = report_plain("before the night", plain_loop(*sample))
        result = night(dbs, args.documents, customers, released, args.timeout, bounces, args.formats)
        after = report_plain("after the night", plain_loop(*sample))
    finally:
        dbs.drop()
    plain = {key: before[key] + after[key] for key in ("documents", "wall", "cpu")}
    plain["per_doc"] = plain["wall"] / plain["documents"]
    print(f"baseline: {plain['per_doc'] * 1000:.1f} ms a document, the two plain loops together (they differ by "
          f"{abs(after['per_doc'] / before['per_doc'] - 1):.1%})")
    ideal = plain["per_doc"] * args.documents / cores
    ratio = result["wall"] / ideal
    once = result["state"] == "success" and result["distinct"] == args.documents and result["max_copies"] == 1
    print(f"night: {result['state']} in {result['wall']:.1f} s wall; the plain loop's pace over {cores} cores would take "
          f"{ideal:.1f} s; {result['mapped']} mapped instances; {result['arrived']} mails arrived for "
          f"{result['distinct']} (document, recipient) pairs, at most {result['max_copies']} each; peak RSS "
          f"{result['peak_rss_mb']:.0f} MB ({result['peak_process']}), peak PSS {result['peak_pss_mb']:.0f} MB; "
          f"the EN 16931 validator processes' peak RSS {result['validator_rss_mb']:.0f} MB")
    cpu, available = result["cpu"], result["window"] * cores
    overhead = {name: seconds for name, seconds in cpu.items() if name not in ("tasks", "machine", "validators")}
    print(f"cpu: the {result['window']:.0f} s from the trigger to the poll that saw the end, {available:.0f} "
          f"core-seconds: {cpu['machine']:.0f} busy ({cpu['machine'] / available:.0%}), "
          f"{available - cpu['machine']:.0f} idle; task processes {cpu['tasks']:.0f} s "
          f"({cpu['tasks'] / args.documents * 1000:.1f} ms a document, of which the validators "
          f"{cpu['validators'] / args.documents * 1000:.1f} ms; the plain loop "
          f"{plain['cpu'] / plain['documents'] * 1000:.1f} ms CPU, {plain['per_doc'] * 1000:.1f} ms wall); "
          + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in sorted(overhead.items(), key=lambda i: -i[1]))
          + f"; other processes {cpu['machine'] - cpu['tasks'] - sum(overhead.values()):.0f} s")
    print(f"night: {args.documents} documents, {customers} customers, {result['task_instances']} task instances, "
          f"ratio {ratio:.2f}, peak_rss_mb {max(result['peak_rss_mb'], result['validator_rss_mb']):.0f}, sent_once {'yes' if once else 'no'}")
    return 0 if once else 1


if __name__ == "__main__":
    sys.exit(main())
