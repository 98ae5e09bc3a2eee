"""The cursor: it advances window by window, never reloads, and survives lost history."""

import dagster as dg
import pytest

from so_pipeline.tooling.runs import execute_job
from so_pipeline_tests.helpers import PipelineDatabases, Post, run_job

pytestmark = pytest.mark.integration


def test_cursor_advances_window_by_window_until_caught_up(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    # ids with gaps, one of several million, and above 2^31
    ids = [1, 2, 3, 10, 11, 500, 501, 4_000_000, 3_000_000_000, 3_000_000_001]
    databases.add_source_posts([Post(id=i) for i in ids])

    cursors, loaded, totals, previews = [], [], [], []
    for _ in range(4):
        outcome = run_job(instance, batch_size=3)
        assert outcome.success
        cursors.append(outcome.metadata()["last_processed_id"])
        loaded.append(outcome.metadata()["rows_loaded"])
        totals.append(outcome.metadata()["dagster/row_count"])
        previews.append(outcome.metadata()["preview"])

    assert cursors == [3, 500, 3_000_000_000, 3_000_000_001]
    assert loaded == [3, 3, 3, 1]
    assert totals == [3, 6, 9, 10]
    assert "| 10 | A title | &lt;p&gt;a body&lt;/p&gt; | 7 |" in previews[1]
    assert "| 1 |" not in previews[1]
    assert databases.loaded_ids() == ids


def test_caught_up_run_is_a_clean_no_op(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 6)])
    assert run_job(instance).success

    outcome = run_job(instance)

    assert outcome.success
    assert outcome.metadata()["rows_loaded"] == 0
    assert outcome.metadata()["last_processed_id"] == 5
    assert outcome.metadata("source_posts_batch")["rows_in_window"] == 0
    assert outcome.metadata("source_posts_batch")["dagster/row_count"] == 0
    assert databases.loaded_ids() == [1, 2, 3, 4, 5]


def test_repeated_and_overlapping_runs_load_nothing_twice(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 21)])
    assert run_job(instance, batch_size=20).success
    databases.add_source_posts([Post(id=i) for i in range(21, 31)])

    # A replay that overlaps the loaded range and reaches into new rows.
    replay = run_job(instance, start_after_id=5, batch_size=100)
    # The same replay again, now entirely over loaded rows.
    again = run_job(instance, start_after_id=5, batch_size=100)

    assert replay.metadata()["rows_loaded"] == 10
    assert replay.metadata()["rows_already_present"] == 15
    assert again.metadata()["rows_loaded"] == 0
    assert again.metadata()["last_processed_id"] == 30
    assert databases.loaded_ids() == list(range(1, 31))
    assert databases.query("analytical", "SELECT count(*), count(DISTINCT id) FROM posts") == [
        (30, 30)
    ]


def test_replay_of_an_old_range_does_not_move_the_cursor_back(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 11)])
    assert run_job(instance).success

    replay = run_job(instance, start_after_id=0, batch_size=3)

    assert replay.metadata()["window_last_id"] == "3"
    assert replay.metadata()["last_processed_id"] == 10
    assert run_job(instance).metadata("source_posts_batch")["window_after_id"] == "10"


def test_without_history_the_cursor_starts_after_the_analytical_tables(
    databases: PipelineDatabases,
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 8)] + [Post(id=8, body="")])
    with dg.DagsterInstance.ephemeral() as first:
        assert run_job(first).success
    databases.add_source_posts([Post(id=9), Post(id=10)])

    with dg.DagsterInstance.ephemeral() as fresh:
        outcome = run_job(fresh)

    batch = outcome.metadata("source_posts_batch")
    assert batch["cursor_origin"] == "analytical tables"
    # 8 was rejected, not loaded: the rejected table counts as processed too.
    assert batch["window_after_id"] == "8"
    assert batch["rows_in_window"] == 2
    assert outcome.metadata()["last_processed_id"] == 10
    assert databases.loaded_ids() == [1, 2, 3, 4, 5, 6, 7, 9, 10]


def test_an_empty_source_is_a_successful_run_without_a_cursor(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([])

    outcome = run_job(instance)

    assert outcome.success
    assert "last_processed_id" not in outcome.metadata()
    assert databases.loaded_ids() == []


def test_the_schedule_runs_every_tick_even_when_nothing_is_new() -> None:
    """A quiet source still gets a run each tick: it re-reads the look-back for late rows, and
    its materialization shows that the pipeline looked (the freshness policy stays green)."""
    from so_pipeline.definitions import defs

    schedule = defs.resolve_schedule_def("stackoverflow_posts_schedule")

    with dg.instance_for_test() as instance, dg.build_schedule_context(instance) as context:
        result = schedule.evaluate_tick(context)

    assert len(result.run_requests or []) == 1
    assert result.skip_message is None


def test_the_catch_up_sensor_starts_large_windows_until_the_schedule_can_keep_up(
    databases: PipelineDatabases,
) -> None:
    from so_pipeline.definitions import defs
    from so_pipeline.resources import PostgresResource

    sensor = defs.resolve_sensor_def("stackoverflow_posts_catch_up_sensor")
    job = defs.resolve_job_def("stackoverflow_posts_job")
    resources = {
        "source_db": PostgresResource(resource_name="source_db", url=databases.source_url),
        "analytical_db": PostgresResource(
            resource_name="analytical_db", url=databases.analytical_url
        ),
    }
    databases.add_source_posts([Post(id=i) for i in (1, 2, 300_000, 300_001)])

    with dg.instance_for_test() as instance:

        def tick():  # -> SensorExecutionData, which Dagster does not export
            with dg.build_sensor_context(instance=instance, resources=resources) as context:
                return sensor.evaluate_tick(context)

        (request,) = tick().run_requests  # 300,001 ids behind: catch up
        assert request.run_key == "catch-up-after-None"
        assert request.run_config["ops"]["source_posts_batch"]["config"]["batch_size"] == 10**6
        catch_up = request.run_config["ops"]["filtered_posts"]["config"]
        assert catch_up == {"catch_up_seconds": 600, "catch_up_batch_size": 10**6}

        going = instance.create_run_for_job(job, status=dg.DagsterRunStatus.STARTED)
        waiting = tick()
        assert not waiting.run_requests
        assert f"Run {going.run_id} is still going" in (waiting.skip_message or "")
        instance.delete_run(going.run_id)

        run = job.execute_in_process(
            run_config=request.run_config, instance=instance, tags=request.tags
        )
        assert run.success
        assert databases.loaded_ids() == [1, 2, 300_000, 300_001]
        caught_up = tick()
        assert not caught_up.run_requests
        assert "0 ids behind the source" in (caught_up.skip_message or "")

        # 150,000 new ids: more than a tick's default window, so the sensor resumes.
        databases.add_source_posts([Post(id=450_001)])
        (resumed,) = tick().run_requests
        assert resumed.run_key == "catch-up-after-300001"


def test_the_backlog_check_warns_then_fails_as_the_cursor_falls_behind(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=i) for i in (1, 2, 3, 5_000_000)])

    def backlog_check(**limits: int) -> dg.AssetCheckEvaluation:
        run_config = {
            "ops": {
                "source_posts_batch": {"config": {"batch_size": 1}},
                "filtered_posts": {"config": limits},
            }
        }
        result = execute_job(instance, run_config)
        (check,) = [
            c
            for c in result.get_asset_check_evaluations()
            if c.check_name == "backlog_within_limits"
        ]
        return check

    warned = backlog_check()  # defaults: warn above 1M ids behind, fail above 10M
    failed = backlog_check(warn_ids_behind=1000, fail_ids_behind=2_000_000)
    passed = backlog_check(warn_ids_behind=5_000_000, fail_ids_behind=6_000_000)

    assert (warned.passed, warned.severity) == (False, dg.AssetCheckSeverity.WARN)
    assert warned.metadata["ids_behind_source"].value == 5_000_000 - 1
    assert (failed.passed, failed.severity) == (False, dg.AssetCheckSeverity.ERROR)
    assert passed.passed
