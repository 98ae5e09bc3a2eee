"""What an operator meets outside the scheduled job: `filtered_posts` materialized on its own
(the UI's button, `dagster asset materialize`), a re-execution from failure on a machine that
never saw the first run's disk, the one-writer pool, and the "are we keeping up?" metadata."""

import logging
import shutil
import subprocess
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from so_pipeline.assets import POSTS_WRITERS_POOL
from so_pipeline.cursor import latest_metadata
from so_pipeline.definitions import defs
from so_pipeline_tests.helpers import (
    BIN,
    LOCK_HOLDER,
    REPO_ROOT,
    PipelineDatabases,
    Post,
    dagster_job_execute,
    run_job,
    run_job_behind_a_held_lock,
)

pytestmark = pytest.mark.integration


def _materialize_filtered_posts_alone() -> subprocess.CompletedProcess[str]:
    command = [str(BIN / "dagster"), "asset", "materialize", "-m", "so_pipeline"]
    return subprocess.run(
        [*command, "--select", "filtered_posts"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )


def _latest(instance: dg.DagsterInstance, asset: str) -> dict[str, object]:
    """The asset's latest metadata, its groups (issue 24) flattened."""
    metadata = latest_metadata(instance, dg.AssetKey(asset))
    assert metadata
    return metadata


def test_filtered_posts_materialized_alone_loads_what_is_new_once(
    databases: PipelineDatabases, dagster_home: Path
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 6)])
    assert dagster_job_execute().returncode == 0
    databases.add_source_posts([Post(id=i) for i in range(6, 9)])

    first = _materialize_filtered_posts_alone()
    second = _materialize_filtered_posts_alone()

    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert databases.loaded_ids() == list(range(1, 9))
    with dg.DagsterInstance.get() as instance:
        metadata = _latest(instance, "filtered_posts")
        runs = instance.get_runs(limit=3)
        batch = _latest(instance, "source_posts_batch")
    assert metadata["last_processed_id"] == 8
    assert metadata["rows_loaded"] == 0  # the second found nothing new
    assert [run.job_name for run in runs][:2] == ["__ASSET_JOB", "__ASSET_JOB"]
    # source_posts_batch's page shows what the latest run found (nothing new), not the window
    # of the job's run (5 posts).
    assert batch["rows_in_window"] == 0 and batch["ids_behind_source"] == 0


def test_a_re_execution_from_failure_needs_no_disk_of_the_first_run(
    databases: PipelineDatabases,
    dagster_home: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 11)])
    with psycopg.connect(databases.analytical_url, autocommit=True) as connection:
        connection.execute(  # filtered_posts fails on it; source_posts_batch succeeds
            "CREATE TABLE posts (id bigint PRIMARY KEY, title text, body integer, "
            "owner_user_id bigint, creation_date timestamp)"
        )
    failed = dagster_job_execute()
    assert failed.returncode != 0
    with psycopg.connect(databases.analytical_url, autocommit=True) as connection:
        connection.execute("DROP TABLE posts")
    # Another machine: the same instance database, a new, empty DAGSTER_HOME folder.
    other_home = tmp_path / "other_machine"
    other_home.mkdir()
    shutil.copyfile(dagster_home / "dagster.yaml", other_home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(other_home))

    with dg.DagsterInstance.get() as instance:
        (failed_run,) = instance.get_runs(limit=1)
        assert failed_run.status == dg.DagsterRunStatus.FAILURE
        result = dg.execute_job(
            dg.reconstructable(_stackoverflow_posts_job),
            instance=instance,
            reexecution_options=dg.ReexecutionOptions.from_failure(failed_run.run_id, instance),
        )
        assert result.success
        assert [e.step_key for e in result.all_events if e.is_step_success] == ["filtered_posts"]
        metadata = _latest(instance, "filtered_posts")

    assert metadata["last_processed_id"] == 10
    assert databases.loaded_ids() == list(range(1, 11))
    assert not list((other_home / "storage").glob("**/source_posts_batch"))


def _stackoverflow_posts_job() -> dg.JobDefinition:
    return defs.resolve_job_def("stackoverflow_posts_job")


def test_every_run_that_writes_posts_waits_for_one_pool_of_one(dagster_home: Path) -> None:
    assets = defs.resolve_asset_graph()
    pools = {key.to_user_string(): assets.get(key).pools for key in assets.get_all_asset_keys()}
    with dg.DagsterInstance.get() as instance:
        concurrency = instance.get_concurrency_config()

    assert pools == {
        "source_posts_batch": {POSTS_WRITERS_POOL},
        "filtered_posts": {POSTS_WRITERS_POOL},
    }
    granularity = concurrency.pool_config.pool_granularity
    assert granularity is not None and granularity.value == "run"
    assert concurrency.pool_config.default_pool_limit == 1


def test_filtered_posts_tells_whether_the_pipeline_keeps_up(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    from datetime import datetime

    posts = [Post(id=i, creation_date=datetime(2021, 1, 1, 0, i)) for i in range(1, 11)]
    posts[1].body = " "
    posts[2].owner_user_id = None
    databases.add_source_posts(posts)

    behind = run_job(instance, batch_size=5).metadata()
    caught_up = run_job(instance).metadata()
    reread = run_job(instance, start_after_id=0).metadata()

    assert behind["ids_behind_source"] == 5
    assert behind["lag_seconds"] == 5 * 60.0  # 00:05 loaded, 00:10 at the source
    assert behind["source_newest_post_at"] == "2021-01-01T00:10:00"
    assert caught_up["ids_behind_source"] == 0 and caught_up["lag_seconds"] == 0
    assert caught_up["rejected_total"] == 2
    assert caught_up["rejected_total_body_whitespace_only"] == 1
    assert caught_up["rejected_total_owner_null"] == 1
    assert caught_up["rejected_total_body_null"] == 0
    # A replay finds the rejected rows again: counted as already rejected, not lost.
    assert reread["rows_read"] == 10
    assert reread["rows_already_present"] == 8
    assert reread["rows_already_rejected"] == 2
    assert reread["rows_rejected"] == 0
    assert reread["rejected_total"] == 2
    assert "rows_per_second" not in run_job(instance, lookback_ids=0).metadata()


def test_the_reconciliation_check_reports_what_it_compared_when_it_passes(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=i) for i in (1, 2, 3, 2_500_000)] + [Post(id=4, body="")])
    assert run_job(instance).success

    job = defs.resolve_job_def("stackoverflow_posts_reconciliation_job")
    result = job.execute_in_process(instance=instance)
    (evaluation,) = [
        e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.asset_check_evaluation_data.check_name == "reconciled_with_source"
    ]

    assert evaluation.passed
    counts = {k: v.value for k, v in evaluation.metadata.items()}
    assert counts["ids_compared"] == 5
    assert counts["buckets_compared"] == 2  # ids 1..4 in one bucket, 2,500,000 in another
    assert counts["buckets_differing"] == 0


def test_the_column_schema_describes_every_column() -> None:
    from so_pipeline import analytical_schema
    from so_pipeline.metadata import column_schema

    columns = column_schema(analytical_schema.posts).columns

    assert [c.name for c in columns] == [c.name for c in analytical_schema.posts.columns]
    assert all(c.description for c in columns)


def test_a_wait_for_the_write_lock_is_measured_and_names_the_run_that_held_it(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """Another run holds the write lock for 2 s: the load step reports the wait it made, and
    warns naming that run (its connections carry the run id in application_name)."""
    databases.add_source_posts([Post(id=i) for i in range(1, 6)])
    assert run_job(instance).success  # the tables exist
    databases.add_source_posts([Post(id=i) for i in range(6, 9)])

    outcome = run_job_behind_a_held_lock(databases, instance)

    assert outcome.success
    assert outcome.metadata()["lock_wait_seconds"] >= 1.0
    assert outcome.metadata()["rows_loaded"] == 3
    warnings = [
        entry.user_message
        for entry in instance.all_logs(outcome.result.run_id)
        if entry.level == logging.WARNING
    ]
    assert any(f"for the write lock, held by {LOCK_HOLDER}" in message for message in warnings), (
        warnings
    )
