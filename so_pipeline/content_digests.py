"""Hashes of what the copy holds, computed on each server, so contents compare without moving.

A row's hash covers every copied value and its verdict under the rules (reject reason, NULL
when kept): the source computes it over its rows cast and classified exactly as a load would
copy them, the analytical database over the active rows of `posts` (reason NULL) and
`posts_rejected`. Text goes through `hashtextextended`, timestamps through an explicit format,
NULLs through a marker no value can take, so the same values give the same hash on any server
whatever its settings. A bucket's digest is the count and the sum of its rows' hashes: only
those two numbers cross the network when a bucket is equal.
"""

from dataclasses import asdict, dataclass

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
# The day's share of buckets: div(id, bucket_ids) taken modulo `days` (never negative) = share.
_IN_SHARE = sql.SQL(
    "id <= %(up_to_id)s::bigint AND mod(mod(div(id, %(bucket_ids)s)::bigint, %(days)s) "
    "+ %(days)s, %(days)s) = %(share)s"
)


def _active_analytical_rows(condition: sql.Composable) -> sql.Composed:
    """The rows the copy stands for: active (not soft-deleted) rows of both tables."""
    fields = copied_columns(posts)
    selects = []
    for table in TABLES:
        reason = sql.SQL("reason") if "reason" in table.c else sql.SQL("NULL::text")
        selects.append(
            sql.SQL(
                "SELECT {fields}, {reason} AS reason FROM {table} "
                "WHERE deleted_at IS NULL AND {condition}"
            ).format(
                fields=sql.SQL(", ").join(map(sql.Identifier, fields)),
                reason=reason,
                table=sql.Identifier(table.name),
                condition=condition,
            )
        )
    return sql.SQL(" UNION ALL ").join(selects)


def _hashes(rows: sql.Composable) -> sql.Composed:
    return sql.SQL("SELECT id, {} AS h FROM ({}) w").format(ROW_HASH, rows)


def _bucket_digests(rows: sql.Composable) -> sql.Composed:
    return sql.SQL(
        "SELECT div(id, %(group_ids)s) AS part, count(*), coalesce(sum(h), 0) "
        "FROM ({}) d GROUP BY part"
    ).format(_hashes(rows))


_SOURCE_SHARE = _bucket_digests(classified_rows(_IN_SHARE))
_ANALYTICAL_SHARE = _bucket_digests(_active_analytical_rows(_IN_SHARE))
_SOURCE_RANGE = _hashes(classified_rows(_IN_RANGE))
_ANALYTICAL_RANGE = _hashes(_active_analytical_rows(_IN_RANGE))
_IN_IDS = sql.SQL("id = ANY(%(ids)s::bigint[])")
_SOURCE_IDS = _hashes(classified_rows(_IN_IDS))
_ANALYTICAL_IDS = _hashes(_active_analytical_rows(_IN_IDS))


@dataclass(frozen=True)
class Share:
    """The buckets (of `bucket_ids` ids) whose number is `share` modulo `days`, up to an id,
    digested in parts of `group_ids` ids (so a difference is narrowed to a small part)."""

    up_to_id: int
    bucket_ids: int
    days: int
    share: int
    group_ids: int

    def params(self) -> dict[str, object]:
        return asdict(self)


def _digests(
    connection: psycopg.Connection, query: sql.Composed, params: dict
) -> dict[int, Digest]:
    rows = connection.execute(query, params).fetchall()
    return {int(bucket): (int(count), int(total)) for bucket, count, total in rows}


def source_digests(
    connection: psycopg.Connection, share: Share, rules: dict[str, object]
) -> dict[int, Digest]:
    """Part -> digest of the share's source rows, classified under `rules` (one scan)."""
    return _digests(connection, _SOURCE_SHARE, {**share.params(), **rules})


def analytical_digests(connection: psycopg.Connection, share: Share) -> dict[int, Digest]:
    """Part -> digest of the share's active analytical rows (one scan of each table)."""
    return _digests(connection, _ANALYTICAL_SHARE, share.params())


def source_row_hashes(
    connection: psycopg.Connection, low: int, high: int, rules: dict[str, object]
) -> dict[int, int]:
    """id -> row hash of the source rows with ids in [low, high]."""
    rows = connection.execute(_SOURCE_RANGE, {"low": low, "high": high, **rules})
    return dict(rows.fetchall())


def analytical_row_hashes(connection: psycopg.Connection, low: int, high: int) -> dict[int, int]:
    """id -> row hash of the active analytical rows with ids in [low, high]."""
    rows = connection.execute(_ANALYTICAL_RANGE, {"low": low, "high": high})
    return dict(rows.fetchall())


def source_hashes_of(
    connection: psycopg.Connection, ids: list[int], rules: dict[str, object]
) -> dict[int, int]:
    """id -> row hash of the source rows with these ids."""
    return dict(connection.execute(_SOURCE_IDS, {"ids": ids, **rules}).fetchall())


def analytical_hashes_of(connection: psycopg.Connection, ids: list[int]) -> dict[int, int]:
    """id -> row hash of the active analytical rows with these ids."""
    return dict(connection.execute(_ANALYTICAL_IDS, {"ids": ids}).fetchall())
