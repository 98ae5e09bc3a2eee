"""The asset page an on-call person opens (issue 24), in a real headless Chromium: after a
run and a reconciliation, every check has a state (the daily ones' latest results repeated);
the latest materialization leads with the status line, then the dashboard's figures in order,
with units; a run that waited for the write lock shows the wait. (The plots' order follows
from the keys, as the UI sorts plots by key: test_pure_operator_view checks it.)

Skipped, with the reason, where Playwright or Debian's chromium is missing (`.ci/run`
installs both).
"""

import contextlib
import re

import dagster as dg
import pytest

from so_pipeline import dashboard
from so_pipeline.definitions import defs
from so_pipeline_tests.helpers import (
    PipelineDatabases,
    Post,
    run_job,
    run_job_behind_a_held_lock,
)
from so_pipeline_tests.test_ui import CHROMIUM, CHROMIUM_ARGS, sync_api

pytestmark = pytest.mark.integration

DASHBOARD = [
    dashboard.IDS_BEHIND,
    dashboard.LAG_MINUTES,
    dashboard.ROWS_LOADED,
    dashboard.ROWS_REJECTED,
    dashboard.EDITS_APPLIED,
    dashboard.DELETED_TOTAL,
    dashboard.LOCK_WAIT,
]


def test_the_asset_page_shows_check_states_the_dashboard_in_order_and_the_lock_wait(
    databases: PipelineDatabases, webserver: str
) -> None:
    databases.add_source_posts(
        [Post(id=i, body=" " if i == 3 else "<p>b</p>") for i in range(1, 9)]
    )
    with dg.DagsterInstance.get() as instance:
        assert run_job(instance, batch_size=5).success
        reconciliation = defs.resolve_job_def("stackoverflow_posts_reconciliation_job")
        assert reconciliation.execute_in_process(instance=instance).success
        assert run_job_behind_a_held_lock(databases, instance).success  # the 15-minute run after it

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1400})
        page.goto(f"{webserver}/assets/filtered_posts?view=checks", timeout=60_000)
        # Check names are drawn truncated beside a hidden copy: wait for the page's queries.
        page.get_by_text("reconciled_with_source_last_result").first.wait_for(
            state="attached", timeout=60_000
        )
        with contextlib.suppress(sync_api.TimeoutError):
            page.get_by_role("button", name="Skip").click(timeout=5_000)
        page.wait_for_load_state("networkidle")
        checks = page.locator("body").inner_text()

        page.goto(f"{webserver}/assets/filtered_posts?view=events", timeout=60_000)
        page.get_by_text(dashboard.STATUS).first.wait_for(timeout=60_000)
        latest = page.locator("table").first.inner_text()
        browser.close()

    # The window checks ran in the latest run; the daily ones' results are repeated by their
    # _last_result checks; only the daily checks themselves wait for their next run.
    states = dict(re.findall(r"^(\w+)\n(Succeeded|Failed|Not Evaluated|Warning)$", checks, re.M))
    assert states == {
        "backlog_within_limits": "Succeeded",
        "post_ids_are_unique": "Succeeded",
        "reconciled_with_source_last_result": "Succeeded",
        "loaded_bodies_are_not_blank_last_result": "Succeeded",
        # Evaluated for the materialization before the latest run's.
        "reconciled_with_source": "Not Evaluated",
        "loaded_bodies_are_not_blank": "Not Evaluated",
    }, checks
    # The latest materialization: the status line first, the figures in order, the lock wait.
    keys = [line.split("\t")[0].strip() for line in latest.splitlines() if line.strip()]
    assert keys.index(dashboard.STATUS) < keys.index(DASHBOARD[0]), latest
    assert [key for key in keys if key in DASHBOARD] == DASHBOARD, latest
    waited = re.search(re.escape(dashboard.LOCK_WAIT) + r"\s+([\d.]+)", latest)
    assert waited and float(waited[1]) >= 1.0, latest
    assert re.search(r"pipeline_status\s+caught up: loaded the source's 3 new ids", latest), latest
