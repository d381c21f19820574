"""Headless Chromium logged into an ``AirflowStack``'s UI: shared by the auditors' UI test and ``make screenshots``.

Debian's chromium and chromedriver (``dev/system-packages``), driven through Selenium, do what a person
does: log in on Airflow's own login page, pick a time zone in the user menu, follow links. Both paths can
be moved with ``CHROMIUM`` and ``CHROMEDRIVER``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
WINDOW = (1400, 900)


def missing_parts() -> list[str]:
    """What is not installed of selenium, chromium and chromedriver (empty when a browser can start)."""
    missing = []
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium")
    return missing + [path for path in (CHROMIUM, CHROMEDRIVER) if not shutil.which(path)]


def chromium(*, downloads: Path | None = None, window: tuple[int, int] = WINDOW):
    """A headless Chromium; files it downloads land in ``downloads`` without a prompt."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     f"--window-size={window[0]},{window[1]}"):
        options.add_argument(argument)
    if downloads:
        options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                                  "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    if downloads:
        driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.implicitly_wait(10)
    return driver


def log_in(driver, stack) -> None:
    """Log in as the stack's admin on Airflow's login page (simple auth manager)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from dev.airflow_stack import ADMIN

    driver.get(f"{stack.url}/auth/login")
    driver.find_element(By.NAME, "username").send_keys(ADMIN)
    driver.find_element(By.NAME, "password").send_keys(stack.password)
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(driver, 30).until(lambda d: "/auth/login" not in d.current_url)


def choose(driver, **preferences) -> None:
    """Make the choices a user makes in the UI's menus, e.g. ``timezone="Europe/Oslo"``, ``log_wrap=True``.

    Airflow's UI keeps them in the browser's localStorage, one JSON value per key (the user menu's
    Timezone dialog writes ``timezone``, the log view's Wrap toggle ``log_wrap``); pages loaded afterwards
    follow them. Call it after ``log_in``: localStorage belongs to the UI's origin."""
    for key, value in preferences.items():
        driver.execute_script("localStorage.setItem(arguments[0], arguments[1])", key, json.dumps(value))


def shoot(driver, path: Path, settle: float = 1.0) -> Path:
    """Save the window as a PNG once the UI's own requests have settled."""
    time.sleep(settle)
    if not driver.save_screenshot(str(path)):
        raise RuntimeError(f"Chromium saved no screenshot to {path}")
    return path
