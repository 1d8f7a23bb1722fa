"""Screenshots of MLflow's UI as a researcher browses a profile's runs, taken headlessly.

Starts ``python -m at ui --profile P`` (MLflow's UI on the project's store, the address of the
runs table printed), opens that address in headless Chromium (Debian's ``chromium`` package,
driven by Playwright without Playwright's own browser download), and saves three PNGs to OUT:

- ``experiment.png``: the runs table as it first opens (cells, their metric columns, where
  each cell's seeds are);
- ``cell.png``: one cell expanded, its seeds' runs nested under it;
- ``run.png``: a cell's page, whose description lists and links every run it aggregates.

MLflow 3 shows a page in its GenAI layout unless the address or the browser says Model
training. The printed address says so, and so do the links the project writes (a cell's
description), but MLflow's own links (a run's name in the table, Child runs, the breadcrumb)
do not: the browser decides, and remembers the layout last chosen with the sidebar's toggle.
The script chooses Model training there once, as a user does, before the screenshots.

    python scripts/mlflow_screenshots.py --profile smoke --out docs/screenshots

Needs ``pip install playwright`` (the Python package only) and a Chromium binary (``--chromium``,
default: ``chromium`` on PATH). Exits non-zero, naming what it did not find, when a page lacks
what it should show; the test suite runs it on a real store.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

LOAD_TIMEOUT_MS = 120_000   # MLflow's UI loads a few MB of JavaScript: slow on a loaded 2-core CPU


def _serve(profile: str, port: int, params: str) -> tuple[subprocess.Popen, str]:
    server = subprocess.Popen([sys.executable, "-m", "at", "--params", params, "ui", "--profile", profile,
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    address = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            break
        found = re.search(r"(http://\S+/#/experiments/\S+)", line)
        if found:
            address = found.group(1)
            break
    if address is None:
        server.kill()
        raise SystemExit(f"`python -m at ui --profile {profile}` printed no address")
    # drain the server's output so that it never blocks on a full pipe
    import threading

    threading.Thread(target=lambda: server.stdout.read(), daemon=True).start()
    root = address.split("#")[0]
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(root, timeout=5)
            return server, address
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit(f"MLflow's UI did not answer at {root}")


def _remember_model_training(page) -> None:
    """Choose the Model training layout with the sidebar's toggle (GenAI, then Model training):
    the browser remembers it for MLflow's own links."""
    for name in ("GenAI", "Model training"):
        toggle = page.get_by_text(name, exact=True).first
        toggle.wait_for(timeout=LOAD_TIMEOUT_MS)
        toggle.click()
        page.wait_for_timeout(1500)
        tour = page.get_by_role("button", name="Got it")   # GenAI's first-visit tips cover the page
        if tour.count():
            tour.first.click()
    if page.evaluate("window.localStorage.getItem('mlflow.workflowType_v1')") != '"machine_learning"':
        raise SystemExit("the browser did not remember the Model training layout")


def take(profile: str, out: Path, chromium: str, port: int, params: str, cell: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    server, address = _serve(profile, port, params)
    shots = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 950})
            page.goto(address)
            _remember_model_training(page)
            page.goto(address)
            row = page.get_by_role("link", name=cell, exact=True)
            row.first.wait_for(timeout=LOAD_TIMEOUT_MS)
            assistant = page.get_by_role("button", name="Close")   # MLflow 3's assistant panel, if open
            if assistant.count():
                assistant.first.click()
            page.wait_for_timeout(1500)
            for text in ("test_error", "Model training", "expand this row"):
                if not page.get_by_text(text).count():
                    raise SystemExit(f"the runs table at {address} shows no {text!r}")
            # the view's width for the names (MLflow's default cuts them at about 17 characters)
            name_header = page.get_by_role("columnheader", name="Run Name").first.bounding_box()
            if name_header is None or name_header["width"] < 300:
                raise SystemExit(f"the Run Name column is {name_header and name_header['width']} px wide, not the view's")
            shots.append(out / "experiment.png")
            page.screenshot(path=shots[-1])
            # expand the cell: its expander is the button in the same row as its name
            table_row = page.locator("[role=row]", has=page.get_by_role("link", name=cell, exact=True)).first
            table_row.get_by_role("button").first.click()
            page.get_by_role("link", name=re.compile(r"^seed\d+ ")).first.wait_for(timeout=LOAD_TIMEOUT_MS)
            page.wait_for_timeout(1000)
            shots.append(out / "cell.png")
            page.screenshot(path=shots[-1])
            row.first.click()
            page.get_by_text("final test error (%)").first.wait_for(timeout=LOAD_TIMEOUT_MS)
            page.wait_for_timeout(1000)
            if page.get_by_text("Evaluation runs").count():
                raise SystemExit("the cell's page opened in MLflow's GenAI layout")
            more = page.get_by_text("Show more", exact=True)   # the whole description
            if more.count():
                more.first.click()
                page.get_by_role("link", name="Back to the runs table").first.wait_for(timeout=LOAD_TIMEOUT_MS)
                page.wait_for_timeout(500)
            shots.append(out / "run.png")
            page.screenshot(path=shots[-1], full_page=True)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    return shots


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--cell", default="sum-p4 | table2", help="the cell run to expand and open")
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args(argv)
    if not args.chromium:
        raise SystemExit("no Chromium found: `apt-get install chromium`, or pass --chromium PATH")
    for shot in take(args.profile, args.out, args.chromium, args.port, args.params, args.cell):
        print(shot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
