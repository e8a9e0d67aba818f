"""The README's MLflow UI picture: a width sweep's children's `ntk/entropy/train` against epoch, all on
one chart, in the UI's model-training mode, taken by the browser test's headless Chromium from the
link the sweep prints.

    python studies/mlflow_ui_picture.py [--store DIR]    # writes docs/mlflow_ui_sweep.png

Measured on 2 shared CPU cores: 3 min 12 s wall clock, 0.97 GB peak memory (`/usr/bin/time -v`),
nearly all of it the sweep's training and analysis; with the sweep in the store, 30 s.

It trains and analyzes the sweep with the product's own command into `--store` (default
./ui_picture_store; a store that holds it already is reused), serves it with the `mlflow ui`
command the sweep printed (on a free port), opens the printed "sweep charts" link, types the
metric into the chart search box and takes the screenshot.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the browser test's helpers

from browser import chromium, printed_links, wait_for_text  # noqa: E402
from servers import MlflowUi  # noqa: E402

PICTURE = HERE.parent / "docs" / "mlflow_ui_sweep.png"
SWEEP = ["sweep", "--task", "mnist_dense", "--grid", "width=16,128,1024", "--depth", "2", "--epochs", "10",
         "--train-size", "2000", "--test-size", "500", "--cv-every", "1", "--analyze", "--subsets", "10",
         "--points", "20", "--no-progress"]
METRIC = "ntk/entropy/train"


def sweep_output(store: pathlib.Path) -> str:
    """What the sweep printed (trained and analyzed once; kept beside the store)."""
    saved = store / "sweep.txt"
    if not saved.exists():
        env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{store}/mlflow.db",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])))
        proc = subprocess.run([sys.executable, "-m", "ntk_tracking.cli", *SWEEP], cwd=store, env=env,
                              capture_output=True, text=True, check=True)
        saved.write_text(proc.stdout)
    return saved.read_text()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=pathlib.Path, default=pathlib.Path("ui_picture_store"))
    args = parser.parse_args()
    store = args.store.resolve()
    store.mkdir(parents=True, exist_ok=True)
    links = printed_links(sweep_output(store))
    ui = MlflowUi(links["start it"], store).start()
    browser = chromium(1500, 1000)
    try:
        ui.wait_until_healthy()
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        browser.get(links["sweep charts"].replace("http://127.0.0.1:5000", ui.uri))
        wait_for_text(browser, "children's NTK charts", "width=1024")
        for close in browser.find_elements(By.CSS_SELECTOR, "[aria-label='Close']"):  # the assistant's panel
            if close.is_displayed():
                close.click()
        search = browser.find_element(By.CSS_SELECTOR, "input[placeholder='Search metric charts']")
        search.send_keys(METRIC)
        wait_for_text(browser, f"width=16 ({METRIC})")
        # A wider, taller chart: its resize handle dragged, then the pointer moved off the chart.
        handle = browser.find_element(By.CSS_SELECTOR, "[data-testid=draggable-card-resize-handle]")
        ActionChains(browser).drag_and_drop_by_offset(handle, 520, 80).perform()
        header = browser.find_element(By.CSS_SELECTOR, "[data-testid=experiment-view-compare-runs-section-header]")
        ActionChains(browser).move_to_element(header).perform()  # hovering a run would fade the others
        wait_for_text(browser, *(f"width={w} ({METRIC})" for w in (16, 128, 1024)))
        time.sleep(2)  # the chart's transition
        browser.save_screenshot(str(PICTURE))
    finally:
        browser.quit()
        ui.stop()
    print(f"wrote {PICTURE}")


if __name__ == "__main__":
    main()
