"""The jobs and what starts them: the 15-minute schedule, the catch-up sensor, the daily check."""

import dagster as dg

from so_pipeline.cursor import current_cursor
from so_pipeline.names import (
    BACKLOG_WITHIN_LIMITS,
    FILTERED_POSTS,
    LAST_RESULT_OF,
    LOADED_BODIES_ARE_NOT_BLANK,
    POST_IDS_ARE_UNIQUE,
    POSTS_JOB,
    RECONCILED_WITH_SOURCE,
    RECONCILIATION_JOB,
    SENSOR_INTERVAL_SECONDS,
    SOURCE_POSTS_BATCH,
)
from so_pipeline.resources import PostgresResource
from so_pipeline.source_posts import max_id
from so_pipeline.window import DEFAULT_BATCH_SIZE, ids_behind

# dagster.yaml limits runs carrying this tag to one at a time, so scheduled ticks queue
# instead of overlapping (correctness does not depend on it: loads are idempotent and locked).
SERIAL_RUN_TAG = {"so_pipeline/serial": "stackoverflow_posts"}


stackoverflow_posts_job = dg.define_asset_job(
    name=POSTS_JOB,
    # The window's own checks are evaluated by filtered_posts itself; the checks that read the
    # whole table run daily in reconciliation_job (on a 1M-post window the blank-body scan
    # alone added 1.7 s, 20%, to the run).
    selection=dg.AssetSelection.assets(SOURCE_POSTS_BATCH, FILTERED_POSTS).without_checks()
    | dg.AssetSelection.checks(POST_IDS_ARE_UNIQUE, BACKLOG_WITHIN_LIMITS, *LAST_RESULT_OF),
    description="Load the next window of Stack Overflow posts into the analytical database.",
    # Two light steps: one process saves ~3 s of start-up per run against the default.
    executor_def=dg.in_process_executor,
    tags=SERIAL_RUN_TAG,
)


# Every tick runs, even when the source has nothing new: the run re-reads the look-back (a
# late row lands then, not at the next new post), and its materialization shows the operator
# that the pipeline looked and found nothing, which keeps the freshness policy green.
stackoverflow_posts_schedule = dg.ScheduleDefinition(
    name="stackoverflow_posts_schedule",
    job=stackoverflow_posts_job,
    cron_schedule="*/15 * * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 15 minutes: load the posts after the cursor (and re-read the look-back).",
)


# A catch-up run reads windows this large (the schedule's runs keep the small default); they
# stream, so memory does not grow with it (1M posts: ~6 s on a 2-core machine).
CATCH_UP_BATCH_SIZE = 1_000_000
# One catch-up run goes on window after window for up to this long (each window recorded as a
# materialization), then leaves the queue to the schedule's next tick and the sensor's next run.
CATCH_UP_RUN_SECONDS = 600
# The sensor starts catching up when the source is this many ids ahead of the cursor: more
# than a default window, so the 15-minute schedule alone would fall behind.
CATCH_UP_AFTER_IDS_BEHIND = DEFAULT_BATCH_SIZE

_ACTIVE_RUN_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
]


@dg.sensor(
    name="stackoverflow_posts_catch_up_sensor",
    job=stackoverflow_posts_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"While the source is more than {CATCH_UP_AFTER_IDS_BEHIND:,} ids ahead of the "
    f"cursor, start catch-up runs back to back, each loading {CATCH_UP_BATCH_SIZE:,}-post "
    f"windows one after the other for up to {CATCH_UP_RUN_SECONDS} s.",
)
def stackoverflow_posts_catch_up_sensor(
    context: dg.SensorEvaluationContext,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
) -> dg.RunRequest | dg.SkipReason:
    """Catches a new deployment (or one that was stopped) up without waiting for 15-minute ticks.

    One run at a time: it waits while any run of the job is queued or running. Each request's
    run_key names the cursor it starts from, so a run that fails is not requested again for
    the same cursor (the schedule's next run, or a manual one, moves it on).
    """
    active = context.instance.get_run_records(
        dg.RunsFilter(job_name=stackoverflow_posts_job.name, statuses=_ACTIVE_RUN_STATUSES),
        limit=1,
    )
    if active:
        return dg.SkipReason(f"Run {active[0].dagster_run.run_id} is still going.")
    with analytical_db.connect() as analytical:
        cursor, _ = current_cursor(context.instance, analytical)
    with source_db.connect() as source:
        behind = ids_behind(max_id(source), cursor)
    if behind <= CATCH_UP_AFTER_IDS_BEHIND:
        return dg.SkipReason(
            f"{behind:,} ids behind the source: the schedule keeps up "
            f"(catching up starts above {CATCH_UP_AFTER_IDS_BEHIND:,})."
        )
    return dg.RunRequest(
        run_key=f"catch-up-after-{cursor}",
        run_config={
            "ops": {
                "source_posts_batch": {"config": {"batch_size": CATCH_UP_BATCH_SIZE}},
                "filtered_posts": {
                    "config": {
                        "catch_up_seconds": CATCH_UP_RUN_SECONDS,
                        "catch_up_batch_size": CATCH_UP_BATCH_SIZE,
                    }
                },
            }
        },
        tags={"so_pipeline/trigger": "catch-up"},
    )


reconciliation_job = dg.define_asset_job(
    name=RECONCILIATION_JOB,
    selection=dg.AssetSelection.checks(RECONCILED_WITH_SOURCE, LOADED_BODIES_ARE_NOT_BLANK),
    description="Compare every processed source id with the analytical tables, and check "
    "every loaded body.",
    executor_def=dg.in_process_executor,
)

reconciliation_schedule = dg.ScheduleDefinition(
    name="stackoverflow_posts_reconciliation_schedule",
    description="Daily at 03:30 UTC: compare every processed id with the source, check every "
    "loaded body.",
    job=reconciliation_job,
    cron_schedule="30 3 * * *",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
)
