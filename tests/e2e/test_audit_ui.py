"""The auditors' pages in a real Airflow, in headless Chromium: log in, nights, a failed delivery, its try, the CSV.

A real night first: the stack of ``dev/airflow_stack.py`` (api-server with this repository's plugins,
scheduler, dag-processor, triggerer; PostgreSQL metadata) runs the DAG against an SMTP server that
refuses one recipient. Then Debian's chromium and chromedriver, through Selenium, do what an auditor
does (``dev/browser.py``, shared with ``make screenshots``). Screenshots go to a temporary folder:
``make screenshots`` writes the README's pictures from a night of its own (a test run never changes the
repository). About a minute and a half.
"""

from __future__ import annotations

import csv
import functools
import io
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from dev import browser as chromium
from dev.smtp_sink import SmtpSink
from include.invoice_mailing.clock import TIMEZONE
from tests.conftest import IN_CI, smtp_connection, sqlite_connection
from tests.erp import TinyErp

DAG = "invoice_mailing"
REFUSED = "ola@fjellheimen.example"


@pytest.fixture
def browser(tmp_path):
    if missing := chromium.missing_parts():
        message = f"{', '.join(missing)} not installed; install it to run this test"
        if IN_CI:
            pytest.fail(f"{message}. Under CI=true a missing browser is a failure.")
        pytest.skip(message)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver = chromium.chromium(downloads=downloads)
    driver.downloads = downloads
    yield driver
    driver.quit()


def next_midday() -> datetime:
    """The stack's clock: the next 12:00 in Oslo, so that no 02:00 night or 06:00 watch comes due while the test
    runs, whatever the hour of the real clock. Ahead of the real clock, never behind: the browser, which keeps
    the real clock, then finds the login cookie the api-server sets still valid."""
    now = datetime.now(TIMEZONE)
    midday = now.replace(hour=12, minute=0, second=0, microsecond=0)
    return midday if midday > now else midday + timedelta(days=1)


@pytest.fixture
def night(tmp_path, postgres_admin, faked_clock):
    """A real night in a running Airflow: customer 10001 gets its invoice, 10002's recipient is refused (550)."""
    from sqlalchemy import create_engine

    from dev.airflow_stack import AirflowStack

    erp = TinyErp(create_engine(f"sqlite:///{tmp_path / 'erp.db'}"))
    erp.recipient(erp.setting(class_id="DOMESTIC"), "Invoicing")
    for number, address in (("10001", "kari@bolgen.example"), ("10002", REFUSED)):
        erp.customer(number, invoice_email=address)
        erp.invoice(f"INV0{number}", number)
    with SmtpSink() as sink:
        sink.faults.rcpt_replies[REFUSED] = "550 5.1.1 <ola@fjellheimen.example>: user unknown"
        env = {"AIRFLOW_CONN_ERP_DB": sqlite_connection(tmp_path / "erp.db"),
               "AIRFLOW_CONN_MAILING_LEDGER": sqlite_connection(tmp_path / "ledger.db"),
               "AIRFLOW_CONN_SMTP_DEFAULT": smtp_connection(sink.port),
               "INVOICE_MAILING_ARCHIVE": str(tmp_path / "archive")}
        with AirflowStack(extra_env=env, fake_time=next_midday()) as stack:
            api = stack.client()
            api.wait_for_dag(DAG)
            api.unpause(DAG)
            run_id = api.trigger(DAG, logical_date="2026-11-24T01:00:00Z")["dag_run_id"]
            api.wait_for_run(DAG, run_id, {"success", "failed"}, timeout=240)
            assert [run["dag_run_id"] for run in api.runs(DAG)] == [run_id]  # unpausing mailed nothing
            yield stack, run_id


@functools.cache
def screenshot_folder() -> Path:
    return Path(tempfile.mkdtemp(prefix="audit-screenshots-"))


def shoot(driver, name: str) -> None:
    chromium.shoot(driver, screenshot_folder() / f"audit-{name}.png")


# `browser` before `night`: a missing browser fails in a second, before an api-server is started.
def test_an_auditor_finds_the_failed_delivery_follows_it_to_its_try_and_downloads_the_csv(browser, night):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ready
    from selenium.webdriver.support.ui import Select, WebDriverWait

    stack, run_id = night
    wait = WebDriverWait(browser, 30)

    chromium.log_in(browser, stack)  # Airflow's own login page (simple auth manager)

    browser.get(f"{stack.url}/plugin/invoice-mailing")  # the navigation's "Invoice mailing" entry
    wait.until(ready.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
    nights = browser.find_element(By.ID, "nights").text
    assert run_id in nights and "failed 1" in nights and "sent 1" in nights
    browser.switch_to.default_content()
    shoot(browser, "nights")

    browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
    browser.find_element(By.LINK_TEXT, "Deliveries").click()
    Select(wait.until(ready.presence_of_element_located((By.NAME, "status")))).select_by_visible_text("failed")
    browser.find_element(By.ID, "apply").click()
    wait.until(lambda d: "status=failed" in d.current_url or "status=failed" in d.execute_script("return location.href"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#deliveries tbody tr")
    assert len(rows) == 1 and "recipient_rejected" in rows[0].text and REFUSED in rows[0].text
    browser.find_element(By.ID, "csv").click()  # the filtered list as CSV, downloaded by the browser
    task_link = rows[0].find_element(By.CLASS_NAME, "task-link")
    browser.switch_to.default_content()
    shoot(browser, "deliveries")

    downloaded = _wait_for_file(browser.downloads, "*.csv")
    table = list(csv.DictReader(io.StringIO(downloaded.read_text())))
    assert [(r["customer_id"], r["status"], r["reason"], r["recipient"]) for r in table] == [
        ("10002", "failed", "recipient_rejected", REFUSED)]

    browser.switch_to.frame(browser.find_element(By.TAG_NAME, "iframe"))
    task_link.click()  # target=_top: the UI's own task instance page
    browser.switch_to.default_content()
    wait.until(lambda d: "/tasks/mail_customers/mapped/" in d.current_url)
    assert f"/dags/{DAG}/runs/" in browser.current_url and "try_number=1" in browser.current_url
    wait.until(ready.presence_of_element_located((By.XPATH, "//*[contains(text(), 'customer 10002')]")))
    shoot(browser, "task-instance")

    browser.find_element(By.XPATH, "//a[normalize-space()='Deliveries'] | //button[normalize-space()='Deliveries']").click()
    wait.until(ready.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
    assert "customers 10002" in wait.until(ready.presence_of_element_located((By.TAG_NAME, "h1"))).text
    browser.switch_to.default_content()
    shoot(browser, "task-deliveries")

    browser.get(f"{stack.url}/dags/{DAG}/runs/{run_id}")
    browser.find_element(By.XPATH, "//a[normalize-space()='Deliveries'] | //button[normalize-space()='Deliveries']").click()
    wait.until(ready.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
    assert "INV010001" in wait.until(ready.presence_of_element_located((By.ID, "deliveries"))).text
    browser.switch_to.default_content()
    shoot(browser, "night-deliveries")

    # One page, one time zone: the user chose Europe/Oslo in the UI (its time zone menu keeps the choice in this
    # origin's local storage); the tab's times follow it, labelled, as the run header above it does.
    browser.execute_script('window.localStorage.setItem("timezone", JSON.stringify("Europe/Oslo"))')
    browser.refresh()
    wait.until(ready.frame_to_be_available_and_switch_to_it((By.TAG_NAME, "iframe")))
    wait.until(lambda d: "Europe/Oslo" in d.find_element(By.ID, "zone").text)
    moments = browser.find_elements(By.CSS_SELECTOR, "#deliveries time")
    assert moments, "no time on the night's Deliveries tab"
    for moment in moments:
        utc = datetime.fromisoformat(moment.get_attribute("datetime"))
        oslo = utc.astimezone(TIMEZONE)
        assert moment.text == oslo.strftime("%Y-%m-%d %H:%M ") + oslo.tzname(), (moment.text, utc)
        assert moment.get_attribute("title") == utc.strftime("%Y-%m-%d %H:%M UTC")
    assert "Times in Europe/Oslo (your time zone in Airflow)" in browser.find_element(By.ID, "zone").text
    browser.switch_to.default_content()


def _wait_for_file(folder: Path, pattern: str, timeout: float = 20) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = [p for p in folder.glob(pattern) if not p.name.endswith(".crdownload")]
        if done:
            return done[0]
        time.sleep(0.2)
    raise AssertionError(f"no {pattern} downloaded into {folder}: {list(folder.iterdir())}")
