"""Headless Chromium for tests and the README's UI picture: Debian's `chromium` and `chromedriver`
(.ci/run installs them), driven by selenium (the dev extra)."""

from __future__ import annotations

import re
import shutil

import pytest

MISSING = ("headless Chromium is not installed: `apt-get install -y chromium chromium-driver` "
           "(.ci/run installs it) and `pip install -e '.[dev]'` (selenium)")


def chromium(width: int = 1600, height: int = 1200):
    """A headless Chromium (a selenium WebDriver), or the test skipped with what is missing."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(MISSING)
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip(MISSING)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    # --no-sandbox: Chromium refuses to start its sandbox as root (CI runs as root).
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def wait_for_text(driver, *texts: str, timeout: float = 90.0) -> str:
    """The page's visible text once it holds every one of `texts` (the UI renders after loading)."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        body = d.find_element(By.TAG_NAME, "body").text
        return body if all(t in body for t in texts) else False

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.5).until(ready)
    except TimeoutException as err:  # say what the page showed instead
        body = driver.find_element(By.TAG_NAME, "body").text
        raise AssertionError(f"{driver.current_url} did not show {texts} within {timeout:.0f} s; it shows:\n"
                             f"{body[:3000]}") from err


def printed_links(stdout: str) -> dict[str, str]:
    """label -> URL of the `in the MLflow UI` block a command printed (and `start it` -> the command)."""
    block = stdout.split("in the MLflow UI (model-training mode):\n")[-1]
    return dict(re.findall(r"^  ([^:]+): +(\S.*)$", block, flags=re.M))
