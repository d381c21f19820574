"""One night's run in three steps, each called by one task: extract, mail a batch of customers, audit."""

from __future__ import annotations

import logging
import math
import os
import signal
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from email_validator import EmailNotValidError
from sqlalchemy import Engine, select

from include.invoice_mailing import archive, ledger, rules, source
from include.invoice_mailing.deliver import (
    DEFAULT_SMTP_CONN_ID,
    NO_SMTPUTF8,
    MessageRecipient,
    SmtpSender,
    build_message,
    smtp_address,
)
from include.invoice_mailing.ledger import FAILED, PENDING, SENT, SKIPPED, PlannedDelivery
from include.invoice_mailing.render import Attachment, Notification, Renderer, RenderError

log = logging.getLogger(__name__)

TIMEZONE = ZoneInfo("Europe/Oslo")
# How a night is cut into mapped task instances (each costs about 1.4 s of start-up on a LocalExecutor):
MAX_BATCHES = 200        # up to this many customers, one customer per instance (a small night)
BATCH_DOCUMENTS = 300    # beyond, instances of about this many documents: ~30 s of work each
MAX_INSTANCES = 256      # and never more instances than this (nor Airflow's max_map_length)


class ParamError(ValueError):
    """An operator's run parameter is wrong: the run stops before anything is read or sent."""


@dataclass(frozen=True)
class RunParams:
    dry_run: bool = False
    redirect_to: str | None = None
    customers: tuple[str, ...] = ()
    documents: tuple[str, ...] = ()
    resend: bool = False
    lookback_days: int = 30

    @classmethod
    def from_params(cls, params: dict) -> RunParams:
        def names(key):
            value = params.get(key) or ()
            if isinstance(value, str):
                value = value.replace(",", " ").split()
            if not all(isinstance(v, str | int) for v in value):
                raise ParamError(f"{key} must be a list of numbers, got {value!r}")
            return tuple(str(v).strip() for v in value if str(v).strip())

        redirect = (params.get("redirect_to") or "").strip() or None
        if redirect:
            try:
                redirect = rules.normalize_address(redirect)
            except EmailNotValidError as exc:
                raise ParamError(f"redirect_to is not a valid address: {exc}") from exc
        raw_lookback = params.get("lookback_days")
        try:
            lookback = 30 if raw_lookback is None else int(raw_lookback)
        except (TypeError, ValueError) as exc:
            raise ParamError(f"lookback_days must be a whole number, got {raw_lookback!r}") from exc
        if lookback < 0:
            raise ParamError("lookback_days cannot be negative")
        return cls(dry_run=bool(params.get("dry_run")), redirect_to=redirect, customers=names("customers"),
                   documents=names("documents"), resend=bool(params.get("resend")), lookback_days=lookback)

    @property
    def mode(self) -> str:
        """Dry runs and redirected test runs keep their own ledger rows: they never count as delivered."""
        if self.dry_run:
            return "dry_run"
        return "redirect" if self.redirect_to else "live"


@dataclass(frozen=True)
class RunContext:
    run_id: str
    run_date: date            # the night's date D, in the DAG's time zone
    released_before: datetime  # the data interval's end: documents released before it are due
    params: RunParams

    @classmethod
    def from_airflow(cls, run_id: str, logical_date: datetime | None, data_interval_end: datetime | None,
                     params: dict) -> RunContext:
        end = data_interval_end or logical_date or datetime.now(TIMEZONE)
        return cls(run_id=run_id, run_date=(logical_date or end).astimezone(TIMEZONE).date(),
                   released_before=end, params=RunParams.from_params(params))

    @property
    def released_since(self) -> datetime | None:
        """The look-back window's start; an operator naming documents gets them whatever their age."""
        if self.params.documents:
            return None
        return datetime.combine(self.run_date - timedelta(days=self.params.lookback_days), time(0), TIMEZONE)


def _naive_utc(moment: datetime | None) -> datetime | None:
    """ERP timestamps are naive UTC (the contract's TIMESTAMP): compare like with like."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(ZoneInfo("UTC")).replace(tzinfo=None)


# --- 1. Extract ---------------------------------------------------------------------------------

def group_batches(documents: Iterable[source.DueDocument], max_batches: int = MAX_BATCHES, *,
                  batch_documents: int = BATCH_DOCUMENTS, max_instances: int = MAX_INSTANCES,
                  workers: int = 1) -> list[dict]:
    """Group due documents by customer, then customers into batches sized by work.

    A small night (at most ``max_batches`` customers) gets one customer per batch, the instance an
    operator finds and clears by its customer number. A larger night gets batches of consecutive
    customers carrying about ``batch_documents`` documents each, so that the work of an instance
    (tens of seconds) pays for its start-up; at least ``workers`` batches, so every worker has one;
    at most ``max_instances``. A customer is never split across batches.
    """
    by_customer: dict[str, list[list[str]]] = defaultdict(list)
    for d in documents:
        by_customer[d.customer_id].append([d.doc_type, d.ref_nbr])
    customers = sorted(by_customer)
    if not customers:
        return []
    if len(customers) <= max_batches:
        groups = [[c] for c in customers]
    else:
        total = sum(len(docs) for docs in by_customer.values())
        wanted = max(math.ceil(total / max(1, batch_documents)), workers)
        groups = _balanced(customers, by_customer, min(wanted, max_instances, len(customers)))
    return [{"label": f"customer {g[0]}" if len(g) == 1 else f"customers {g[0]}..{g[-1]} ({len(g)})",
             "customers": g, "documents": [doc for c in g for doc in by_customer[c]]} for g in groups]


def _balanced(customers: list[str], by_customer: dict[str, list], count: int) -> list[list[str]]:
    """Cut the sorted customers into ``count`` runs of about equal numbers of documents."""
    total = sum(len(by_customer[c]) for c in customers)
    groups: list[list[str]] = [[]]
    done = 0
    for i, customer in enumerate(customers):
        left_customers, left_groups = len(customers) - i, count - len(groups)
        if groups[-1] and (done >= total * len(groups) / count or left_customers <= left_groups):
            groups.append([])
        groups[-1].append(customer)
        done += len(by_customer[customer])
    return groups


def extract(erp: Engine, ledger_db: Engine, ctx: RunContext, max_batches: int = MAX_BATCHES, *,
            batch_documents: int = BATCH_DOCUMENTS, max_instances: int = MAX_INSTANCES, workers: int = 1
            ) -> list[dict]:
    """Due documents, less those the ledger shows as delivered, grouped into batches of customers.

    The ERP's rows are streamed in chunks and only their keys are kept: the mapped instances get
    customer numbers and document keys, and load the rest themselves.
    """
    ledger.ensure_schema(ledger_db)
    ledger.start_run(ledger_db, ctx.run_id, ctx.released_before, ctx.params.mode, asdict(ctx.params))
    chunks = source.due_documents(
        erp,
        released_before=_naive_utc(ctx.released_before),
        released_since=_naive_utc(ctx.released_since),
        customers=ctx.params.customers,
        documents=ctx.params.documents,
        include_emailed=ctx.params.resend,
    )
    due: list[source.DueDocument] = []
    delivered = 0
    for chunk in chunks:
        if not ctx.params.resend:  # a dry or redirected run previews tonight's live run: delivered is done
            settled = ledger.settled_documents(ledger_db, [(d.doc_type, d.ref_nbr) for d in chunk])
            delivered += len(settled)
            chunk = [d for d in chunk if (d.doc_type, d.ref_nbr) not in settled]
        due += chunk
    log.info("%d documents due, %d of them delivered before", len(due) + delivered, delivered)
    batches = group_batches(due, max_batches, batch_documents=batch_documents, max_instances=max_instances,
                            workers=workers)
    log.info("%d documents of %d customers in %d batches", len(due),
             sum(len(b["customers"]) for b in batches), len(batches))
    return batches


# --- 2. Mail one batch --------------------------------------------------------------------------

def plan_batch(data: source.BatchData, renderer: Renderer, *, include_emailed: bool = False
               ) -> list[rules.DocumentPlan]:
    template_ids = {template_id for template_id, _ in data.templates}
    plans = []
    for document in data.documents:
        gone = rules.still_due(document, include_emailed=include_emailed)
        if gone:  # the ERP changed since the night's extract: voided, "don't email", emailed by hand
            plans.append(rules.DocumentPlan(document, refusal=gone))
            continue
        customer = data.customers.get(document.customer_id)
        plan = rules.plan_document(
            document, customer,
            data.customer_settings.get(document.customer_id),
            data.class_settings.get(customer.class_id) if customer else None,
            data.contacts, data.accounts, data.reports, template_ids,
        )
        if plan.mailing and customer and not (
            (plan.mailing.template_id, customer.locale) in data.templates
            or (plan.mailing.template_id, "") in data.templates
        ):
            plan.refusal = rules.Refusal(
                rules.CONFIG_ERROR,
                f"notification template {plan.mailing.template_id!r} has no text for locale {customer.locale!r} "
                "and no default ('') text", "failed")
        elif plan.mailing and not renderer.has_report(plan.mailing.report.template_name):
            report = plan.mailing.report
            plan.refusal = rules.Refusal(
                rules.CONFIG_ERROR,
                f"report {report.report_id} of mailing setting {plan.mailing.setting.setting_id} names template "
                f"{report.template_name!r}, which does not exist", "failed")
        plans.append(plan)
    return plans


def planned_deliveries(plan: rules.DocumentPlan) -> list[PlannedDelivery]:
    """The ledger rows of one document's plan: one per recipient and format, or one for the whole document."""
    doc = plan.document
    base = dict(doc_type=doc.doc_type, ref_nbr=doc.ref_nbr, customer_id=doc.customer_id,
                mailing_id=source.INVOICE_MAILING)
    rows = [
        PlannedDelivery(**base, recipient=r.recipient, add_to="", format=r.format, status=r.refusal.status,
                        reason=r.refusal.reason, detail=r.refusal.detail)
        for r in plan.refused_recipients
    ]
    if plan.refusal:
        rows.append(PlannedDelivery(**base, recipient="", add_to="", format="", status=plan.refusal.status,
                                    reason=plan.refusal.reason, detail=plan.refusal.detail))
        return rows
    account = plan.mailing.account
    for r in plan.recipients:
        rows.append(PlannedDelivery(**base, recipient=r.address, add_to=r.add_to, format=r.format, status=PENDING,
                                    sender=account.address, sender_domain=account.address.rpartition("@")[2],
                                    recipient_key=r.key))
    return rows


@dataclass
class BatchSettings:
    lease: timedelta = ledger.DEFAULT_LEASE  # after this long, another host's claim counts as stale
    write_back: bool = False                 # set invoice.emailed in the ERP after a live send
    archive: archive.Archive | None = None   # keep each sent message's bytes (INVOICE_MAILING_ARCHIVE)


@dataclass(frozen=True)
class NotSent:
    """A delivery that did not go out, as an operator reads it: who, what, and the server's answer."""
    customer: str
    document: str
    recipient: str
    format: str
    status: str      # pending (deferred: retried) or failed (an operator must act)
    reason: str
    answer: str

    def __str__(self) -> str:
        return (f"customer {self.customer}, {self.document}, to {self.recipient or '(no recipient)'}, "
                f"{self.format or '-'}: {self.status} {self.reason}: {self.answer}")

    @classmethod
    def of(cls, row: dict, status: str, reason: str, answer: str | None) -> NotSent:
        return cls(customer=row["customer_id"], document=f"{row['doc_type']} {row['ref_nbr']}",
                   recipient=row["recipient"], format=row["format"], status=status, reason=reason,
                   answer=" ".join((answer or "").split()))


class DeliveriesPending(RuntimeError):
    """Some deliveries could not be sent now: the task fails so that Airflow retries it with back-off."""

    def __init__(self, message: str, not_sent: list[NotSent] = ()):
        super().__init__(message)
        self.not_sent = list(not_sent)


def mail_batch(erp: Engine, ledger_db: Engine, ctx: RunContext, batch: dict, *, renderer: Renderer,
               sender: SmtpSender, settings: BatchSettings | None = None) -> dict:
    """Plan, render and send the documents of one batch of customers; return its counts.

    Safe to run again (a task retry, a cleared task, a zombie's twin): the ledger's keys make
    planning idempotent and its claims let exactly one attempt send each delivery. Raises
    DeliveriesPending when deliveries stay pending, so that Airflow retries the task.
    """
    settings = settings or BatchSettings()
    mode = ctx.params.mode
    data = source.load_batch(erp, [tuple(d) for d in batch["documents"]])
    plans = plan_batch(data, renderer, include_emailed=ctx.params.resend)
    gone = {p.document.key for p in plans if p.refusal and p.refusal.reason == rules.NO_LONGER_DUE}
    # A document no longer due keeps the rows it has (its pending ones are retired below); one that
    # never had any gets a row that says why it was not mailed.
    recorded = ledger.documents_with_rows(ledger_db, gone, mode) if gone else set()
    planned = {p.document.key: [] if p.document.key in recorded else planned_deliveries(p) for p in plans}
    ledger.record_plan(ledger_db, [row for rows in planned.values() for row in rows],
                       run_id=ctx.run_id, mode=mode, resend=ctx.params.resend)
    refused = [NotSent.of(asdict(row), FAILED, row.reason, row.detail)
               for rows in planned.values() for row in rows if row.status == FAILED]
    for item in refused:
        log.warning("Not sent: %s", item)

    by_key = {p.document.key: p for p in plans if p.refusal is None}
    wanted = {row.key for rows in planned.values() for row in rows if row.status == PENDING}
    messages: dict[str, list[dict]] = defaultdict(list)
    retired: dict[str, list[int]] = defaultdict(list)
    for row in ledger.open_deliveries(ledger_db, planned, mode):
        doc_key = (row["doc_type"], row["ref_nbr"])
        key = (*doc_key, row["mailing_id"], row["recipient_key"], row["format"])
        if row["status"] == PENDING and key not in wanted:
            retired["no_longer_due" if doc_key in gone else "no_longer_planned"].append(row["id"])
        elif doc_key in by_key:
            messages[row["message_id"]].append(row)
    for reason, ids in retired.items():
        detail = ("the document is no longer due in the ERP (voided, marked don't email, or emailed)"
                  if reason == "no_longer_due" else
                  "the ERP no longer names this recipient, format or document for mailing")
        ledger.retire(ledger_db, ids, run_id=ctx.run_id, reason=reason, detail=detail)

    mailer = _Mailer(ctx, data, renderer, sender, ledger_db, settings)
    current = None
    for message_id, members in sorted(messages.items(), key=lambda m: (m[1][0]["doc_type"], m[1][0]["ref_nbr"])):
        todo = [r for r in members if r["status"] in (PENDING, ledger.SENDING)]
        if todo:
            doc_key = (todo[0]["doc_type"], todo[0]["ref_nbr"])
            if doc_key != current:  # one document's attachments in memory at a time
                mailer.forget()
                current = doc_key
            mailer.mail(by_key[doc_key], message_id, members, todo)

    if settings.write_back and mode == "live":
        # Only a document whose every live delivery is settled: a deferred recipient is retried tomorrow.
        settled = ledger.settled_documents(ledger_db, by_key)
        if settled:
            log.info("Marked %d documents as emailed in the ERP", source.mark_emailed(erp, settled))
    counts = {status: n for status, n in mailer.counts.items() if status != "held"}
    summary = {"label": batch["label"], "documents": len(plans), **counts}
    log.info("Batch %s: %s", batch["label"], summary)
    not_sent = refused + mailer.not_sent
    if counts.get("deferred") or mailer.counts["held"]:
        raise DeliveriesPending(
            f"{counts.get('deferred', 0)} deliveries deferred by the SMTP server, {mailer.counts['held']} held by "
            f"another running attempt; they stay pending and are sent by the task's next try ({summary}). "
            "Not sent: " + "; ".join(str(item) for item in not_sent), not_sent)
    summary["failed_deliveries"] = [str(item) for item in not_sent]  # an operator must act on these
    return summary


_crashpoints_passed: dict[str, int] = defaultdict(int)


def crashpoint(name: str) -> None:
    """A seam for the crash test: ``INVOICE_MAILING_CRASH_AT=name:n`` SIGKILLs this process the n-th
    time it passes ``name``. Unset (always, outside that test) it does nothing."""
    spec = os.environ.get("INVOICE_MAILING_CRASH_AT")
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target == name:
        _crashpoints_passed[name] += 1
        if _crashpoints_passed[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


class _Mailer:
    """Sends the messages of one batch: render (once per document and format), claim, send, record."""

    def __init__(self, ctx: RunContext, data: source.BatchData, renderer: Renderer, sender: SmtpSender,
                 ledger_db: Engine, settings: BatchSettings):
        self.ctx, self.data, self.renderer, self.sender = ctx, data, renderer, sender
        self.ledger_db, self.settings = ledger_db, settings
        self.token = ledger.claimant()
        self.attachments: dict[tuple, Attachment | RenderError] = {}
        self.notifications: dict[tuple, Notification | RenderError] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.not_sent: list[NotSent] = []

    def finish(self, ids, status: str, count_as: str | None = None, **values) -> None:
        self.counts[count_as or status] += ledger.finish(self.ledger_db, ids, self.token, status, **values)

    def forget(self) -> None:
        """Drop the rendered attachments and notification of the document just mailed."""
        self.attachments.clear()
        self.notifications.clear()

    def not_sending(self, rows: list[dict], status: str, reason: str, answer: str | None) -> None:
        """One log line per delivery that did not go out, with the server's answer."""
        for row in rows:
            item = NotSent.of(row, status, reason, answer)
            self.not_sent.append(item)
            log.warning("Not sent: %s", item)

    def mail(self, plan: rules.DocumentPlan, message_id: str, members: list[dict], todo: list[dict]) -> None:
        """Send one message to the deliveries in ``todo``.

        The message is rendered before anything is claimed: a template that fails, whatever it
        raises, is this document's ``config_error`` and leaves no row ``sending``.
        """
        doc, mailing, params = plan.document, plan.mailing, self.ctx.params
        try:
            notification = self.notification(plan)
            attachment = self.attachment(plan, todo[0]["format"])
        except RenderError as exc:
            self.refuse(todo, rules.CONFIG_ERROR, str(exc))
            return
        claimed, busy = ledger.claim(self.ledger_db, [r["id"] for r in todo], self.token, run_id=self.ctx.run_id,
                                     lease=self.settings.lease)
        self.counts["held"] += len(busy)
        if not claimed:
            return
        crashpoint("after_claim")
        if params.mode == "dry_run":
            self.finish(claimed, SKIPPED, "dry_run", reason="dry_run", attachment_sha256=attachment.sha256)
            return

        conn_id = mailing.account.smtp_conn_id or DEFAULT_SMTP_CONN_ID
        account = (f"email account {mailing.account.account_id} <{mailing.account.address}>, "
                   f"SMTP connection {conn_id!r}")
        rows = [r for r in todo if r["id"] in claimed]
        envelope = {r["id"]: smtp_address(params.redirect_to or r["recipient"]) for r in rows}
        utf8 = [r["id"] for r in rows if not envelope[r["id"]].isascii()]
        if utf8 and self.sender.supports(conn_id, "smtputf8") is False:
            self.finish(utf8, FAILED, reason="smtputf8_unsupported", error=NO_SMTPUTF8,
                        detail=f"{NO_SMTPUTF8} ({account})")
            self.not_sending([r for r in rows if r["id"] in utf8], FAILED, "smtputf8_unsupported", NO_SMTPUTF8)
            rows = [r for r in rows if r["id"] not in utf8]
            if not rows:
                return
        excluded = set(utf8) - {r["id"] for r in rows}
        msg = build_message(
            sender_address=mailing.account.address, sender_name=mailing.account.display_name,
            recipients=[MessageRecipient(r["recipient"], r["add_to"], _name(plan, r["recipient_key"]))
                        for r in members
                        if r["id"] not in excluded and (r["status"] != FAILED or r["id"] in claimed)],
            notification=notification, attachment=attachment, message_id=message_id,
            document_ref=f"{doc.doc_type} {doc.ref_nbr}", redirect_to=params.redirect_to,
        )
        ids_of: dict[str, list[int]] = defaultdict(list)  # envelope address -> rows (all of them, redirected)
        for r in rows:
            ids_of[envelope[r["id"]]].append(r["id"])
        result = self.sender.send(conn_id, msg, smtp_address(mailing.account.address), list(ids_of))
        crashpoint("before_commit")

        sent_ids = [i for a in result.accepted for i in ids_of.get(a, ())]
        self.finish(sent_ids, SENT, attachment_sha256=attachment.sha256, redirected_to=params.redirect_to,
                    message_sha256=archive.digest(result.data))
        if sent_ids and self.settings.archive:  # after the commit: the duplicate window stays one UPDATE
            ledger.record_message_path(self.ledger_db, sent_ids, self.settings.archive.keep(result.data))
        row_of = {r["id"]: r for r in rows}

        def naming_the_account(reason: str, text: str) -> str | None:  # the relay's to mend, or the settings'
            return f"{text} ({account})" if reason in (*ledger.RELAY_REFUSALS, rules.CONFIG_ERROR) else None

        for address, (reason, text) in result.rejected.items():
            detail = naming_the_account(reason, text)
            self.finish(ids_of.get(address, []), FAILED, reason=reason, error=text, detail=detail)
            self.not_sending([row_of[i] for i in ids_of.get(address, [])], FAILED, reason, detail or text)
        for address, text in result.deferred.items():
            self.finish(ids_of.get(address, []), PENDING, "deferred", error=text)
            self.not_sending([row_of[i] for i in ids_of.get(address, [])], PENDING, "deferred", text)
        if result.failure:  # for every recipient the relay did not take: earlier attempts' stay sent
            reason, text = result.failure
            answered = {*result.accepted, *result.rejected, *result.deferred}
            rest = [i for a, ids in ids_of.items() if a not in answered for i in ids]
            detail = naming_the_account(reason, text)
            self.finish(rest, FAILED, reason=reason, error=text, detail=detail, attachment_sha256=attachment.sha256)
            self.not_sending([row_of[i] for i in rest], FAILED, reason, detail or text)

    def refuse(self, rows: list[dict], reason: str, detail: str) -> None:
        """Deliveries that cannot be sent tonight and are re-decided tomorrow. Pending rows are settled
        directly; a stale ``sending`` row is claimed first (another attempt may still hold it)."""
        self.not_sending(rows, FAILED, reason, detail)
        pending = [r["id"] for r in rows if r["status"] == PENDING]
        self.counts[FAILED] += ledger.retire(self.ledger_db, pending, run_id=self.ctx.run_id, reason=reason,
                                             detail=detail, status=FAILED, error=detail)
        stuck = [r["id"] for r in rows if r["status"] == ledger.SENDING]
        if stuck:
            claimed, busy = ledger.claim(self.ledger_db, stuck, self.token, run_id=self.ctx.run_id,
                                         lease=self.settings.lease)
            self.counts["held"] += len(busy)
            self.finish(claimed, FAILED, reason=reason, error=detail, detail=detail)

    def notification(self, plan: rules.DocumentPlan) -> Notification:
        """Rendered once per document, for all its formats; a failure is remembered too."""
        doc, mailing = plan.document, plan.mailing
        if doc.key not in self.notifications:
            customer = self.data.customers[doc.customer_id]
            template = (self.data.templates.get((mailing.template_id, customer.locale))
                        or self.data.templates[(mailing.template_id, "")])
            sender_info = {"address": mailing.account.address, "name": mailing.account.display_name or ""}
            try:
                self.notifications[doc.key] = self.renderer.notification(template, doc, customer, sender_info,
                                                                         customer.locale)
            except RenderError as exc:
                self.notifications[doc.key] = exc
        return _value_or_raise(self.notifications[doc.key])

    def attachment(self, plan: rules.DocumentPlan, fmt: str) -> Attachment:
        """Rendered once per document and format, for all its recipients and messages."""
        doc, report = plan.document, plan.mailing.report
        customer = self.data.customers[doc.customer_id]
        key = (doc.key, fmt, customer.locale)
        if key not in self.attachments:
            contact = self.data.contacts.get(customer.invoice_contact_id)
            try:
                self.attachments[key] = self.renderer.attachment(
                    doc, customer, contact.display_name if contact else None, report.template_name, fmt,
                    customer.locale, report.report_id)
            except RenderError as exc:
                self.attachments[key] = exc
        return _value_or_raise(self.attachments[key])


def _value_or_raise(value):
    if isinstance(value, Exception):
        raise value
    return value


def _name(plan: rules.DocumentPlan, key: str) -> str | None:
    for r in plan.recipients:
        if r.key == key:
            return r.name
    return None


# --- 3. Audit -----------------------------------------------------------------------------------

def audit(ledger_db: Engine, run_id: str) -> dict:
    """The run's counts by status and reason, and every delivery an operator must act on.

    A delivery still pending (deferred by the relay) or failed (refused by the relay, a configuration
    error) makes the night red; rule refusals (``skipped``: inactive customer, no address...) do not.
    """
    ledger.ensure_schema(ledger_db)
    summary = ledger.summarize_run(ledger_db, run_id)
    lines = [f"{'status':<9} {'reason':<22} {'deliveries':>10} {'documents':>9}"]
    lines += [f"{r['status']:<9} {r['reason']:<22} {r['deliveries']:>10} {r['documents']:>9}" for r in summary["rows"]]
    log.info("Run %s:\n%s", run_id, "\n".join(lines))
    with ledger_db.connect() as conn:
        started = conn.execute(select(ledger.mailing_run.c.started_at)
                               .where(ledger.mailing_run.c.run_id == run_id)).scalar()
    if started is not None:  # Airflow restarts a run's clock at every clear; the ledger keeps the night's start
        started = (started if started.tzinfo else started.replace(tzinfo=ZoneInfo("UTC"))).astimezone(TIMEZONE)
        summary["night_started_at"] = started.isoformat()
        log.info("The night started at %s (Europe/Oslo); Airflow's run duration counts from its last clear",
                 started.strftime("%Y-%m-%d %H:%M:%S"))
    rows = ledger.all_deliveries(ledger_db, ledger.delivery.c.last_run_id == run_id,
                                 ledger.delivery.c.status.in_((PENDING, ledger.SENDING, FAILED)))
    summary["undelivered"] = [asdict(NotSent.of(r, r["status"], r["reason"] or "deferred", r["last_error"] or r["detail"]))
                              for r in rows]
    return summary
