"""``make screenshots``: the README's pictures of the Airflow UI, all from one real night, rewritten in docs/.

A real Airflow (``dev/airflow_stack.py``) mails a small ERP's invoices through an SMTP sink that refuses
one customer's recipient, so the night ends red; then a live resend of everything is held by the approval
brake and left waiting. Headless Chromium (``dev/browser.py``), logged in with the time zone set to
Europe/Oslo in the user menu, takes what an operator and an auditor see:

    night-grid.png        the red run's mapped mail_customers instances, each labelled with its customer
    night-log.png         the refused instance's log: customer, document, masked recipient, server's answer
    night-alert.png       the alert mail audit sent the operators (the HTML body the sink received)
    night-watch.png       the morning watch's mail about the same night (06:00 Oslo, here triggered at once)
    night-approval.png    the held night waiting: approve_night's Required Action tab, with its numbers
    audit-*.png           the auditors' pages (README, "Auditing in the Airflow UI")
    audit-bounced.png     Deliveries filtered to bounced: Kari's invoice, after the relay's report came back
    audit-bounce-report.png  that report's text, as the row's link shows it

The invoices go out with VERP senders, the bounce mailbox is a Dovecot (``dev/dovecot.py``), and after
the night a Postfix-shaped report for Kari's invoice is put in it and ``invoice_mailing_bounces`` is
triggered, as its hourly run would. So that the nights page's chart has a history to draw, the ledger
starts with the 59 nights before, generated (``seed_history``: about 40 deliveries a night, bounces
slowly rising): the pictures' only invented data, and the nights page says nothing else about them.

The pictures are written to a temporary folder first and copied into docs/ only when all of them were
taken. It rewrites the repository, so it is no part of ``make test``; about two minutes (up to eight
on a busy machine).
"""

from __future__ import annotations

import argparse
import html
import json
import shutil
import sys
import tempfile
import time
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from zoneinfo import ZoneInfo

from sqlalchemy import create_engine

from dev import browser as chromium
from dev.airflow_stack import ROOT, AirflowStack
from dev.dovecot import Dovecot
from dev.smtp_sink import SmtpSink
from include.invoice_mailing import ledger
from include.invoice_mailing.bounces import BOUNCE_KEY_VARIABLE
from tests.erp import TinyErp
from tests.test_bounce_collect import BOUNCES, KEY, postfix_dsn_for

DAG = "invoice_mailing"
WATCH = "invoice_mailing_watch"
BOUNCES_DAG = "invoice_mailing_bounces"
BOUNCED = "kari@bolgen.example"
OPERATORS = "operators@fjordlys.example"
REFUSED = "ola@fjellheimen.example"
REFUSAL = f"550 5.1.1 <{REFUSED}>: user unknown"
CUSTOMERS = (("10001", "Bølgen Kafé AS", "kari@bolgen.example"),
             ("10002", "Fjellheimen Hytteutleie AS", REFUSED),
             ("10003", "Havblikk Fiskeutsalg AS", "per@havblikk.example"),
             ("10004", "Nordlys Bakeri AS", "ingrid@nordlysbakeri.example"))
# (logical date, run id): 02:00 in Oslo; triggered runs named after their night, not the clock of today.
RED_NIGHT = ("2026-11-24T01:00:00Z", "manual__2026-11-24T01:00:00+00:00")
HELD_NIGHT = ("2026-11-25T01:00:00Z", "manual__2026-11-25T01:00:00+00:00")
WATCH_MORNING = "2026-11-24T05:00:00Z"  # 06:00 in Oslo
OSLO = ZoneInfo("Europe/Oslo")
WINDOW = (1600, 1000)  # a wide screen: the Deliveries tables fit but for the run tab's last columns


def seed_erp(path: Path) -> None:
    """Four customers with one invoice each: the refused recipient is customer 10002's."""
    erp = TinyErp(create_engine(f"sqlite:///{path}"))
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing")
    for number, name, address in CUSTOMERS:
        erp.customer(number, name, invoice_email=address)
        erp.invoice(f"INV0{number}", number)


def seed_history(path: Path, nights: int = 59) -> None:
    """The nights before the red one, for the chart: runs and final deliveries in the ledger, about 40 a
    night, a few skipped, and bounces rising from none to a handful (no failure: the pages' failed
    delivery is the red night's own)."""
    import random
    from datetime import UTC, datetime, timedelta

    engine = create_engine(f"sqlite:///{path}")
    ledger.ensure_schema(engine)
    pick = random.Random(20261124)
    first = datetime(2026, 11, 24, 1, tzinfo=UTC) - timedelta(days=nights)
    runs, rows = [], []
    for n in range(nights):
        night = first + timedelta(days=n)
        run_id = f"scheduled__{night.isoformat()}"
        runs.append(dict(run_id=run_id, logical_date=night, mode="live", params={}, started_at=night,
                         finished_at=night + timedelta(minutes=4),
                         summary={"status": "green", "why": "every delivery decided"}))  # as audit left each night
        statuses = (["sent"] * pick.randint(30, 45) + ["skipped"] * pick.randint(1, 4)
                    + ["bounced"] * pick.randint(0, 1 + n // 12))  # no failure: the red night's is the one
        for i, status in enumerate(statuses):
            address = f"faktura@kunde{i}.example"
            rows.append(dict(
                run_id=run_id, last_run_id=run_id, doc_type="INV", ref_nbr=f"HIST{n:03d}{i:03d}",  # no document of the ERP above
                customer_id=f"2{i:04d}", mailing_id="INVOICE", recipient=address, recipient_key=address,
                add_to="To", format="PDF", mode="live", generation=0, status=status, attempts=1,
                reason={"skipped": "no_address", "bounced": "hard_bounce"}.get(status),
                sent_at=night if status in ("sent", "bounced") else None,
                bounced_at=night + timedelta(hours=3) if status == "bounced" else None,
                message_id=f"<{n}.{i}@fjordlys.example>", created_at=night, updated_at=night))
    with engine.begin() as conn:
        conn.execute(ledger.mailing_run.insert(), runs)
        conn.execute(ledger.delivery.insert(), rows)
    engine.dispose()


def smtp(port: int, **extra) -> str:
    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port,
                       "extra": {"disable_ssl": True, "disable_tls": True, "retry_limit": 0, "timeout": 10, **extra}})


class Camera:
    """The browser, the stack and the folder the pictures go to."""

    def __init__(self, driver, stack, folder: Path):
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver, self.stack, self.folder = driver, stack, folder
        self.wait = WebDriverWait(driver, 60)

    def open(self, path: str, *, showing: str) -> None:
        """Load a page of the UI and wait until it shows ``showing`` (the UI fills pages in after loading)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support import expected_conditions as ready

        self.driver.get(f"{self.stack.url}{path}")
        self.wait.until(ready.presence_of_element_located((By.XPATH, f"//*[contains(text(), {json.dumps(showing)})]")))

    def shoot(self, name: str, element: str | None = None) -> None:
        """The window, or only the element of that id (a mail is short: no empty window below it)."""
        from selenium.webdriver.common.by import By

        path = self.folder / f"{name}.png"
        if element:
            self.driver.find_element(By.ID, element).screenshot(str(path))
        else:
            chromium.shoot(self.driver, path, settle=2.0)
        print(f"  {name}.png", flush=True)


def red_night(camera: Camera, run_id: str, refused: dict, alert, watch_alert) -> None:
    path = f"/dags/{DAG}/runs/{run_id}/tasks/mail_customers"
    camera.open(f"{path}/mapped", showing="customer 10004")
    camera.shoot("night-grid")
    # Warnings only: the "Not sent:" line, not the traceback of the failure under it.
    camera.open(f"{path}/mapped/{refused['map_index']}?log_level=warning", showing="Not sent:")
    camera.shoot("night-log")
    for name, received in (("night-alert", alert), ("night-watch", watch_alert)):
        mail = camera.folder / f"{name}.html"
        mail.write_text(alert_page(received.message))
        camera.driver.get(mail.as_uri())
        camera.shoot(name, element="mail")
        mail.unlink()


def audit_pages(camera: Camera, run_id: str) -> None:
    """The auditors' walk of tests/e2e/test_audit_ui.py: nights, the failed delivery, its try, the tabs."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select

    driver, wait = camera.driver, camera.wait
    frame = (By.TAG_NAME, "iframe")
    deliveries_tab = (By.XPATH, "//a[normalize-space()='Deliveries'] | //button[normalize-space()='Deliveries']")

    driver.get(f"{camera.stack.url}/plugin/invoice-mailing")
    wait.until(ready.frame_to_be_available_and_switch_to_it(frame))
    wait.until(ready.presence_of_element_located((By.ID, "nights")))
    driver.switch_to.default_content()
    camera.shoot("audit-nights")

    wait.until(ready.frame_to_be_available_and_switch_to_it(frame))
    driver.find_element(By.LINK_TEXT, "Deliveries").click()
    Select(wait.until(ready.presence_of_element_located((By.NAME, "status")))).select_by_visible_text("failed")
    driver.find_element(By.ID, "apply").click()
    wait.until(lambda d: "status=failed" in d.execute_script("return location.href"))
    task_link = wait.until(ready.presence_of_element_located((By.CSS_SELECTOR, "#deliveries tbody tr .task-link")))
    driver.switch_to.default_content()
    camera.shoot("audit-deliveries")

    driver.switch_to.frame(driver.find_element(*frame))
    task_link.click()  # target=_top: the UI's own task instance page
    driver.switch_to.default_content()
    wait.until(lambda d: "/tasks/mail_customers/mapped/" in d.current_url)
    # The log's level filter set to warnings, as on night-log.png: the "Not sent:" line, not the traceback.
    driver.get(f"{driver.current_url}&log_level=warning")
    wait.until(ready.presence_of_element_located((By.XPATH, "//*[contains(text(), 'Not sent:')]")))
    camera.shoot("audit-task-instance")

    driver.find_element(*deliveries_tab).click()
    wait.until(ready.frame_to_be_available_and_switch_to_it(frame))
    wait.until(ready.presence_of_element_located((By.ID, "deliveries")))
    driver.switch_to.default_content()
    camera.shoot("audit-task-deliveries")

    camera.open(f"/dags/{DAG}/runs/{run_id}", showing="mail_customers")
    driver.find_element(*deliveries_tab).click()
    wait.until(ready.frame_to_be_available_and_switch_to_it(frame))
    wait.until(ready.presence_of_element_located((By.ID, "deliveries")))
    driver.switch_to.default_content()
    camera.shoot("audit-night-deliveries")


def bounce_comes_back(stack, api, mailbox: Dovecot, login: str, ledger_path: Path) -> None:
    """The relay's report on Kari's invoice reaches the bounce mailbox; the hourly DAG applies it."""
    engine = create_engine(f"sqlite:///{ledger_path}")
    [kari] = ledger.all_deliveries(engine, ledger.delivery.c.recipient == BOUNCED)
    engine.dispose()
    mailbox.append(login, postfix_dsn_for(kari).replace(b"nordvik-bygg.example", b"bolgen.example"))  # Kari's MX
    api.wait_for_dag(BOUNCES_DAG)
    api.unpause(BOUNCES_DAG)
    run_id = api.trigger(BOUNCES_DAG, logical_date=None)["dag_run_id"]
    if api.wait_for_run(BOUNCES_DAG, run_id, {"success", "failed"}, timeout=180)["state"] != "success":
        raise RuntimeError(f"{BOUNCES_DAG} {run_id} did not apply the report")


def bounce_pages(camera: Camera) -> None:
    """Deliveries filtered to bounced, and the text of the report behind the row."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select

    driver, wait = camera.driver, camera.wait
    frame = (By.TAG_NAME, "iframe")
    driver.get(f"{camera.stack.url}/plugin/invoice-mailing")
    wait.until(ready.frame_to_be_available_and_switch_to_it(frame))
    driver.find_element(By.LINK_TEXT, "Deliveries").click()
    Select(wait.until(ready.presence_of_element_located((By.NAME, "status")))).select_by_visible_text("bounced")
    driver.find_element(By.ID, "apply").click()
    wait.until(lambda d: "status=bounced" in d.execute_script("return location.href"))
    report = wait.until(ready.presence_of_element_located(
        (By.CSS_SELECTOR, "#deliveries tbody tr a[href*='bounce-reports']")))
    href = report.get_attribute("href")
    driver.switch_to.default_content()
    camera.shoot("audit-bounced")
    driver.get(href)
    wait.until(ready.presence_of_element_located((By.XPATH, "//*[contains(text(), '5.1.1')]")))
    camera.shoot("audit-bounce-report")


def held_night(camera: Camera, api) -> None:
    """A live resend of every document: the brake holds it; nobody answers while the picture is taken."""
    logical_date, run_id = HELD_NIGHT
    api.trigger(DAG, logical_date=logical_date, run_id=run_id, conf={"resend": True})
    camera.stack.wait_until(f"{run_id} to wait for approval", lambda: any(
        d["task_instance"]["state"] == "awaiting_input" for d in api.hitl_details(DAG, run_id)), 240)
    camera.open(f"/dags/{DAG}/runs/{run_id}/tasks/approve_night/required_actions",
                showing="a resend of every due document")
    camera.shoot("night-approval")


def alert_page(message) -> str:
    """The alert's HTML body under the headers a mail program shows, its date in Oslo time as one there would."""
    shown = {"From": message["From"], "To": message["To"], "Subject": message["Subject"],
             "Date": format_datetime(parsedate_to_datetime(message["Date"]).astimezone(OSLO))}
    headers = "".join(f"<div><b>{name}:</b> {html.escape(str(value))}</div>" for name, value in shown.items())
    return (f'<div id="mail" style="display: inline-block; padding-bottom: 12px">'
            f'<div style="font-family: sans-serif; padding: 8px 12px; background: #eef1f5; '
            f'border-bottom: 1px solid #ccd">{headers}</div>{message.get_body(("html",)).get_content()}</div>')


def take(folder: Path, work: Path) -> None:
    seed_erp(work / "erp.db")
    seed_history(work / "ledger.db")
    with SmtpSink() as sink, Dovecot() as mailbox:
        sink.faults.rcpt_replies[REFUSED] = REFUSAL
        login = mailbox.new_login()
        env = {"AIRFLOW_CONN_ERP_DB": json.dumps({"conn_type": "sqlite", "host": str(work / "erp.db")}),
               "AIRFLOW_CONN_MAILING_LEDGER": json.dumps({"conn_type": "sqlite", "host": str(work / "ledger.db")}),
               "AIRFLOW_CONN_SMTP_DEFAULT": smtp(sink.port),
               "AIRFLOW_CONN_MAILING_ALERTS": smtp(sink.port, to=OPERATORS, from_email="airflow@fjordlys.example"),
               "AIRFLOW_CONN_MAILING_BOUNCES": json.dumps(mailbox.connection(login, address=BOUNCES)),
               BOUNCE_KEY_VARIABLE: KEY,
               "INVOICE_MAILING_ARCHIVE": str(work / "archive")}
        with AirflowStack(extra_env=env) as stack:
            api = stack.client()
            api.wait_for_dag(DAG)
            api.unpause(DAG)
            logical_date, run_id = RED_NIGHT
            api.trigger(DAG, logical_date=logical_date, run_id=run_id)
            print(f"The red night {run_id} runs...", flush=True)
            if api.wait_for_run(DAG, run_id, {"success", "failed"}, timeout=300)["state"] != "failed":
                engine = create_engine(f"sqlite:///{work / 'ledger.db'}")
                rows = [(r["recipient"], r["status"], r["reason"]) for r in ledger.all_deliveries(
                    engine, ledger.delivery.c.last_run_id == run_id)]
                raise RuntimeError(f"{run_id} should have ended red: {REFUSED} was refused; the ledger: {rows}")
            [refused] = [ti for ti in api.task_instances(DAG, run_id, "mail_customers") if ti["state"] == "failed"]
            alert = stack.wait_until("audit's alert", lambda: next(
                (m for m in sink.received if m.envelope_to == [OPERATORS]), None), 120)
            api.wait_for_dag(WATCH)
            api.unpause(WATCH)
            api.trigger(WATCH, logical_date=WATCH_MORNING)
            watch_alert = stack.wait_until("the morning watch's alert", lambda: next(
                (m for m in sink.received if m.message["Subject"].startswith("Invoice mailing 2026-11-24:")), None), 240)
            print("Kari's invoice bounces...", flush=True)
            bounce_comes_back(stack, api, mailbox, login, work / "ledger.db")

            driver = chromium.chromium(window=WINDOW)
            try:
                chromium.log_in(driver, stack)
                chromium.choose(driver, timezone="Europe/Oslo", log_wrap=True)
                camera = Camera(driver, stack, folder)
                red_night(camera, run_id, refused, alert, watch_alert)
                audit_pages(camera, run_id)
                bounce_pages(camera)
                print("The held night waits for approval...", flush=True)
                held_night(camera, api)
            finally:
                driver.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    args = parser.parse_args(argv)
    if missing := chromium.missing_parts():
        print(f"{', '.join(missing)} not installed (dev/system-packages install)", file=sys.stderr)
        return 2
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
        pictures, work = Path(tmp) / "png", Path(tmp) / "night"
        pictures.mkdir()
        work.mkdir()
        take(pictures, work)
        args.out.mkdir(parents=True, exist_ok=True)
        taken = sorted(pictures.glob("*.png"))
        for picture in taken:
            shutil.copy2(picture, args.out / picture.name)
    print(f"Wrote {len(taken)} pictures to {args.out} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
