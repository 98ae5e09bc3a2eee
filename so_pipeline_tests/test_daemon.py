"""The Dagster daemon as an operator meets it: quiet when there is nothing to do, and the run
queue that holds the UI's Materialize button behind a job run in progress (under `dg dev`)."""

import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from so_pipeline.metadata import flattened
from so_pipeline_tests.helpers import (
    BIN,
    SENSORS,
    PipelineDatabases,
    Post,
    background,
    free_port,
    graphql,
    log_lines,
    pipeline_waits_for_a_lock,
    run_job,
    sensor_evaluations,
    stop_schedule,
    wait_for,
    wait_for_webserver,
    warnings,
    with_password,
)

pytestmark = pytest.mark.integration

# How long the idle daemon is watched after its first ticks: within it, a sensor evaluated every
# 10 s (as they were) is evaluated again at least once, one every 30 s (as they are) not again
# (10 s of margin for first ticks that land a few seconds apart on a busy machine).
IDLE_SECONDS = 20
PASSWORD = "dev-MARKER-91ab"


def test_an_idle_daemon_logs_each_sensor_once_per_interval_and_no_warning(
    databases: PipelineDatabases, dagster_home: Path, tmp_path: Path
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 4)])
    with dg.DagsterInstance.get() as instance:
        assert run_job(instance).success  # caught up: the catch-up sensor has nothing to do
    stop_schedule()
    output = tmp_path / "daemon.log"

    # As on a server (deploy/dagster-daemon.service): from the repository, with workspace.yaml.
    with background([str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"], output):
        wait_for(lambda: set(sensor_evaluations(output)) == SENSORS, "each sensor's first tick")
        time.sleep(IDLE_SECONDS)
        evaluations = sensor_evaluations(output)
        lines = log_lines(output)  # while it runs: what stopping it prints is not idle noise
    assert evaluations == Counter(SENSORS), evaluations
    sensor_lines = [line for line in lines if "dagster.daemon.SensorDaemon - " in line]
    assert len(sensor_lines) <= 2 * len(SENSORS), sensor_lines
    assert any("0 ids behind the source: the schedule keeps up" in line for line in sensor_lines)
    assert not warnings(lines)


_LAUNCH = """
mutation LaunchPipelineExecution($executionParams: ExecutionParams!) {
  launchPipelineExecution(executionParams: $executionParams) {
    __typename
    ... on LaunchRunSuccess { run { runId } }
    ... on PythonError { message }
  }
}
"""
# What the "Materialize" button on filtered_posts' page sends (read from its request in
# Chromium): the asset alone in the implicit asset job, with every check on the asset.
MATERIALIZE_BUTTON = {
    "pipelineName": "__ASSET_JOB",
    "assetSelection": [{"path": ["filtered_posts"]}],
    "assetCheckSelection": [
        {"name": name, "assetKey": {"path": ["filtered_posts"]}}
        for name in (  # every check of the asset, as the UI's button selects them
            "backlog_within_limits",
            "loaded_bodies_are_not_blank",
            "loaded_bodies_are_not_blank_last_result",
            "post_ids_are_unique",
            "reconciled_with_source",
            "reconciled_with_source_last_result",
        )
    ],
}
LAUNCHPAD = {"pipelineName": "stackoverflow_posts_job"}


def _launch(webserver: str, selection: Mapping[str, object]) -> str:
    """Launch a run through the webserver's GraphQL API as the UI does; its run id."""
    params = {
        "selector": {
            "repositoryLocationName": "so_pipeline",
            "repositoryName": "__repository__",
            **selection,
        },
        "mode": "default",
        "runConfigData": "{}",
        "executionMetadata": {"tags": [{"key": "dagster/from_ui", "value": "true"}]},
    }
    answer = graphql(webserver, _LAUNCH, {"executionParams": params})
    launched = answer["launchPipelineExecution"]
    assert launched["__typename"] == "LaunchRunSuccess", launched
    return launched["run"]["runId"]


def _status(instance: dg.DagsterInstance, run_id: str) -> dg.DagsterRunStatus:
    run = instance.get_run_by_id(run_id)
    assert run is not None
    return run.status


def _materialized(instance: dg.DagsterInstance, run_id: str, asset: str) -> dict[str, object]:
    """The metadata of `asset`'s materialization in the run, groups flattened (empty: none)."""
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
        materialization = entry.asset_materialization
        if materialization is not None and materialization.asset_key == dg.AssetKey(asset):
            return flattened({key: value.value for key, value in materialization.metadata.items()})
    return {}


def _check_results(instance: dg.DagsterInstance, run_id: str) -> dict[str, bool]:
    """Whether each check evaluated in the run passed, by check name."""
    results = {}
    for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        assert entry.dagster_event is not None
        evaluation = entry.dagster_event.asset_check_evaluation_data
        results[evaluation.check_name] = evaluation.passed
    return results


def _run_times(instance: dg.DagsterInstance, run_id: str) -> tuple[float, float]:
    record = instance.get_run_record_by_id(run_id)
    assert record is not None and record.start_time and record.end_time
    return record.start_time, record.end_time


def test_the_materialize_button_waits_for_a_job_run_then_loads_only_what_is_new(
    databases: PipelineDatabases,
    dagster_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", with_password(databases.source_url, PASSWORD))
    databases.add_source_posts([Post(id=i) for i in range(1, 6)])
    with dg.DagsterInstance.get() as instance:
        assert run_job(instance).success  # posts 1..5 loaded, cursor 5
    databases.add_source_posts([Post(id=i) for i in range(6, 11)])
    stop_schedule()
    port = free_port()
    webserver = f"http://127.0.0.1:{port}"
    output = tmp_path / "dg_dev.log"

    # `dg dev` from the project root, as Dagster's docs run it: webserver, daemon, run queue.
    with (
        background([str(BIN / "dg"), "dev", "-h", "127.0.0.1", "-p", str(port)], output) as dev,
        dg.DagsterInstance.get() as instance,
        psycopg.connect(databases.analytical_url) as holder,
    ):
        wait_for_webserver(webserver, dev)
        # Another session holds the analytical posts table: the job's run stops inside its load.
        holder.execute("LOCK TABLE posts IN ACCESS EXCLUSIVE MODE")
        job_run = _launch(webserver, LAUNCHPAD)
        wait_for(lambda: _materialized(instance, job_run, "source_posts_batch"), "the window")
        wait_for(lambda: pipeline_waits_for_a_lock(databases.analytical_url), "the job run's load")
        databases.add_source_posts([Post(id=i) for i in range(11, 14)])  # after its window

        button_run = _launch(webserver, MATERIALIZE_BUTTON)
        blocked = f"Run {button_run} is blocked by global concurrency limits"
        wait_for(lambda: any(blocked in line for line in log_lines(output)), "the queue's verdict")
        assert _status(instance, button_run) == dg.DagsterRunStatus.QUEUED
        assert _status(instance, job_run) == dg.DagsterRunStatus.STARTED

        holder.rollback()  # the lock goes: the job's run goes on, then the button's
        finished = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE}
        wait_for(lambda: _status(instance, button_run) in finished, "the button's run")
        assert _status(instance, job_run) == dg.DagsterRunStatus.SUCCESS
        assert _status(instance, button_run) == dg.DagsterRunStatus.SUCCESS
        by_job = _materialized(instance, job_run, "filtered_posts")
        by_button = _materialized(instance, button_run, "filtered_posts")
        job_times, button_times = _run_times(instance, job_run), _run_times(instance, button_run)
        button_checks = _check_results(instance, button_run)

    assert button_times[0] >= job_times[1]  # started after the job's run ended
    assert (by_job["last_processed_id"], by_job["rows_loaded"]) == (10, 5)
    # The button's run planned its own window from the cursor the job's run left: 11..13.
    assert by_button["cursor_before"] == "10"  # a label
    assert (by_button["last_processed_id"], by_button["rows_loaded"]) == (13, 3)
    # The button also runs the whole-table checks (the job leaves them to the daily one).
    assert button_checks == {
        "backlog_within_limits": True,
        "loaded_bodies_are_not_blank": True,
        "post_ids_are_unique": True,
        "reconciled_with_source": True,
        # Evaluated with the window, before this run's daily checks: they had never run (WARN).
        "loaded_bodies_are_not_blank_last_result": False,
        "reconciled_with_source_last_result": False,
    }
    assert databases.loaded_ids() == list(range(1, 14))  # each post once
    assert PASSWORD not in output.read_text(errors="replace")
