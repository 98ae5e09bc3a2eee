"""Table shapes: what the source must offer and what the analytical database holds."""

import dagster as dg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from so_pipeline.resources import PostgresResource

POST_COLUMNS = ("id", "title", "body", "owner_user_id", "creation_date")

metadata = sa.MetaData()

# The analytical copy. The column types are the contract with downstream users.
posts_table = sa.Table(
    "posts",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("title", sa.Text),
    sa.Column("body", sa.Text),
    sa.Column("owner_user_id", sa.BigInteger),
    sa.Column("creation_date", pg.TIMESTAMP(timezone=False)),
    sa.Column("loaded_at", pg.TIMESTAMP(timezone=True), server_default=sa.func.now()),
)

# Every source row the rules turned away, with the reason, so nothing is dropped silently.
posts_rejected_table = sa.Table(
    "posts_rejected",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("title", sa.Text),
    sa.Column("body", sa.Text),
    sa.Column("owner_user_id", sa.BigInteger),
    sa.Column("creation_date", pg.TIMESTAMP(timezone=False)),
    sa.Column("rejected_at", pg.TIMESTAMP(timezone=True), server_default=sa.func.now()),
)

REJECTED_COLUMNS = ("id", "reason", "title", "body", "owner_user_id", "creation_date")

# Serialises the pipeline's writers on the analytical database (any runs, any processes).
PIPELINE_LOCK_ID = 0x50_4F_53_54_53  # "POSTS"

_INTEGER = frozenset({"smallint", "integer", "bigint"})
_TEXT = frozenset({"text", "character varying"})
_TIMESTAMP = frozenset({"timestamp without time zone", "timestamp with time zone"})

# Source column -> the PostgreSQL types it may have (information_schema spelling).
SOURCE_CONTRACT: dict[str, frozenset[str]] = {
    "id": _INTEGER,
    "title": _TEXT | {"character"},
    "body": _TEXT | {"character"},
    "owner_user_id": _INTEGER,
    "creation_date": _TIMESTAMP,
}

# Existing analytical tables must match their definitions at least this closely.
ANALYTICAL_CONTRACTS: dict[str, dict[str, frozenset[str]]] = {
    "posts": {
        "id": frozenset({"bigint"}),
        "title": _TEXT,
        "body": _TEXT,
        "owner_user_id": frozenset({"bigint"}),
        "creation_date": frozenset({"timestamp without time zone"}),
    },
    "posts_rejected": {
        "id": frozenset({"bigint"}),
        "reason": _TEXT,
        "title": _TEXT,
        "body": _TEXT,
        "owner_user_id": frozenset({"bigint"}),
        "creation_date": frozenset({"timestamp without time zone"}),
    },
}

_COLUMN_TYPES = sa.text(
    "SELECT column_name, data_type FROM information_schema.columns "
    "WHERE table_name = :table AND table_schema = ANY (current_schemas(false))"
)


class SchemaMismatchError(dg.Failure):
    """A table lacks a required column or has one of the wrong type."""


def column_types(connection: sa.Connection, table: str) -> dict[str, str]:
    """Column name -> type of `table` on the search path; empty when it does not exist."""
    rows = connection.execute(_COLUMN_TYPES, {"table": table}).all()
    return {name: data_type for name, data_type in rows}


def contract_problems(actual: dict[str, str], contract: dict[str, frozenset[str]]) -> list[str]:
    problems = []
    for column, allowed in contract.items():
        found = actual.get(column)
        if found is None:
            problems.append(f"column {column} is missing")
        elif found not in allowed:
            problems.append(f"column {column} is {found}, expected {' or '.join(sorted(allowed))}")
    return problems


def check_source_table(source_db: PostgresResource, table: str) -> None:
    """Fail before any write when the source table cannot provide the posts fields."""
    with source_db.begin() as connection:
        actual = column_types(connection, table)
    if not actual:
        raise SchemaMismatchError(
            description=f"source_db: table {table} not found at {source_db.location}",
            allow_retries=False,
        )
    problems = contract_problems(actual, SOURCE_CONTRACT)
    if problems:
        raise SchemaMismatchError(
            description=f"source_db: table {table} cannot be read: {'; '.join(problems)}",
            allow_retries=False,
        )


def ensure_analytical_tables(analytical_db: PostgresResource) -> None:
    """Create missing tables; fail, before writing, on existing ones that do not fit."""
    with analytical_db.begin() as connection:
        connection.execute(sa.select(sa.func.pg_advisory_xact_lock(PIPELINE_LOCK_ID)))
        for table, contract in ANALYTICAL_CONTRACTS.items():
            actual = column_types(connection, table)
            problems = contract_problems(actual, contract) if actual else []
            if problems:
                raise SchemaMismatchError(
                    description=f"analytical_db: existing table {table} is incompatible: "
                    f"{'; '.join(problems)}. Rename or migrate it; nothing was written.",
                    allow_retries=False,
                )
        metadata.create_all(connection, checkfirst=True)
