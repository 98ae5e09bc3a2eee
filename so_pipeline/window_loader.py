"""Moves one id window from the source into the analytical database.

Rows stream from source COPY to target COPY (see copy_pipe). A window whose new ids all lie
above the analytical table's highest id goes straight into `posts`, split into id ranges that
several connection pairs copy at once when it is large (a catch-up): one COPY is bound by the
single target backend that writes it (on 2 cores, loading 1M posts took 5.3 s with one stream,
4.7 s with two). Each of those streams sets its rejected rows aside (in a temporary file past
1 MB) while it reads; the main pair copies them after. Everything else (the look-back,
replays) is staged and merged with `ON CONFLICT (id) DO NOTHING`.
"""

import time
from collections import Counter
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, as_completed, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from tempfile import SpooledTemporaryFile
from types import TracebackType
from typing import IO, Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

from so_pipeline import analytical_posts as analytical
from so_pipeline.copy_pipe import PIPE_CHUNK_BYTES, copy_in_from_file, pipe_copy, split_copy
from so_pipeline.core_sql import scalar, server_encoding
from so_pipeline.metadata import labels, numbers
from so_pipeline.post_rules import RejectReason, rule_params
from so_pipeline.resources import PostgresResource
from so_pipeline.source_posts import (
    COPY_CLASSIFIED_POSTS,
    COPY_SPLIT_POSTS,
    SPLIT_COLUMNS,
    range_params,
    split_id_range,
)
from so_pipeline.window import IdRange, PostWindow, cut_ranges, plan_load, stream_count

# A window is split into parallel COPY streams only when each would carry at least this many
# rows, so ticks keep to one stream, one transaction and two connections.
MIN_ROWS_PER_STREAM = 50_000

# Below every id: what posts holds at most when it is empty.
_MIN_BIGINT = -(2**63)

_COPY_INTO_POSTS = analytical.copy_in(analytical.posts, analytical.copied_columns(analytical.posts))

# A stream's rejected rows stay in memory up to this size, then go to a temporary file.
REJECTED_IN_MEMORY_BYTES = 4 * PIPE_CHUNK_BYTES


@dataclass(frozen=True)
class WindowLoad:
    """What loading one window did."""

    kept_rows: int = 0
    loaded_rows: int = 0
    updated_rows: int = 0  # kept rows re-read with new values (an edit, a fix at the source)
    restored_rows: int = 0  # soft-deleted rows found at the source again
    rejected_rows: int = 0
    newly_rejected_by_reason: dict[str, int] = field(default_factory=dict)
    wrote_directly: bool = False
    lock_wait_seconds: float = 0.0
    copy_streams: int = 0

    @property
    def already_present_rows(self) -> int:
        """Kept rows re-read and found in posts with the same values."""
        return self.kept_rows - self.loaded_rows - self.updated_rows

    @property
    def newly_rejected_rows(self) -> int:
        return sum(self.newly_rejected_by_reason.values())

    @property
    def rows_read(self) -> int:
        return self.kept_rows + self.rejected_rows

    def describe(self) -> str:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.newly_rejected_by_reason.items()))
        return (
            f"{self.rows_read} posts read, {self.loaded_rows} loaded, "
            f"{self.already_present_rows} already present, {self.newly_rejected_rows} newly "
            f"rejected{f' ({reasons})' if reasons else ''}"
        )

    def metadata(self, seconds: float) -> dict[str, Any]:
        """What `filtered_posts` records about the load, `seconds` being its duration."""
        return {
            "load_path": "direct COPY" if self.wrote_directly else "staged merge",
            **labels({"copy_streams": self.copy_streams}),
            **numbers(
                {
                    "rows_read": self.rows_read,
                    "rows_loaded": self.loaded_rows,
                    "rows_already_present": self.already_present_rows,
                    "rows_updated": self.updated_rows,
                    "rows_restored": self.restored_rows,
                    "rows_rejected": self.newly_rejected_rows,
                    "rows_already_rejected": self.rejected_rows - self.newly_rejected_rows,
                    **{
                        f"rejected_{reason}": self.newly_rejected_by_reason.get(reason, 0)
                        for reason in RejectReason
                    },
                    "duration_seconds": round(seconds, 3),
                    "lock_wait_seconds": round(self.lock_wait_seconds, 3),
                    "rows_per_second": round(self.rows_read / seconds) if self.rows_read else None,
                }
            ),
        }


def prepare_source_reads(source: psycopg.Connection) -> None:
    """Read-only snapshot transactions, without parallel query.

    Every source read of a window shares one snapshot, so kept + rejected is exactly the
    window. PostgreSQL expects few rows to pass the kept filter (it cannot see into the
    reject CASE) and plans a parallel scan whose workers hand every row to the leader through
    shared memory: 1.4 s of CPU per 1M posts for nothing, as the COPY is read by one client.
    """
    source.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    source.read_only = True
    source.execute("SET max_parallel_workers_per_gather = 0")


class WindowLoader:
    """Loads windows from `source_db` into `analytical_db` under the rules' parameters."""

    def __init__(
        self,
        source_db: PostgresResource,
        analytical_db: PostgresResource,
        require_owner: bool,
        copy_streams: int = 1,
    ) -> None:
        self.source_db = source_db
        self.analytical_db = analytical_db
        self.require_owner = require_owner
        self.copy_streams = copy_streams
        self._rules = rule_params(require_owner)  # set again for the source's encoding

    def load(self, window: PostWindow) -> WindowLoad:
        """Copy the window's kept posts into `posts` and its rejected ones into `posts_rejected`.

        Loading is idempotent (`ON CONFLICT (id) DO NOTHING`), so a window that is re-read
        after a crash, a replay, a look-back or an overlapping run adds nothing twice. The
        window commits as one transaction, or, split into parallel streams, as one per stream,
        committed back to back once every stream has finished (see README, "Guarantees").
        """
        assert window.last_id is not None
        with self.analytical_db.connect() as target, self.source_db.connect() as source:
            self._rules = rule_params(self.require_owner, server_encoding(source))
            prepare_source_reads(source)
            with target.transaction(), source.transaction():
                lock_wait = _lock_analytical_writes(target)
                posts_max_id = analytical.highest_loaded_id(target)
                plan = plan_load(window, posts_max_id)
                ranges = [] if plan.direct is None else self._cut(source, plan.direct, window)
                # The direct range's rejected rows go straight into posts_rejected too when it
                # holds none of its ids (a catch-up): nothing to stage, merge or look up.
                direct_rejects = (
                    plan.direct
                    if plan.direct and not analytical.holds_rejected_ids(target, *plan.direct)
                    else None
                )
                with _DirectCopy(self, source, target, ranges) as direct:
                    staged = analytical.create_classified_staging(target)
                    for id_range in plan.merged:
                        self._stage(source, target, id_range, staged)
                    if plan.direct is not None:
                        into = analytical.posts_rejected if direct_rejects else staged
                        direct.copy_rejected(analytical.copy_in(into.name, SPLIT_COLUMNS))
                # 1. Leaving that block committed the parallel streams (they had all finished),
                # each with its rows added to the row count. Only now may the main transaction
                # write the counts (a stream waiting on its row lock would wait forever).
                newly_rejected: Counter[str] = Counter()
                if direct_rejects:
                    newly_rejected.update(analytical.count_copied_rejected(target, *direct_rejects))
                elif plan.direct is not None:
                    # No id the direct COPY wrote may stay in posts_rejected (looked up before
                    # the staged rejected rows arrive there, so among earlier ones only).
                    analytical.drop_rejected_twins(target, *plan.direct)
                applied = analytical.apply_classified(
                    target, staged, _MIN_BIGINT if posts_max_id is None else posts_max_id
                )
                analytical.add_to_row_count(target, applied.inserted_rows + direct.main_pair_rows)
                copied_rejected_rows = newly_rejected.total()
                newly_rejected.update(applied.newly_rejected_by_reason)
            # 2. Leaving this block committed the main transaction, releasing the lock last.
        return WindowLoad(
            kept_rows=applied.kept_rows + direct.rows,
            loaded_rows=applied.inserted_rows + direct.rows,
            updated_rows=applied.updated_rows,
            restored_rows=applied.restored_rows,
            rejected_rows=applied.rejected_rows + copied_rejected_rows,
            newly_rejected_by_reason=dict(newly_rejected),
            wrote_directly=plan.direct is not None,
            lock_wait_seconds=lock_wait,
            copy_streams=max(len(ranges), 1),
        )

    def _cut(
        self, source: psycopg.Connection, id_range: IdRange, window: PostWindow
    ) -> list[IdRange]:
        """`id_range` cut into up to `copy_streams` ranges of about equal row counts."""
        streams = stream_count(window.new_rows, self.copy_streams, MIN_ROWS_PER_STREAM)
        if streams == 1:
            return [id_range]
        cuts = split_id_range(source, *id_range, streams, window.new_rows)
        return cut_ranges(id_range, cuts)

    def copy_kept(
        self,
        source: psycopg.Connection,
        target: psycopg.Connection,
        id_range: IdRange,
        rejected: IO[bytes],
    ) -> tuple[int, int]:
        """Copy the kept posts of `id_range` straight into `posts`, and write its rejected ones
        to `rejected` as COPY data (reason first); return how many of each."""
        params = range_params(*id_range, self._rules)
        kept_columns = len(SPLIT_COLUMNS) - 1
        return split_copy(
            source, COPY_SPLIT_POSTS, params, target, _COPY_INTO_POSTS, rejected, kept_columns
        )

    def _stage(
        self,
        source: psycopg.Connection,
        target: psycopg.Connection,
        id_range: IdRange,
        staged: sa.Table,
    ) -> int:
        """Copy every row of `id_range`, classified (reason NULL when kept), into `staged`."""
        params = range_params(*id_range, self._rules)
        copy_in = analytical.copy_in(staged.name, analytical.CLASSIFIED_COLUMNS)
        return pipe_copy(source, COPY_CLASSIFIED_POSTS, params, target, copy_in)

    def open_stream_pair(
        self, connections: ExitStack, snapshot: str
    ) -> tuple[psycopg.Connection, psycopg.Connection]:
        """A (source, target) pair for one parallel stream, each in its own transaction.

        The source reads `snapshot` (the main source transaction's); the target's transaction
        stays open until `_DirectCopy` commits it. Both close with `connections`.
        """
        target = connections.enter_context(self.analytical_db.connect())
        source = connections.enter_context(self.source_db.connect())
        prepare_source_reads(source)
        source.autocommit = target.autocommit = False
        source.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        return source, target


class _DirectCopy:
    """Copies id ranges straight into `posts` while the main pair loads the rest of the window.

    One range is copied at once on the main pair, in the main transaction. Several are copied
    each on its own connection pair, in its own thread and transaction, reading the main
    source transaction's snapshot. Every range's rejected rows are set aside for
    `copy_rejected`, which the main pair copies as each stream finishes. Leaving the block
    without error waits for every stream, then commits their transactions one after the
    other; the caller's main transaction, which holds the advisory lock, commits after them.
    On an error every stream's query is cancelled and its transaction rolled back (closing an
    uncommitted connection does it).
    """

    def __init__(
        self,
        loader: WindowLoader,
        source: psycopg.Connection,
        target: psycopg.Connection,
        ranges: list[IdRange],
    ) -> None:
        self._loader = loader
        self._source = source
        self._target = target
        self._ranges = ranges
        self._connections = ExitStack()
        self._rejected: list[IO[bytes]] = [
            self._connections.enter_context(
                SpooledTemporaryFile(REJECTED_IN_MEMORY_BYTES)  # noqa: SIM115 (the stack closes it)
            )
            for _ in ranges
        ]
        self._pairs: list[tuple[psycopg.Connection, psycopg.Connection]] = []
        # One per range, in range order: (kept rows copied, rejected rows set aside).
        self._copies: list[Future[tuple[int, int]]] = []
        self.main_pair_rows = 0

    @property
    def rows(self) -> int:
        """Kept rows copied into posts (once the block is left)."""
        return sum(kept for kept, _ in (copy.result() for copy in self._copies))

    def __enter__(self) -> "_DirectCopy":
        try:
            self._start()
        except BaseException:
            self._connections.close()  # __exit__ is not called when __enter__ fails
            raise
        return self

    def _start(self) -> None:
        if len(self._ranges) == 1:
            copied: Future[tuple[int, int]] = Future()
            copied.set_result(
                self._loader.copy_kept(
                    self._source, self._target, self._ranges[0], self._rejected[0]
                )
            )
            self._copies = [copied]
            self.main_pair_rows = self.rows
        elif self._ranges:
            snapshot = scalar(self._source, sa.select(sa.func.pg_export_snapshot()))
            self._pairs = [
                self._loader.open_stream_pair(self._connections, snapshot) for _ in self._ranges
            ]
            pool = self._connections.enter_context(
                ThreadPoolExecutor(len(self._pairs), "so_pipeline-copy")
            )
            self._copies = [
                pool.submit(self._loader.copy_kept, source, target, id_range, rejected)
                for (source, target), id_range, rejected in zip(
                    self._pairs, self._ranges, self._rejected, strict=True
                )
            ]

    def copy_rejected(self, copy_in: sql.Composed) -> None:
        """Copy every range's rejected rows through `copy_in` on the main pair, each range's
        as soon as its copy is done (a failed stream raises here at once)."""
        rejected_of = dict(zip(self._copies, self._rejected, strict=True))
        for copy in as_completed(self._copies):
            _, rejected_rows = copy.result()
            if rejected_rows:
                rejected_of[copy].seek(0)
                copy_in_from_file(self._target, copy_in, rejected_of[copy])

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        # Closing the stack waits for the threads, then closes every connection and file.
        with self._connections:
            committed = False
            try:
                if error_type is None and self._pairs:
                    wait(self._copies, return_when=FIRST_EXCEPTION)  # a failure, at once
                    for (_, target), copy in zip(self._pairs, self._copies, strict=True):
                        analytical.add_to_row_count(target, copy.result()[0])
                        target.commit()
                committed = True
            finally:
                if not committed or error_type is not None:
                    for connection in (c for pair in self._pairs for c in pair):
                        connection.cancel_safe()


def _lock_analytical_writes(target: psycopg.Connection) -> float:
    """Take the pipeline's advisory lock until commit; return the seconds spent waiting.

    A concurrent run waits here, then finds the window's rows present and adds nothing.
    """
    if analytical.lock_writes(target):
        return 0.0
    started = time.monotonic()
    analytical.wait_for_lock(target)
    return time.monotonic() - started
