"""The operator's alert of a red night: who was not mailed and why, with masked addresses and links.

The alert goes through the Airflow connection ``mailing_alerts`` (type smtp: the relay's host and
port; extra ``to``, the operators' address(es), and ``from_email``). Without that connection the
alert is only logged. The text is built by pure functions; only ``send`` talks to the relay.
"""

from __future__ import annotations

import html
import logging
from urllib.parse import quote

from include.invoice_mailing.masking import mask_address as mask

log = logging.getLogger(__name__)

ALERT_CONN_ID = "mailing_alerts"
MAPPED_TASK_ID = "mail_customers"


def task_link(base_url: str, dag_id: str, run_id: str, map_index: int | None) -> str:
    """The UI page of the mapped instance (Airflow 3's ``/dags/…/runs/…/tasks/…/mapped/N``)."""
    mapped = f"/mapped/{map_index}" if map_index is not None else ""
    return f"{base_url.rstrip('/')}/dags/{dag_id}/runs/{quote(run_id, safe='')}/tasks/{MAPPED_TASK_ID}{mapped}"


def map_indexes(batches: list[dict] | None) -> dict[str, int]:
    """Customer number -> map index of the instance that mails it (the batches are extract's XCom, in order)."""
    return {customer: index for index, batch in enumerate(batches or []) for customer in batch["customers"]}


def red_night(dag_id: str, run_id: str, undelivered: list[dict], batches: list[dict] | None,
              base_url: str) -> tuple[str, str]:
    """Subject and HTML body of the alert: one line per delivery not sent, grouped by customer."""
    if batches is None:
        subject = f"Invoice mailing {run_id}: the night failed before mailing (extract did not finish)"
        body = (f"<p>The run <b>{html.escape(run_id)}</b> of {html.escape(dag_id)} failed before any customer was "
                "mailed: the due documents could not be read. See the task <code>extract</code>.</p>"
                f"<p><a href=\"{html.escape(task_link(base_url, dag_id, run_id, None).rsplit('/', 1)[0])}/extract\">"
                "extract</a></p>")
        return subject, body
    indexes = map_indexes(batches)
    customers = sorted({u["customer"] for u in undelivered})
    subject = (f"Invoice mailing {run_id}: {len(undelivered)} deliveries not sent "
               f"({len(customers)} customer{'s' if len(customers) != 1 else ''})")
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
            f"<table border=\"1\" cellpadding=\"4\"><tr>{head}</tr>{''.join(rows)}</table>")
    return subject, body


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


def night_late() -> None:
    """The night has not finished by the hour operators expect it (06:00 Oslo by default)."""
    subject = "Invoice mailing: the night has not finished by its deadline"
    body = ("<p>A run of invoice_mailing is still queued or running past its deadline. Look for instances of "
            "<code>mail_customers</code> that are up for retry or running, and at the relay.</p>")
    send(subject, body)
