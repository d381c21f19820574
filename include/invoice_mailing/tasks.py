"""The bodies of the DAG's tasks: resolve Airflow connections and context, then call the pipeline."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from datetime import datetime, timedelta
from functools import lru_cache

from sqlalchemy import Engine, create_engine

from include.invoice_mailing import alerts, clock, ledger, night_audit, pipeline
from include.invoice_mailing.archive import Archive
from include.invoice_mailing.dag_settings import (
    ALERTED_KEY,
    DAG_ID,
    FAILURE_KEY,
    NIGHTS,
    SUMMARY_KEY,
    concurrency,
    smtp_sessions,
    smtp_slot_wait,
)
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.render import Renderer
from include.invoice_mailing.session_slots import SessionSlots

ERP_CONN_ID = "erp_db"
LEDGER_CONN_ID = "mailing_ledger"

log = logging.getLogger(__name__)


def write_back() -> bool:
    """Whether to set invoice.emailed in the ERP for delivered documents: INVOICE_MAILING_WRITE_BACK (off)."""
    return os.environ.get("INVOICE_MAILING_WRITE_BACK", "false").lower() in ("1", "true", "yes")


@lru_cache(maxsize=8)
def engine_for(conn_id: str) -> Engine:
    """A SQLAlchemy engine for an Airflow connection of type sqlite or postgres (one per process)."""
    from airflow.sdk import BaseHook

    uri = BaseHook.get_connection(conn_id).get_hook().get_uri()
    scheme, rest = uri.split("://", 1)
    if scheme.startswith("postgres"):  # the hook names psycopg 3 when it is installed; the ledger and the tests
        uri = f"postgresql+psycopg2://{rest}"  # run on psycopg2, the driver requirements.txt pins
    return create_engine(uri, pool_pre_ping=True)


@lru_cache(maxsize=1)
def renderer() -> Renderer:
    # WeasyPrint logs every fetched and laid-out document ("Step 1 - Fetching...") and fontTools every
    # subsetting step at INFO: that drowned the task log's delivery lines. Their warnings stay.
    for name in ("weasyprint.progress", "fontTools"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return Renderer()


@contextmanager
def failure_recorded(ti) -> Iterator[None]:
    """Record why this try failed in the instance's XCom ``failure``, for the night's failure alert
    (``alerts.NightFailed``), which runs where the exception is not at hand. Airflow deletes the
    XCom when the next try starts, so only a last failed try leaves one."""
    try:
        yield
    except Exception as exc:
        if ti is not None:
            reason = _one_line(exc)
            try:
                ti.xcom_push(key=FAILURE_KEY, value={"reason": reason, "label": ti.rendered_map_index or None})
            except Exception:  # noqa: BLE001 - the task's own error is the one to raise
                log.warning("Could not record the failure for the alert", exc_info=True)
        raise


def _one_line(exc: BaseException) -> str:
    """What an alert says of an error: its first line, whole (a database error's SQL starts on the next), and the
    type only where the text does not name the cause on its own."""
    text = night_audit.first_line(str(exc))
    if len(text) > 1000:
        text = text[:1000].rsplit(" ", 1)[0] + " ..."
    if type(exc).__name__ in ("AirflowFailException",):
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _context(run_id: str, logical_date: datetime | None, data_interval_end: datetime | None,
             params: dict) -> pipeline.RunContext:
    return pipeline.RunContext.from_airflow(run_id, logical_date, data_interval_end, dict(params or {}))


def open_night(*, run_id, logical_date, data_interval_end, params) -> None:
    """The night's setup: refuse wrong parameters, an unreachable ledger and an ERP that lacks part of the
    contract before anything is read. An unreachable database is retried; a missing column is not."""
    from airflow.sdk.exceptions import AirflowFailException

    from include.invoice_mailing.erp_contract import ErpContractError, check

    ctx = _context(run_id, logical_date, data_interval_end, params)
    ledger.ensure_schema(engine_for(LEDGER_CONN_ID))
    try:
        check(engine_for(ERP_CONN_ID), ERP_CONN_ID)
    except ErpContractError as exc:
        raise AirflowFailException(str(exc)) from None
    log.info("Night %s: mode %s, parameters %s", ctx.run_date, ctx.params.mode, ctx.params)


def extract(*, run_id, logical_date, data_interval_end, params) -> list[dict]:
    ctx = _context(run_id, logical_date, data_interval_end, params)
    from airflow.sdk.configuration import conf

    max_batches = int(os.environ.get("INVOICE_MAILING_MAX_BATCHES", pipeline.MAX_BATCHES))
    batch_documents = int(os.environ.get("INVOICE_MAILING_BATCH_DOCUMENTS", pipeline.BATCH_DOCUMENTS))
    max_instances = min(int(os.environ.get("INVOICE_MAILING_MAX_INSTANCES", pipeline.MAX_INSTANCES)),
                        conf.getint("core", "max_map_length", fallback=1024))
    return pipeline.extract(engine_for(ERP_CONN_ID), engine_for(LEDGER_CONN_ID), ctx, max_batches,
                            batch_documents=batch_documents, max_instances=max_instances, workers=concurrency(),
                            write_back=write_back())


def mail_batch(batch: dict, *, run_id, logical_date, data_interval_end, params, map_index: int | None = None,
               try_number: int | None = None) -> dict:
    ctx = _context(run_id, logical_date, data_interval_end, params)
    settings = pipeline.BatchSettings(
        write_back=write_back(),
        lease=timedelta(seconds=float(os.environ.get("INVOICE_MAILING_CLAIM_LEASE_SECONDS",
                                                     ledger.DEFAULT_LEASE.total_seconds()))),
        archive=Archive.from_env(),
        verp=pipeline.Verp.from_deployment(),
    )
    if map_index is not None and try_number is not None:  # the audit links deliveries to this try
        ledger.record_task(engine_for(LEDGER_CONN_ID), run_id=run_id, map_index=map_index, try_number=try_number,
                           label=batch["label"], customers=batch["customers"])
    # A wait for a session slot happens with deliveries claimed: it stays well inside their lease.
    slots = SessionSlots(engine_for(LEDGER_CONN_ID), default_max_sessions=smtp_sessions(),
                         wait=min(smtp_slot_wait(), settings.lease.total_seconds() / 2))
    with SmtpSender(slots=slots) as sender:
        summary = pipeline.mail_batch(engine_for(ERP_CONN_ID), engine_for(LEDGER_CONN_ID), ctx, batch,
                                      renderer=renderer(), sender=sender, settings=settings)
    if summary["failed_deliveries"]:
        from airflow.sdk.exceptions import AirflowFailException

        # Retrying would not help: the relay refused, or the ERP or configuration is wrong.
        raise AirflowFailException(f"{len(summary['failed_deliveries'])} deliveries of {batch['label']} failed "
                                   "and need an operator: " + "; ".join(summary["failed_deliveries"]))
    return summary


def audit(*, dag_id, run_id, batches: list[dict] | None, outlet_events=None, ti=None) -> dict:
    """Store the night's summary and its status: ``green``, ``red`` (deliveries not sent, or no extract) or
    ``rejected`` (the approval brake). Green: publish it as the event of the asset NIGHTS and succeed. Else
    fail, so that the run is red and a clear runs audit again: deliveries not sent are mailed to the
    operators first (``alerts.red_night``); a night without extract or rejected is mailed by the DAG's
    failure alert, which names the task and why. ``publish_red`` then publishes the red night."""
    from airflow.sdk.configuration import conf
    from airflow.sdk.exceptions import AirflowFailException

    engine = engine_for(LEDGER_CONN_ID)
    summary = pipeline.audit(engine, run_id)
    # A night the brake held has no instance that ran: that is the brake's verdict, not a failure of theirs.
    held = night_status(engine, run_id, [], batches)[0] == "rejected"
    unfinished = [] if held else unfinished_instances(ti, dag_id, run_id, batches)
    if unfinished:
        summary["unfinished_instances"] = [asdict(u) for u in unfinished]
        summary["undelivered"] += night_audit.undecided_documents(engine, run_id, unfinished, batches)
        for u in unfinished:
            log.error("The instance %s did not succeed (%s): %s", u.label, u.state, u.error)
    summary["status"], summary["why"] = night_status(engine, run_id, summary["undelivered"], batches, unfinished)
    ledger.record_night_status(engine, run_id, summary["status"], summary["why"], len(unfinished))
    if summary["status"] == "green":
        if outlet_events is not None:
            outlet_events[NIGHTS].extra = published(run_id, summary)
        return summary
    if ti is not None:
        ti.xcom_push(key=SUMMARY_KEY, value=summary)
    if not summary["undelivered"] and not unfinished:
        raise AirflowFailException(f"Invoice mailing {run_id}: {summary['why']}")
    base_url = conf.get("api", "base_url", fallback="http://localhost:8080/")
    subject, body = alerts.red_night(dag_id, run_id, summary["undelivered"], batches, base_url, unfinished)
    try:
        if alerts.send(subject, body) and ti is not None:
            ti.xcom_push(key=ALERTED_KEY, value=subject)  # the DAG's failure alert then stays silent
    except Exception:  # noqa: BLE001 - the night is red whether or not the alert could be mailed
        log.exception("The alert could not be sent: %s", subject)
    raise AirflowFailException(subject)


def unfinished_instances(ti, dag_id: str, run_id: str, batches: list[dict] | None) -> list:
    """The night's mapped instances that did not succeed, asked of Airflow (their states, and the error each
    recorded in its XCom ``failure``): an instance that failed before it wrote a ledger row, or whose
    process was killed, leaves nothing in the ledger to count."""
    if ti is None or not batches:
        return []
    from include.invoice_mailing.alerts import MAPPED_TASK_ID

    found = ti.get_task_states(dag_id=dag_id, task_ids=[MAPPED_TASK_ID], run_ids=[run_id]).get(run_id, {})
    unexpanded = found.get(MAPPED_TASK_ID)  # the task never expanded: an upstream task failed
    states = {i: found.get(f"{MAPPED_TASK_ID}_{i}", unexpanded) for i in range(len(batches))}
    errors = {}
    for index, state in states.items():
        if state != "success":
            failure = ti.xcom_pull(task_ids=MAPPED_TASK_ID, key=FAILURE_KEY, map_indexes=index)
            if isinstance(failure, dict) and failure.get("reason"):
                errors[index] = failure["reason"]
    return night_audit.unfinished_instances(batches, states, errors)


def night_status(engine: Engine, run_id: str, undelivered: list[dict], batches: list[dict] | None,
                 unfinished: list | None = None) -> tuple[str, str]:
    """(status, why) of a night: the brake's last answer, mapped instances that did not succeed, deliveries
    not sent, extract."""
    asked = ledger.approvals(engine, run_id)
    if asked and asked[-1]["decision"] in (ledger.REJECTED, ledger.TIMED_OUT):
        by = asked[-1]["decided_by"]
        why = f"rejected by {by}" if asked[-1]["decision"] == ledger.REJECTED else "no answer in time"
        return "rejected", f"the approval brake held the night ({why}): nothing was mailed"
    if unfinished:  # no error text here: the why is published to data teams, who see no address
        labels = ", ".join(u.label for u in unfinished[:3]) + (f" and {len(unfinished) - 3} more"
                                                              if len(unfinished) > 3 else "")
        return "red", (f"{len(unfinished)} of {len(batches)} mailing instances did not succeed ({labels}), "
                       f"{alerts.deliveries(len(undelivered))} not sent")
    if undelivered:
        return "red", f"{alerts.deliveries(len(undelivered))} not sent"
    if batches is None:
        return "red", "extract did not finish, nothing was mailed"
    return "green", "every delivery decided"


def published(run_id: str, summary: dict) -> dict:
    """The asset event's extra: the night's status and counts, never an address (the undelivered are counted)."""
    return {"run_id": run_id, **{k: v for k, v in summary.items() if k not in ("undelivered", "unfinished_instances")},
            "undelivered": len(summary.get("undelivered") or []),
            "unfinished_instances": len(summary.get("unfinished_instances") or [])}


def publish_red(*, run_id, ti, outlet_events) -> None:
    """After audit: a night audit did not publish (it failed) is published red, with the summary audit left,
    so that downstream DAGs see every night. A green night was published by audit: nothing to do."""
    from airflow.sdk.exceptions import AirflowSkipException

    if ti.xcom_pull(task_ids="audit") is not None:
        raise AirflowSkipException("audit published this night (green)")
    summary = ti.xcom_pull(task_ids="audit", key=SUMMARY_KEY) or {
        "status": "red", "why": "audit could not read the ledger (see its log)"}
    outlet_events[NIGHTS].extra = published(run_id, summary)
    log.info("Published night %s as %s: %s", run_id, summary["status"], summary["why"])


def tonight(watch_date: datetime) -> datetime:
    """The logical date of the night a watch run looks at: the last 02:00 Oslo at or before it."""
    return clock.last_night(watch_date, hour=2)


def night_problem(*, paused: bool, count) -> str | None:
    """What is wrong with tonight's run, from Airflow's answers; None when it succeeded and will go on.

    ``count(states)``: how many runs of tonight are in those states (None: in any state)."""
    if not count(None):
        return "no run tonight" + (": the DAG is paused" if paused else " (is the scheduler running?)")
    if count(["failed"]):
        return "tonight's run failed"
    if count(["queued", "running"]):
        return "tonight's run has not finished" + (" (the DAG is paused)" if paused else "")
    if paused:
        return "the DAG is paused: tomorrow's night will not run"
    return None


def check_night(*, ti, logical_date: datetime) -> None:
    """The morning watch: tonight's run of invoice_mailing must exist and have succeeded, and the DAG
    must not be paused; anything else alerts the operators, and this check fails. It asks Airflow
    (the task SDK's view of runs and DAGs), never the ledger."""
    from airflow.sdk.exceptions import AirflowFailException

    night = tonight(logical_date)
    paused = ti.get_dag(DAG_ID).is_paused
    problem = night_problem(paused=paused, count=lambda states: ti.get_dr_count(
        dag_id=DAG_ID, logical_dates=[night], states=states))
    bounced = new_bounces(logical_date)
    if problem is None:
        log.info("Tonight's run of %s (%s) succeeded", DAG_ID, night.isoformat())
        if bounced:  # not red: but accounts receivable must correct the addresses
            alerts.send(*alerts.bounces_only(clock.night_of(night).isoformat(), bounced))
        return
    subject, body = alerts.night_not_done(clock.night_of(night).isoformat(), problem)
    alerts.send(subject, body + alerts.new_bounces(bounced))
    raise AirflowFailException(subject)


def new_bounces(watch_date: datetime) -> list[dict]:
    """Deliveries that bounced since the previous morning's watch (the 24 hours before this one), from the
    ledger. The watch's verdict is about tonight's run, never about the ledger: a ledger it cannot read
    (or none configured) gives no list, and a log line."""
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return ledger.bounced_between(engine_for(LEDGER_CONN_ID), watch_date - timedelta(days=1), watch_date)
    except AirflowNotFoundException:
        log.info("No connection %s: no bounces to list", LEDGER_CONN_ID)
    except Exception:  # noqa: BLE001 - the watch still says whether tonight's run succeeded
        log.exception("The bounces since yesterday's watch could not be read from the ledger")
    return []


def hold_night(*, run_id, logical_date, data_interval_end, params) -> tuple[str, str] | None:
    """The approval brake's question for tonight: None when the night goes on without one (logged with
    the numbers), else the subject and body of the approval request, recorded in the ledger."""
    from include.invoice_mailing import brake

    ctx = _context(run_id, logical_date, data_interval_end, params)
    engine = engine_for(LEDGER_CONN_ID)
    settings = brake.BrakeSettings.from_env()
    volume = brake.Volume.from_json(ledger.night_volume(engine, run_id) or {})
    history = [brake.Volume.from_json(v) for v in ledger.night_history(engine, run_id)]
    comparison = brake.compare(volume, history, mode=ctx.params.mode, resend=ctx.params.resend,
                               scoped=bool(ctx.params.documents or ctx.params.customers), settings=settings)
    median = "no earlier night" if comparison.median_documents is None else \
        f"median {comparison.median_documents:g} documents of the last {comparison.nights} nights"
    if not comparison.braked:
        log.info("No approval needed: %d documents to %d customers (%s), mode %s", volume.documents,
                 volume.customers, median, ctx.params.mode)
        return None
    shown = dict(params or {})
    ledger.ask_approval(engine, run_id, {**comparison.as_json(), "params": shown})
    log.warning("Held for approval: %s", "; ".join(comparison.reasons))
    return brake.request_text(run_id, comparison, shown, settings)


def night_decided(*, run_id, approved: bool, timed_out: bool, responded_by: dict | None, responded_at) -> str:
    """Record a person's answer (or the timeout's) in the ledger; what the log and the alert say of it."""
    from include.invoice_mailing import brake

    decision = ledger.APPROVED if approved else ledger.TIMED_OUT if timed_out else ledger.REJECTED
    who = None if responded_by is None else (responded_by.get("name") or responded_by.get("id"))
    request = ledger.decide_approval(engine_for(LEDGER_CONN_ID), run_id, decision, who, responded_at)
    numbers = brake.Volume.from_json(request or {})
    what = (f"{numbers.documents} documents to {numbers.customers} customers"
            + "".join(f", {c} {t:,.2f}" for c, t in numbers.totals.items()))
    when = clock.local(responded_at).strftime("%Y-%m-%d %H:%M %Z") if responded_at else "?"
    if approved:
        return f"Approved by {who} at {when}: mailing {what}"
    if timed_out:
        return f"No answer within the approval's time (until {when}): rejected, nothing was mailed ({what})"
    return f"Rejected by {who} at {when}: nothing was mailed ({what})"


def collect_bounces(*, run_id, night: bool) -> dict:
    """Read the bounce mailbox (the connection ``mailing_bounces``) and apply its reports to the ledger.

    Never fails the night: a mailbox that cannot be read is logged, recorded in the task's return value
    (its XCom: ``read: false`` and why) and, for a night (``night=True``), mailed to the operators at once,
    because the night mails all the same and nobody would otherwise learn that its bounces were not
    read. The hourly DAG (``night=False``) fails instead: its red run in the grid is the sign, and an
    hourly mail would be noise. Without the connection, nothing is read and the log says so."""
    from airflow.sdk.exceptions import AirflowFailException

    from include.invoice_mailing.bounce_collect import Collected, collect
    from include.invoice_mailing.bounce_mailbox import (
        BOUNCES_CONN_ID,
        BounceMailbox,
        MailboxUnavailable,
        mailbox_settings,
    )
    from include.invoice_mailing.bounces import BounceKeyError, bounce_key_from_environment

    if mailbox_settings() is None:
        log.info("No connection %s: no bounce mailbox to read (bounces are not tracked)", BOUNCES_CONN_ID)
        return Collected(read=False, why=f"no connection {BOUNCES_CONN_ID}").as_xcom()
    try:
        key = bounce_key_from_environment()
    except BounceKeyError as exc:  # nothing was sent with it: no report can be tied to a delivery
        log.warning("%s: no report can be tied to its delivery without it; they stay in the mailbox", exc)
        key = None
    try:
        with BounceMailbox.from_connection() as mailbox:
            done = collect(engine_for(LEDGER_CONN_ID), mailbox, key=key, run_id=run_id)
    except Exception as exc:  # noqa: BLE001 - reading bounces is best-effort for a night: the invoices go out
        why = str(exc) if isinstance(exc, MailboxUnavailable) else f"{type(exc).__name__}: {_one_line(exc)}"
        done = Collected(read=False, why=why)
        if not night:
            raise AirflowFailException(f"The bounces were not read: {why}") from exc
        log.warning("The bounces were not read, the night mails all the same: %s", why,
                    exc_info=not isinstance(exc, MailboxUnavailable))
        _warn(*alerts.bounces_not_read(run_id, why))
        return done.as_xcom()
    if done.quarantined and night:
        _warn(*alerts.bounces_quarantined(run_id, mailbox.settings.quarantine_folder, done.quarantined))
    return done.as_xcom()


def _warn(subject: str, body: str) -> None:
    try:
        alerts.send(subject, body)
    except Exception:  # noqa: BLE001 - the night goes on whether or not the warning could be mailed
        log.exception("The warning could not be sent: %s", subject)


def collect_bounces_between_nights(*, run_id, ti) -> dict:
    """The hourly DAG's pass over the bounce mailbox; skipped while a night runs. A night reads the mailbox
    itself, and two sessions moving the same messages would race (the ledger would not mind: a report is
    applied once per delivery; but the loser's move of a message already gone fails its run)."""
    from airflow.sdk.exceptions import AirflowSkipException

    if ti.get_dr_count(dag_id=DAG_ID, states=["queued", "running"]):
        raise AirflowSkipException(f"a run of {DAG_ID} is queued or running: it reads the bounce mailbox itself")
    return collect_bounces(run_id=run_id, night=False)
