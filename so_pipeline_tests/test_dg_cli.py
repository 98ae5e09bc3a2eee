"""Dagster's `dg` CLI on this project, as its docs lay one out: `dg check defs`, `dg list defs`,
`dg launch`, and `so-pipeline dev`'s `dg dev` (test_daemon.py starts `dg dev` from the project);
and `dagster dev`, which it supersedes, still serving the code location."""

import json
import subprocess
from pathlib import Path

import dagster as dg
import pytest

from so_pipeline_tests.helpers import (
    BIN,
    REPO_ROOT,
    SENSORS,
    PipelineDatabases,
    Post,
    background,
    free_port,
    graphql,
    log_lines,
    sensor_evaluations,
    wait_for,
    wait_for_webserver,
    warnings,
    with_password,
)

pytestmark = pytest.mark.integration

PASSWORD = "dg-MARKER-5e0c"


def dg_command(*args: str) -> subprocess.CompletedProcess[str]:
    """`dg ...` from the repository root (the project, found through pyproject's [tool.dg])."""
    return subprocess.run(
        [str(BIN / "dg"), *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=180
    )


def test_dg_check_and_list_defs_find_the_code_location(dagster_home: Path) -> None:
    check = dg_command("check", "defs")
    listed = dg_command("list", "defs", "--json")

    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    assert "All definitions loaded successfully" in check.stdout + check.stderr
    # An operator's view with no noise: dg's venv warning is off for `.venv/bin/dg`.
    assert "virtual environment" not in check.stdout + check.stderr
    assert listed.returncode == 0, listed.stderr[-2000:]
    defs = json.loads(listed.stdout)
    assert sorted(asset["asset_key"] for asset in defs["assets"]) == [
        "filtered_posts",
        "source_posts_batch",
    ]
    assert sorted(job["name"] for job in defs["jobs"]) == [
        "stackoverflow_posts_job",
        "stackoverflow_posts_reconciliation_job",
    ]
    assert sorted(sensor["name"] for sensor in defs["sensors"]) == [
        "so_pipeline_check_and_recovery_alerts",
        "so_pipeline_failure_alerts",
        "stackoverflow_posts_catch_up_sensor",
    ]


def test_dg_launch_loads_the_next_window_and_moves_the_cursor(
    databases: PipelineDatabases,
    dagster_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 6)] + [Post(id=6, body=" ")])
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", with_password(databases.source_url, PASSWORD))
    run_config = tmp_path / "window.yaml"
    run_config.write_text("ops:\n  source_posts_batch:\n    config:\n      batch_size: 4\n")
    launch = ("launch", "--job", "stackoverflow_posts_job", "--config", str(run_config))

    first = dg_command(*launch)
    loaded_by_first = databases.loaded_ids()
    second = dg_command(*launch)

    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert PASSWORD not in first.stdout + first.stderr + second.stdout + second.stderr
    assert loaded_by_first == [1, 2, 3, 4]
    assert databases.loaded_ids() == [1, 2, 3, 4, 5]
    assert databases.rejected() == {6: "body_whitespace_only"}
    with dg.DagsterInstance.get() as instance:  # the runs are in the PostgreSQL-backed instance
        event = instance.get_latest_materialization_event(dg.AssetKey("filtered_posts"))
        assert event is not None and event.asset_materialization is not None
        assert event.asset_materialization.metadata["last_processed_id"].value == 6
        runs = instance.get_runs()
    assert [(run.job_name, run.status) for run in runs] == [
        ("stackoverflow_posts_job", dg.DagsterRunStatus.SUCCESS)
    ] * 2


_LOCATIONS = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus } } } }"


def test_dagster_dev_still_serves_the_code_location(dagster_home: Path, tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "dagster"), "dev", "-m", "so_pipeline", "-h", "127.0.0.1"]

    with background([*command, "-p", str(port)], tmp_path / "dev.log") as dev:
        wait_for_webserver(url, dev)
        locations = graphql(url, _LOCATIONS)["workspaceOrError"]["locationEntries"]

    assert locations == [{"name": "so_pipeline", "loadStatus": "LOADED"}]


def test_so_pipeline_dev_serves_the_ui_through_dg_dev_without_a_warning(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    output = tmp_path / "dev.log"
    command = [str(BIN / "so-pipeline"), "--home", str(tmp_path / "state"), "dev"]

    with background([*command, "--port", str(port)], output) as dev:
        wait_for_webserver(url, dev)
        locations = graphql(url, _LOCATIONS)["workspaceOrError"]["locationEntries"]
        wait_for(lambda: set(sensor_evaluations(output)) == SENSORS, "the daemon's first ticks")
        # Read while it serves: stopping the whole process group at once (as Ctrl-C does) makes
        # Dagster's proxy warn that the code server exited, which is not a start-up warning.
        lines = log_lines(output)

    assert locations == [{"name": "so_pipeline", "loadStatus": "LOADED"}]
    # Neither "dagster dev is superseded by dg dev" nor "the dagster.yaml here is not used".
    assert not warnings(lines), warnings(lines)
    assert not [line for line in lines if "superseded" in line or "dagster.yaml" in line]
