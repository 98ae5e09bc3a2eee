"""Breaking things for real: killed runs, dropped connections, overlapping runs, late rows."""

import os
import signal
import subprocess
import threading
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from so_pipeline.analytical_schema import ensure_tables
from so_pipeline.dashboard import ROWS_LOADED
from so_pipeline.definitions import defs
from so_pipeline.tooling.runs import execute_job
from so_pipeline_tests.helpers import (
    REPO_ROOT,
    PipelineDatabases,
    Post,
    RunOutcome,
    dagster_job_execute,
    dagster_job_execute_command,
    generate_source_posts,
    job_run_config,
    pipeline_waits_for_a_lock,
    run_job,
    wait_for,
)

pytestmark = pytest.mark.integration

GENERATED_ROWS = 150_000


def _terminate_copy_backend(url: str, command: str) -> bool:
    with psycopg.connect(url, autocommit=True) as connection:
        pids = connection.execute(
            "SELECT p.pid FROM pg_stat_progress_copy p JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name LIKE 'so_pipeline%%' AND p.command = %s "
            "AND p.tuples_processed > 5000 AND a.datname = current_database()",
            [command],
        ).fetchall()
        for (pid,) in pids:
            connection.execute("SELECT pg_terminate_backend(%s)", [pid])
    return bool(pids)


def _job_in_background(config: Path) -> subprocess.Popen[bytes]:
    """`dagster job execute -c config` in its own process group, to be SIGKILLed whole."""
    return subprocess.Popen(
        dagster_job_execute_command("-c", str(config)),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def test_a_run_killed_while_loading_leaves_nothing_and_the_next_run_completes(
    databases: PipelineDatabases, dagster_home: Path, tmp_path: Path
) -> None:
    expected = generate_source_posts(databases.source_url, GENERATED_ROWS)
    config = tmp_path / "big.yaml"
    config.write_text("ops:\n  source_posts_batch:\n    config:\n      batch_size: 1000000\n")
    run = _job_in_background(config)
    wait_for(lambda: _copy_rows(databases.analytical_url, "COPY FROM") > 5_000, "a COPY", 60, 0.02)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()

    wait_for(lambda: _copy_rows(databases.analytical_url, "COPY FROM") == 0, "no COPY", 60, 0.02)
    assert databases.query("analytical", "SELECT count(*) FROM posts") == [(0,)]

    rerun = dagster_job_execute("-c", str(config), timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert databases.loaded_ids() == expected
    assert len(databases.rejected()) == GENERATED_ROWS - len(expected)
    with dg.DagsterInstance.get() as instance:
        event = instance.get_latest_materialization_event(dg.AssetKey("filtered_posts"))
        assert event and event.asset_materialization
        assert event.asset_materialization.metadata["last_processed_id"].value == GENERATED_ROWS


def _copy_rows(url: str, command: str) -> int:
    with psycopg.connect(url, autocommit=True) as connection:
        (rows,) = connection.execute(
            "SELECT coalesce(max(p.tuples_processed), 0) FROM pg_stat_progress_copy p "
            "JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name LIKE 'so_pipeline%%' AND p.command = %s "
            "AND a.datname = current_database()",
            [command],
        ).fetchone()  # type: ignore[misc]
    return rows


@pytest.mark.parametrize(("which", "command"), [("source", "COPY TO"), ("analytical", "COPY FROM")])
def test_a_connection_dropped_mid_window_is_retried_and_loads_exactly_once(
    databases: PipelineDatabases, instance: dg.DagsterInstance, which: str, command: str
) -> None:
    expected = generate_source_posts(databases.source_url, GENERATED_ROWS)
    url = databases.source_url if which == "source" else databases.analytical_url
    terminated = threading.Event()

    def terminate_once() -> None:
        wait_for(lambda: _terminate_copy_backend(url, command), command, 60, 0.02)
        terminated.set()

    killer = threading.Thread(target=terminate_once, daemon=True)
    killer.start()
    outcome = run_job(instance, batch_size=1_000_000)
    killer.join(timeout=60)

    assert terminated.is_set()
    retried = [e for e in outcome.result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert retried, "the dropped connection should have been retried"
    resource = "source_db" if which == "source" else "analytical_db"
    assert resource in str(retried[0].event_specific_data)
    assert outcome.success
    assert databases.loaded_ids() == expected
    assert outcome.metadata()["rows_loaded"] == len(expected)


def test_a_failing_copy_stream_rolls_back_every_stream_of_the_window(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """A large window is copied by parallel streams; they commit together or not at all."""
    expected = generate_source_posts(databases.source_url, GENERATED_ROWS)
    with psycopg.connect(databases.analytical_url, autocommit=True) as connection:
        ensure_tables(connection)
    # The last post breaks a constraint at the end of the last stream, when the first stream
    # has finished writing its rows.
    with psycopg.connect(databases.analytical_url, autocommit=True) as connection:
        connection.execute(
            f"ALTER TABLE posts ADD CONSTRAINT refuse_one_post CHECK (id <> {expected[-1]})"
        )

    failed = run_job(instance, batch_size=1_000_000, copy_streams=2)

    assert not failed.success
    assert 'violates check constraint "refuse_one_post"' in failed.failure_message()
    assert databases.query("analytical", "SELECT count(*) FROM posts") == [(0,)]
    assert databases.rejected() == {}
    assert instance.get_latest_materialization_event(dg.AssetKey("filtered_posts")) is None

    with psycopg.connect(databases.analytical_url, autocommit=True) as connection:
        connection.execute("ALTER TABLE posts DROP CONSTRAINT refuse_one_post")
    rerun = run_job(instance, batch_size=1_000_000, copy_streams=2)

    assert rerun.success
    assert rerun.metadata()["copy_streams"] == "2"
    assert databases.loaded_ids() == expected


def test_a_row_written_behind_the_pipelines_back_is_merged_by_the_retry(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """A writer that skips the advisory lock puts an id into the window while COPY runs.

    The direct COPY then hits a unique violation; the retry sees the id loaded, takes the
    staged merge, and gives that row the source's current values (as an edit would).
    """
    expected = generate_source_posts(databases.source_url, 20_000)
    with psycopg.connect(databases.analytical_url, autocommit=True) as connection:
        ensure_tables(connection)
    intruder_id = expected[len(expected) // 2]
    outcomes = []
    with psycopg.connect(databases.analytical_url) as intruder:
        # Not committed yet: the COPY's unique check on this id waits for this transaction.
        intruder.execute(
            "INSERT INTO posts (id, title, body) VALUES (%s, 'intruder', '<p>first</p>')",
            [intruder_id],
        )
        runner = threading.Thread(target=lambda: outcomes.append(run_job(instance)))
        runner.start()
        wait_for(
            lambda: pipeline_waits_for_a_lock(databases.analytical_url, "transactionid"),
            "the COPY waiting for the intruder",
            60,
            0.02,
        )
        intruder.commit()
        runner.join(timeout=120)

    (outcome,) = outcomes
    assert outcome.success
    retried = [e for e in outcome.result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert "duplicate key value violates unique constraint" in str(retried[0].event_specific_data)
    assert outcome.metadata()["load_path"] == "staged merge"
    assert outcome.metadata()["rows_loaded"] == len(expected) - 1
    assert outcome.metadata()["rows_updated"] == 1
    assert databases.loaded_ids() == expected
    assert databases.query(
        "analytical", "SELECT title FROM posts WHERE id = %s", [intruder_id]
    ) == [(f"t{intruder_id}",)]


def test_permanent_errors_are_not_retried(
    databases: PipelineDatabases, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    databases.add_source_posts([Post(id=1)])
    unknown_role = databases.source_url.replace("postgres:@", "no_such_role:@", 1)
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", unknown_role)

    outcome = run_job(instance)

    assert not outcome.success
    assert "source_db: PostgreSQL at" in outcome.failure_message()
    assert 'role "no_such_role" does not exist' in outcome.failure_message()
    events = {event.event_type_value for event in outcome.result.all_events}
    assert "STEP_UP_FOR_RETRY" not in events


def test_two_runs_at_once_load_each_row_once(
    databases: PipelineDatabases, dagster_home: Path
) -> None:
    expected = generate_source_posts(databases.source_url, 60_000)
    runs = [
        subprocess.Popen(
            dagster_job_execute_command(),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]

    assert [run.returncode for run in runs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert databases.loaded_ids() == expected
    loaded: list[int] = []
    with dg.DagsterInstance.get() as instance:
        for record in instance.fetch_materializations(dg.AssetKey("filtered_posts"), 10).records:
            materialization = record.asset_materialization
            assert materialization is not None
            assert materialization.metadata["last_processed_id"].value == 60_000
            rows_loaded = materialization.metadata[ROWS_LOADED].value  # the dashboard's figure
            assert isinstance(rows_loaded, int)
            loaded.append(rows_loaded)
    # Whether the second run waited for the first one's lock or started after it, it found
    # every row present.
    assert sorted(loaded) == [0, len(expected)]


def test_late_rows_inside_the_look_back_are_loaded_and_others_repaired_by_the_reconciliation(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=i) for i in [*range(1, 5), *range(6, 41), *range(46, 51)]])
    assert run_job(instance, batch_size=100).success

    # Two rows commit late, below the cursor (50): one within the look-back of 10 ids.
    databases.add_source_posts([Post(id=45), Post(id=5)])
    outcome = run_job(instance, batch_size=100, lookback_ids=10)

    assert outcome.success
    assert 45 in databases.loaded_ids()
    assert 5 not in databases.loaded_ids()
    reconciliation = defs.resolve_job_def("stackoverflow_posts_reconciliation_job")
    checks = reconciliation.execute_in_process(instance=instance).get_asset_check_evaluations()
    (check,) = [c for c in checks if c.check_name == "reconciled_with_source"]
    assert check.passed
    assert check.metadata["buckets_differing"].value == 1
    assert check.metadata["rows_loaded_by_repair"].value == 1
    assert 5 in databases.loaded_ids()
    checks = reconciliation.execute_in_process(instance=instance).get_asset_check_evaluations()
    assert [c.passed for c in checks] == [True, True]


CATCH_UP_CONFIG = (
    "ops:\n"
    "  source_posts_batch: {config: {batch_size: 40000}}\n"
    "  filtered_posts: {config: {catch_up_seconds: 600, catch_up_batch_size: 40000}}\n"
)


def _filtered_posts_cursors(instance: dg.DagsterInstance) -> list[int]:
    """last_processed_id of every filtered_posts materialization, oldest first."""
    records = instance.fetch_materializations(dg.AssetKey("filtered_posts"), limit=100).records
    cursors = [
        record.asset_materialization.metadata["last_processed_id"].value
        for record in records
        if record.asset_materialization is not None
    ]
    return list(reversed(cursors))  # type: ignore[arg-type]


def test_a_catch_up_run_records_every_window_and_equals_single_windows(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    expected = generate_source_posts(databases.source_url, 100)
    config = job_run_config(batch_size=30)
    config["ops"]["filtered_posts"]["config"] = {"catch_up_seconds": 600, "catch_up_batch_size": 30}

    outcome = RunOutcome(execute_job(instance, config))

    assert outcome.success
    assert _filtered_posts_cursors(instance) == [30, 60, 90, 100]
    assert [run.run_id for run in instance.get_runs()] == [outcome.result.run_id]
    assert databases.loaded_ids() == expected
    assert outcome.metadata()["dagster/row_count"] == len(expected)
    assert run_job(instance).metadata()["rows_loaded"] == 0


def test_a_catch_up_run_killed_between_windows_keeps_every_committed_window(
    databases: PipelineDatabases, dagster_home: Path, tmp_path: Path
) -> None:
    expected = generate_source_posts(databases.source_url, GENERATED_ROWS)
    config = tmp_path / "catch_up.yaml"
    config.write_text(CATCH_UP_CONFIG)
    run = _job_in_background(config)
    with dg.DagsterInstance.get() as instance:
        # Killed while it copies the second window, once the first is recorded.
        wait_for(lambda: _filtered_posts_cursors(instance), "a committed window", 120, 0.02)
        wait_for(
            lambda: _copy_rows(databases.analytical_url, "COPY FROM") > 5_000, "a COPY", 60, 0.02
        )
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()
        wait_for(
            lambda: _copy_rows(databases.analytical_url, "COPY FROM") == 0, "no COPY", 60, 0.02
        )
        (first_cursor,) = _filtered_posts_cursors(instance)
        loaded = databases.loaded_ids()

        rerun = dagster_job_execute("-c", str(config), timeout=300)
        cursors = _filtered_posts_cursors(instance)

    assert loaded == [i for i in expected if i <= first_cursor]  # the window in flight: nothing
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert databases.loaded_ids() == expected
    assert cursors[0] == first_cursor and cursors[-1] == GENERATED_ROWS
    assert cursors == sorted(cursors)
