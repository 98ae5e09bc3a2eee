"""`so-pipeline status` and `so-pipeline metrics`: is it keeping up, and what did the runs do?"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import dagster as dg

from so_pipeline import source_posts
from so_pipeline.alerts import error_line
from so_pipeline.cursor import cursor_from_history, cursor_recorded_at, latest_metadata
from so_pipeline.dashboard import STATUS, duration
from so_pipeline.names import POSTS_JOB, RECONCILIATION_JOB
from so_pipeline.posts_state import read_posts_state
from so_pipeline.resources import PostgresResource

# The runs that belong to the pipeline: its jobs, and the UI's Materialize button (__ASSET_JOB).
PIPELINE_JOBS = (POSTS_JOB, RECONCILIATION_JOB, "__ASSET_JOB")
# The jobs that move the cursor.
_LOADING_JOBS = {POSTS_JOB, "__ASSET_JOB"}
# With a run every 15 minutes, no new record for this long means nothing is running them.
NO_RECORD_IS_STUCK_AFTER_SECONDS = 3600
# A run going for longer than this (a catch-up run takes up to 10 minutes) is named.
LONG_RUN_SECONDS = 15 * 60
_FINISHED = {dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE}


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


@dataclass(frozen=True)
class RunSeen:
    job: str
    status: dg.DagsterRunStatus
    started: float
    ended: float | None
    run_id: str
    error: str | None = None  # a failed run's first step error


def recent_runs(instance: dg.DagsterInstance, limit: int) -> list[RunSeen]:
    """The pipeline's latest runs, newest first (a failed one with its error)."""
    runs = []
    for record in instance.get_run_records(limit=limit * 4):
        run = record.dagster_run
        if run.job_name not in PIPELINE_JOBS:
            continue
        error = None
        if run.status == dg.DagsterRunStatus.FAILURE:
            for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
                if entry.dagster_event is not None:
                    error = error_line(entry.dagster_event.step_failure_data.error)
                    break
        started = record.start_time or record.create_timestamp.timestamp()
        runs.append(RunSeen(run.job_name, run.status, started, record.end_time, run.run_id, error))
        if len(runs) == limit:
            break
    return runs


def pipeline_status(
    latest_status: str | None, recorded_at: float | None, runs: Sequence[RunSeen], now: float
) -> str:
    """One line: the latest record's status, unless the runs since say the pipeline is stuck."""
    loading = [run for run in runs if run.job in _LOADING_JOBS]
    finished = [run for run in loading if run.status in _FINISHED]
    if finished and finished[0].status == dg.DagsterRunStatus.FAILURE:
        failures = []
        for run in finished:
            if run.status != dg.DagsterRunStatus.FAILURE:
                break
            failures.append(run)
        since = failures[-1].started
        last_good = f"; last record {_when(recorded_at)} UTC" if recorded_at else ""
        return (
            f"stuck since {_when(since)} UTC ({duration(now - since)}): the last {len(failures)} "
            f"run(s) failed{last_good}. Latest error: {failures[0].error or 'see the run'}"
        )
    going = [run for run in loading if run.status == dg.DagsterRunStatus.STARTED]
    if going and now - going[0].started > LONG_RUN_SECONDS:
        return (
            f"run {going[0].run_id[:8]} has been going for {duration(now - going[0].started)} "
            "(a catch-up, or a wait for the write lock: see its log)"
        )
    if recorded_at is None:
        return "no run has loaded anything yet"
    if now - recorded_at > NO_RECORD_IS_STUCK_AFTER_SECONDS:
        return (
            f"stuck since {_when(recorded_at)} UTC: no run has finished for "
            f"{duration(now - recorded_at)} (is the daemon running, the schedule on?)"
        )
    return f"{latest_status or 'no status recorded'} (as of {_when(recorded_at)} UTC)"


def status_report(
    instance: dg.DagsterInstance,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
    runs: int = 8,
) -> str:
    cursor = cursor_from_history(instance)
    recorded = cursor_recorded_at(instance)
    seen = recent_runs(instance, runs)
    now = datetime.now(UTC).timestamp()
    status = pipeline_status(latest_metadata(instance).get(STATUS), recorded, seen, now)
    lines = [f"status: {status}"]
    if cursor is not None and recorded is not None:
        lines.append(f"cursor (last_processed_id): {cursor}, recorded {_when(recorded)} UTC")
    else:
        lines.append("cursor: none yet (no materialization of filtered_posts)")
    with source_db.connect() as connection:
        highest = source_posts.max_id(connection)
        backlog = source_posts.rows_after(connection, cursor)
    lines.append(f"source: highest id {highest}; {backlog} posts after the cursor")
    with analytical_db.connect() as connection:
        state = read_posts_state(connection)
    rejected = sum(state.rejected_by_reason.values())
    lines.append(
        f"analytical posts: {state.live_posts} live, {state.deleted_posts} deleted at the "
        f"source (kept, soft-deleted); posts_rejected: {rejected}"
    )
    lines.append("last runs of the pipeline's jobs:")
    for run in seen:
        took = f"{run.ended - run.started:.1f} s" if run.ended else "running"
        lines.append(
            f"  {_when(run.started)}  {run.status.value:<9} {took:>9}  {run.run_id[:8]}  {run.job}"
        )
    if not seen:
        lines.append("  none")
    return "\n".join(lines)


@dataclass(frozen=True)
class Metric:
    name: str
    kind: str
    unit: str | None
    help: str
    value: float | None


def read_figures(instance: dg.DagsterInstance) -> list[Metric]:
    """The dashboard's figures of the latest filtered_posts materialization."""
    latest = latest_metadata(instance)
    succeeded = instance.get_run_records(
        dg.RunsFilter(job_name=POSTS_JOB, statuses=[dg.DagsterRunStatus.SUCCESS]), limit=1
    )
    last_success = succeeded[0].end_time if succeeded else None

    def metric(name: str, unit: str | None, help: str, value: object) -> Metric:
        number = value if isinstance(value, int | float) else None
        return Metric(f"so_pipeline_{name}", "gauge", unit, help, number)

    return [
        metric(
            "ids_behind_source",
            None,
            "Source ids above the cursor.",
            latest.get("ids_behind_source"),
        ),
        metric(
            "lag_seconds",
            "seconds",
            "How much older the newest loaded post is than the source's newest.",
            latest.get("lag_seconds"),
        ),
        metric(
            "posts_live",
            None,
            "Posts in the analytical table that are still at the source.",
            latest.get("dagster/row_count"),
        ),
        metric(
            "posts_rejected",
            None,
            "Posts in posts_rejected (every reason).",
            latest.get("rejected_total"),
        ),
        metric(
            "posts_deleted",
            None,
            "Posts soft-deleted: gone from the source.",
            latest.get("deleted_posts_total"),
        ),
        metric(
            "last_run_rows_loaded", None, "Posts the latest run loaded.", latest.get("rows_loaded")
        ),
        metric(
            "last_run_rows_rejected",
            None,
            "Posts the latest run newly rejected.",
            latest.get("rows_rejected"),
        ),
        metric(
            "last_run_lock_wait_seconds",
            "seconds",
            "How long the latest run waited for the write lock.",
            latest.get("lock_wait_seconds"),
        ),
        metric(
            "last_success_timestamp_seconds",
            "seconds",
            f"When the latest successful run of {POSTS_JOB} ended (Unix time).",
            last_success,
        ),
        metric(
            "cursor",
            None,
            "last_processed_id: the highest source id processed.",
            latest.get("last_processed_id"),
        ),
    ]


def openmetrics(metrics: Sequence[Metric]) -> str:
    """`metrics` in the OpenMetrics text format; an unknown value is left out, its family kept."""
    lines = []
    for metric in metrics:
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        if metric.unit:
            lines.append(f"# UNIT {metric.name} {metric.unit}")
        lines.append(f"# HELP {metric.name} {metric.help}")
        if metric.value is not None:
            lines.append(f"{metric.name} {metric.value}")
    return "\n".join([*lines, "# EOF"]) + "\n"
