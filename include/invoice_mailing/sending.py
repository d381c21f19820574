"""Step 2b, send: one batch's messages rendered, claimed, sent and recorded, each delivery once."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from sqlalchemy import Engine

from include.invoice_mailing import archive, ledger, rules, source
from include.invoice_mailing.bounces import BounceKeyError, bounce_key_from_environment, verp_sender
from include.invoice_mailing.deliver import (
    DEFAULT_SMTP_CONN_ID,
    NO_SMTPUTF8,
    MessageRecipient,
    SendResult,
    SmtpSender,
    WireMessage,
    build_message,
    smtp_address,
)
from include.invoice_mailing.ledger import FAILED, PENDING, SENT, SKIPPED
from include.invoice_mailing.masking import mask_address, mask_text
from include.invoice_mailing.params import RunContext
from include.invoice_mailing.planning import plan_batch, planned_deliveries
from include.invoice_mailing.render import Attachment, Notification, Renderer, RenderError, one_line
from include.invoice_mailing.smtp_login import MAILBOX

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verp:
    """Each delivery in its own SMTP transaction, with an envelope sender of its own at the bounce address
    (docs/rules.md, rule 9), so that a bounce report names the delivery it is about. ``key`` is None when the
    deployment has no usable secret: then ``key_error`` says why, and nothing is sent (never unsigned)."""

    bounce_address: str
    key: bytes | None = field(default=None, repr=False)  # the deployment's secret: never in a log line
    key_error: str | None = None

    @classmethod
    def from_deployment(cls) -> Verp | None:
        """On when Airflow has the ``mailing_bounces`` connection; None (today's single transaction with the
        account's address as MAIL FROM) when it has not."""
        from include.invoice_mailing.bounce_mailbox import mailbox_settings

        mailbox = mailbox_settings()
        if mailbox is None:
            return None
        try:
            return cls(mailbox.address, bounce_key_from_environment())
        except BounceKeyError as exc:
            return cls(mailbox.address, key_error=f"{exc} (the connection mailing_bounces is set)")

    def envelope_sender(self, delivery_id: int) -> str:
        return verp_sender(self.bounce_address, delivery_id, self.key)

    @staticmethod
    def envid(envelope_sender: str) -> str:
        """The DSN envelope id (RFC 3461 ``ENVID``) of a delivery: its VERP token, the delivery id and MAC,
        which a report returns as ``Original-Envelope-Id``."""
        return envelope_sender.rpartition("@")[0].rpartition("+")[2]


@dataclass
class BatchSettings:
    lease: timedelta = ledger.DEFAULT_LEASE  # after this long, another host's claim counts as stale
    write_back: bool = False                 # set invoice.emailed in the ERP after a live send
    archive: archive.Archive | None = None   # keep each sent message's bytes (INVOICE_MAILING_ARCHIVE)
    verp: Verp | None = None                 # one transaction per delivery (the connection mailing_bounces)


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
                   recipient=mask_address(row["recipient"]), format=row["format"], status=status, reason=reason,
                   answer=mask_text(" ".join((answer or "").split())))  # logs and alerts are read by viewers


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
    keys = {tuple(d[:2]) for d in batch["documents"]}  # (doc_type, ref_nbr[, customer])
    data = source.load_batch(erp, keys)
    plans = plan_batch(data, renderer, include_emailed=ctx.params.resend)
    gone = {p.document.key for p in plans if p.refusal and p.refusal.reason == rules.NO_LONGER_DUE}
    gone |= keys - {p.document.key for p in plans}  # deleted from the ERP since the extract
    # A document no longer due keeps the rows it has (its open ones are retired below); one that
    # never had any gets a row that says why it was not mailed.
    recorded = ledger.documents_with_rows(ledger_db, gone, mode) if gone else set()
    planned = {p.document.key: [] if p.document.key in recorded else planned_deliveries(p) for p in plans}
    planned.update((key, []) for key in gone - planned.keys())
    rows_planned = [row for rows in planned.values() for row in rows]
    ledger.record_plan(ledger_db, rows_planned, run_id=ctx.run_id, mode=mode, resend=ctx.params.resend,
                       message_key=settings.verp.key if settings.verp else None)
    ledger.retire_unplanned_failures(ledger_db, rows_planned, run_id=ctx.run_id, mode=mode)
    refused = [NotSent.of(asdict(row), FAILED, row.reason, row.detail)
               for rows in planned.values() for row in rows if row.status == FAILED]
    for item in refused:
        log.warning("Not sent: %s", item)

    by_key = {p.document.key: p for p in plans if p.refusal is None}
    wanted = {row.key for rows in planned.values() for row in rows if row.status == PENDING}
    # A message's rows are those the ERP still names for it: they are its envelope and its To/Cc.
    messages: dict[str, list[dict]] = defaultdict(list)
    retired: dict[str, list[dict]] = defaultdict(list)
    for row in ledger.open_deliveries(ledger_db, planned, mode):
        doc_key = (row["doc_type"], row["ref_nbr"])
        key = (*doc_key, row["mailing_id"], row["recipient_key"], row["format"])
        if key in wanted and doc_key in by_key:
            messages[row["message_id"]].append(row)
        elif row["status"] in (PENDING, ledger.SENDING):  # a stale claim is re-decided like a pending row
            retired["no_longer_due" if doc_key in gone else "no_longer_planned"].append(row)

    mailer = _Mailer(ctx, data, renderer, sender, ledger_db, settings)
    for reason, rows in retired.items():
        detail = ("the document is no longer due in the ERP (voided, marked don't email, emailed, or deleted)"
                  if reason == "no_longer_due" else
                  "the ERP no longer names this recipient, format or document for mailing")
        mailer.settle_unsent(rows, SKIPPED, reason, detail)
    queue = []
    for message_id, members in sorted(messages.items(), key=lambda m: (m[1][0]["doc_type"], m[1][0]["ref_nbr"])):
        todo = [r for r in members if r["status"] in (PENDING, ledger.SENDING)]
        if todo:
            queue.append((by_key[(todo[0]["doc_type"], todo[0]["ref_nbr"])], message_id, members, todo))
    for position, (plan, message_id, members, todo) in enumerate(queue):
        # The next message's attachment is rendered while this one's e-invoice is checked (in the worker's
        # validator); this one is claimed and sent only once its check has answered.
        mailer.prepare(plan, todo[0]["format"])
        documents = {plan.document.key}
        if position + 1 < len(queue):
            after, _, _, after_todo = queue[position + 1]
            mailer.prepare(after, after_todo[0]["format"])
            documents.add(after.document.key)
        mailer.keep(documents)
        mailer.mail(plan, message_id, members, todo)

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


class _Mailer:
    """Sends the messages of one batch: render (once per document and format), claim, send, record."""

    def __init__(self, ctx: RunContext, data: source.BatchData, renderer: Renderer, sender: SmtpSender,
                 ledger_db: Engine, settings: BatchSettings):
        self.ctx, self.data, self.renderer, self.sender = ctx, data, renderer, sender
        self.ledger_db, self.settings = ledger_db, settings
        self.token = ledger.claimant()
        # (document, format, locale) -> the attachment, its RenderError, or the function that waits for its check
        self.attachments: dict[tuple, Attachment | RenderError | Callable[[], Attachment]] = {}
        self.notifications: dict[tuple, Notification | RenderError] = {}
        self.counts: dict[str, int] = defaultdict(int)
        self.not_sent: list[NotSent] = []

    def finish(self, ids, status: str, count_as: str | None = None, **values) -> int:
        done = ledger.finish(self.ledger_db, ids, self.token, status, **values)
        self.counts[count_as or status] += done
        return done

    def keep(self, documents: set[tuple]) -> None:
        """Drop the rendered attachments and notifications of every other document: two at most in memory."""
        self.attachments = {key: value for key, value in self.attachments.items() if key[0] in documents}
        self.notifications = {key: value for key, value in self.notifications.items() if key in documents}

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
        conn_id = mailing.account.smtp_conn_id or DEFAULT_SMTP_CONN_ID
        verp = self.verp(conn_id) if params.mode != "dry_run" else None
        if verp is not None and verp.key is None:
            self.refuse(todo, rules.CONFIG_ERROR, verp.key_error)
            return
        claimed, busy = ledger.claim(self.ledger_db, [r["id"] for r in todo], self.token, run_id=self.ctx.run_id,
                                     lease=self.settings.lease)
        self.counts["held"] += len(busy)
        if not claimed:
            return
        if params.mode == "dry_run":
            self.finish(claimed, SKIPPED, "dry_run", reason="dry_run", attachment_sha256=attachment.sha256)
            return

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
        try:
            msg = build_message(
                sender_address=mailing.account.address, sender_name=mailing.account.display_name,
                recipients=[MessageRecipient(r["recipient"], r["add_to"], _name(plan, r["recipient_key"]))
                            for r in members if r["id"] not in excluded
                            and (r["status"] not in (FAILED, SKIPPED) or r["id"] in claimed)],
                notification=notification, attachment=attachment, message_id=message_id,
                document_ref=f"{doc.doc_type} {doc.ref_nbr}", redirect_to=params.redirect_to,
            )
            addresses = [envelope[r["id"]] for r in rows]  # the SMTPUTF8 choice is the rows still going
            wire = WireMessage.of(msg, addresses if verp is not None
                                  else [smtp_address(mailing.account.address), *addresses])
        except Exception as exc:  # nothing was sent: the claimed rows say why, and the batch goes on
            detail = f"the message could not be built from the ERP's data: {type(exc).__name__}: {one_line(exc)}"
            self.finish([r["id"] for r in rows], FAILED, reason=rules.CONFIG_ERROR, error=detail, detail=detail)
            self.not_sending(rows, FAILED, rules.CONFIG_ERROR, detail)
            return
        if verp is not None:
            self.send_each(conn_id, wire, rows, envelope, message_id, attachment.sha256, account)
            return
        ids_of: dict[str, list[int]] = defaultdict(list)  # envelope address -> rows (all of them, redirected)
        for r in rows:
            ids_of[envelope[r["id"]]].append(r["id"])
        result = self.sender.send(conn_id, wire, smtp_address(mailing.account.address), list(ids_of))
        self.record(result, ids_of, rows, message_id, attachment.sha256, account)

    def verp(self, conn_id: str) -> Verp | None:
        """The deployment's VERP, unless the connection sends with the mailbox's own address as the envelope
        sender (``envelope_sender: mailbox``, the default on Microsoft 365 and Gmail): then one transaction
        per message, as without a bounce mailbox, and its bounces are matched by Message-ID and recipient."""
        if self.settings.verp is None or self.sender.envelope_sender(conn_id) == MAILBOX:
            return None
        return self.settings.verp

    def send_each(self, conn_id: str, wire: WireMessage, rows: list[dict], envelope: dict[int, str], message_id: str,
                  attachment_sha256: str, account: str) -> None:
        """VERP: one transaction per delivery on the relay's session, each recorded on its own answer, so
        that the window in which a message can arrive twice stays one delivery's UPDATE and a recipient
        refused in one transaction leaves the others as they are. Once the session fails for good, the
        deliveries not yet tried stay pending with the same answer (no new wait per delivery). Every
        transaction carries the same bytes, ``wire``."""
        gave_up: str | None = None
        for row in rows:
            address = envelope[row["id"]]
            if gave_up is not None:
                self.record(SendResult(deferred={address: gave_up}, data=wire.data), {address: [row["id"]]},
                            [row], message_id, attachment_sha256, account)
                continue
            sender = self.settings.verp.envelope_sender(row["id"])
            result = self.sender.send(conn_id, wire, sender, [address], envid=Verp.envid(sender))
            self.record(result, {address: [row["id"]]}, [row], message_id, attachment_sha256, account)
            if result.session_fault:
                gave_up = result.deferred[address]

    def record(self, result: SendResult, ids_of: dict[str, list[int]], rows: list[dict], message_id: str,
               attachment_sha256: str, account: str) -> None:
        """Write the server's answers to one transaction into the ledger, delivery by delivery."""
        params = self.ctx.params
        sent_ids = [i for a in result.accepted for i in ids_of.get(a, ())]
        digest = archive.digest(result.data)
        if self.finish(sent_ids, SENT, attachment_sha256=attachment_sha256, redirected_to=params.redirect_to,
                       message_sha256=digest) < len(sent_ids):
            lost = self.claims_lost(message_id, sent_ids, digest)
            sent_ids = [i for i in sent_ids if i not in lost]
        if sent_ids and self.settings.archive:  # after the commit: the duplicate window stays one UPDATE
            ledger.record_message_path(self.ledger_db, sent_ids, self.settings.archive.keep(result.data))
        row_of = {r["id"]: r for r in rows}
        for address, (reason, text) in result.rejected.items():
            detail = naming_the_account(reason, text, account)
            self.finish(ids_of.get(address, []), FAILED, reason=reason, error=text, detail=detail)
            self.not_sending([row_of[i] for i in ids_of.get(address, [])], FAILED, reason, detail or text)
        for address, text in result.deferred.items():
            self.finish(ids_of.get(address, []), PENDING, "deferred", error=text)
            self.not_sending([row_of[i] for i in ids_of.get(address, [])], PENDING, "deferred", text)
        if result.failure:  # for every recipient the relay did not take: earlier attempts' stay sent
            reason, text = result.failure
            answered = {*result.accepted, *result.rejected, *result.deferred}
            rest = [i for a, ids in ids_of.items() if a not in answered for i in ids]
            detail = naming_the_account(reason, text, account)
            self.finish(rest, FAILED, reason=reason, error=text, detail=detail, attachment_sha256=attachment_sha256)
            self.not_sending([row_of[i] for i in rest], FAILED, reason, detail or text)

    def claims_lost(self, message_id: str, sent_ids: list[int], digest: str | None) -> set[int]:
        """The server took the message, but another attempt had taken these deliveries over meanwhile
        (this attempt outlived its lease): the recipient may get the message twice. Say so, in the
        log and in the ledger's ``lost_claim``; the row stays the other attempt's to finish."""
        lost = ledger.note_lost_claims(self.ledger_db, sent_ids, self.token, run_id=self.ctx.run_id,
                                       message_sha256=digest)
        for row in lost:
            log.warning("Possible duplicate: the SMTP server took message %s for %s, but another attempt (%s) "
                        "had taken over this delivery meanwhile (it is now %s); the recipient may get it twice",
                        message_id, mask_address(row["recipient"]), row["claimed_by"], row["status"])
        self.counts["possible_duplicates"] += len(lost)
        return {row["id"] for row in lost}

    def refuse(self, rows: list[dict], reason: str, detail: str) -> None:
        """Deliveries that cannot be sent tonight and are re-decided tomorrow. Pending rows are settled
        directly; a stale ``sending`` row is claimed first (another attempt may still hold it)."""
        self.not_sending(rows, FAILED, reason, detail)
        self.settle_unsent(rows, FAILED, reason, detail, error=detail)

    def settle_unsent(self, rows: list[dict], status: str, reason: str, detail: str,
                      error: str | None = None) -> None:
        """Settle deliveries without sending them. Pending rows are settled directly; a ``sending``
        row is taken over first when its claim is stale (its attempt died), and left to a live one."""
        pending = [r["id"] for r in rows if r["status"] == PENDING]
        self.counts[status] += ledger.retire(self.ledger_db, pending, run_id=self.ctx.run_id, reason=reason,
                                             detail=detail, status=status, error=error)
        stuck = [r["id"] for r in rows if r["status"] == ledger.SENDING]
        if stuck:
            claimed, busy = ledger.claim(self.ledger_db, stuck, self.token, run_id=self.ctx.run_id,
                                         lease=self.settings.lease)
            self.counts["held"] += len(busy)
            died = "an earlier attempt died while sending it, so it may have arrived"
            self.finish(claimed, status, reason=reason, error=error or died,
                        detail=f"{detail}; {died}" if status == SKIPPED else detail)

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

    def prepare(self, plan: rules.DocumentPlan, fmt: str) -> tuple:
        """Render the document in this format, once for all its recipients and messages, and start its e-invoice
        check; a failure is remembered too. Returns its key in ``attachments``."""
        doc, report = plan.document, plan.mailing.report
        customer = self.data.customers[doc.customer_id]
        key = (doc.key, fmt, customer.locale)
        if key not in self.attachments:
            contact = self.data.contacts.get(customer.invoice_contact_id)
            try:
                self.attachments[key] = self.renderer.start_attachment(
                    doc, customer, contact.display_name if contact else None, report.template_name, fmt,
                    customer.locale, report.report_id, address=self.data.addresses.get(doc.customer_id))
            except RenderError as exc:
                self.attachments[key] = exc
        return key

    def attachment(self, plan: rules.DocumentPlan, fmt: str) -> Attachment:
        """The prepared attachment, once its check has answered."""
        key = self.prepare(plan, fmt)
        if callable(self.attachments[key]):
            try:
                self.attachments[key] = self.attachments[key]()
            except RenderError as exc:
                self.attachments[key] = exc
        return _value_or_raise(self.attachments[key])


def naming_the_account(reason: str, text: str, account: str) -> str | None:
    """The ``detail`` of a refusal that the relay's owner or the settings must mend: it names the account."""
    return f"{text} ({account})" if reason in ledger.KEEPS_DOCUMENT_OPEN else None


def _value_or_raise(value):
    if isinstance(value, Exception):
        raise value
    return value


def _name(plan: rules.DocumentPlan, key: str) -> str | None:
    for r in plan.recipients:
        if r.key == key:
            return r.name
    return None
