"""The daily safety net: compare the copy with the source, value for value, and repair it.

Ids, every bucket, every day: per bucket of ids both sides give a count and an
order-independent digest of their ids (the sum of PostgreSQL's `hashint8`), read from the
primary-key indexes (no bodies). A deletion and a late row in one bucket leave the counts
equal but not the digests.

Contents, on a rotating share of the buckets: both sides give the count and the sum of their
rows' hashes (content_digests: every copied value and the rules' verdict). That reads every
body, so each day takes the buckets b with b % content_days == day % content_days: every row
is verified at least every `content_days` days (1: all of them daily).

Differing buckets are read id by id (row hashes), under the write lock, so no load or change
capture races with the repair: ids whose source row is missing from the copy or differs are
re-read through the rules (inserted, updated, moved between the tables, restored); ids gone
from the source are soft-deleted (`deleted_at` set, the row kept for history), unless that
would delete more than the mass-delete threshold (a truncated source, an old snapshot, the
wrong database): then nothing is deleted and the check fails until a run allows it.
"""

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa

from so_pipeline import content_digests
from so_pipeline.analytical_reads import live_posts_count
from so_pipeline.analytical_schema import TABLES
from so_pipeline.content_digests import Share, analytical_row_hashes, source_row_hashes
from so_pipeline.core_sql import execute
from so_pipeline.posts_merge import PostsMerge
from so_pipeline.run_connections import RunConnections
from so_pipeline.source_posts import (
    COPY_CLASSIFIED_POSTS,
    copy_posts_by_id,
    range_params,
    source_posts,
)

# 100,000 ids per bucket: ~800 buckets for Stack Overflow, and a differing bucket is read id by
# id in a fraction of a second.
BUCKET_IDS = 100_000
# Contents are digested in parts of this many ids, so a difference is narrowed by reading the
# values of a part, not of its whole bucket.
CONTENT_PART_IDS = 1_000
# At most this many ids are named in a failed check's message.
NAMED_IDS = 20
# A repair may soft-delete at most this share of the live posts (or MIN_MASS_DELETE, whichever
# is larger) unless its run allows more.
MASS_DELETE_SHARE = 0.01
MIN_MASS_DELETE = 100

Digests = dict[int, tuple[int, int]]  # bucket -> (ids, sum of their hashes)


@dataclass(frozen=True)
class ReconcileSettings:
    """How a reconciliation compares and repairs (the check's run config)."""

    require_owner: bool = True
    content_days: int = 7
    day: int = 0  # days since the epoch: picks the day's share of content buckets
    allow_mass_delete: bool = False
    mass_delete_threshold: int | None = None  # None: the default share of live posts
    recopy: tuple[int | None, int] | None = None  # ids (after, up_to] to re-copy, if asked

    def content_share(self, up_to_id: int) -> Share:
        """The buckets whose contents this run compares (b % content_days == day's)."""
        share = self.day % self.content_days
        return Share(up_to_id, BUCKET_IDS, self.content_days, share, CONTENT_PART_IDS)


def bucket_bounds(bucket: int, size: int = BUCKET_IDS) -> tuple[int, int]:
    """The ids x with trunc(x / size) == bucket (PostgreSQL's div), as an inclusive range."""
    if bucket > 0:
        return bucket * size, bucket * size + size - 1
    if bucket < 0:
        return bucket * size - size + 1, bucket * size
    return -size + 1, size - 1


def _digest_query(ids: sa.ColumnElement, table: sa.FromClause, *where: Any) -> sa.Select:
    bucket = sa.func.div(ids, BUCKET_IDS)
    return (
        sa.select(bucket, sa.func.count(), sa.func.sum(sa.func.hashint8(ids)))
        .select_from(table)
        .where(*where)
        .group_by(bucket)
    )


@contextmanager
def _index_only(connection: psycopg.Connection) -> Iterator[None]:
    """A transaction that reads ids from the primary keys: a sequential scan would read every
    body. (SET LOCAL: the setting ends with it, and holds behind a transaction pooler.)"""
    with connection.transaction():
        connection.execute("SET LOCAL enable_seqscan = off")
        yield


def source_id_digests(connection: psycopg.Connection, up_to_id: int) -> Digests:
    query = _digest_query(source_posts.c.id, source_posts, source_posts.c.id <= up_to_id)
    with _index_only(connection):
        rows = execute(connection, query).fetchall()
    return {int(b): (int(n), int(h)) for b, n, h in rows}


def analytical_id_digests(connection: psycopg.Connection, up_to_id: int) -> Digests:
    """Digests of the active ids (not soft-deleted) of posts and posts_rejected.

    Every id, minus the soft-deleted ones: both read from indexes (the primary key, and a
    partial index on the few deleted ids).
    """
    digests: dict[int, list[int]] = {}
    with _index_only(connection):
        rows = [
            (sign, row)
            for table in TABLES
            for sign, deleted in ((1, False), (-1, True))
            for row in execute(connection, _active_digest_query(table, deleted, up_to_id))
        ]
    for sign, (bucket, count, digest) in rows:
        totals = digests.setdefault(int(bucket), [0, 0])
        totals[0] += sign * int(count)
        totals[1] += sign * int(digest)
    return {b: (n, h) for b, (n, h) in digests.items() if n or h}


def _active_digest_query(table: sa.Table, deleted: bool, up_to_id: int) -> sa.Select:
    where = [table.c.id <= up_to_id]
    if deleted:
        where.append(table.c.deleted_at.is_not(None))
    return _digest_query(table.c.id, table, *where)


@dataclass
class Reconciliation:
    """What one reconciliation compared, found and repaired."""

    up_to_id: int
    ids_compared: int = 0
    buckets_compared: int = 0
    content_buckets_compared: int = 0
    buckets_differing: int = 0
    loaded: int = 0
    updated: int = 0
    restored: int = 0
    marked_deleted: int = 0
    recopied: int = 0
    deletions_held_back: list[int] = field(default_factory=list)
    deletion_limit: int = 0
    unrepaired: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        shown = self.unrepaired[:NAMED_IDS]
        held = self.deletions_held_back[:NAMED_IDS]
        return {
            "ids_checked_up_to": self.up_to_id,
            "ids_compared": self.ids_compared,
            "buckets_compared": self.buckets_compared,
            "content_buckets_compared": self.content_buckets_compared,
            "buckets_differing": self.buckets_differing,
            "rows_loaded_by_repair": self.loaded,
            "rows_updated_by_repair": self.updated,
            "rows_restored": self.restored,
            "rows_marked_deleted": self.marked_deleted,
            "rows_recopied": self.recopied,
            "deletions_held_back": len(self.deletions_held_back),
            "deletion_limit": self.deletion_limit,
            "ids_unrepaired": len(self.unrepaired),
            "duration_seconds": round(self.seconds, 3),
            **({"unrepaired_ids": ", ".join(map(str, shown))} if shown else {}),
            **({"held_back_ids": ", ".join(map(str, held))} if held else {}),
        }

    def problem(self) -> str | None:
        """Why the check fails, in words (None: the copy equals the source)."""
        if self.deletions_held_back and not self.ids_compared:
            return (
                f"The source holds no post up to id {self.up_to_id}, and the copy holds "
                f"{len(self.deletions_held_back)}: nothing was deleted. Check that "
                "SO_SOURCE_DATABASE_URL points at the right database."
            )
        if self.deletions_held_back:
            shown = ", ".join(map(str, self.deletions_held_back[:NAMED_IDS]))
            return (
                f"{len(self.deletions_held_back)} posts are gone from the source, more than the "
                f"{self.deletion_limit} a repair deletes on its own (e.g. {shown}): nothing was "
                "deleted. If the source really lost them, run the reconciliation with "
                "allow_mass_delete: true (or a higher mass_delete_threshold); if not, check "
                "SO_SOURCE_DATABASE_URL points at the right database."
            )
        if self.unrepaired:
            shown = ", ".join(map(str, self.unrepaired[:NAMED_IDS]))
            return (
                f"{len(self.unrepaired)} ids still differ after the repair (e.g. {shown}): "
                "changed at the source while it ran, or not writable. Run the reconciliation "
                "again."
            )
        return None


def source_ids(connection: psycopg.Connection, low: int, high: int) -> set[int]:
    ids = source_posts.c.id
    query = sa.select(ids).where(ids.between(low, high))
    return {row[0] for row in execute(connection, query).fetchall()}


def analytical_active_ids(connection: psycopg.Connection, low: int, high: int) -> set[int]:
    found: set[int] = set()
    for table in TABLES:
        query = sa.select(table.c.id).where(
            table.c.id.between(low, high), table.c.deleted_at.is_(None)
        )
        found |= {row[0] for row in execute(connection, query).fetchall()}
    return found


@dataclass(frozen=True)
class Differences:
    """What the comparison found to narrow: id buckets whose id sets differ (read from the
    indexes), and content parts whose rows differ (read with their values)."""

    id_ranges: list[tuple[int, int]]
    content_ranges: list[tuple[int, int]]

    def narrow(self, run: RunConnections, rules: dict[str, object]) -> tuple[set[int], set[int]]:
        """(ids to re-read from the source, ids gone from it)."""
        to_read: set[int] = set()
        gone: set[int] = set()
        for low, high in self.id_ranges:
            theirs = source_ids(run.source, low, high)
            ours = analytical_active_ids(run.analytical, low, high)
            to_read |= theirs - ours
            gone |= ours - theirs
        for low, high in self.content_ranges:
            their_rows = source_row_hashes(run.source, low, high, rules)
            our_rows = analytical_row_hashes(run.analytical, low, high)
            to_read |= {i for i, h in their_rows.items() if our_rows.get(i) != h}
            gone |= set(our_rows) - set(their_rows)
        return to_read, gone


def _still_differing(run: RunConnections, ids: list[int], rules: dict[str, object]) -> list[int]:
    """The ids whose rows still differ between the source and the copy."""
    theirs = content_digests.source_hashes_of(run.source, ids, rules)
    ours = content_digests.analytical_hashes_of(run.analytical, ids)
    return sorted(i for i in ids if theirs.get(i) != ours.get(i))


def _deletion_limit(run: RunConnections, settings: ReconcileSettings) -> int:
    if settings.mass_delete_threshold is not None:
        return settings.mass_delete_threshold
    return max(MIN_MASS_DELETE, int(live_posts_count(run.analytical) * MASS_DELETE_SHARE))


def _apply(merge: PostsMerge, result: Reconciliation) -> None:
    applied = merge.apply()
    result.restored += applied.restored_rows
    result.loaded += applied.inserted_rows + applied.newly_rejected_rows - applied.restored_rows
    result.updated += applied.updated_rows


def _repair(
    run: RunConnections,
    differences: Differences,
    settings: ReconcileSettings,
    rules: dict[str, object],
    result: Reconciliation,
) -> None:
    """Under the write lock: narrow the differences to ids, re-read what differs through the
    rules, soft-delete what the source lost (within the limit), and record the ids that still
    differ after."""
    with run.writer.transaction() as merge:
        to_read, gone = differences.narrow(run, rules)
        if to_read:
            merge.stage(run.source, copy_posts_by_id(), {"ids": sorted(to_read), **rules})
            _apply(merge, result)
        _soft_delete(run, merge, sorted(gone), settings, result)
        checked = sorted((to_read | gone) - set(result.deletions_held_back))
        result.unrepaired = _still_differing(run, checked, rules) if checked else []


def _soft_delete(
    run: RunConnections,
    merge: PostsMerge,
    gone: list[int],
    settings: ReconcileSettings,
    result: Reconciliation,
) -> None:
    """Soft-delete `gone`, unless they are more than the limit and the run does not allow it."""
    result.deletion_limit = _deletion_limit(run, settings)
    source_empty = result.ids_compared == 0  # a truncated source, or the wrong database
    if source_empty or (len(gone) > result.deletion_limit and not settings.allow_mass_delete):
        result.deletions_held_back = gone
    elif gone:
        result.marked_deleted += merge.soft_delete(gone)


def _recopy(
    run: RunConnections,
    settings: ReconcileSettings,
    rules: dict[str, object],
    result: Reconciliation,
) -> None:
    """Re-copy the asked id range through the rules, under the lock (cursors untouched)."""
    if settings.recopy is None:
        return
    after_id, up_to_id = settings.recopy
    with run.writer.transaction() as merge:
        result.recopied = merge.stage(
            run.source, COPY_CLASSIFIED_POSTS, range_params((after_id, up_to_id), rules)
        )
        _apply(merge, result)


def reconcile(run: RunConnections, up_to_id: int, settings: ReconcileSettings) -> Reconciliation:
    """Compare every id up to `up_to_id` with the source, and the day's share of contents;
    repair what differs."""
    started = time.monotonic()
    result = Reconciliation(up_to_id)
    rules = run.rules(settings.require_owner)
    _recopy(run, settings, rules, result)
    # Both servers scan their indexes at once (one thread each: psycopg waits in C).
    with ThreadPoolExecutor(2, "so_pipeline-reconcile") as pool:
        their_digests = pool.submit(source_id_digests, run.source, up_to_id)
        ours = analytical_id_digests(run.analytical, up_to_id)
        theirs = their_digests.result()
        share = settings.content_share(up_to_id)
        their_contents = pool.submit(content_digests.source_digests, run.source, share, rules)
        our_contents = content_digests.analytical_digests(run.analytical, share)
        theirs_by_part = their_contents.result()
    parts = set(theirs_by_part) | set(our_contents)
    buckets = set(theirs) | set(ours)
    differing = sorted(b for b in buckets if theirs.get(b) != ours.get(b))
    differing_parts = sorted(p for p in parts if theirs_by_part.get(p) != our_contents.get(p))
    result.ids_compared = sum(n for n, _ in theirs.values())
    result.buckets_compared = len(buckets)
    result.content_buckets_compared = len({div_toward_zero(p * CONTENT_PART_IDS) for p in parts})
    result.buckets_differing = len(
        set(differing) | {div_toward_zero(p * CONTENT_PART_IDS) for p in differing_parts}
    )
    if differing or differing_parts:
        differences = Differences(
            _bounds(differing, BUCKET_IDS, up_to_id),
            _bounds(differing_parts, CONTENT_PART_IDS, up_to_id),
        )
        _repair(run, differences, settings, rules, result)
    result.seconds = time.monotonic() - started
    return result


def _bounds(numbers: list[int], size: int, up_to_id: int) -> list[tuple[int, int]]:
    """The id ranges of bucket (or part) `numbers` of `size` ids, cut at `up_to_id`."""
    return [(low, min(high, up_to_id)) for low, high in (bucket_bounds(n, size) for n in numbers)]


def div_toward_zero(first_id: int, size: int = BUCKET_IDS) -> int:
    """The bucket of an id (PostgreSQL's div truncates toward zero)."""
    whole = abs(first_id) // size
    return whole if first_id >= 0 else -whole
