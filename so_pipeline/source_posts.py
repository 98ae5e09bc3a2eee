"""The source `posts` table: its contract and every statement the pipeline runs on it.

Rows leave the source as binary COPY data cast to exactly the analytical column types (binary
COPY requires it), so the column lists below come from the analytical table definitions.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import psycopg
import sqlalchemy as sa
from psycopg import sql

from so_pipeline.analytical_schema import copied_columns, post_fields, posts, posts_rejected
from so_pipeline.core_sql import execute, scalar, server_encoding
from so_pipeline.post_rules import (
    REJECT_REASON_SQL,
    UnsupportedEncodingError,
    python_codec,
)
from so_pipeline.table_contract import (
    SchemaMismatchError,
    column_types,
    contract_problems,
    family_types,
    id_is_unique_key,
    type_name,
)
from so_pipeline.window import IdRange

SOURCE_TABLE = "posts"

source_posts = sa.table(
    SOURCE_TABLE, sa.column("id", sa.BigInteger), sa.column("creation_date", sa.DateTime)
)
_id = source_posts.c.id


def check_source_table(connection: psycopg.Connection, location: str) -> None:
    """Fail before any write when the source table cannot provide the posts fields."""
    try:
        python_codec(server_encoding(connection))
    except UnsupportedEncodingError as error:
        raise SchemaMismatchError(
            description=f"source_db: cannot apply the rules at {location}: {error}",
            allow_retries=False,
        ) from None
    actual = column_types(connection, SOURCE_TABLE)
    if not actual:
        raise SchemaMismatchError(
            description=f"source_db: table {SOURCE_TABLE} not found at {location}",
            allow_retries=False,
        )
    problems = contract_problems(actual, family_types(post_fields()))
    if problems:
        raise SchemaMismatchError(
            description=f"source_db: table {SOURCE_TABLE} cannot be read: {'; '.join(problems)}",
            allow_retries=False,
        )
    if not id_is_unique_key(connection, SOURCE_TABLE):
        raise SchemaMismatchError(
            description=f"source_db: table {SOURCE_TABLE} at {location} does not guarantee "
            "unique, non-NULL ids (no primary key, nor a unique index on a NOT NULL id): "
            f"{describe_id_violations(connection)}. The cursor needs one row per id. Fix: "
            f"remove those rows, then ALTER TABLE {SOURCE_TABLE} ADD PRIMARY KEY (id). "
            "Nothing was written.",
            allow_retries=False,
        )


def describe_id_violations(connection: psycopg.Connection, shown: int = 10) -> str:
    """The duplicate and NULL ids of the source table, as a user would want them named."""
    duplicates = sa.select(_id).group_by(_id).having(sa.func.count() > 1).order_by(_id)
    duplicate_ids = [row[0] for row in execute(connection, duplicates.limit(shown + 1))]
    null_ids = scalar(connection, sa.select(sa.func.count()).where(_id.is_(None)))
    found = []
    if duplicate_ids:
        listed = ", ".join(map(str, duplicate_ids[:shown]))
        found.append(f"duplicate ids {listed}{', ...' if len(duplicate_ids) > shown else ''}")
    if null_ids:
        found.append(f"{null_ids} row(s) with a NULL id")
    return "; ".join(found) if found else "no duplicate or NULL id yet"


def _ids_after(after_id: int | None) -> sa.ColumnElement[bool]:
    return sa.true() if after_id is None else _id > after_id


def next_window_bounds(
    connection: psycopg.Connection, after_id: int | None, batch_size: int
) -> tuple[int, int | None, int | None]:
    """(rows, first id, last id) of the next `batch_size` ids after `after_id`.

    Keyset paging on the primary key: an index-only scan, however large the id gaps.
    """
    ids = sa.select(_id).where(_ids_after(after_id)).order_by(_id).limit(batch_size).subquery()
    query = sa.select(sa.func.count(), sa.func.min(ids.c.id), sa.func.max(ids.c.id))
    count, first_id, last_id = execute(connection, query).fetchone()  # type: ignore[misc]
    return count, first_id, last_id


def max_id(connection: psycopg.Connection) -> int | None:
    return scalar(connection, sa.select(sa.func.max(_id)))


def newest_post_time(connection: psycopg.Connection) -> datetime | None:
    """creation_date (UTC) of the post with the highest id: read backwards on the primary key."""
    query = sql.SQL("SELECT {} FROM {} ORDER BY id DESC LIMIT 1").format(
        _as_analytical("creation_date", "timestamp without time zone"),
        sql.Identifier(SOURCE_TABLE),
    )
    row = connection.execute(query).fetchone()
    return None if row is None else row[0]


def rows_after(connection: psycopg.Connection, cursor: int | None) -> int:
    """Source posts above the cursor (a full index scan of them: for status, not for runs)."""
    return scalar(connection, sa.select(sa.func.count()).where(_ids_after(cursor)))


def split_id_range(
    connection: psycopg.Connection, id_range: IdRange, parts: int, rows: int
) -> list[int]:
    """Ids that cut the `rows` source ids in the range into `parts` about equal parts.

    Each cut is found after the previous one (keyset on the primary key), so the index is read
    once whatever the number of parts. Fewer cuts come back when the range holds fewer rows
    than expected; every part is non-empty and together they cover the range.
    """
    previous, last_id = id_range
    cuts: list[int] = []
    for _ in range(parts - 1):
        query = (
            sa.select(_id)
            .where(_ids_after(previous), _id < last_id)
            .order_by(_id)
            .offset(rows // parts - 1)
            .limit(1)
        )
        found = scalar(connection, query)
        if found is None:
            break
        previous = found
        cuts.append(found)
    return cuts


def _as_analytical(name: str, analytical_type: str) -> sql.Composed:
    """The source column cast to its analytical type, whatever the session's settings.

    A source timestamp may be `timestamp` (taken as UTC, as Stack Exchange's are) or
    `timestamp with time zone`, converted with AT TIME ZONE 'UTC': a plain cast would use the
    session's TimeZone, which a pooler may not let the pipeline set. The statement does not
    know which type the source has, so it asks each value (no measurable cost on 1M rows).
    """
    column = sql.Identifier(name)
    if analytical_type != "timestamp without time zone":
        return sql.SQL("{}::{}").format(column, sql.SQL(analytical_type))
    return sql.SQL(
        "CASE WHEN pg_typeof({0}) = 'timestamp with time zone'::regtype "
        "THEN {0}::timestamptz AT TIME ZONE 'UTC' ELSE {0}::timestamp END"
    ).format(column)


_FIELDS = sql.SQL(", ").join(
    sql.SQL("{} AS {}").format(
        _as_analytical(column.name, type_name(column)), sql.Identifier(column.name)
    )
    for column in post_fields()
)
_IN_ID_RANGE = sql.SQL(
    "(%(after_id)s::bigint IS NULL OR id > %(after_id)s::bigint) AND id <= %(last_id)s::bigint"
)


_NO_EXTRA = sql.SQL("")


def classified_rows(condition: sql.Composable, extra: sql.Composable = _NO_EXTRA) -> sql.Composed:
    """Source rows meeting `condition` with their reject `reason` (NULL when kept), each column
    cast to its analytical type; `extra` adds columns."""
    return sql.SQL(
        "SELECT {fields}, {reason} AS reason{extra} FROM {table} WHERE {condition}"
    ).format(
        fields=_FIELDS,
        reason=sql.SQL(REJECT_REASON_SQL),
        extra=extra,
        table=sql.Identifier(SOURCE_TABLE),
        condition=condition,
    )


def _copy_out(columns: Sequence[str]) -> sql.Composed:
    return sql.SQL("COPY (SELECT {} FROM ({}) w) TO STDOUT (FORMAT binary)").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), classified_rows(_IN_ID_RANGE)
    )


# Every row of a window, classified (its reason, NULL when kept), in posts_rejected's layout.
COPY_CLASSIFIED_POSTS = _copy_out(copied_columns(posts_rejected))
# The same rows with the reason first, then `posts`' columns: copy_pipe.split_copy sends the
# kept ones to `posts` and the rejected ones aside, so a window's rows are read once.
SPLIT_COLUMNS = ("reason", *copied_columns(posts))
COPY_SPLIT_POSTS = _copy_out(SPLIT_COLUMNS)

# Name of the extra column that carries the change column's value in change COPYs.
CHANGED_AT = "changed_at"


@dataclass(frozen=True)
class OddRows:
    """Rows whose change time cannot be trusted: change capture cannot place them."""

    ahead_of_clock: int = 0  # in the future, or infinity
    without_time: int = 0  # NULL


@dataclass(frozen=True)
class ChangeColumn:
    """The source column that moves on every edit, read as a UTC timestamp without time zone.

    A `timestamp with time zone` column is converted explicitly (AT TIME ZONE 'UTC'); a
    `timestamp without time zone` column is taken to hold UTC already, as Stack Exchange's
    do. Comparisons are made on the column itself, so an index on (it, id) serves them.
    """

    name: str
    with_time_zone: bool

    def _as_utc(self) -> sql.Composable:
        column = sql.Identifier(self.name)
        if self.with_time_zone:
            return sql.SQL("({} AT TIME ZONE 'UTC')").format(column)
        return column

    def _param(self, name: str) -> sql.Composable:
        """A UTC timestamp parameter in the column's own type."""
        if self.with_time_zone:
            return sql.SQL("(%({})s::timestamp AT TIME ZONE 'UTC')").format(sql.SQL(name))
        return sql.SQL("%({})s::timestamp").format(sql.SQL(name))

    def _python_range(self) -> sql.Composable:
        """Values Python can hold: the year 10000, infinity and beyond are left out."""
        limit = "'10000-01-01 UTC'::timestamptz" if self.with_time_zone else "'10000-01-01'"
        return sql.SQL("{} < {}").format(sql.Identifier(self.name), sql.SQL(limit))

    def copy_changes(self) -> sql.Composed:
        """Classified rows changed after a keyset position on (the column, id), oldest first,
        with the column's value as `changed_at`.

        Parameters: `after_at` and `after_id` (the position; `after_id` NULL means every id
        at `after_at` too), `up_to_id` (only ids the id cursor has passed), `limit`, and the
        rules'. NULL and out-of-range values are never read here (the reconciliation compares
        those rows' contents).
        """
        changed, after_at = sql.Identifier(self.name), self._param("after_at")
        condition = sql.SQL(
            "id <= %(up_to_id)s::bigint AND {in_range} AND ({changed} > {after_at} OR "
            "({changed} = {after_at} AND (%(after_id)s::bigint IS NULL OR "
            "id > %(after_id)s::bigint))) ORDER BY {changed}, id LIMIT %(limit)s"
        ).format(in_range=self._python_range(), changed=changed, after_at=after_at)
        extra = sql.SQL(", {} AS {}").format(self._as_utc(), sql.Identifier(CHANGED_AT))
        columns = [*copied_columns(posts_rejected), CHANGED_AT]
        return sql.SQL("COPY ({} ) TO STDOUT (FORMAT binary)").format(
            sql.SQL("SELECT {} FROM ({}) w").format(
                sql.SQL(", ").join(map(sql.Identifier, columns)), classified_rows(condition, extra)
            )
        )

    def clock(self, connection: psycopg.Connection) -> datetime:
        """The source server's own clock, as a UTC timestamp without time zone."""
        return scalar(connection, sa.select(sa.func.timezone("UTC", sa.func.now())))

    def latest_change(self, connection: psycopg.Connection, clock: datetime) -> datetime | None:
        """The newest change time not ahead of `clock` (read backwards on an index on it)."""
        query = sql.SQL("SELECT max({}) FROM {} WHERE {} <= {}").format(
            self._as_utc(),
            sql.Identifier(SOURCE_TABLE),
            sql.Identifier(self.name),
            self._param("clock"),
        )
        return connection.execute(query, {"clock": clock}).fetchone()[0]  # type: ignore[index]

    def odd_rows(self, connection: psycopg.Connection, clock: datetime, up_to_id: int) -> OddRows:
        """Rows up to `up_to_id` whose change time is ahead of `clock` or missing."""
        changed = sql.Identifier(self.name)
        query = sql.SQL(
            "SELECT count(*) FILTER (WHERE {changed} > {clock}), "
            "count(*) FILTER (WHERE {changed} IS NULL) FROM {table} "
            "WHERE id <= %(up_to_id)s AND ({changed} > {clock} OR {changed} IS NULL)"
        ).format(changed=changed, clock=self._param("clock"), table=sql.Identifier(SOURCE_TABLE))
        ahead, missing = connection.execute(
            query, {"clock": clock, "up_to_id": up_to_id}
        ).fetchone()  # type: ignore[misc]
        return OddRows(ahead_of_clock=ahead, without_time=missing)


def copy_posts_by_id() -> sql.Composed:
    """Classified rows whose ids are in the array parameter `ids` (a repair)."""
    return sql.SQL("COPY (SELECT {} FROM ({}) w) TO STDOUT (FORMAT binary)").format(
        sql.SQL(", ").join(map(sql.Identifier, copied_columns(posts_rejected))),
        classified_rows(sql.SQL("id = ANY(%(ids)s::bigint[])")),
    )


def range_params(id_range: IdRange, rules: dict[str, object]) -> dict[str, object]:
    """Parameters of COPY_SPLIT_POSTS / COPY_CLASSIFIED_POSTS for the ids in (after_id, last_id].

    `rules` are the rules' own parameters (`post_rules.rule_params`).
    """
    after_id, last_id = id_range
    return {"after_id": after_id, "last_id": last_id, **rules}
