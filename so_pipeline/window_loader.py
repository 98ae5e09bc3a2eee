"""Moves one id window from the source into the analytical database.

Rows stream from source COPY to target COPY (see copy_pipe). A window whose new ids all lie
above the analytical table's highest id goes straight into `posts`, split into id ranges that
several connection pairs copy at once when it is large (a catch-up): one COPY is bound by the
single target backend that writes it (on 2 cores, loading 1M posts took 5.3 s with one stream,
4.7 s with two). Everything else (the look-back, replays, rejected rows) is staged and merged
with `ON CONFLICT (id) DO NOTHING`.
"""

import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from types import TracebackType

import psycopg
from psycopg import sql

from so_pipeline.copy_pipe import pipe_copy
from so_pipeline.resources import PostgresResource
from so_pipeline.schema import PIPELINE_LOCK_ID, POST_COLUMNS, REJECTED_COLUMNS
from so_pipeline.source_queries import (
    COPY_KEPT_POSTS,
    COPY_REJECTED_POSTS,
    PostWindow,
    range_params,
    split_id_range,
)

# A window is split into parallel COPY streams only when each would carry at least this many
# rows, so ticks keep to one stream, one transaction and two connections.
MIN_ROWS_PER_STREAM = 50_000

IdRange = tuple[int | None, int]  # (after_id, last_id]: ids after the first, up to the last


@dataclass(frozen=True)
class WindowLoad:
    """What loading one window did."""

    kept_rows: int
    loaded_rows: int
    rejected_rows: int
    newly_rejected_by_reason: dict[str, int]
    wrote_directly: bool
    lock_wait_seconds: float = 0.0
    copy_streams: int = 0

    @property
    def already_present_rows(self) -> int:
        return self.kept_rows - self.loaded_rows

    @property
    def newly_rejected_rows(self) -> int:
        return sum(self.newly_rejected_by_reason.values())


@dataclass(frozen=True)
class _Databases:
    source_db: PostgresResource
    analytical_db: PostgresResource
    require_owner: bool


def load_window(
    source_db: PostgresResource,
    analytical_db: PostgresResource,
    window: PostWindow,
    require_owner: bool,
    copy_streams: int = 1,
) -> WindowLoad:
    """Copy the window's kept posts into `posts` and its rejected ones into `posts_rejected`.

    Loading is idempotent (`ON CONFLICT (id) DO NOTHING`), so a window that is re-read after a
    crash, a replay, a look-back or an overlapping run adds nothing twice. The window commits
    as one transaction, or, split into parallel streams, as one per stream, committed back to
    back once every stream has finished (see README, "Guarantees").
    """
    assert window.last_id is not None
    databases = _Databases(source_db, analytical_db, require_owner)
    with analytical_db.connect() as target, source_db.connect() as source:
        _prepare_source(source)
        with target.transaction(), source.transaction():
            lock_wait = _lock_analytical_writes(target)
            highest_loaded = target.execute("SELECT max(id) FROM posts").fetchone()[0]  # type: ignore[index]
            direct, merged = _plan_ranges(window, highest_loaded)
            ranges = (
                _split(source, direct, window.new_rows, copy_streams) if direct is not None else []
            )
            with ExitStack() as parallel:
                direct_rows = _copy_direct(parallel, source, target, ranges, databases)
                kept = loaded = 0
                if merged:
                    staged = _create_staging_table(target, "posts")
                    for id_range in merged:
                        kept += _copy_kept(source, target, id_range, staged, databases)
                    loaded += _insert_missing(target, "posts", staged, POST_COLUMNS)
                rejected, newly_rejected = _load_rejected_posts(source, target, window, databases)
                written = direct_rows()
            # Parallel streams' transactions have committed (closing `parallel`); this one next.
    return WindowLoad(
        kept_rows=kept + written,
        loaded_rows=loaded + written,
        rejected_rows=rejected,
        newly_rejected_by_reason=newly_rejected,
        wrote_directly=direct is not None,
        lock_wait_seconds=lock_wait,
        copy_streams=max(len(ranges), 1),
    )


def _prepare_source(source: psycopg.Connection) -> None:
    """Read-only snapshot transactions, without parallel query.

    Every source read of a window shares one snapshot, so kept + rejected is exactly the
    window. PostgreSQL expects few rows to pass the kept filter (it cannot see into the
    reject CASE) and plans a parallel scan whose workers hand every row to the leader through
    shared memory: 1.4 s of CPU per 1M posts for nothing, as the COPY is read by one client.
    """
    source.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    source.read_only = True
    source.execute("SET max_parallel_workers_per_gather = 0")


def _lock_analytical_writes(target: psycopg.Connection) -> float:
    """Take the pipeline's advisory lock until commit; return the seconds spent waiting.

    A concurrent run waits here, then finds the window's rows present and adds nothing.
    """
    acquired = target.execute("SELECT pg_try_advisory_xact_lock(%s)", [PIPELINE_LOCK_ID])
    if acquired.fetchone()[0]:  # type: ignore[index]
        return 0.0
    started = time.monotonic()
    target.execute("SELECT pg_advisory_xact_lock(%s)", [PIPELINE_LOCK_ID])
    return time.monotonic() - started


def _plan_ranges(
    window: PostWindow, highest_loaded: int | None
) -> tuple[IdRange | None, list[IdRange]]:
    """(the range COPY can write straight into posts, the ranges to stage and merge)."""
    assert window.last_id is not None
    new_after = window.after_id
    merged: list[IdRange] = []
    if new_after is not None and window.read_after_id != new_after:
        merged.append((window.read_after_id, new_after))  # the look-back
    if new_after is not None and new_after >= window.last_id:
        return None, merged
    if highest_loaded is None or (new_after is not None and new_after >= highest_loaded):
        # Every new id lies above every loaded one, so no conflict is possible: write once.
        # (Another writer would have to bypass the advisory lock to break this; the unique
        # violation would then fail the run, and its retry would take the merge path.)
        return (new_after, window.last_id), merged
    return None, [*merged, (new_after, window.last_id)]


def _split(
    source: psycopg.Connection, id_range: IdRange, rows: int, copy_streams: int
) -> list[IdRange]:
    """`id_range` cut into up to `copy_streams` ranges of about equal row counts."""
    streams = max(1, min(copy_streams, rows // MIN_ROWS_PER_STREAM))
    if streams == 1:
        return [id_range]
    after_id, last_id = id_range
    cuts = split_id_range(source, after_id, last_id, streams, rows)
    return list(zip([after_id, *cuts], [*cuts, last_id], strict=True))


def _copy_kept(
    source: psycopg.Connection,
    target: psycopg.Connection,
    id_range: IdRange,
    table: str | sql.Identifier,
    databases: _Databases,
) -> int:
    params = range_params(*id_range, databases.require_owner)
    return pipe_copy(source, COPY_KEPT_POSTS, params, target, table, POST_COLUMNS)


def _copy_direct(
    parallel: ExitStack,
    source: psycopg.Connection,
    target: psycopg.Connection,
    ranges: list[IdRange],
    databases: _Databases,
) -> Callable[[], int]:
    """Start copying `ranges` straight into posts; return the wait for their row count.

    One range is copied at once on the main connection pair. Several are copied each on its
    own pair, in its own thread, while the main pair goes on with the rest of the window:
    every pair reads the main source transaction's snapshot and writes in a transaction that
    `parallel` commits when it closes without error (rolls back otherwise), before the main
    transaction commits and releases the advisory lock.
    """
    if len(ranges) <= 1:
        rows = sum(_copy_kept(source, target, id_range, "posts", databases) for id_range in ranges)
        return lambda: rows
    snapshot = source.execute("SELECT pg_export_snapshot()").fetchone()[0]  # type: ignore[index]
    pairs = [_open_pair(parallel, databases, snapshot) for _ in ranges]
    pool = parallel.enter_context(ThreadPoolExecutor(len(ranges), "so_pipeline-copy"))
    parallel.push(_CancelOnError(pairs))  # exits first: a failure stops the other streams
    copies = [
        pool.submit(_copy_kept, pair_source, pair_target, id_range, "posts", databases)
        for (pair_source, pair_target), id_range in zip(pairs, ranges, strict=True)
    ]
    return lambda: _sum_rows(copies)


def _sum_rows(copies: list[Future[int]]) -> int:
    """Rows written by all `copies`; the first failure is raised as soon as it happens."""
    wait(copies, return_when=FIRST_EXCEPTION)
    return sum(copy.result() for copy in copies)


def _open_pair(
    parallel: ExitStack, databases: _Databases, snapshot: str
) -> tuple[psycopg.Connection, psycopg.Connection]:
    target = parallel.enter_context(databases.analytical_db.connect())
    source = parallel.enter_context(databases.source_db.connect())
    _prepare_source(source)
    parallel.enter_context(target.transaction())
    parallel.enter_context(_snapshot_transaction(source, snapshot))
    return source, target


@contextmanager
def _snapshot_transaction(source: psycopg.Connection, snapshot: str) -> Iterator[None]:
    with source.transaction():
        source.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        yield


class _CancelOnError:
    """Exit callback: on an error, cancel the queries of every parallel connection."""

    def __init__(self, pairs: list[tuple[psycopg.Connection, psycopg.Connection]]) -> None:
        self._connections = [connection for pair in pairs for connection in pair]

    def __call__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if error_type is not None:
            for connection in self._connections:
                connection.cancel_safe()
        return False


def _load_rejected_posts(
    source: psycopg.Connection,
    target: psycopg.Connection,
    window: PostWindow,
    databases: _Databases,
) -> tuple[int, dict[str, int]]:
    """Merge the window's rejected rows; return (rows rejected, new rejections by reason)."""
    assert window.last_id is not None
    params = range_params(window.read_after_id, window.last_id, databases.require_owner)
    staged = _create_staging_table(target, "posts_rejected")
    rejected = pipe_copy(source, COPY_REJECTED_POSTS, params, target, staged, REJECTED_COLUMNS)
    column_list = sql.SQL(", ").join(map(sql.Identifier, REJECTED_COLUMNS))
    counts = target.execute(
        sql.SQL(
            "WITH inserted AS (INSERT INTO posts_rejected ({columns}) SELECT {columns} FROM "
            "{staged} ON CONFLICT (id) DO NOTHING RETURNING reason) "
            "SELECT reason, count(*) FROM inserted GROUP BY reason"
        ).format(columns=column_list, staged=staged)
    ).fetchall()
    return rejected, dict(counts)  # type: ignore[arg-type]


def _create_staging_table(target: psycopg.Connection, table: str) -> sql.Identifier:
    """A temporary twin of `table`, dropped at commit."""
    staged = sql.Identifier(f"{table}_incoming")
    target.execute(
        sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP").format(
            staged, sql.Identifier(table)
        )
    )
    return staged


def _insert_missing(
    target: psycopg.Connection, table: str, staged: sql.Identifier, columns: tuple[str, ...]
) -> int:
    column_list = sql.SQL(", ").join(map(sql.Identifier, columns))
    cursor = target.execute(
        sql.SQL(
            "INSERT INTO {table} ({columns}) SELECT {columns} FROM {staged} "
            "ON CONFLICT (id) DO NOTHING"
        ).format(table=sql.Identifier(table), columns=column_list, staged=staged)
    )
    return cursor.rowcount
