"""Moves one id window from the source into the analytical database.

Rows stream from source COPY to target COPY (see copy_pipe). A window whose new ids all lie
above the analytical table's highest id goes straight into `posts`, split into id ranges that
several connection pairs copy at once when it is large (a catch-up): one COPY is bound by the
single target backend that writes it (on 2 cores, loading 1M posts took 5.3 s with one stream,
4.7 s with two). Each of those streams sets its rejected rows aside (in a temporary file past
1 MB) while it reads; the main pair copies them after. Everything else (the look-back,
replays) is staged and merged by posts_merge.

Commit order: the parallel streams commit one after the other once every one has finished,
each with its rows counted; then the main transaction, which holds the write lock, counts and
merges the rest and commits last. A crash before the last commit leaves the cursor where it
was, and the window's re-read finds the committed rows present (see README, "Guarantees").
A read that a read replica cancels is read again whole (see source_replica).
"""

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, as_completed, wait
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from tempfile import SpooledTemporaryFile
from types import TracebackType
from typing import IO, Any

import psycopg
import sqlalchemy as sa

from so_pipeline.analytical_reads import highest_loaded_id
from so_pipeline.copy_pipe import PIPE_CHUNK_BYTES, split_copy
from so_pipeline.core_sql import scalar
from so_pipeline.metadata import labels, numbers
from so_pipeline.post_rules import RejectReason
from so_pipeline.posts_merge import COPY_INTO_POSTS, LockWait, add_to_row_count
from so_pipeline.run_connections import RunConnections, start_snapshot_read
from so_pipeline.source_posts import (
    COPY_CLASSIFIED_POSTS,
    COPY_SPLIT_POSTS,
    SPLIT_COLUMNS,
    range_params,
    split_id_range,
)
from so_pipeline.source_replica import read_through_conflicts
from so_pipeline.window import (
    CURSOR_METADATA_KEY,
    IdRange,
    PostWindow,
    cut_ranges,
    plan_load,
    stream_count,
)

# A window is split into parallel COPY streams only when each would carry at least this many
# rows, so ticks keep to one stream, one transaction and two connections.
MIN_ROWS_PER_STREAM = 50_000

# Below every id: what posts holds at most when it is empty.
_MIN_BIGINT = -(2**63)

# Where a loader logs when no step's log is given (tests, tools).
_LOG = logging.getLogger(__name__)

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
    lock_wait: LockWait = LockWait()
    copy_streams: int = 0
    reads_cancelled: int = 0  # by a read replica (recovery conflicts), each read again

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
        """What the load did, in figures that add up to the rows read."""
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(self.newly_rejected_by_reason.items()))
        already_rejected = self.rejected_rows - self.newly_rejected_rows
        unchanged = self.already_present_rows + already_rejected
        return (
            f"{self.rows_read} posts read = {self.loaded_rows} loaded + {self.updated_rows} "
            f"updated + {self.newly_rejected_rows} rejected{f' ({reasons})' if reasons else ''}"
            f" + {unchanged} re-read unchanged ({self.already_present_rows} already loaded, "
            f"{already_rejected} already rejected: the look-back, a replay or a retry)"
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
                    "lock_wait_seconds": round(self.lock_wait.seconds, 3),
                    "source_reads_cancelled": self.reads_cancelled,
                    "rows_per_second": round(self.rows_read / seconds) if self.rows_read else None,
                }
            ),
        }


class WindowLoader:
    """Loads windows over a run's connections under the rules' parameters."""

    def __init__(
        self,
        run: RunConnections,
        require_owner: bool,
        copy_streams: int = 1,
        log: logging.Logger = _LOG,
    ) -> None:
        self.run = run
        self.rules = run.rules(require_owner)
        self.copy_streams = copy_streams
        self.log = log

    def load(self, window: PostWindow) -> WindowLoad:
        """Copy the window's kept posts into `posts` and its rejected ones into `posts_rejected`.

        Loading is idempotent, so a window that is re-read after a crash, a replay, a look-back
        or an overlapping run adds nothing twice. A read that the source (a read replica)
        cancels is read again, up to source_replica.MAX_READS times in all.
        """
        what = f"window {window.describe()}"
        load, cancelled = read_through_conflicts(
            self.run, self.log, what, lambda: self._load(window)
        )
        return replace(load, reads_cancelled=cancelled)

    def _load(self, window: PostWindow) -> WindowLoad:
        """One read of the window; a source read that fails leaves nothing of it committed."""
        source = self.run.source
        with self.run.writer.transaction() as merge, _snapshot_read(source, self.log):
            posts_max_id = highest_loaded_id(merge.connection)
            plan = plan_load(window, posts_max_id)
            ranges = [] if plan.direct is None else self._cut(plan.direct, window.new_rows)
            # The direct range's rejected rows go straight into posts_rejected when it holds
            # none of its ids (a catch-up): nothing to stage, merge or look up.
            rejects_direct = plan.direct is not None and not merge.holds_rejected_ids(plan.direct)
            with _DirectCopy(self.run, ranges, self.rules) as direct:
                for id_range in plan.merged:
                    merge.stage(source, COPY_CLASSIFIED_POSTS, range_params(id_range, self.rules))
                set_aside = merge.copy_rejected_data if rejects_direct else merge.stage_copy_data
                direct.copy_rejected(lambda data: set_aside(data, SPLIT_COLUMNS))
            newly_rejected: Counter[str] = Counter()
            if rejects_direct and plan.direct is not None:
                newly_rejected.update(merge.count_rejected_in(plan.direct))
            elif plan.direct is not None:
                # No id the direct COPY wrote may stay in posts_rejected (looked up before the
                # staged rejected rows arrive there, so among earlier ones only).
                merge.drop_rejected_twins(plan.direct)
            copied_rejected_rows = newly_rejected.total()
            merge.count_new_posts(direct.main_pair_rows)
            applied = merge.apply(_MIN_BIGINT if posts_max_id is None else posts_max_id)
            newly_rejected.update(applied.newly_rejected_by_reason)
            if window.cursor_after is not None:
                merge.record(CURSOR_METADATA_KEY, str(window.cursor_after))
        return WindowLoad(
            kept_rows=applied.kept_rows + direct.rows,
            loaded_rows=applied.inserted_rows + direct.rows,
            updated_rows=applied.updated_rows,
            restored_rows=applied.restored_rows,
            rejected_rows=applied.rejected_rows + copied_rejected_rows,
            newly_rejected_by_reason=dict(newly_rejected),
            wrote_directly=plan.direct is not None,
            lock_wait=self.run.writer.take_lock_wait(),
            copy_streams=max(len(ranges), 1),
        )

    def _cut(self, id_range: IdRange, new_rows: int) -> list[IdRange]:
        """`id_range` cut into up to `copy_streams` ranges of about equal row counts."""
        streams = stream_count(new_rows, self.copy_streams, MIN_ROWS_PER_STREAM)
        if streams == 1:
            return [id_range]
        return cut_ranges(id_range, split_id_range(self.run.source, id_range, streams, new_rows))


@contextmanager
def _snapshot_read(source: psycopg.Connection, log: logging.Logger) -> Iterator[None]:
    """The source's window transaction (see start_snapshot_read), whose end cannot fail the
    window once every read in it has succeeded.

    A read replica ends a session idle in a transaction that holds back its replay: the main
    source connection sits idle while the parallel streams copy, and may be ended after every
    row has been read and the streams have committed. The rows it read came whole from one
    snapshot, and a read-only transaction has nothing to commit: failing the window then would
    leave the streams' rows committed without the rest of the window.
    """
    read = False
    try:
        with source.transaction():
            start_snapshot_read(source)
            yield
            read = True
    except psycopg.Error as error:
        if not read:
            raise
        log.warning(
            "The source ended the window's read transaction after every read in it was done "
            "(on a read replica: a recovery conflict); nothing was lost: %s",
            " ".join(str(error).split()),
        )


class _DirectCopy:
    """Copies id ranges straight into `posts` while the main pair loads the rest of the window.

    One range is copied at once on the main pair, in the main transaction. Several are copied
    each on its own connection pair, in its own thread and transaction, reading the main
    source transaction's snapshot. Every range's rejected rows are set aside for
    `copy_rejected`, which the main pair copies as each stream finishes. Leaving the block
    without error waits for every stream, then commits their transactions one after the
    other. On an error every stream's query is cancelled and its transaction rolled back
    (closing an uncommitted connection does it).
    """

    def __init__(self, run: RunConnections, ranges: list[IdRange], rules: dict[str, object]):
        self._run = run
        self._ranges = ranges
        self._rules = rules
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

    def _copy(
        self,
        source: psycopg.Connection,
        target: psycopg.Connection,
        id_range: IdRange,
        rejected: IO[bytes],
    ) -> tuple[int, int]:
        """COPY the range's kept posts into `posts`, its rejected ones into `rejected`."""
        params = range_params(id_range, self._rules)
        kept_columns = len(SPLIT_COLUMNS) - 1
        return split_copy(
            source, COPY_SPLIT_POSTS, params, target, COPY_INTO_POSTS, rejected, kept_columns
        )

    def _start(self) -> None:
        if len(self._ranges) == 1:
            copied: Future[tuple[int, int]] = Future()
            run = self._run
            copied.set_result(
                self._copy(run.source, run.analytical, self._ranges[0], self._rejected[0])
            )
            self._copies = [copied]
            self.main_pair_rows = self.rows
        elif self._ranges:
            snapshot = scalar(self._run.source, sa.select(sa.func.pg_export_snapshot()))
            try:
                self._pairs = [
                    self._run.open_stream_pair(self._connections, snapshot) for _ in self._ranges
                ]
            except psycopg.errors.InvalidParameterValue:
                # The snapshot went with the transaction that exported it: raise what ended
                # that (a read replica ends a session idle in a transaction on a conflict).
                self._run.source.execute("SELECT 1")
                raise
            pool = self._connections.enter_context(
                ThreadPoolExecutor(len(self._pairs), "so_pipeline-copy")
            )
            self._copies = [
                pool.submit(self._copy, source, target, id_range, rejected)
                for (source, target), id_range, rejected in zip(
                    self._pairs, self._ranges, self._rejected, strict=True
                )
            ]

    def copy_rejected(self, copy: Callable[[IO[bytes]], object]) -> None:
        """Hand every range's rejected rows (binary COPY data) to `copy` on the main pair,
        each range's as soon as its copy is done (a failed stream raises here at once)."""
        rejected_of = dict(zip(self._copies, self._rejected, strict=True))
        for done in as_completed(self._copies):
            _, rejected_rows = done.result()
            if rejected_rows:
                rejected_of[done].seek(0)
                copy(rejected_of[done])

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
                        add_to_row_count(target, copy.result()[0])
                        target.commit()
                committed = True
            finally:
                if not committed or error_type is not None:
                    for connection in (c for pair in self._pairs for c in pair):
                        connection.cancel_safe()
