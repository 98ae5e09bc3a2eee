"""The two assets: pick the next id window of the source, then load its valid posts."""

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import dagster as dg
from pydantic import Field

from so_pipeline.cursor import CURSOR_METADATA_KEY, current_cursor, latest_metadata
from so_pipeline.post_rules import RejectReason
from so_pipeline.resources import PostgresResource
from so_pipeline.schema import check_source_table, ensure_analytical_tables, posts_table
from so_pipeline.source_queries import (
    SOURCE_TABLE,
    PostWindow,
    next_window_bounds,
    source_max_id,
)
from so_pipeline.table_stats import count_posts, loaded_posts_preview
from so_pipeline.window_checks import (
    BacklogLimits,
    check_backlog,
    check_post_ids_are_unique,
    window_check_specs,
)
from so_pipeline.window_loader import MIN_ROWS_PER_STREAM, WindowLoad, load_window

# 100k posts (~120 MB of source data) take a few seconds per tick and keep each transaction
# short; raise it for a catch-up run, memory does not grow with it.
DEFAULT_BATCH_SIZE = 100_000

# Ids are handed out at INSERT and become visible at COMMIT, so a slow transaction can land
# below the cursor. On Stack Overflow 1,000 ids span hours of posting: far longer than any
# insert transaction, and re-reading them costs milliseconds.
DEFAULT_LOOKBACK_IDS = 1_000


# One COPY is bound by the target backend that writes it; with two, a 1M-post catch-up run
# took 6.2 s instead of 6.8 s on 2 cores (benchmarks/last_run.txt). More help only where the
# analytical server has cores to spare. Each stream holds ~4 MB of buffers: at most 8 keep a
# run under 200 MB (8: 167 MB, 16: 204 MB on a 1M-post window).
DEFAULT_COPY_STREAMS = 2


def _asset(**options: Any) -> Callable[[Callable[..., Any]], dg.AssetsDefinition]:
    """`dg.asset` with what both assets share."""
    return dg.asset(
        kinds={"postgres"},
        group_name="stackoverflow",
        owners=["team:data-engineering"],
        # Transient errors (a dropped connection, a serialization failure) are retried after
        # 1, 2 and 4 s; permanent ones raise dg.Failure(allow_retries=False) and fail at once.
        retry_policy=dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL),
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


def _numbers(values: dict[str, int | float | None]) -> dict[str, int | float]:
    """Metadata keeps numbers as numbers (so the UI can plot them) and leaves out unknowns."""
    return {key: value for key, value in values.items() if value is not None}


@_asset()
def source_posts_batch(
    context: dg.AssetExecutionContext,
    config: SourceBatchConfig,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
) -> dg.Output[PostWindow]:
    """The next window of source post ids after the cursor (its bounds, not its rows)."""
    check_source_table(source_db, SOURCE_TABLE)
    cursor, cursor_origin = current_cursor(context.instance, analytical_db)
    if config.start_after_id is None:
        after_id = cursor
        read_after_id = None if cursor is None else cursor - config.lookback_ids
    else:
        after_id = read_after_id = config.start_after_id
        cursor_origin = "start_after_id (replay)"
    new_rows, first_id, last_new_id = next_window_bounds(source_db, after_id, config.batch_size)
    highest_source_id = source_max_id(source_db)
    window = PostWindow(
        read_after_id=read_after_id,
        after_id=after_id,
        last_id=last_new_id if last_new_id is not None else after_id,
        cursor_before=cursor,
        new_rows=new_rows,
        source_max_id=highest_source_id,
    )
    context.log.info(
        f"Window ({window.read_after_id}, {window.last_id}]: {new_rows} new posts after id "
        f"{after_id} (cursor from {cursor_origin}); source max id {highest_source_id}"
    )
    return dg.Output(
        window,
        metadata={
            "cursor_origin": cursor_origin,
            **_numbers(
                {
                    "cursor_before": cursor,
                    "window_after_id": after_id,
                    "lookback_after_id": read_after_id,
                    "window_first_id": first_id,
                    "window_last_id": window.last_id,
                    "rows_in_window": new_rows,
                    "dagster/row_count": new_rows,
                    "source_max_id": highest_source_id,
                    "ids_behind_source": window.ids_behind_source,
                }
            ),
        },
    )


@_asset(
    check_specs=window_check_specs("filtered_posts"),
    # Shown on the asset's page: warn after an hour (four ticks) without a new
    # materialization, fail after three.
    freshness_policy=dg.FreshnessPolicy.time_window(
        warn_window=timedelta(hours=1), fail_window=timedelta(hours=3)
    ),
)
def filtered_posts(
    context: dg.AssetExecutionContext,
    config: FilterConfig,
    source_posts_batch: PostWindow,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
) -> dg.MaterializeResult:
    """Posts of the window with a non-empty body, loaded into the analytical `posts` table.

    Rejected posts go to `posts_rejected` with their reason. `last_processed_id` in this
    asset's metadata is the pipeline's cursor.
    """
    window = source_posts_batch
    ensure_analytical_tables(analytical_db)
    # The running total of rows in posts; counted (once) before loading when unknown, which
    # costs nothing on a new table, instead of scanning what this window just wrote.
    rows_before = latest_metadata(context.instance).get("dagster/row_count")
    if rows_before is None:
        rows_before = count_posts(analytical_db)
    started = time.monotonic()
    if window.is_empty:
        load = WindowLoad(0, 0, 0, {}, wrote_directly=False)
        context.log.info(f"Caught up: nothing after id {window.after_id}; cursor unchanged.")
    else:
        load = load_window(
            source_db, analytical_db, window, config.require_owner, config.copy_streams
        )
    seconds = time.monotonic() - started
    # A replay of an older range must not move the cursor back over work already done.
    cursor_after = max(
        (i for i in (window.cursor_before, window.last_id) if i is not None), default=None
    )
    rows_read = load.kept_rows + load.rejected_rows
    if load.lock_wait_seconds:
        context.log.warning(
            f"Waited {load.lock_wait_seconds:.1f} s for another run holding the load lock; "
            "rows it had loaded were found present and skipped."
        )
    if not window.is_empty:
        context.log.info(
            f"Window ({window.read_after_id}, {window.last_id}]: {rows_read} posts read, "
            f"{load.loaded_rows} loaded, {load.already_present_rows} already present, "
            f"{load.newly_rejected_rows} newly rejected {load.newly_rejected_by_reason or ''}; "
            f"cursor {window.cursor_before} -> {cursor_after}"
        )
    checks = [
        check_post_ids_are_unique(analytical_db),
        check_backlog(window.ids_behind_source, config),
    ]
    preview = {}
    if load.loaded_rows and window.last_id is not None:
        preview["preview"] = loaded_posts_preview(analytical_db, window.after_id, window.last_id)
    return dg.MaterializeResult(
        check_results=checks,
        metadata={
            "dagster/table_name": "posts",
            "dagster/column_schema": _posts_column_schema(),
            "dagster/row_count": rows_before + load.loaded_rows,
            "load_path": "direct COPY" if load.wrote_directly else "staged merge",
            **preview,
            **_numbers(
                {
                    CURSOR_METADATA_KEY: cursor_after,
                    "cursor_before": window.cursor_before,
                    "window_after_id": window.after_id,
                    "window_last_id": window.last_id,
                    "rows_read": rows_read,
                    "rows_loaded": load.loaded_rows,
                    "rows_already_present": load.already_present_rows,
                    "rows_rejected": load.newly_rejected_rows,
                    **{
                        f"rejected_{reason}": load.newly_rejected_by_reason.get(reason, 0)
                        for reason in RejectReason
                    },
                    "duration_seconds": round(seconds, 3),
                    "lock_wait_seconds": round(load.lock_wait_seconds, 3),
                    "copy_streams": load.copy_streams,
                    "rows_per_second": round(rows_read / seconds) if rows_read else None,
                }
            ),
        },
    )


def _posts_column_schema() -> dg.TableSchema:
    return dg.TableSchema(
        columns=[
            dg.TableColumn(column.name, str(column.type).lower()) for column in posts_table.columns
        ]
    )
