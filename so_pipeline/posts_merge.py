"""The one home for writing posts into the analytical tables.

Every writer (a new window, change capture, a repair, a backfill) goes through `PostsWriter`:
a transaction on the analytical database under the pipeline's write lock, in which source rows
classified by the rules (reason NULL when kept) are copied into a staging table and then
applied to `posts` and `posts_rejected`: inserted, updated where a value differs, moved
between the tables, restored when soft-deleted, and counted. Ids gone from the source are
soft-deleted here too. A new column or rule is one edit in analytical_schema or post_rules;
a new kind of change is one method here.

Only a catch-up window bypasses the staging table: its new ids all lie above every loaded
id, so COPY writes them straight into `posts` (window_loader), and this module counts them.
"""

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.dialects import postgresql as pg

from so_pipeline.analytical_schema import (
    CLASSIFIED_COLUMNS,
    REJECTED_KEY_PREFIX,
    TABLES,
    copied_columns,
    copy_in,
    ensure_tables,
    pipeline_state,
    post_fields,
    posts,
    posts_rejected,
    row_counts,
)
from so_pipeline.copy_pipe import copy_in_from_file, copy_rows_in, pipe_copy
from so_pipeline.core_sql import execute, index_only_plans, scalar
from so_pipeline.window import DEFAULT_BATCH_SIZE, IdRange

# Serialises the pipeline's writers on the analytical database (any runs, any processes). A
# transaction-level lock: it ends with the transaction that took it, so it holds behind a
# pooler in transaction mode too.
PIPELINE_LOCK_ID = 0x50_4F_53_54_53  # "POSTS"


@dataclass(frozen=True)
class Applied:
    """What one merge did to the analytical tables."""

    kept_rows: int = 0
    rejected_rows: int = 0
    inserted_rows: int = 0
    updated_rows: int = 0
    restored_rows: int = 0
    newly_rejected_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def newly_rejected_rows(self) -> int:
        return sum(self.newly_rejected_by_reason.values())

    def __add__(self, other: "Applied") -> "Applied":
        """What two merges did together."""
        reasons = Counter(self.newly_rejected_by_reason)
        reasons.update(other.newly_rejected_by_reason)
        return Applied(
            kept_rows=self.kept_rows + other.kept_rows,
            rejected_rows=self.rejected_rows + other.rejected_rows,
            inserted_rows=self.inserted_rows + other.inserted_rows,
            updated_rows=self.updated_rows + other.updated_rows,
            restored_rows=self.restored_rows + other.restored_rows,
            newly_rejected_by_reason=dict(reasons),
        )


@dataclass(frozen=True)
class LockWait:
    """How long a writer waited for the write lock, and who held it when it started waiting."""

    seconds: float = 0.0
    holder: str | None = None  # the holder's application_name (it names its run)

    def __add__(self, other: "LockWait") -> "LockWait":
        return LockWait(self.seconds + other.seconds, self.holder or other.holder)


class PostsWriter:
    """Writes posts through one analytical connection, one locked transaction at a time.

    The first transaction also creates or checks the tables, so the lock's first wait is
    measured where the run first needs it; `take_lock_wait` hands over the waits since the
    last call.
    """

    def __init__(self, connection: psycopg.Connection) -> None:
        self.connection = connection
        self._tables_ready = False
        self._waited = LockWait()

    @contextmanager
    def transaction(self) -> Iterator["PostsMerge"]:
        """A transaction holding the write lock; commits on leaving, rolls back on an error."""
        with self.connection.transaction():
            self._waited += _take_write_lock(self.connection)
            if not self._tables_ready:
                ensure_tables(self.connection)
                self._tables_ready = True
            yield PostsMerge(self.connection)

    def ensure_tables(self) -> None:
        """Create or check the tables now (under the lock), unless done already."""
        if not self._tables_ready:
            with self.transaction():
                pass

    def take_lock_wait(self) -> LockWait:
        """The waits since the last call (a run reports each window's own)."""
        waited, self._waited = self._waited, LockWait()
        return waited


def _take_write_lock(connection: psycopg.Connection) -> LockWait:
    """Take the write lock until commit, waiting for the run that holds it."""
    if scalar(connection, sa.select(sa.func.pg_try_advisory_xact_lock(PIPELINE_LOCK_ID))):
        return LockWait()
    holder = _lock_holder(connection)
    started = time.monotonic()
    execute(connection, sa.select(sa.func.pg_advisory_xact_lock(PIPELINE_LOCK_ID)))
    return LockWait(time.monotonic() - started, holder)


def _lock_holder(connection: psycopg.Connection) -> str | None:
    """The application_name of the session that holds the write lock (None when unknown)."""
    holder = connection.execute(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
        "AND (l.classid::bigint << 32 | l.objid::bigint) = %s LIMIT 1",
        (PIPELINE_LOCK_ID,),
    ).fetchone()
    return holder[0] if holder else None


def add_to_row_count(connection: psycopg.Connection, rows: int, key: str = posts.name) -> int:
    """Add `rows` inserted to the count `key`, in the caller's transaction; return the count.

    A parallel stream adds its rows just before it commits: the counter's row lock is held
    until then, and streams commit one after the other.
    """
    update = (
        sa.update(row_counts)
        .where(row_counts.c.table_name == key)
        .values(row_count=row_counts.c.row_count + rows)
        .returning(row_counts.c.row_count)
    )
    return scalar(connection, update)


COPY_INTO_POSTS = copy_in(posts, copied_columns(posts))


# A merge of at most this many staged rows looks each one up through the indexes (see
# PostsMerge.apply): a default window's worth.
MERGE_BY_INDEX_ROWS = DEFAULT_BATCH_SIZE


class PostsMerge:
    """The writes of one locked transaction: stage classified rows, then apply them."""

    def __init__(self, connection: psycopg.Connection) -> None:
        self.connection = connection
        self._staged: sa.Table | None = None
        self._staged_rows = 0

    def staging_table(self, *extra: sa.Column) -> sa.Table:
        """The staging table (temporary, dropped at commit), created on first use with `extra`
        columns beside the classified ones."""
        if self._staged is None:
            self._staged = sa.Table(
                "posts_incoming",
                sa.MetaData(),
                *post_fields(),
                sa.Column("reason", sa.Text),
                *extra,
                prefixes=["TEMPORARY"],
                postgresql_on_commit="DROP",
            )
            execute(self.connection, sa.schema.CreateTable(self._staged))
        return self._staged

    def stage(
        self,
        source: psycopg.Connection,
        copy_out: sql.Composed,
        params: dict[str, object],
        *extra: sa.Column,
    ) -> int:
        """Stage the classified rows a source COPY sends (in CLASSIFIED_COLUMNS' order, then
        `extra`); return how many."""
        staged = self.staging_table(*extra)
        columns = (*CLASSIFIED_COLUMNS, *(column.name for column in extra))
        rows = pipe_copy(source, copy_out, params, self.connection, copy_in(staged.name, columns))
        self._staged_rows += rows
        return rows

    def stage_copy_data(self, data: IO[bytes], columns: tuple[str, ...]) -> int:
        """Stage binary COPY data of classified rows with `columns`; return how many."""
        staged = self.staging_table()
        rows = copy_in_from_file(self.connection, copy_in(staged.name, columns), data)
        self._staged_rows += rows
        return rows

    def copy_rejected_data(self, data: IO[bytes], columns: tuple[str, ...]) -> int:
        """Copy binary COPY data of rejected rows straight into posts_rejected (their ids are
        in neither table: see `holds_rejected_ids`); `count_rejected_in` counts them."""
        return copy_in_from_file(self.connection, copy_in(posts_rejected, columns), data)

    def holds_rejected_ids(self, id_range: IdRange) -> bool:
        """Whether posts_rejected holds any id of the range."""
        return scalar(self.connection, sa.select(sa.exists().where(*_rejected_in(id_range))))

    def count_rejected_in(self, id_range: IdRange) -> dict[str, int]:
        """Count the rows copied straight into posts_rejected for a range that held none
        before; return them by reason."""
        written = sa.select(posts_rejected.c.reason).where(*_rejected_in(id_range))
        return self._count_rejected(written.subquery())

    def drop_rejected_twins(self, id_range: IdRange) -> int:
        """Remove from posts_rejected the ids of the range that posts now holds."""
        twins = [*_rejected_in(id_range), posts_rejected.c.id == posts.c.id]
        return execute(self.connection, sa.delete(posts_rejected).where(*twins)).rowcount

    def record(self, name: str, value: str) -> None:
        """Record a cursor in so_pipeline_state, committed with the rows it covers."""
        insert = pg.insert(pipeline_state).values(name=name, value=value)
        upsert = insert.on_conflict_do_update(
            index_elements=["name"],
            set_={"value": insert.excluded.value, "updated_at": sa.func.now()},
        )
        execute(self.connection, upsert)

    def count_new_posts(self, rows: int) -> None:
        """Count rows COPY wrote straight into posts in this transaction."""
        if rows:
            add_to_row_count(self.connection, rows)

    def apply(self, posts_max_id: int | None = None) -> Applied:
        """Make the analytical tables hold the staged rows' current values, under the rules.

        A kept row is inserted into posts or updated there (only if a value differs), and
        leaves posts_rejected; a rejected row goes to posts_rejected with its reason (rewritten
        only if something differs) and leaves posts. A soft-deleted row that is staged (it is
        at the source again) is restored. Unchanged rows are not written; no id ends in both
        tables; the row counts follow.

        `posts_max_id`, when the caller knows it (under the lock, before writing): no staged
        rejected id above it is in posts. A catch-up window's rejected rows all are, and
        looking for them in posts was a join with the whole table (0.4 s of a 4.4 s window of
        1M posts).

        Up to MERGE_BY_INDEX_ROWS staged rows (a tick, a window), every statement is planned
        without a scan of posts or posts_rejected: PostgreSQL, not knowing how many rows the
        staging table holds, hash-joined a tick's look-back with a full scan of posts (0.2-0.3
        s per tick at 1M posts, growing with the table). A larger merge (a re-copy of a range)
        is left to the planner, for which a scan may be the right plan.
        """
        if self._staged is None:
            return Applied()
        if self._staged_rows > MERGE_BY_INDEX_ROWS:
            return self._apply(self._staged, posts_max_id)
        with index_only_plans(self.connection):
            return self._apply(self._staged, posts_max_id)

    def _apply(self, staged: sa.Table, posts_max_id: int | None) -> Applied:
        connection = self.connection
        new = staged.c
        kept = new.reason.is_(None)
        rejected_maybe_in_posts: sa.ColumnElement[bool] = sa.not_(kept)
        if posts_max_id is not None:
            rejected_maybe_in_posts = sa.and_(rejected_maybe_in_posts, new.id <= posts_max_id)
        kept_rows, rejected_rows, to_leave_posts = execute(
            connection,
            sa.select(
                sa.func.count().filter(kept),
                sa.func.count().filter(sa.not_(kept)),
                sa.func.count().filter(rejected_maybe_in_posts),
            ).select_from(staged),
        ).fetchone()  # type: ignore[misc]
        restored = scalar(
            connection,
            sa.select(sa.func.count())
            .select_from(staged)
            .where(
                sa.or_(
                    *(
                        sa.exists().where(table.c.id == new.id, table.c.deleted_at.is_not(None))
                        for table in TABLES
                    )
                )
            ),
        )
        rejected_fields = [name for name in CLASSIFIED_COLUMNS if name != "id"]
        execute(
            connection,
            sa.delete(posts_rejected).where(
                posts_rejected.c.id == new.id,
                sa.or_(
                    kept,
                    _differs(posts_rejected, new, rejected_fields),
                    posts_rejected.c.deleted_at.is_not(None),
                ),
            ),
        )
        if to_leave_posts:
            execute(
                connection, sa.delete(posts).where(posts.c.id == new.id, rejected_maybe_in_posts)
            )
        added = self._insert_rejected(staged)
        inserted, updated = self._upsert_posts(staged)
        self.count_new_posts(inserted)
        return Applied(
            kept_rows=kept_rows,
            rejected_rows=rejected_rows,
            inserted_rows=inserted,
            updated_rows=updated,
            restored_rows=restored,
            newly_rejected_by_reason=added,
        )

    def soft_delete(self, ids: Iterable[int]) -> int:
        """Mark `ids` deleted in whichever table holds them (already marked ones stay as they
        are); return how many were marked.

        The ids travel through a temporary table (COPY), so a repair of any size binds no
        parameter per id.
        """
        gone = sa.Table(
            "posts_gone",
            sa.MetaData(),
            sa.Column("id", sa.BigInteger, primary_key=True),
            prefixes=["TEMPORARY"],
            postgresql_on_commit="DROP",
        )
        execute(self.connection, sa.schema.CreateTable(gone))
        copy_rows_in(self.connection, copy_in(gone.name, ("id",)), ["int8"], ((i,) for i in ids))
        marked = 0
        for table in TABLES:
            update = (
                sa.update(table)
                .where(table.c.id == gone.c.id, table.c.deleted_at.is_(None))
                .values(deleted_at=sa.func.now())
            )
            marked += execute(self.connection, update).rowcount
        execute(self.connection, sa.schema.DropTable(gone))
        return marked

    def _insert_rejected(self, staged: sa.Table) -> dict[str, int]:
        """Insert the staged rejected rows that posts_rejected lacks; return them by reason."""
        columns = list(CLASSIFIED_COLUMNS)
        rows = sa.select(*(staged.c[name] for name in columns)).where(staged.c.reason.is_not(None))
        inserted = (
            pg.insert(posts_rejected)
            .from_select(columns, rows)
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(posts_rejected.c.reason)
            .cte("inserted")
        )
        return self._count_rejected(inserted)

    def _count_rejected(self, rows: sa.FromClause) -> dict[str, int]:
        """Add `rows` (just written to posts_rejected) to its row counts; return them by reason."""
        by_reason = sa.select(rows.c.reason, sa.func.count()).group_by(rows.c.reason)
        added = dict(execute(self.connection, by_reason).fetchall())
        for reason, count in added.items():
            add_to_row_count(self.connection, count, REJECTED_KEY_PREFIX + reason)
        return added

    def _upsert_posts(self, staged: sa.Table) -> tuple[int, int]:
        """Insert or update the staged kept rows in posts; return (inserted, updated)."""
        columns = list(copied_columns(posts))
        fields = [name for name in columns if name != "id"]
        rows = sa.select(*(staged.c[name] for name in columns)).where(staged.c.reason.is_(None))
        insert = pg.insert(posts).from_select(columns, rows)
        upsert: Any = insert.on_conflict_do_update(
            index_elements=["id"],
            set_={**{name: insert.excluded[name] for name in fields}, "deleted_at": None},
            where=sa.or_(_differs(posts, insert.excluded, fields), posts.c.deleted_at.is_not(None)),
        ).returning(sa.literal_column("xmax = 0").label("inserted"))
        written = upsert.cte("written")
        counts = sa.select(
            sa.func.count().filter(written.c.inserted), sa.func.count().filter(~written.c.inserted)
        )
        inserted, updated = execute(self.connection, counts).fetchone()  # type: ignore[misc]
        return inserted, updated


def _differs(table: sa.Table, other: sa.ColumnCollection, names: list[str]) -> sa.ColumnElement:
    ours = sa.tuple_(*(table.c[name] for name in names))
    return ours.is_distinct_from(sa.tuple_(*(other[name] for name in names)))


def _rejected_in(id_range: IdRange) -> list[sa.ColumnElement[bool]]:
    """posts_rejected's ids in (after_id, last_id]."""
    after_id, last_id = id_range
    rejected = posts_rejected.c
    return [rejected.id <= last_id] + ([] if after_id is None else [rejected.id > after_id])
