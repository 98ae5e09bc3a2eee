"""Whether an existing table offers the columns a table definition needs, with usable types."""

import dagster as dg
import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from so_pipeline.core_sql import DIALECT, execute, scalar

# Types that hold the same values for our purpose (information_schema spelling): a source
# column of any type of its family can be read and cast to the analytical type.
TYPE_FAMILIES = (
    frozenset({"smallint", "integer", "bigint"}),
    frozenset({"text", "character varying", "character"}),
    frozenset({"timestamp without time zone", "timestamp with time zone"}),
)
# An existing analytical table may differ from its definition only this much.
_INTERCHANGEABLE = {"text": frozenset({"text", "character varying"})}

_columns = sa.table(
    "columns",
    sa.column("table_name"),
    sa.column("table_schema"),
    sa.column("column_name"),
    sa.column("data_type"),
    schema="information_schema",
)


# The catalog tables that tell which columns an index covers.
PG_INDEX = sa.table(
    "pg_index",
    sa.column("indrelid"),
    sa.column("indkey", pg.ARRAY(sa.SmallInteger)),
    sa.column("indisunique"),
    sa.column("indisprimary"),
    sa.column("indnkeyatts"),
    sa.column("indpred"),
    sa.column("indisvalid"),
    sa.column("indimmediate"),
)
PG_ATTRIBUTE = sa.table(
    "pg_attribute",
    sa.column("attrelid"),
    sa.column("attnum"),
    sa.column("attname"),
    sa.column("attnotnull"),
    sa.column("attcompression"),
)


class SchemaMismatchError(dg.Failure):
    """A table lacks a required column or has one of the wrong type."""


def type_name(column: sa.Column) -> str:
    """The column's type as information_schema spells it (e.g. `timestamp without time zone`)."""
    return column.type.compile(dialect=DIALECT).lower()


def exact_types(columns: list[sa.Column]) -> dict[str, frozenset[str]]:
    """Contract of a table we own: each column's own type (text may be varchar)."""
    return {
        column.name: _INTERCHANGEABLE.get(type_name(column), frozenset({type_name(column)}))
        for column in columns
    }


def family_types(columns: list[sa.Column]) -> dict[str, frozenset[str]]:
    """Contract of a table we read and cast: any type of each column's family."""
    contract = {}
    for column in columns:
        name = type_name(column)
        contract[column.name] = next((f for f in TYPE_FAMILIES if name in f), frozenset({name}))
    return contract


def column_types(connection: psycopg.Connection, table: str) -> dict[str, str]:
    """Column name -> type of `table` on the search path; empty when it does not exist."""
    query = sa.select(_columns.c.column_name, _columns.c.data_type).where(
        _columns.c.table_name == table,
        _columns.c.table_schema == sa.any_(sa.func.current_schemas(False)),
    )
    return dict(execute(connection, query).fetchall())


def contract_problems(actual: dict[str, str], contract: dict[str, frozenset[str]]) -> list[str]:
    """What keeps columns `actual` (name -> type) from meeting `contract`; empty when it does."""
    problems = []
    for column, allowed in contract.items():
        found = actual.get(column)
        if found is None:
            problems.append(f"column {column} is missing")
        elif found not in allowed:
            problems.append(f"column {column} is {found}, expected {' or '.join(sorted(allowed))}")
    return problems


def _indexes_leading_with(
    connection: psycopg.Connection, table: str, column: str, *conditions: sa.ColumnElement[bool]
) -> int:
    """How many indexes of `table` have `column` first (and meet `conditions`)."""
    index, attribute = PG_INDEX, PG_ATTRIBUTE
    query = (
        sa.select(sa.func.count())
        .select_from(
            index.join(
                attribute,
                sa.and_(
                    attribute.c.attrelid == index.c.indrelid,
                    attribute.c.attnum == index.c.indkey[0],
                ),
            )
        )
        .where(
            index.c.indrelid == sa.func.to_regclass(table),
            attribute.c.attname == column,
            *conditions,
        )
    )
    return scalar(connection, query)


def id_is_unique_key(connection: psycopg.Connection, table: str, immediate: bool = False) -> bool:
    """Whether `table`'s `id` is NOT NULL and alone in a valid, unique, non-partial index
    (`immediate`: checked at once, not DEFERRABLE, as ON CONFLICT (id) needs).

    (A primary key on `id` is one.) The cursor, and ON CONFLICT (id), need one row per id. An
    index left INVALID by a failed CREATE INDEX CONCURRENTLY proves nothing.
    """
    index = PG_INDEX
    unique_alone = [
        index.c.indisunique,
        index.c.indisvalid,
        index.c.indnkeyatts == 1,
        index.c.indpred.is_(None),
        PG_ATTRIBUTE.c.attnotnull,
    ]
    if immediate:
        unique_alone.append(index.c.indimmediate)
    return bool(_indexes_leading_with(connection, table, "id", *unique_alone))


def has_index_on(connection: psycopg.Connection, table: str, column: str) -> bool:
    """Whether an index of `table` starts with `column` (so a range read on it can use it)."""
    return bool(_indexes_leading_with(connection, table, column))
