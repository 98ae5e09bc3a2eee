"""Reads from the source `posts` table: the next id window, and its rows as COPY streams."""

from dataclasses import dataclass

import psycopg
import sqlalchemy as sa
from psycopg import sql

from so_pipeline.post_rules import REJECT_REASON_SQL, rule_params
from so_pipeline.resources import PostgresResource

SOURCE_TABLE = "posts"

_source_posts = sa.table(SOURCE_TABLE, sa.column("id", sa.BigInteger))


@dataclass(frozen=True)
class PostWindow:
    """Source ids `read_after_id < id <= last_id`: what one run reads.

    Ids above `after_id` (the cursor, or a replay's start) are new; those in
    `(read_after_id, after_id]` are the look-back, re-read in case a late row committed there
    after the previous run. Only these bounds pass between the assets, with `new_rows` (the
    count of new ids, which sizes the parallel COPY streams) and the source's highest id:
    `filtered_posts` streams the rows itself, so no window is ever held in memory. None means
    "from the start".
    """

    read_after_id: int | None
    after_id: int | None
    last_id: int | None
    cursor_before: int | None
    new_rows: int
    source_max_id: int | None

    @property
    def is_empty(self) -> bool:
        return self.last_id is None or self.last_id == self.read_after_id

    @property
    def ids_behind_source(self) -> int:
        """How far the source's highest id is beyond this window (the backlog)."""
        if self.source_max_id is None or self.last_id is None:
            return 0
        return self.source_max_id - self.last_id


def next_window_bounds(
    source_db: PostgresResource, after_id: int | None, batch_size: int
) -> tuple[int, int | None, int | None]:
    """(rows, first id, last id) of the next `batch_size` ids after `after_id`.

    Keyset paging on the primary key: an index-only scan, however large the id gaps.
    """
    ids = sa.select(_source_posts.c.id).order_by(_source_posts.c.id).limit(batch_size)
    if after_id is not None:
        ids = ids.where(_source_posts.c.id > after_id)
    window = ids.subquery()
    query = sa.select(sa.func.count(), sa.func.min(window.c.id), sa.func.max(window.c.id))
    with source_db.begin() as connection:
        count, first_id, last_id = connection.execute(query).one()
    return count, first_id, last_id


def source_max_id(source_db: PostgresResource) -> int | None:
    with source_db.begin() as connection:
        return connection.execute(sa.select(sa.func.max(_source_posts.c.id))).scalar_one()


def split_id_range(
    source: psycopg.Connection, after_id: int | None, last_id: int, parts: int, rows: int
) -> list[int]:
    """Ids that cut the `rows` source ids in (after_id, last_id] into `parts` about equal parts.

    Each cut is found after the previous one (keyset on the primary key), so the index is read
    once whatever the number of parts. Fewer cuts come back when the range holds fewer rows
    than expected; every part is non-empty and together they cover the range.
    """
    query = sql.SQL(
        "SELECT id FROM {table} WHERE (%(after_id)s::bigint IS NULL OR id > %(after_id)s::bigint)"
        " AND id < %(last_id)s::bigint ORDER BY id OFFSET %(offset)s LIMIT 1"
    ).format(table=sql.Identifier(SOURCE_TABLE))
    cuts: list[int] = []
    previous = after_id
    for _ in range(parts - 1):
        found = source.execute(
            query, {"after_id": previous, "last_id": last_id, "offset": rows // parts - 1}
        ).fetchone()
        if found is None:
            break
        previous = found[0]
        cuts.append(previous)
    return cuts


# Rows of the window with their reject reason (NULL when kept), cast to exactly the analytical
# column types, which binary COPY requires.
_CLASSIFIED_WINDOW = sql.SQL(
    """SELECT id::bigint AS id, title::text AS title, body::text AS body,
        owner_user_id::bigint AS owner_user_id, creation_date::timestamp AS creation_date,
        {reason} AS reject_reason
    FROM {table}
    WHERE (%(after_id)s::bigint IS NULL OR id > %(after_id)s::bigint)
      AND id <= %(last_id)s::bigint"""
).format(reason=sql.SQL(REJECT_REASON_SQL), table=sql.Identifier(SOURCE_TABLE))

COPY_KEPT_POSTS = sql.SQL(
    "COPY (SELECT id, title, body, owner_user_id, creation_date FROM ({window}) w "
    "WHERE reject_reason IS NULL) TO STDOUT (FORMAT binary)"
).format(window=_CLASSIFIED_WINDOW)

COPY_REJECTED_POSTS = sql.SQL(
    "COPY (SELECT id, reject_reason, title, body, owner_user_id, creation_date FROM ({window}) w "
    "WHERE reject_reason IS NOT NULL) TO STDOUT (FORMAT binary)"
).format(window=_CLASSIFIED_WINDOW)


def range_params(after_id: int | None, last_id: int, require_owner: bool) -> dict[str, object]:
    """Parameters of COPY_KEPT_POSTS / COPY_REJECTED_POSTS for the ids in (after_id, last_id]."""
    return {"after_id": after_id, "last_id": last_id, **rule_params(require_owner)}
