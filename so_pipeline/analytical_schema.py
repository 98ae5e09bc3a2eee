"""The analytical tables: `posts`, `posts_rejected` and their row counters, and their set-up.

Column lists, contracts, COPY and merge statements are all derived from the two table
definitions below, so a new column is one edit here. Writing rows is posts_merge's concern,
reading them analytical_reads'.
"""

import psycopg
import sqlalchemy as sa
from psycopg import sql
from sqlalchemy.dialects import postgresql as pg

from so_pipeline.core_sql import execute, scalar, server_encoding
from so_pipeline.post_rules import RejectReason
from so_pipeline.table_contract import (
    SchemaMismatchError,
    column_types,
    contract_problems,
    exact_types,
    id_is_unique_key,
    type_name,
)


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
REJECTED_KEY_PREFIX = "posts_rejected:"

# The cursors, each written in the same transaction as the rows it covers. Dagster's event
# log is where users browse them; this table is where a run resumes when that history is lost
# (a new instance, wiped storage).
pipeline_state = sa.Table(
    "so_pipeline_state",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", pg.TIMESTAMP(timezone=True), server_default=sa.func.now()),
)

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


def ensure_tables(connection: psycopg.Connection) -> None:
    """Create missing tables; fail, before writing, on existing ones that do not fit.

    Run under the pipeline's write lock (posts_merge.PostsWriter takes it first), so two runs
    never race to create or migrate the same table.
    """
    encoding = server_encoding(connection)
    if encoding != "UTF8":
        raise SchemaMismatchError(
            description=f"analytical_db: the database's encoding is {encoding}, which cannot "
            "hold every character a post may carry. Create it with ENCODING 'UTF8' (CREATE "
            "DATABASE ... ENCODING 'UTF8' TEMPLATE template0) and point "
            "SO_ANALYTICAL_DATABASE_URL at it; nothing was written.",
            allow_retries=False,
        )
    with connection.transaction():
        existing = {table.name: column_types(connection, table.name) for table in TABLES}
        for table in TABLES:
            actual = existing[table.name]
            problems = contract_problems(actual, exact_types(_copied(table))) if actual else []
            if actual and not id_is_unique_key(connection, table.name, immediate=True):
                problems.append(
                    "id is not its primary key (nor a unique, NOT NULL column with a valid, "
                    "non-deferrable unique index, as ON CONFLICT (id) needs)"
                )
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
        _create_live_view(connection)


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


# What analysts query: the posts at the source now (soft-deleted ones left out).
LIVE_VIEW = "posts_live"


def _create_live_view(connection: psycopg.Connection) -> None:
    """Create the posts_live view unless it exists (CREATE OR REPLACE would lock it each run)."""
    if scalar(connection, sa.select(sa.func.to_regclass(LIVE_VIEW))) is not None:
        return
    shown = copied_columns(posts)  # what every posts table has, made here or before
    connection.execute(
        sql.SQL("CREATE VIEW {} AS SELECT {} FROM {} WHERE deleted_at IS NULL").format(
            sql.Identifier(LIVE_VIEW),
            sql.SQL(", ").join(map(sql.Identifier, shown)),
            sql.Identifier(posts.name),
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
    rejected_key = sa.literal(REJECTED_KEY_PREFIX) + posts_rejected.c.reason
    counts = sa.union_all(
        sa.select(sa.literal(posts.name), sa.func.count()).select_from(posts),
        sa.select(rejected_key, sa.func.count()).group_by(posts_rejected.c.reason),
    )
    seed = pg.insert(row_counts).from_select(["table_name", "row_count"], counts)
    update = {"row_count": seed.excluded.row_count}
    execute(connection, seed.on_conflict_do_update(index_elements=["table_name"], set_=update))
    for reason in RejectReason:
        zero = pg.insert(row_counts).values(table_name=REJECTED_KEY_PREFIX + reason, row_count=0)
        execute(connection, zero.on_conflict_do_nothing())


def copy_in(table: sa.Table | str, columns: tuple[str, ...]) -> sql.Composed:
    """`COPY table (columns) FROM STDIN` in binary format (`table` may be a staging table)."""
    name = table if isinstance(table, str) else table.name
    return sql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
        sql.Identifier(name), sql.SQL(", ").join(map(sql.Identifier, columns))
    )


# Classified source rows (kept: reason NULL) in the layout of posts_rejected's copied columns.
CLASSIFIED_COLUMNS = copied_columns(posts_rejected)
