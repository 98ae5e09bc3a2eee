"""The daily safety net: compare id sets with the source, exactly, and repair what differs.

Per bucket of ids, both sides give a count and an order-independent digest of their ids (the
sum of PostgreSQL's `hashint8`), read from the primary-key indexes (no bodies). A deletion
and a late row in one bucket leave the counts equal but not the digests. Only buckets that
differ are read id by id. Then: ids missing from the analytical tables (rows that committed
too late for any look-back, posts undeleted at the source) are loaded under the rules; ids no
longer at the source are soft-deleted (`deleted_at` set, the row kept for history).
"""

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
import sqlalchemy as sa

from so_pipeline import analytical_posts as analytical
from so_pipeline.copy_pipe import pipe_copy
from so_pipeline.core_sql import execute, server_encoding
from so_pipeline.post_rules import rule_params
from so_pipeline.resources import PostgresResource
from so_pipeline.source_posts import copy_posts_by_id, source_posts

# 100,000 ids per bucket: ~800 buckets for Stack Overflow, and a differing bucket is read id by
# id in a fraction of a second.
BUCKET_IDS = 100_000
# At most this many ids are named in a failed check's message.
NAMED_IDS = 20

Digests = dict[int, tuple[int, int]]  # bucket -> (ids, sum of their hashes)


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


def _index_only(connection: psycopg.Connection) -> None:
    """Read ids from the primary keys: a sequential scan would read every body."""
    connection.execute("SET enable_seqscan = off")


def source_digests(connection: psycopg.Connection, up_to_id: int) -> Digests:
    query = _digest_query(source_posts.c.id, source_posts, source_posts.c.id <= up_to_id)
    return {int(b): (int(n), int(h)) for b, n, h in execute(connection, query).fetchall()}


def analytical_digests(connection: psycopg.Connection, up_to_id: int) -> Digests:
    """Digests of the active ids (not soft-deleted) of posts and posts_rejected.

    Every id, minus the soft-deleted ones: both read from indexes (the primary key, and a
    partial index on the few deleted ids).
    """
    digests: dict[int, list[int]] = {}
    for table in analytical.TABLES:
        for sign, deleted in ((1, False), (-1, True)):
            where = [table.c.id <= up_to_id]
            if deleted:
                where.append(table.c.deleted_at.is_not(None))
            for bucket, count, digest in execute(
                connection, _digest_query(table.c.id, table, *where)
            ).fetchall():
                totals = digests.setdefault(int(bucket), [0, 0])
                totals[0] += sign * int(count)
                totals[1] += sign * int(digest)
    return {b: (n, h) for b, (n, h) in digests.items() if n or h}


def source_ids(connection: psycopg.Connection, low: int, high: int) -> set[int]:
    ids = source_posts.c.id
    query = sa.select(ids).where(ids.between(low, high))
    return {row[0] for row in execute(connection, query).fetchall()}


def analytical_active_ids(connection: psycopg.Connection, low: int, high: int) -> set[int]:
    found: set[int] = set()
    for table in analytical.TABLES:
        query = sa.select(table.c.id).where(
            table.c.id.between(low, high), table.c.deleted_at.is_(None)
        )
        found |= {row[0] for row in execute(connection, query).fetchall()}
    return found


def soft_delete(connection: psycopg.Connection, ids: list[int]) -> int:
    """Mark `ids` deleted in whichever table holds them (already marked ones stay as they are)."""
    marked = 0
    for table in analytical.TABLES:
        update = (
            sa.update(table)
            .where(table.c.id.in_(ids), table.c.deleted_at.is_(None))
            .values(deleted_at=sa.func.now())
        )
        marked += execute(connection, update).rowcount
    return marked


@dataclass
class Reconciliation:
    """What one reconciliation compared, found and repaired."""

    up_to_id: int
    ids_compared: int = 0
    buckets_compared: int = 0
    buckets_differing: int = 0
    loaded: int = 0
    restored: int = 0
    marked_deleted: int = 0
    unrepaired: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def metadata(self) -> dict[str, Any]:
        shown = self.unrepaired[:NAMED_IDS]
        return {
            "ids_checked_up_to": self.up_to_id,
            "ids_compared": self.ids_compared,
            "buckets_compared": self.buckets_compared,
            "buckets_differing": self.buckets_differing,
            "rows_loaded_by_repair": self.loaded,
            "rows_restored": self.restored,
            "rows_marked_deleted": self.marked_deleted,
            "ids_unrepaired": len(self.unrepaired),
            "duration_seconds": round(self.seconds, 3),
            **({"unrepaired_ids": ", ".join(map(str, shown))} if shown else {}),
        }


def _repair(
    source: psycopg.Connection,
    target: psycopg.Connection,
    missing: list[int],
    gone: list[int],
    rules: dict[str, object],
    result: Reconciliation,
) -> None:
    """In one transaction under the load lock: load `missing` under the rules, mark `gone`."""
    with target.transaction():
        analytical.wait_for_lock(target)
        if missing:
            staged = analytical.create_classified_staging(target)
            copy_in = analytical.copy_in(staged.name, analytical.CLASSIFIED_COLUMNS)
            pipe_copy(source, copy_posts_by_id(), {"ids": missing, **rules}, target, copy_in)
            applied = analytical.apply_classified(target, staged)
            analytical.add_to_row_count(target, applied.inserted_rows)
            result.restored = applied.restored_rows
            staged_rows = applied.kept_rows + applied.rejected_rows
            result.loaded = staged_rows - applied.restored_rows
        if gone:
            result.marked_deleted = soft_delete(target, gone)


def reconcile(
    source_db: PostgresResource,
    analytical_db: PostgresResource,
    up_to_id: int,
    require_owner: bool = True,
) -> Reconciliation:
    """Compare every id up to `up_to_id` with the source; load the missing, mark the gone."""
    started = time.monotonic()
    result = Reconciliation(up_to_id)
    with source_db.connect() as source, analytical_db.connect() as target:
        _index_only(source)
        _index_only(target)
        # Both servers scan their indexes at once (one thread each: psycopg waits in C).
        with ThreadPoolExecutor(2, "so_pipeline-reconcile") as pool:
            their_digests = pool.submit(source_digests, source, up_to_id)
            ours = analytical_digests(target, up_to_id)
            theirs = their_digests.result()
        differing = sorted(b for b in set(theirs) | set(ours) if theirs.get(b) != ours.get(b))
        result.ids_compared = sum(n for n, _ in theirs.values())
        result.buckets_compared = len(set(theirs) | set(ours))
        result.buckets_differing = len(differing)
        missing: list[int] = []
        gone: list[int] = []
        for bucket in differing:
            low, high = bucket_bounds(bucket)
            high = min(high, up_to_id)
            at_source = source_ids(source, low, high)
            loaded = analytical_active_ids(target, low, high)
            missing += sorted(at_source - loaded)
            gone += sorted(loaded - at_source)
        if missing or gone:
            rules = rule_params(require_owner, server_encoding(source))
            _repair(source, target, missing, gone, rules, result)
            for bucket in differing:
                low, high = bucket_bounds(bucket)
                high = min(high, up_to_id)
                result.unrepaired += sorted(
                    source_ids(source, low, high) ^ analytical_active_ids(target, low, high)
                )
    result.seconds = time.monotonic() - started
    return result
