"""The analytical `posts` and `posts_rejected` tables: definitions and every statement on them.

Column lists, contracts, COPY and merge statements are all derived from the two table
definitions below, so a new column is one edit here.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.dialects import postgresql as pg

from so_pipeline.core_sql import execute, scalar
from so_pipeline.post_rules import RejectReason
from so_pipeline.table_contract import (
    PG_ATTRIBUTE,
    PG_INDEX,
    SchemaMismatchError,
    column_types,
    contract_problems,
    exact_types,
    id_is_unique_key,
    type_name,
)

# Serialises the pipeline's writers on the analytical database (any runs, any processes).
PIPELINE_LOCK_ID = 0x50_4F_53_54_53  # "POSTS"

PREVIEW_ROWS = 5
PREVIEW_BODY_CHARS = 80


def post_fields() -> list[sa.Column]:
    """The post's own fields, as every table of the family holds them (new objects per call).

    The column types are the contract with downstream users.
    """
    return [
        sa.Column(
            "id", sa.BigInteger, primary_key=True, autoincrement=False, doc="Source post id."
        ),
        sa.Column("title", sa.Text, doc="Question title; NULL for answers."),
        sa.Column("body", sa.Text, doc="HTML body, as in the source."),
        sa.Column("owner_user_id", sa.BigInteger, doc="Author; NULL once the user is deleted."),
        sa.Column(
            "creation_date", pg.TIMESTAMP(timezone=False), doc="When the post was made (UTC)."
        ),
    ]


def soft_delete_columns() -> list[sa.Column | sa.Index]:
    """Columns the pipeline manages itself (never copied from the source), and the partial
    index that lets the reconciliation read the few deleted ids without a table scan."""
    return [
        sa.Index(None, "id", postgresql_where=sa.text("deleted_at IS NOT NULL")),
        sa.Column(
            "deleted_at",
            pg.TIMESTAMP(timezone=True),
            info={"managed": True},
            doc="When the reconciliation found the post gone from the source (NULL: it is "
            "there). Analysts filter deleted_at IS NULL.",
        ),
    ]


# Index names follow the table: posts_deleted_ids, posts_rejected_deleted_ids.
metadata = sa.MetaData(naming_convention={"ix": "%(table_name)s_deleted_ids"})

posts = sa.Table(
    "posts",
    metadata,
    *post_fields(),
    sa.Column(
        "loaded_at",
        pg.TIMESTAMP(timezone=True),
        server_default=sa.func.now(),
        doc="When the pipeline loaded the row.",
    ),
    *soft_delete_columns(),
)

# Every source row the rules turned away, with the reason, so nothing is dropped silently.
_rejected_fields = post_fields()
posts_rejected = sa.Table(
    "posts_rejected",
    metadata,
    _rejected_fields[0],
    sa.Column("reason", sa.Text, nullable=False, doc="Why the rules turned the post away."),
    *_rejected_fields[1:],
    sa.Column(
        "rejected_at",
        pg.TIMESTAMP(timezone=True),
        server_default=sa.func.now(),
        doc="When the pipeline rejected the row.",
    ),
    *soft_delete_columns(),
)

TABLES = (posts, posts_rejected)

# Exact row counts, kept in the same transactions as the writes: the loads add what they
# inserted, and statement triggers subtract rows deleted by hand (a TRUNCATE sets 0). Keys:
# `posts`, and `posts_rejected:<reason>` for each reason. Counting 55M rows on every tick
# would take seconds.
row_counts = sa.Table(
    "so_pipeline_row_counts",
    metadata,
    sa.Column("table_name", sa.Text, primary_key=True),
    sa.Column("row_count", sa.BigInteger, nullable=False),
)
_REJECTED_KEY_PREFIX = "posts_rejected:"

_COUNT_TRIGGER_FUNCTION = """CREATE OR REPLACE FUNCTION so_pipeline_count_removed_rows()
RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        UPDATE so_pipeline_row_counts SET row_count = 0
        WHERE table_name = TG_TABLE_NAME OR table_name LIKE TG_TABLE_NAME || ':%';
    ELSIF TG_TABLE_NAME = 'posts_rejected' THEN
        UPDATE so_pipeline_row_counts c SET row_count = c.row_count - r.rows
        FROM (SELECT 'posts_rejected:' || reason AS key, count(*) AS rows
              FROM removed GROUP BY reason) r
        WHERE c.table_name = r.key;
    ELSE
        UPDATE so_pipeline_row_counts SET row_count = row_count - (SELECT count(*) FROM removed)
        WHERE table_name = TG_TABLE_NAME;
    END IF;
    RETURN NULL;
END $$"""
_COUNT_TRIGGERS = {
    "so_pipeline_count_deleted": "AFTER DELETE ON {table} REFERENCING OLD TABLE AS removed "
    "FOR EACH STATEMENT EXECUTE FUNCTION so_pipeline_count_removed_rows()",
    "so_pipeline_count_truncated": "AFTER TRUNCATE ON {table} "
    "FOR EACH STATEMENT EXECUTE FUNCTION so_pipeline_count_removed_rows()",
}


def copied_columns(table: sa.Table) -> tuple[str, ...]:
    """The columns copied from the source (the others: defaults, or managed by the pipeline)."""
    return tuple(
        column.name
        for column in table.columns
        if column.server_default is None and not column.info.get("managed")
    )


def _copied(table: sa.Table) -> list[sa.Column]:
    return [table.c[name] for name in copied_columns(table)]


# --- set-up and locking ----------------------------------------------------------------------


def ensure_tables(connection: psycopg.Connection) -> None:
    """Create missing tables; fail, before writing, on existing ones that do not fit."""
    with connection.transaction():
        execute(connection, sa.select(sa.func.pg_advisory_xact_lock(PIPELINE_LOCK_ID)))
        existing = {table.name: column_types(connection, table.name) for table in TABLES}
        for table in TABLES:
            actual = existing[table.name]
            problems = contract_problems(actual, exact_types(_copied(table))) if actual else []
            if actual and not id_is_unique_key(connection, table.name):
                problems.append("id is not its primary key (nor a unique, NOT NULL column)")
            if problems:
                raise SchemaMismatchError(
                    description=f"analytical_db: existing table {table.name} is incompatible: "
                    f"{'; '.join(problems)}. Rename or migrate it; nothing was written.",
                    allow_retries=False,
                )
        for table in metadata.sorted_tables:
            execute(connection, sa.schema.CreateTable(table, if_not_exists=True))
        _compress_new_bodies_with_lz4(connection, [t for t in TABLES if not existing[t.name]])
        _add_missing_managed_columns(connection, existing)
        _add_missing_indexes(connection)
        _keep_row_counts(connection)


def lz4_available(connection: psycopg.Connection) -> bool:
    """Whether the server can compress values with lz4 (PostgreSQL 14+ built with it)."""
    setting = sa.table("pg_settings", sa.column("name"), sa.column("enumvals"))
    supported = scalar(
        connection,
        sa.select(setting.c.enumvals).where(setting.c.name == "default_toast_compression"),
    )
    return "lz4" in (supported or [])


def _compress_new_bodies_with_lz4(connection: psycopg.Connection, created: list[sa.Table]) -> None:
    """Long bodies are compressed as they are written; lz4 does it several times faster than
    the default pglz, which made the analytical backend the slowest part of a catch-up.

    Only on tables just created: on a table in use, SET COMPRESSION waits for an exclusive
    lock (the README shows the statement to run by hand; it affects new values only).
    """
    if created and lz4_available(connection):
        for table in created:
            connection.execute(
                sql.SQL("ALTER TABLE {} ALTER COLUMN body SET COMPRESSION lz4").format(
                    sql.Identifier(table.name)
                )
            )


def body_compression(connection: psycopg.Connection) -> str:
    """How `posts.body` values are compressed: its own setting, else the server's default."""
    method = scalar(
        connection,
        sa.select(PG_ATTRIBUTE.c.attcompression).where(
            PG_ATTRIBUTE.c.attrelid == sa.func.to_regclass(posts.name),
            PG_ATTRIBUTE.c.attname == "body",
        ),
    )
    if method in ("p", "l"):
        return {"p": "pglz", "l": "lz4"}[method]
    return scalar(connection, sa.select(sa.func.current_setting("default_toast_compression")))


def _add_missing_managed_columns(
    connection: psycopg.Connection, existing: dict[str, dict[str, str]]
) -> None:
    """Upgrade tables made by an earlier release in place (`existing`: their columns, empty for a
    table just created): a nullable column without a default is added without rewriting the
    table, and nothing is reloaded."""
    for table in TABLES:
        actual = existing[table.name]
        for column in table.columns:
            if actual and column.info.get("managed") and column.name not in actual:
                connection.execute(
                    sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                        sql.Identifier(table.name),
                        sql.Identifier(column.name),
                        sql.SQL(type_name(column)),
                    )
                )


def _add_missing_indexes(connection: psycopg.Connection) -> None:
    """Create the partial indexes that are missing (only then: CREATE INDEX locks the table
    against writers, even with IF NOT EXISTS)."""
    for table in TABLES:
        for index in table.indexes:
            if scalar(connection, sa.select(sa.func.to_regclass(index.name))) is None:
                execute(connection, sa.schema.CreateIndex(index, if_not_exists=True))


def _keep_row_counts(connection: psycopg.Connection) -> None:
    """Install the row counters unless they are there (counting the tables once)."""
    trigger = sa.table("pg_trigger", sa.column("tgrelid"), sa.column("tgname"))
    installed = scalar(
        connection,
        sa.select(sa.func.count()).where(
            trigger.c.tgrelid.in_([sa.func.to_regclass(table.name) for table in TABLES]),
            trigger.c.tgname.in_(list(_COUNT_TRIGGERS)),
        ),
    )
    if installed == len(_COUNT_TRIGGERS) * len(TABLES):
        return
    connection.execute(_COUNT_TRIGGER_FUNCTION)
    for table in TABLES:
        for name, definition in _COUNT_TRIGGERS.items():
            trigger_name, table_name = sql.Identifier(name), sql.Identifier(table.name)
            connection.execute(
                sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(trigger_name, table_name)
            )
            connection.execute(
                sql.SQL("CREATE TRIGGER {} " + definition).format(trigger_name, table=table_name)
            )
    rejected_key = sa.literal(_REJECTED_KEY_PREFIX) + posts_rejected.c.reason
    counts = sa.union_all(
        sa.select(sa.literal(posts.name), sa.func.count()).select_from(posts),
        sa.select(rejected_key, sa.func.count()).group_by(posts_rejected.c.reason),
    )
    seed = pg.insert(row_counts).from_select(["table_name", "row_count"], counts)
    update = {"row_count": seed.excluded.row_count}
    execute(connection, seed.on_conflict_do_update(index_elements=["table_name"], set_=update))
    for reason in RejectReason:
        zero = pg.insert(row_counts).values(table_name=_REJECTED_KEY_PREFIX + reason, row_count=0)
        execute(connection, zero.on_conflict_do_nothing())


def add_to_row_count(connection: psycopg.Connection, rows: int, key: str = posts.name) -> int:
    """Add `rows` inserted to the count `key`, in the caller's transaction; return the count."""
    update = (
        sa.update(row_counts)
        .where(row_counts.c.table_name == key)
        .values(row_count=row_counts.c.row_count + rows)
        .returning(row_counts.c.row_count)
    )
    return scalar(connection, update)


def lock_writes(connection: psycopg.Connection) -> bool:
    """Try to take the pipeline's advisory lock until commit; False when another run holds it."""
    return bool(scalar(connection, sa.select(sa.func.pg_try_advisory_xact_lock(PIPELINE_LOCK_ID))))


def wait_for_lock(connection: psycopg.Connection) -> None:
    execute(connection, sa.select(sa.func.pg_advisory_xact_lock(PIPELINE_LOCK_ID)))


# --- loading -----------------------------------------------------------------------------------


def copy_in(table: sa.Table | str, columns: tuple[str, ...]) -> sql.Composed:
    """`COPY table (columns) FROM STDIN` in binary format (`table` may be a staging table)."""
    name = table if isinstance(table, str) else table.name
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
        sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, columns))
    )


# Classified source rows (kept: reason NULL) in the layout of posts_rejected's copied columns.
CLASSIFIED_COLUMNS = copied_columns(posts_rejected)


def create_classified_staging(connection: psycopg.Connection, *extra: sa.Column) -> sa.Table:
    """A temporary table, dropped at commit, that COPY fills with classified source rows."""
    staged = sa.Table(
        "posts_incoming",
        sa.MetaData(),
        *post_fields(),
        sa.Column("reason", sa.Text),
        *extra,
        prefixes=["TEMPORARY"],
        postgresql_on_commit="DROP",
    )
    execute(connection, sa.schema.CreateTable(staged))
    return staged


@dataclass(frozen=True)
class Applied:
    """What applying staged source rows did to the analytical tables."""

    kept_rows: int = 0
    rejected_rows: int = 0
    inserted_rows: int = 0
    updated_rows: int = 0
    restored_rows: int = 0
    newly_rejected_by_reason: dict[str, int] = field(default_factory=dict)


def _differs(table: sa.Table, other: sa.ColumnCollection, names: list[str]) -> sa.ColumnElement:
    ours = sa.tuple_(*(table.c[name] for name in names))
    return ours.is_distinct_from(sa.tuple_(*(other[name] for name in names)))


def apply_classified(
    connection: psycopg.Connection, staged: sa.Table, posts_max_id: int | None = None
) -> Applied:
    """Make the analytical tables hold the staged rows' current values, under the rules.

    A kept row is inserted into posts or updated there (only if a value differs), and leaves
    posts_rejected; a rejected row goes to posts_rejected with its reason (rewritten only if
    something differs) and leaves posts. A soft-deleted row that is staged (it is at the source
    again) is restored. Rows whose values did not change are not written. No id ends in both.
    The caller adds `inserted_rows` to the posts row count (deletions count themselves).

    `posts_max_id`, when the caller knows it (under the lock, before writing): no staged
    rejected id above it is in posts. A catch-up window's rejected rows all are, and looking
    for them in posts was a join with the whole table (0.4 s of a 4.4 s window of 1M posts).
    """
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
        execute(connection, sa.delete(posts).where(posts.c.id == new.id, rejected_maybe_in_posts))
    added = _insert_rejected(connection, staged)
    inserted, updated = _upsert_posts(connection, staged)
    return Applied(
        kept_rows=kept_rows,
        rejected_rows=rejected_rows,
        inserted_rows=inserted,
        updated_rows=updated,
        restored_rows=restored,
        newly_rejected_by_reason=added,
    )


def _insert_rejected(connection: psycopg.Connection, staged: sa.Table) -> dict[str, int]:
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
    return _count_rejected(connection, inserted)


def _count_rejected(connection: psycopg.Connection, rows: sa.FromClause) -> dict[str, int]:
    """Add `rows` (just written to posts_rejected) to its row counts; return them by reason."""
    by_reason = sa.select(rows.c.reason, sa.func.count()).group_by(rows.c.reason)
    added = dict(execute(connection, by_reason).fetchall())
    for reason, count in added.items():
        add_to_row_count(connection, count, _REJECTED_KEY_PREFIX + reason)
    return added


def _upsert_posts(connection: psycopg.Connection, staged: sa.Table) -> tuple[int, int]:
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
    inserted, updated = execute(connection, counts).fetchone()  # type: ignore[misc]
    return inserted, updated


def _rejected_in(after_id: int | None, last_id: int) -> list[sa.ColumnElement[bool]]:
    """posts_rejected's ids in (after_id, last_id]."""
    rejected = posts_rejected.c
    return [rejected.id <= last_id] + ([] if after_id is None else [rejected.id > after_id])


def drop_rejected_twins(connection: psycopg.Connection, after_id: int | None, last_id: int) -> int:
    """Remove from posts_rejected the ids of (after_id, last_id] that posts now holds."""
    twins = [*_rejected_in(after_id, last_id), posts_rejected.c.id == posts.c.id]
    return execute(connection, sa.delete(posts_rejected).where(*twins)).rowcount


def holds_rejected_ids(connection: psycopg.Connection, after_id: int | None, last_id: int) -> bool:
    """Whether posts_rejected holds any id of (after_id, last_id]."""
    return scalar(connection, sa.select(sa.exists().where(*_rejected_in(after_id, last_id))))


def count_copied_rejected(
    connection: psycopg.Connection, after_id: int | None, last_id: int
) -> dict[str, int]:
    """Count the rows COPY wrote straight into posts_rejected for (after_id, last_id] (which
    held none before): add them to the row counts, return them by reason."""
    written = sa.select(posts_rejected.c.reason).where(*_rejected_in(after_id, last_id))
    return _count_rejected(connection, written.subquery())


def rejected_totals(connection: psycopg.Connection) -> dict[str, int]:
    """Rows in `posts_rejected` by reason (every reason, 0 included), from the counters."""
    query = sa.select(row_counts.c.table_name, row_counts.c.row_count).where(
        row_counts.c.table_name.startswith(_REJECTED_KEY_PREFIX, autoescape=True)
    )
    return {
        key.removeprefix(_REJECTED_KEY_PREFIX): count
        for key, count in execute(connection, query).fetchall()
    }


# --- reading -----------------------------------------------------------------------------------


def highest_loaded_id(connection: psycopg.Connection) -> int | None:
    return scalar(connection, sa.select(sa.func.max(posts.c.id)))


def highest_processed_id(connection: psycopg.Connection) -> int | None:
    """The highest id in posts or posts_rejected (None when neither exists or both are empty)."""
    highest = [
        scalar(connection, sa.select(sa.func.max(table.c.id)))
        for table in TABLES
        if scalar(connection, sa.select(sa.func.to_regclass(table.name))) is not None
    ]
    present = [value for value in highest if value is not None]
    return max(present) if present else None


def newest_loaded_time(connection: psycopg.Connection) -> datetime | None:
    """creation_date of the loaded post with the highest id."""
    query = sa.select(posts.c.creation_date).order_by(posts.c.id.desc()).limit(1)
    return scalar(connection, query)


def posts_row_count(connection: psycopg.Connection) -> int:
    """The exact number of rows in `posts`, from the counter (ensure_tables installs it)."""
    query = sa.select(row_counts.c.row_count).where(row_counts.c.table_name == posts.name)
    return scalar(connection, query)


def preview_rows(connection: psycopg.Connection, after_id: int | None, last_id: int) -> list[tuple]:
    """The first posts of the window (bodies cut short), for the materialization's preview."""
    fields = [posts.c[name] for name in copied_columns(posts)]
    shown = [
        sa.func.left(field, PREVIEW_BODY_CHARS).label("body") if field.name == "body" else field
        for field in fields
    ]
    query = sa.select(*shown).where(posts.c.id <= last_id).order_by(posts.c.id).limit(PREVIEW_ROWS)
    if after_id is not None:
        query = query.where(posts.c.id > after_id)
    return execute(connection, query).fetchall()


def blank_bodies(connection: psycopg.Connection, non_whitespace: str) -> tuple[int, int | None]:
    """(count, lowest id) of posts whose body is NULL, empty or only whitespace."""
    body = posts.c.body
    blank = sa.or_(
        body.is_(None),
        sa.and_(
            sa.not_(sa.func.left(body, 1).regexp_match(non_whitespace)),
            sa.not_(body.regexp_match(non_whitespace)),
        ),
    )
    query = sa.select(sa.func.count(), sa.func.min(posts.c.id)).where(blank)
    count, lowest = execute(connection, query).fetchone()  # type: ignore[misc]
    return count, lowest


def primary_key_columns(connection: psycopg.Connection) -> list[str] | None:
    """The columns of `posts`' primary key (None when it has none)."""
    index, attribute = PG_INDEX, PG_ATTRIBUTE
    query = (
        sa.select(sa.func.array_agg(sa.cast(attribute.c.attname, sa.Text)))
        .select_from(
            index.join(
                attribute,
                sa.and_(
                    attribute.c.attrelid == index.c.indrelid,
                    attribute.c.attnum == sa.any_(index.c.indkey),
                ),
            )
        )
        .where(index.c.indrelid == sa.func.to_regclass(posts.name), index.c.indisprimary)
    )
    return scalar(connection, query)


def row_estimates(connection: psycopg.Connection) -> dict[str, int]:
    """PostgreSQL's row estimate of each table of the family that exists (no scan)."""
    pg_class = sa.table("pg_class", sa.column("oid"), sa.column("relname"), sa.column("reltuples"))
    query = sa.select(pg_class.c.relname, sa.cast(pg_class.c.reltuples, sa.BigInteger)).where(
        pg_class.c.oid.in_([sa.func.to_regclass(table.name) for table in TABLES])
    )
    return dict(execute(connection, query).fetchall())


def count_rows(connection: psycopg.Connection, table_name: str) -> int:
    table = metadata.tables[table_name]
    return scalar(connection, sa.select(sa.func.count()).select_from(table))
