"""The MLflow UI a researcher lands in, checked in a real headless Chromium against a real `mlflow ui`:
the links that the quickstart and a `--grid width=…` sweep print, and the ones in the runs'
descriptions, open their NTK charts in model-training mode."""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from browser import chromium, printed_links, wait_for_text
from servers import MlflowUi

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL_UI = "http://127.0.0.1:5000"
TINY = ["--epochs", "2", "--train-size", "64", "--test-size", "32", "--batch-size", "16", "--no-progress"]


def _run(argv, cwd, env) -> str:
    script = shutil.which("ntk-tracking", path=os.path.dirname(sys.executable)) or shutil.which("ntk-tracking")
    assert script, "the ntk-tracking console script is not installed: pip install -e ."
    proc = subprocess.run([script, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def ui_runs(tmp_path_factory):
    """A local store holding the quickstart's run (1 epoch) and a 2-child width sweep, both analyzed,
    made by the console script; what each command printed."""
    root = tmp_path_factory.mktemp("ui-store")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(ROOT), MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", JAX_PLATFORMS="cpu")
    quickstart = _run(["quickstart", "--epochs", "1", "--no-progress"], root, env)
    sweep = _run(["sweep", "--task", "mnist_dense", "--grid", "width=4,8", *TINY, "--analyze",
                  "--subsets", "2", "--points", "4"], root, env)
    return root, quickstart, sweep


@pytest.fixture(scope="module")
def ui(ui_runs):
    """The `mlflow ui` command the quickstart printed, serving on a free port of loopback."""
    root, quickstart, _ = ui_runs
    server = MlflowUi(printed_links(quickstart)["start it"], root).start()
    try:
        yield server.wait_until_healthy()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(ui):
    driver = chromium()
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, ui, url: str) -> None:
    assert url.startswith(f"{LOCAL_UI}/#/"), url
    browser.get(ui.uri + url[len(LOCAL_UI):])  # the printed command's port is 5000; this one's is free


def show_section(browser, name: str) -> str:
    """Scroll the chart section `name` into view (charts render once seen); its header's text."""
    from selenium.webdriver.common.by import By

    for header in browser.find_elements(By.CSS_SELECTOR, "[data-testid=experiment-view-compare-runs-section-header]"):
        if header.text.split("\n", 1)[0] == name:
            browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", header)
            return header.text
    raise AssertionError(f"no chart section {name!r} on {browser.current_url}")


def chart_with(browser, legend: str):
    """The chart card whose legend holds `legend`."""
    from selenium.webdriver.common.by import By

    cards = browser.find_elements(By.CSS_SELECTOR, "[data-testid=experiment-view-compare-runs-card]")
    found = [card for card in cards if legend in card.text.splitlines()]
    assert len(found) == 1, f"{len(found)} charts with {legend!r} on {browser.current_url}"
    return found[0]


def curves(card) -> int:
    """How many runs the chart draws: its lines' colours (plotly draws a run as two traces of one colour)."""
    from selenium.webdriver.common.by import By

    return len({line.value_of_css_property("stroke") for line in card.find_elements(By.CSS_SELECTOR, "path.js-line")})


def test_the_commands_end_with_the_ui_links_and_the_next_step(ui_runs):
    _, quickstart, sweep = ui_runs
    assert "ntk-tracking analyze" not in quickstart  # analyzed already: no hint to analyze it
    assert set(printed_links(quickstart)) == {"start it", "Model metrics"}
    assert set(printed_links(sweep)) >= {"start it", "sweep charts", "sweep comparison"}
    parent = re.search(r"^sweep (\w+): 2 of 2 children FINISHED", sweep, flags=re.M).group(1)
    assert sweep.rstrip().splitlines()[-1] == f"report the sweep with: ntk-tracking report {parent}"


def test_the_quickstart_link_shows_the_runs_ntk_charts(ui_runs, ui, browser):
    _open(browser, ui, printed_links(ui_runs[1])["Model metrics"])
    text = wait_for_text(browser, "Model training", "Model metrics", "ntk/entropy", "ntk/trace")
    assert "Traces 0" not in text  # not the GenAI overview
    assert show_section(browser, "ntk/entropy").splitlines()[:2] == ["ntk/entropy", "(2)"]
    wait_for_text(browser, "(ntk/entropy/train)", "(ntk/entropy/test)")
    assert curves(chart_with(browser, "mnist_dense-w128-d2-relu (ntk/entropy/train)")) == 1


def test_the_sweep_link_draws_both_children_on_one_chart(ui_runs, ui, browser):
    from selenium.webdriver.common.by import By

    _open(browser, ui, printed_links(ui_runs[2])["sweep charts"])
    wait_for_text(browser, "children's NTK charts", "width=4", "width=8", "ntk/entropy")
    show_section(browser, "ntk/entropy")
    wait_for_text(browser, "width=4 (ntk/entropy/train)", "width=8 (ntk/entropy/train)")
    card = chart_with(browser, "width=4 (ntk/entropy/train)")
    assert "width=8 (ntk/entropy/train)" in card.text.splitlines()
    assert curves(card) == 2  # one curve per child
    assert "Additional runs" in browser.find_element(By.TAG_NAME, "body").text  # the parent, set apart


def test_the_compare_link_puts_the_children_side_by_side(ui_runs, ui, browser):
    _open(browser, ui, printed_links(ui_runs[2])["sweep comparison"])
    text = wait_for_text(browser, "Comparing 2 Runs", "width=4", "width=8", "ntk/entropy/train")
    assert "Parameters" in text and "Metrics" in text


def test_the_descriptions_lead_to_the_same_pages(ui_runs, ui, browser):
    """A child's description (its run page's Overview) links its sweep's charts; the link opens them."""
    from selenium.webdriver.common.by import By

    sweep_url = printed_links(ui_runs[2])["sweep charts"]
    _open(browser, ui, sweep_url)
    wait_for_text(browser, "width=4")
    browser.find_element(By.LINK_TEXT, "width=4").click()  # the child's run page, Overview
    wait_for_text(browser, "NTK charts in the MLflow UI", "sweep charts")
    link = browser.find_element(By.LINK_TEXT, "sweep charts")
    assert link.get_attribute("href") == ui.uri + sweep_url[len(LOCAL_UI):]
    assert "ntk_tracking links" not in browser.find_element(By.TAG_NAME, "body").text  # its markers stay hidden
    link.click()  # opens in a new tab
    browser.switch_to.window(browser.window_handles[-1])
    wait_for_text(browser, "children's NTK charts", "ntk/entropy")
    show_section(browser, "ntk/entropy")
    wait_for_text(browser, "width=4 (ntk/entropy/train)", "width=8 (ntk/entropy/train)")
