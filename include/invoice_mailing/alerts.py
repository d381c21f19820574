"""The operator's alert of a red night: who was not mailed and why, with masked addresses and links.

The alert goes through the Airflow connection ``mailing_alerts`` (type smtp: the relay's host and
port; extra ``to``, the operators' address(es), and ``from_email``). Without that connection the
alert is only logged. The text is built by pure functions; only ``send`` talks to the relay.

Three paths, one mail per red night:

- ``audit`` mails ``red_night`` when deliveries were not sent (it reads them from the ledger) and
  records that it did (XCom ``alerted``).
- ``NightFailed``, the DAG's ``on_failure_callback`` (run by the dag-processor, or by ``dag.test()``),
  mails ``night_failed`` for every other failed run: a task failed and audit sent nothing (a wrong
  parameter, the ERP or the ledger unreachable, audit itself failing). It needs neither the ledger
  nor the pipeline: the failing tasks record why in their XCom ``failure``.
- ``invoice_mailing_watch`` mails ``night_not_done`` when tonight's run is missing, failed, not
  finished, or the DAG is paused; with the deliveries that bounced since its last run
  (``new_bounces``). A green night with new bounces gets ``bounces_only``: a bounce is not red.
- ``collect_bounces`` mails ``bounces_not_read`` when a night cannot read its bounce mailbox (the
  night mails all the same).
"""

from __future__ import annotations

import html
import logging
from urllib.parse import quote

from airflow.sdk import BaseNotifier

from include.invoice_mailing.dag_settings import ALERTED_KEY, FAILURE_KEY
from include.invoice_mailing.masking import mask_address as mask
from include.invoice_mailing.masking import mask_text

log = logging.getLogger(__name__)

ALERT_CONN_ID = "mailing_alerts"
MAPPED_TASK_ID = "mail_customers"


def task_link(base_url: str, dag_id: str, run_id: str, map_index: int | None,
              task_id: str = MAPPED_TASK_ID) -> str:
    """The UI page of a task instance (Airflow 3's ``/dags/…/runs/…/tasks/…[/mapped/N]``)."""
    mapped = f"/mapped/{map_index}" if map_index is not None and map_index >= 0 else ""
    return f"{base_url.rstrip('/')}/dags/{dag_id}/runs/{quote(run_id, safe='')}/tasks/{task_id}{mapped}"


def map_indexes(batches: list[dict] | None) -> dict[str, int]:
    """Customer number -> map index of the instance that mails it (the batches are extract's XCom, in order)."""
    return {customer: index for index, batch in enumerate(batches or []) for customer in batch["customers"]}


def red_night(dag_id: str, run_id: str, undelivered: list[dict], batches: list[dict] | None,
              base_url: str, unfinished: list | None = None) -> tuple[str, str]:
    """Subject and HTML body of audit's alert: the mapped instances that did not succeed, each with its
    customers and the first line of its error; then one line per delivery not sent, grouped by customer."""
    indexes = map_indexes(batches)
    customers = sorted({u["customer"] for u in undelivered})
    failed = f"{len(unfinished)} mailing instance{'s' if len(unfinished) != 1 else ''} failed, " if unfinished else ""
    subject = (f"Invoice mailing {run_id}: {failed}{deliveries(len(undelivered))} not sent "
               f"({len(customers)} customer{'s' if len(customers) != 1 else ''})")
    instances = "".join(
        f"<tr><td>{html.escape(u.label)}</td><td>{html.escape(' '.join(u.customers))}</td>"
        f"<td>{html.escape(u.state)}</td><td>{html.escape(mask_text(u.error) or '')}</td>"
        f"<td><a href=\"{html.escape(task_link(base_url, dag_id, run_id, u.map_index))}\">task instance</a></td></tr>"
        for u in unfinished or ())
    if instances:
        instances = ("<p>These mailing instances did not succeed; their documents without a row below were not "
                     "mailed. Fix the cause (the error's first line is here, the whole one in the instance's log), "
                     "then clear the instance.</p><table border=\"1\" cellpadding=\"4\"><tr><th>instance</th>"
                     "<th>customers</th><th>state</th><th>error</th><th></th></tr>" + instances + "</table>")
    rows = []
    for u in sorted(undelivered, key=lambda u: (u["customer"], u["document"], u["recipient"])):
        link = task_link(base_url, dag_id, run_id, indexes.get(u["customer"]))
        rows.append(
            "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                u["customer"], u["document"], mask(u["recipient"]) or "(whole document)", u["format"] or "-",
                u["status"], u["reason"], u["answer"]))
            + f"<td><a href=\"{html.escape(link)}\">task instance</a></td></tr>")
    head = "".join(f"<th>{h}</th>" for h in ("customer", "document", "recipient", "format", "status", "reason",
                                             "server's answer / detail", ""))
    body = (f"<p>The run <b>{html.escape(run_id)}</b> of {html.escape(dag_id)} ended <b>failed</b>: these deliveries "
            "were not sent. <i>pending</i>: the relay deferred them; fix the relay or wait, then clear the task "
            "instance. <i>failed</i>: refused by the relay or a configuration error; fix the ERP data or the "
            "configuration, then clear the task instance (only what is missing is sent).</p>"
            f"{instances}<table border=\"1\" cellpadding=\"4\"><tr>{head}</tr>{''.join(rows)}</table>")
    return subject, body


def clipped(subject: str, limit: int = 250) -> str:
    """A subject at most ``limit`` characters, cut between words and marked (the body has the whole line)."""
    if len(subject) <= limit:
        return subject
    return subject[:limit - 2].rsplit(" ", 1)[0] + " \u2026"


def deliveries(count: int) -> str:
    return f"{count} deliver{'y' if count == 1 else 'ies'}"


def send(subject: str, html_content: str) -> bool:
    """Mail the alert through the ``mailing_alerts`` connection; False (and a log line) without one."""
    from airflow.providers.smtp.hooks.smtp import SmtpHook
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        conn = BaseHook.get_connection(ALERT_CONN_ID)
    except AirflowNotFoundException:
        log.warning("No connection %r: the alert is only in this log: %s", ALERT_CONN_ID, subject)
        return False
    extra = conn.extra_dejson
    to = extra.get("to")
    if not to:
        log.warning("Connection %r names no 'to' address: the alert is only in this log: %s", ALERT_CONN_ID, subject)
        return False
    with SmtpHook(smtp_conn_id=ALERT_CONN_ID) as hook:
        hook.send_email_smtp(to=to, subject=subject, html_content=html_content,
                             from_email=extra.get("from_email") or "invoice-mailing@localhost")
    log.info("Alert sent to %s: %s", to, subject)
    return True


def night_failed(dag_id: str, run_id: str, failures: list[dict], base_url: str) -> tuple[str, str]:
    """Subject and HTML body of a failed run's alert: each failed task, why, and a link to its log.

    ``failures``: dicts with ``task_id``, ``map_index``, ``label`` and ``reason``.
    """
    first = failures[0]
    where = f" in {first['task_id']}" if first["task_id"] else ""
    named = f" ({first['label']})" if first["label"] else ""
    reason = " ".join(str(first["reason"]).split())  # one line: a subject is a header
    subject = clipped(f"Invoice mailing {run_id}: the night failed{where}{named}: {reason}")

    def link(f: dict) -> str:
        if not f["task_id"]:
            return task_link(base_url, dag_id, run_id, None, "").rsplit("/tasks/", 1)[0]
        return task_link(base_url, dag_id, run_id, f["map_index"], f["task_id"])

    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            f["task_id"] or "", f["label"] or "", f["reason"]))
        + f"<td><a href=\"{html.escape(link(f))}\">task instance and log</a></td></tr>" for f in failures)
    body = (f"<p>The run <b>{html.escape(run_id)}</b> of {html.escape(dag_id)} ended <b>failed</b>. "
            "Fix the cause, then clear the failed task instance (or the run): the night sends only what it "
            "has not sent.</p><table border=\"1\" cellpadding=\"4\"><tr><th>task</th><th>instance</th>"
            f"<th>why</th><th></th></tr>{rows}</table>")
    return subject, body


class NightFailed(BaseNotifier):
    """The DAG's ``on_failure_callback``: mail ``night_failed`` unless ``audit`` already mailed this run.

    Airflow runs it once per failed run, in the dag-processor (``dag.test()`` runs it itself). The
    reasons come from the failing tasks' XCom ``failure`` (see ``tasks.failure_recorded``); an
    instance killed before it could record one is named with "no reason recorded".
    """

    def __init__(self, recorded_by: tuple[str, ...] = ("open_night", "collect_bounces", "extract", "approve_night",
                                                "audit")):
        super().__init__()
        self.recorded_by = recorded_by  # the unmapped tasks whose failure is looked up besides the failing one

    def render_template_fields(self, context, jinja_env=None) -> None:
        """Nothing is templated. (``dag.test()`` hands DAG callbacks the serialized DAG, which has no
        template environment: BaseNotifier's rendering would fail there before ``notify``.)"""

    def notify(self, context) -> None:
        from airflow.sdk.configuration import conf

        ti, run_id = context.get("ti"), context["run_id"]
        dag_id = context["dag"].dag_id
        if _cleared_since_it_failed(dag_id, run_id):
            log.info("%s was cleared since it failed: its new try alerts if it fails again", run_id)
            return
        if _recorded(context, dag_id, run_id, "audit", -1, ALERTED_KEY):
            log.info("audit already mailed the alert of %s: no second mail", run_id)
            return
        failures = []
        looked_up = [(task_id, -1) for task_id in self.recorded_by]
        if ti is not None and (ti.task_id, ti.map_index) not in looked_up:
            looked_up.insert(0, (ti.task_id, ti.map_index))
        for task_id, map_index in looked_up:
            recorded = _recorded(context, dag_id, run_id, task_id, map_index, FAILURE_KEY)
            if recorded:
                failures.append({"task_id": task_id, "map_index": map_index, "label": recorded.get("label"),
                                 "reason": recorded.get("reason") or "?"})
        if not failures:
            reason = f"no reason recorded (Airflow says: {context.get('reason') or 'failed'}); see the log"
            failures = [{"task_id": ti.task_id if ti else None, "map_index": ti.map_index if ti else -1,
                         "label": None, "reason": reason}]
        subject, body = night_failed(dag_id, run_id, failures, conf.get("api", "base_url",
                                                                        fallback="http://localhost:8080/"))
        send(subject, body)


ACTIVE = {"scheduled", "queued", "running", "up_for_retry", "up_for_reschedule", "restarting", "deferred"}


def _cleared_since_it_failed(dag_id: str, run_id: str) -> bool:
    """Whether an operator cleared the run after it failed and before this callback ran (Airflow runs it
    in the dag-processor, seconds later). A cleared instance's XComs are gone at its next try, so
    ``audit``'s "alerted" could no longer be read: the run's new try decides, and alerts if it fails again.
    Cleared: an instance is waiting or running again, or none is failed any more (some wait to be
    scheduled, or the new tries already mended the run before the callback came round). A failed run of
    this DAG always has a failed instance (it has no run timeout), so one without is one that was cleared."""
    states = list(_task_states(dag_id, run_id))
    if any(state in ACTIVE for state in states):
        return True
    return bool(states) and not any(state in ("failed", "upstream_failed") for state in states)


def _without_task_sdk_channel() -> bool:
    """Whether this callback runs without the task SDK's channel to Airflow: in ``dag.test()``, which
    runs DAG callbacks in its own process (the dag-processor runs them with it). Then it reads the
    metadata database ``dag.test()`` runs on."""
    try:
        from airflow.sdk.execution_time.task_runner import SUPERVISOR_COMMS  # noqa: F401
    except ImportError:
        return True
    return False


def _task_states(dag_id: str, run_id: str):
    """The states of the run's task instances now."""
    if _without_task_sdk_channel():
        from airflow.models.taskinstance import TaskInstance
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            return list(session.scalars(select(TaskInstance.state).where(
                TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id)))
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    found = RuntimeTaskInstance.get_task_states(dag_id=dag_id, run_ids=[run_id])
    return [state for by_task in found.values() for state in by_task.values()]


def _recorded(context, dag_id: str, run_id: str, task_id: str, map_index: int, key: str):
    """An XCom of this run."""
    if _without_task_sdk_channel():
        from airflow.models.xcom import XComModel
        from airflow.utils.session import create_session
        from sqlalchemy import select

        with create_session() as session:
            row = session.execute(select(XComModel.value).where(
                XComModel.dag_id == dag_id, XComModel.run_id == run_id, XComModel.task_id == task_id,
                XComModel.map_index == map_index, XComModel.key == key)).first()
            return XComModel.deserialize_value(row) if row is not None else None
    ti = context.get("ti")
    if ti is None:  # Airflow found no instance to blame (a deadlock): nothing to read it through
        return None
    return ti.xcom_pull(task_ids=task_id, dag_id=dag_id, run_id=run_id, key=key, map_indexes=map_index)


def night_not_done(night: str, problem: str) -> tuple[str, str]:
    """The watch's alert: tonight's run (``night``: its date in Oslo) is not a success by the deadline."""
    subject = f"Invoice mailing {night}: {problem}"
    body = (f"<p>The night of {html.escape(night)} of invoice_mailing: <b>{html.escape(problem)}</b>.</p>"
            "<p>A missing night: is the DAG paused, the scheduler down? A run not finished: look for instances of "
            "<code>mail_customers</code> up for retry or running, and at the relay. A failed run: its own alert "
            "says why; clear the failed instance once the cause is fixed.</p>")
    return subject, body


def bounces_not_read(run_id: str, why: str) -> tuple[str, str]:
    """The night's warning when its bounce mailbox could not be read: it mails all the same."""
    subject = f"Invoice mailing {run_id}: the bounces were not read"
    body = (f"<p>The run <b>{html.escape(run_id)}</b> could not read the bounce mailbox: "
            f"{html.escape(why)}.</p><p>The night mails all the same; the reports wait in the mailbox and the "
            "next run that can read it applies them (the hourly <code>invoice_mailing_bounces</code> too). "
            "Until then, deliveries that bounced still show as <i>sent</i>.</p>")
    return subject, body


def bounces_quarantined(run_id: str, folder: str, quarantined: list[str]) -> tuple[str, str]:
    """The night's warning when some bounce reports could not be applied: moved aside, never deleted."""
    subject = f"Invoice mailing {run_id}: {len(quarantined)} bounce report(s) moved to {folder}"
    items = "".join(f"<li>{html.escape(line)}</li>" for line in quarantined[:20])
    body = (f"<p>The run <b>{html.escape(run_id)}</b> could not apply these reports of the bounce mailbox and moved "
            f"them to its folder <b>{html.escape(folder)}</b>, where they stop no later run:</p><ul>{items}</ul>"
            "<p>The night mails all the same. Look at them there; a report that names a delivery of ours can be "
            "moved back to the inbox once the cause is mended.</p>")
    return subject, body


def new_bounces(bounced: list[dict]) -> str:
    """The morning alert's list of deliveries that bounced since the last one: who, what, the masked
    address and the remote server's words, so accounts receivable can correct the address in the ERP."""
    if not bounced:
        return ""
    rows = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
            b["customer_id"], f"{b['doc_type']} {b['ref_nbr']}", mask(b["recipient"]), b["reason"],
            mask_text(" ".join((b["detail"] or "").split()))))
        + "</tr>" for b in bounced)
    head = "".join(f"<th>{h}</th>" for h in ("customer", "document", "contact address", "bounce",
                                             "server's answer"))
    return (f"<p><b>{deliveries(len(bounced))} bounced</b> since the last alert: the customer did not receive "
            "the document. Correct the address in the ERP; the next night mails the document to the new address. "
            "(An address that hard-bounced is not mailed again until then, or until an operator runs the night "
            "with <code>lift_bounces</code>.)</p>"
            f"<table border=\"1\" cellpadding=\"4\"><tr>{head}</tr>{rows}</table>")


def bounces_only(night: str, bounced: list[dict]) -> tuple[str, str]:
    """The watch's mail for a night that succeeded but has new bounces: not red, but somebody must act."""
    return f"Invoice mailing {night}: {deliveries(len(bounced))} bounced", new_bounces(bounced)
