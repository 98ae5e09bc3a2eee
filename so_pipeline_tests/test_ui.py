"""The Dagster UI, in a real headless Chromium: the materialization history an operator reads.

Skipped, with the reason, where Playwright or Debian's chromium is missing (`.ci/run`
installs both). Set SO_UI_SCREENSHOT=path to keep the screenshot (docs/ has one).
"""

import contextlib
import os
import re
import shutil
from pathlib import Path

import dagster as dg
import pytest

from so_pipeline_tests.helpers import (
    PipelineDatabases,
    Post,
    run_until_caught_up,
)

pytestmark = pytest.mark.integration

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("Debian's chromium is not installed", allow_module_level=True)

# Chromium flags for a root, offline, headless run (no sandbox user, no calls home).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def test_the_materialization_history_lists_each_run_with_its_cursor(
    databases: PipelineDatabases, webserver: str, tmp_path: Path
) -> None:
    databases.add_source_posts(
        [Post(id=i, body=" " if i == 7 else "<p>b</p>") for i in range(1, 26)]
    )
    with dg.DagsterInstance.get() as instance:
        loads = run_until_caught_up(instance, batch_size=10)
        cursors = {run.result.run_id[:8]: run.metadata()["last_processed_id"] for run in loads}
        # The last run found nothing new: it is in the history too, the cursor unchanged.
        (caught_up,) = {run.run_id[:8] for run in instance.get_runs()} - set(cursors)

    seen = {}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.goto(f"{webserver}/assets/filtered_posts?view=events", timeout=60_000)
        page.get_by_text("last_processed_id").first.wait_for(timeout=60_000)
        # The first-visit newsletter dialog opens a moment after the page.
        with contextlib.suppress(sync_api.TimeoutError):
            page.get_by_role("button", name="Skip").click(timeout=5_000)
        entries = page.get_by_text(re.compile(r"^\w{3} \d+, \d+:\d\d [AP]M$"))
        for index in range(entries.count()):
            entries.nth(index).click()
            run = page.get_by_text(re.compile(r"^Materialized in run")).inner_text()
            metadata = page.locator("table").first.inner_text()
            found = re.search(r"last_processed_id\s+(\d+)", metadata)
            assert found, metadata
            seen[run.split()[-1]] = int(found[1])
        entries.first.click()
        # "Are we keeping up?" without digging: the latest materialization's metadata.
        latest = page.locator("table").first.inner_text()
        screenshot = Path(os.environ.get("SO_UI_SCREENSHOT", tmp_path / "history.png"))
        page.screenshot(path=str(screenshot))
        browser.close()

    assert list(cursors.values()) == [10, 20, 25]
    assert seen == {**cursors, caught_up: 25}
    # (Issue 24: the dashboard's figures lead, with units; the others are grouped.)
    assert re.search(r"1 ids behind source\s+0\b", latest), latest
    assert re.search(r"2 lag \(minutes\)\s+0\b", latest), latest
    assert re.search(r'"rejected_total": 1\b', latest), latest
    assert re.search(r'"rejected_total_body_whitespace_only": 1\b', latest), latest
    assert re.search(r"change_capture\s+on \(last_activity_date\)", latest), latest
