"""The commands users type: `dagster job execute` on the shipped dagster.yaml, and the demo."""

import subprocess
from pathlib import Path

import dagster as dg
import pytest

from so_pipeline_tests.helpers import BIN, PipelineDatabases, Post, dagster_job_execute, run_job

pytestmark = pytest.mark.integration


def test_dagster_job_execute_runs_end_to_end_and_keeps_the_cursor(
    databases: PipelineDatabases, dagster_home: Path, tmp_path: Path
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 6)] + [Post(id=6, body=" ")])
    run_config = tmp_path / "window.yaml"
    run_config.write_text("ops:\n  source_posts_batch:\n    config:\n      batch_size: 4\n")

    first = dagster_job_execute("-c", str(run_config))
    second = dagster_job_execute("-c", str(run_config))

    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert databases.loaded_ids() == [1, 2, 3, 4, 5]
    assert databases.rejected() == {6: "body_whitespace_only"}
    with dg.DagsterInstance.get() as instance:  # the PostgreSQL-backed instance of the runs
        event = instance.get_latest_materialization_event(dg.AssetKey("filtered_posts"))
        assert event is not None and event.asset_materialization is not None
        assert event.asset_materialization.metadata["last_processed_id"].value == 6
        assert len(instance.get_runs()) == 2


def test_dagster_job_execute_fails_clearly_when_a_url_is_missing(
    databases: PipelineDatabases, dagster_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SO_SOURCE_DATABASE_URL")

    result = dagster_job_execute()

    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "SO_SOURCE_DATABASE_URL" in output and "source_db" in output


def test_demo_loads_the_sample_until_caught_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "so-pipeline"), "--home", str(tmp_path / "state"), "demo"],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loaded 2595 posts, rejected 35 (body_empty 33, owner_null 2)" in result.stdout
    assert "last_processed_id = 4805" in result.stdout
    # The demo's source has the index change capture reads: no warning in a normal start.
    assert "WARNING" not in result.stdout + result.stderr


def test_status_prints_cursor_backlog_and_last_runs(
    databases: PipelineDatabases, dagster_home: Path
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 6)])
    with dg.DagsterInstance.get() as instance:
        assert run_job(instance, batch_size=3).success

    result = subprocess.run(
        [str(BIN / "so-pipeline"), "status"], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "cursor (last_processed_id): 3" in result.stdout
    assert "highest id 5; 2 posts after the cursor" in result.stdout
    assert "analytical posts: 3 rows" in result.stdout
    assert "SUCCESS" in result.stdout
