"""Reads of the analytical tables: the state metadata and checks report (no writes here)."""

from datetime import datetime

import psycopg
import sqlalchemy as sa

from so_pipeline.analytical_schema import (
    REJECTED_KEY_PREFIX,
    TABLES,
    copied_columns,
    metadata,
    pipeline_state,
    posts,
    row_counts,
)
from so_pipeline.core_sql import execute, index_only_plans, scalar
from so_pipeline.table_contract import PG_ATTRIBUTE, PG_INDEX

PREVIEW_ROWS = 5
PREVIEW_BODY_CHARS = 80


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


def recorded_state(connection: psycopg.Connection, name: str) -> str | None:
    """A cursor recorded in so_pipeline_state (None: never recorded, or no table yet)."""
    if scalar(connection, sa.select(sa.func.to_regclass(pipeline_state.name))) is None:
        return None
    return scalar(
        connection, sa.select(pipeline_state.c.value).where(pipeline_state.c.name == name)
    )


def posts_row_count(connection: psycopg.Connection) -> int:
    """The exact number of rows in `posts`, deleted or not, from the counter."""
    query = sa.select(row_counts.c.row_count).where(row_counts.c.table_name == posts.name)
    return scalar(connection, query)


def deleted_posts_count(connection: psycopg.Connection) -> int:
    """Soft-deleted rows of `posts`, read from the partial index on them (planned so even
    before the table's first ANALYZE: else a full scan per window, 0.45 s at 3M posts)."""
    query = sa.select(sa.func.count()).select_from(posts).where(posts.c.deleted_at.is_not(None))
    with index_only_plans(connection):
        return scalar(connection, query)


def live_posts_count(connection: psycopg.Connection) -> int:
    """Rows of `posts` that are at the source (what the posts_live view shows)."""
    return posts_row_count(connection) - deleted_posts_count(connection)


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


def rejected_totals(connection: psycopg.Connection) -> dict[str, int]:
    """Rows in `posts_rejected` by reason (every reason, 0 included), from the counters."""
    query = sa.select(row_counts.c.table_name, row_counts.c.row_count).where(
        row_counts.c.table_name.startswith(REJECTED_KEY_PREFIX, autoescape=True)
    )
    return {
        key.removeprefix(REJECTED_KEY_PREFIX): count
        for key, count in execute(connection, query).fetchall()
    }


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
