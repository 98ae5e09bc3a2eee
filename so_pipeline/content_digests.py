"""Hashes of what the copy holds, computed on each server, so contents compare without moving.

A row's hash covers every copied value and its verdict under the rules (reject reason, NULL
when kept): the source computes it over its rows cast and classified exactly as a load would
copy them, the analytical database over the active rows of `posts` (reason NULL) and
`posts_rejected`. Text goes through `hashtextextended`, timestamps through an explicit format,
NULLs through a marker no value can take, so the same values give the same hash on any server
whatever its settings. A bucket's digest is the count and the sum of its rows' hashes: only
those two numbers cross the network when a bucket is equal.
"""

import psycopg
import sqlalchemy as sa
from psycopg import sql

from so_pipeline.analytical_schema import TABLES, copied_columns, post_fields, posts
from so_pipeline.source_posts import classified_rows

Digest = tuple[int, int]  # (rows, sum of their hashes)

_NULL = sql.Literal("N")  # hashes and formatted timestamps never read "N"


def _value_text(column: sa.Column) -> sql.Composable:
    name = sql.Identifier(column.name)
    if isinstance(column.type, sa.Text | sa.String):
        return sql.SQL("coalesce(hashtextextended({}, 0)::text, {})").format(name, _NULL)
    if isinstance(column.type, sa.DateTime):
        # to_char gives NULL for infinity; its text form is the same under any DateStyle.
        return sql.SQL("coalesce(to_char({0}, 'YYYY-MM-DD HH24:MI:SS.US'), {0}::text, {1})").format(
            name, _NULL
        )
    return sql.SQL("coalesce({}::text, {})").format(name, _NULL)


_HASHED_COLUMNS = [*post_fields(), sa.Column("reason", sa.Text)]
ROW_HASH = sql.SQL("hashtextextended(concat_ws('|', {}), 0)").format(
    sql.SQL(", ").join(_value_text(column) for column in _HASHED_COLUMNS)
)

_IN_RANGE = sql.SQL("id >= %(low)s::bigint AND id <= %(high)s::bigint")


def _active_analytical_rows() -> sql.Composed:
    """The rows the copy stands for: active (not soft-deleted) rows of both tables."""
    fields = copied_columns(posts)
    selects = []
    for table in TABLES:
        reason = sql.SQL("reason") if "reason" in table.c else sql.SQL("NULL::text")
        selects.append(
            sql.SQL(
                "SELECT {fields}, {reason} AS reason FROM {table} "
                "WHERE deleted_at IS NULL AND {range}"
            ).format(
                fields=sql.SQL(", ").join(map(sql.Identifier, fields)),
                reason=reason,
                table=sql.Identifier(table.name),
                range=_IN_RANGE,
            )
        )
    return sql.SQL(" UNION ALL ").join(selects)


_SOURCE_ROWS = classified_rows(_IN_RANGE)
_ANALYTICAL_ROWS = _active_analytical_rows()


def _hashes(rows: sql.Composable) -> sql.Composed:
    return sql.SQL("SELECT id, {} AS h FROM ({}) w").format(ROW_HASH, rows)


def _digest(rows: sql.Composable) -> sql.Composed:
    return sql.SQL("SELECT count(*), coalesce(sum(h), 0) FROM ({}) d").format(_hashes(rows))


def source_digest(
    connection: psycopg.Connection, low: int, high: int, rules: dict[str, object]
) -> Digest:
    """Digest of the source rows with ids in [low, high], classified under `rules`."""
    row = connection.execute(_digest(_SOURCE_ROWS), {"low": low, "high": high, **rules})
    count, total = row.fetchone()  # type: ignore[misc]
    return int(count), int(total)


def analytical_digest(connection: psycopg.Connection, low: int, high: int) -> Digest:
    """Digest of the active analytical rows with ids in [low, high]."""
    row = connection.execute(_digest(_ANALYTICAL_ROWS), {"low": low, "high": high})
    count, total = row.fetchone()  # type: ignore[misc]
    return int(count), int(total)


def source_row_hashes(
    connection: psycopg.Connection, low: int, high: int, rules: dict[str, object]
) -> dict[int, int]:
    """id -> row hash of the source rows with ids in [low, high]."""
    rows = connection.execute(_hashes(_SOURCE_ROWS), {"low": low, "high": high, **rules})
    return dict(rows.fetchall())


def analytical_row_hashes(connection: psycopg.Connection, low: int, high: int) -> dict[int, int]:
    """id -> row hash of the active analytical rows with ids in [low, high]."""
    rows = connection.execute(_hashes(_ANALYTICAL_ROWS), {"low": low, "high": high})
    return dict(rows.fetchall())
