"""The two assets: pick the next id window of the source, then load its valid posts."""

import gc
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import dagster as dg
import psycopg
from pydantic import Field

from so_pipeline import source_posts as source
from so_pipeline.analytical_reads import preview_rows
from so_pipeline.analytical_schema import copied_columns, posts
from so_pipeline.change_capture import (
    ChangeCursor,
    ChangeSettings,
    capture_changes,
    missing_index_advice,
    previous_cursor,
)
from so_pipeline.cursor import (
    current_cursor,
    cursor_from_history,
    cursor_recorded_at,
    latest_metadata,
)
from so_pipeline.dashboard import Progress, arranged, status_line
from so_pipeline.metadata import column_schema, markdown_table
from so_pipeline.names import SOURCE_POSTS_BATCH
from so_pipeline.posts_state import read_posts_state
from so_pipeline.resources import DatabaseUnavailableError, PostgresResource, is_permanent
from so_pipeline.run_connections import RunConnections
from so_pipeline.source_replica import read_through_conflicts, replica_status
from so_pipeline.window import DEFAULT_BATCH_SIZE, REPLAY_ORIGIN, PostWindow
from so_pipeline.window_checks import (
    BacklogLimits,
    check_backlog,
    check_daily_results,
    check_post_ids_are_unique,
    window_check_specs,
)
from so_pipeline.window_io import WINDOW_IO_MANAGER_KEY
from so_pipeline.window_loader import MIN_ROWS_PER_STREAM, WindowLoad, WindowLoader

# Every Stack Exchange posts table has it, and it moves forward on every edit.
DEFAULT_CHANGE_COLUMN = "last_activity_date"
# Edits commit late too; 10 minutes is far longer than an edit's transaction.
DEFAULT_CHANGE_LOOKBACK_SECONDS = 600
# Stack Overflow sees a few edits a second: 100k is hours of them.
DEFAULT_CHANGE_BATCH_SIZE = 100_000
# A mass edit is applied page by page for up to this long per run (then the next run goes on).
DEFAULT_CHANGE_TIME_BUDGET_SECONDS = 120

# Bumped when a change alters what the assets write, so the UI can tell materializations apart.
CODE_VERSION = "2"

# The concurrency pool of the assets that read and move the cursor.
POSTS_WRITERS_POOL = "so_pipeline_posts"

# Transient errors are retried this many times (after 1, 2 and 4 s).
MAX_RETRIES = 3

# Ids are handed out at INSERT and become visible at COMMIT, so a slow transaction can land
# below the cursor. On Stack Overflow 1,000 ids span hours of posting: far longer than any
# insert transaction, and re-reading them costs milliseconds.
DEFAULT_LOOKBACK_IDS = 1_000


# One COPY is bound by the target backend that writes it; with two, a 1M-post catch-up run
# took 6.2 s instead of 6.8 s on 2 cores (benchmarks/runs/). More help only where the
# analytical server has cores to spare. Each stream holds ~4 MB of buffers: at most 8 keep a
# run under 200 MB (8: 167 MB, 16: 204 MB on a 1M-post window).
DEFAULT_COPY_STREAMS = 2


def _asset(**options: Any) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """`dg.asset` with what both assets share."""
    return dg.asset(
        kinds={"postgres"},
        group_name="stackoverflow",
        owners=["team:data-engineering"],
        # Every run that writes posts (the job, the UI's Materialize button, a backfill,
        # `dagster asset materialize`) waits for this pool; dagster.yaml gives it one run.
        pool=POSTS_WRITERS_POOL,
        code_version=CODE_VERSION,
        **options,
    )


class SourceBatchConfig(dg.Config):
    batch_size: int = Field(
        default=DEFAULT_BATCH_SIZE, gt=0, description="Most source ids to process in this run."
    )
    start_after_id: int | None = Field(
        default=None,
        description="Replay: process the ids after this one instead of after the cursor. "
        "The cursor never moves backwards.",
    )
    lookback_ids: int = Field(
        default=DEFAULT_LOOKBACK_IDS,
        ge=0,
        description="Also re-read this many ids just below the cursor, for rows that committed "
        "late (after a higher id had been read). Idempotent loading makes it safe.",
    )


class FilterConfig(BacklogLimits):
    catch_up_seconds: int = Field(
        default=0,
        ge=0,
        description="Go on loading windows of catch_up_batch_size posts in this run while the "
        "source is ahead, for up to this many seconds (0: one window). Each committed window "
        "is recorded as a materialization with its cursor.",
    )
    catch_up_batch_size: int = Field(
        default=1_000_000,
        gt=0,
        description="Most source ids per window after the first one, in a catch-up run.",
    )
    change_column: str | None = Field(
        default=DEFAULT_CHANGE_COLUMN,
        description="Source column that moves forward on every edit; edits to loaded posts are "
        "applied by keyset paging on (it, id). Empty or null: change capture off.",
    )
    change_lookback_seconds: int = Field(
        default=DEFAULT_CHANGE_LOOKBACK_SECONDS,
        ge=0,
        description="Re-read the edits of this many seconds before the change cursor, for "
        "edits that committed late. Unchanged rows are not rewritten.",
    )
    change_batch_size: int = Field(
        default=DEFAULT_CHANGE_BATCH_SIZE,
        gt=0,
        description="Most changed rows read and applied in one transaction (a page); a run "
        "reads page after page until the changes are drained or change_time_budget_seconds "
        "has passed.",
    )
    change_time_budget_seconds: int = Field(
        default=DEFAULT_CHANGE_TIME_BUDGET_SECONDS,
        ge=0,
        description="After this long, a run stops reading pages of changes (the next run goes "
        "on from there).",
    )
    require_owner: bool = Field(
        default=True, description="Reject posts whose owner_user_id is NULL (deleted users)."
    )
    copy_streams: int = Field(
        default=DEFAULT_COPY_STREAMS,
        ge=1,
        le=8,
        description="Most parallel COPY streams for a large window loaded straight into posts "
        f"(each carries at least {MIN_ROWS_PER_STREAM:,} rows). Each uses one more connection "
        "to each database.",
    )

    def change_settings(self) -> ChangeSettings:
        return ChangeSettings(
            column=self.change_column,
            lookback=timedelta(seconds=self.change_lookback_seconds),
            batch_size=self.change_batch_size,
            require_owner=self.require_owner,
            time_budget=timedelta(seconds=self.change_time_budget_seconds),
        )


def plan_window(
    context: dg.AssetExecutionContext, config: SourceBatchConfig, run: RunConnections
) -> PostWindow:
    """The next window after the cursor (or a replay's start), from the current state."""
    cursor, cursor_origin = current_cursor(context.instance, run.analytical)
    if config.start_after_id is None:
        after_id = cursor
        read_after_id = None if cursor is None else cursor - config.lookback_ids
    else:
        after_id = read_after_id = config.start_after_id
        cursor_origin = REPLAY_ORIGIN
    source.check_source_table(run.source, run.source_location)
    new_rows, first_id, last_new_id = source.next_window_bounds(
        run.source, after_id, config.batch_size
    )
    highest_source_id = source.max_id(run.source)
    source_newest_at = source.newest_post_time(run.source)
    window = PostWindow(
        read_after_id=read_after_id,
        after_id=after_id,
        last_id=last_new_id if last_new_id is not None else after_id,
        cursor_before=cursor,
        new_rows=new_rows,
        source_max_id=highest_source_id,
        cursor_origin=cursor_origin,
        first_new_id=first_id,
        source_newest_at=source_newest_at.isoformat() if source_newest_at else None,
    )
    context.log.info(
        "Planned %s (cursor %s, from %s); source max id %s",
        window.describe(),
        after_id,
        cursor_origin,
        highest_source_id,
    )
    if window.replay_note():
        context.log.warning("Replay: %s", window.replay_note())
    return window


@contextmanager
def retrying_transient_errors(context: dg.AssetExecutionContext) -> Iterator[None]:
    """Retry the step after 1, 2 and 4 s on a transient database error, and on nothing else.

    Transient: a dropped connection, an unreachable server, a serialization failure, a row
    written behind the advisory lock (the retry merges). A refused login, a missing table, a
    bad config or a bug fail the step at once: retrying cannot help them.
    """
    try:
        yield
    except (DatabaseUnavailableError, psycopg.Error) as error:
        if isinstance(error, psycopg.Error) and is_permanent(error):
            raise
        raise dg.RetryRequested(
            max_retries=MAX_RETRIES, seconds_to_wait=2**context.retry_number
        ) from error


@contextmanager
def run_connections(
    context: dg.AssetExecutionContext,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
) -> Iterator[RunConnections]:
    """The step's connections, with transient errors retried."""
    with (
        retrying_transient_errors(context),
        RunConnections(source_db, analytical_db, context.run.run_id) as run,
    ):
        yield run


@_asset(io_manager_key=WINDOW_IO_MANAGER_KEY)
def source_posts_batch(
    context: dg.AssetExecutionContext,
    config: SourceBatchConfig,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
) -> dg.Output[PostWindow]:
    """The next window of source post ids after the cursor (its bounds, not its rows)."""
    with run_connections(context, source_db, analytical_db) as run:
        window = plan_window(context, config, run)
    return dg.Output(window, metadata=window.metadata())


@_asset(
    check_specs=window_check_specs(),
    # Shown on the asset's page: warn after an hour (four ticks) without a new
    # materialization, fail after three.
    freshness_policy=dg.FreshnessPolicy.time_window(
        warn_window=timedelta(hours=1), fail_window=timedelta(hours=3)
    ),
)
def filtered_posts(
    context: dg.AssetExecutionContext,
    config: FilterConfig,
    source_posts_batch: PostWindow | None,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
) -> dg.MaterializeResult:
    """Posts of the window with a non-empty body, loaded into the analytical `posts` table.

    Rejected posts go to `posts_rejected` with their reason. `last_processed_id` in this
    asset's metadata is the pipeline's cursor.
    """
    # Dagster and the definitions leave ~150,000 objects that live as long as the process;
    # moving them out of the cyclic collector's reach spares every later full collection the
    # walk over them, and the process's exit 0.6 s of it (a tick ends that much sooner).
    gc.freeze()
    with run_connections(context, source_db, analytical_db) as run:
        return _load_windows(context, config, source_posts_batch, run)


def _load_windows(
    context: dg.AssetExecutionContext,
    config: FilterConfig,
    window: PostWindow | None,
    run: RunConnections,
) -> dg.MaterializeResult:
    """Load the window (and, catching up, the windows after it), then apply the changes."""
    if window is None:
        # filtered_posts alone (the UI's Materialize button, `dagster asset materialize`): no
        # window was planned in this run, and a stored one would be stale.
        context.log.info("No window from source_posts_batch in this run: planning one now.")
        window = plan_window(context, SourceBatchConfig(), run)
        # So that source_posts_batch's page shows the backlog found now, not the last job's.
        context.log_event(dg.AssetMaterialization(SOURCE_POSTS_BATCH, metadata=window.metadata()))
    run.writer.ensure_tables()
    change_cursor = previous_cursor(
        run, ChangeCursor.from_metadata(latest_metadata(context.instance))
    )
    loader = WindowLoader(run, config.require_owner, config.copy_streams, context.log)
    started = time.monotonic()
    load, seconds = _load(context, loader, window)
    # A catch-up run goes on window after window; each committed one is recorded as a
    # materialization with its cursor, so a crash loses at most the window in flight.
    while (
        window.new_rows
        and window.ids_behind_source
        and time.monotonic() - started < config.catch_up_seconds
    ):
        context.log_event(
            dg.AssetMaterialization(
                asset_key=context.asset_key,
                metadata=arranged(
                    {
                        **_window_metadata(window, load, seconds, run),
                        **(change_cursor.metadata() if change_cursor else {}),
                    },
                    _status(context, window),
                ),
            )
        )
        next_window = SourceBatchConfig(batch_size=config.catch_up_batch_size, lookback_ids=0)
        window = plan_window(context, next_window, run)
        load, seconds = _load(context, loader, window)
    settings = config.change_settings()
    changes, _ = read_through_conflicts(
        run,
        context.log,
        "the changes",
        lambda: capture_changes(run, settings, change_cursor, window.cursor_after),
    )
    if changes.index_missing and settings.column:
        context.log.warning("Change capture: %s", missing_index_advice(settings.column))
    if changes.applied is not None:
        read_from = change_cursor.read_from(settings.lookback)[0] if change_cursor else None
        context.log.info(
            "Changes: %d changed rows read from %s on (%d pages); %d updated, %d inserted, %d "
            "now rejected, %d restored; change cursor now %s",
            changes.read,
            read_from,
            changes.pages,
            changes.applied.updated_rows,
            changes.applied.inserted_rows,
            changes.applied.newly_rejected_rows,
            changes.applied.restored_rows,
            changes.cursor.at if changes.cursor else None,
        )
    checks = [
        check_post_ids_are_unique(run.analytical),
        check_backlog(window.ids_behind_source, config),
        *check_daily_results(context.instance),
    ]
    preview = {}
    if load.loaded_rows and window.last_id is not None:
        rows = preview_rows(run.analytical, window.after_id, window.last_id)
        preview["preview"] = markdown_table(copied_columns(posts), rows)
    return dg.MaterializeResult(
        check_results=checks,
        metadata=arranged(
            {**_window_metadata(window, load, seconds, run), **preview, **changes.metadata()},
            _status(context, window),
        ),
    )


def _status(context: dg.AssetExecutionContext, window: PostWindow) -> str:
    """The pipeline's state after `window`, in one line (the pace: since the latest record)."""
    return status_line(
        Progress(
            ids_behind=window.ids_behind_source,
            new_ids=window.new_rows,
            cursor=window.cursor_after,
            replay=window.cursor_origin == REPLAY_ORIGIN,
            source_newest_at=window.source_newest_at,
            previous_cursor=cursor_from_history(context.instance),
            previous_at=cursor_recorded_at(context.instance),
            now=time.time(),
        )
    )


# A wait for the write lock longer than this is logged as a warning.
LOCK_WAIT_WARNING_SECONDS = 1.0


def _load(
    context: dg.AssetExecutionContext, loader: WindowLoader, window: PostWindow
) -> tuple[WindowLoad, float]:
    """Load one window; return what it did and how long it took."""
    started = time.monotonic()
    if window.is_empty:
        load = WindowLoad(lock_wait=loader.run.writer.take_lock_wait())
        context.log.info("Caught up: nothing after id %s; cursor unchanged.", window.after_id)
    else:
        load = loader.load(window)
        context.log.info(
            "Window %s: %s; cursor %s -> %s",
            window.describe(),
            load.describe(),
            window.cursor_before,
            window.cursor_after,
        )
    if load.lock_wait.seconds > LOCK_WAIT_WARNING_SECONDS:
        context.log.warning(
            "Waited %.1f s for the write lock, held by %s; rows it had loaded were found "
            "present and skipped.",
            load.lock_wait.seconds,
            load.lock_wait.holder or "another writer",
        )
    return load, time.monotonic() - started


def _window_metadata(
    window: PostWindow, load: WindowLoad, seconds: float, run: RunConnections
) -> dict[str, Any]:
    """A materialization's metadata: the table's state, the cursor, and the load."""
    return {
        "dagster/table_name": posts.name,
        "dagster/column_schema": column_schema(posts),
        **read_posts_state(run.analytical).metadata(window, replica_status(run.source)),
        **window.cursor_metadata(),
        **load.metadata(seconds),
    }
