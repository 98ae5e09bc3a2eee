"""Edits at the source reach the analytical tables: keyset paging on (change column, id).

Every Stack Exchange posts table has `last_activity_date`, which moves forward on every edit
(title, body, the owner set NULL when a user is deleted). Each run reads the rows whose
(last_activity_date, id) lies after a change cursor, for ids the id cursor has already passed
(newer ids arrive through the id windows with their current values), classifies them under
the same rules and applies them: unchanged rows are not rewritten. Transactions commit late,
so once the changes are drained a run starts again `lookback` before the cursor; that re-read
is cheap with an index on (last_activity_date, id) at the source.

The column is written by an application, so nothing in it is trusted: the cursor never moves
past the source server's own clock (a post dated in the future cannot hide the edits after
it), values Python cannot hold (infinity, the year 10000) and NULLs are never read here, and
such rows are counted. Their edits, and edits that moved the column backwards beyond the
look-back, reach the copy through the reconciliation, which compares contents. A run pages
on until it has drained the changes or spent its time budget; the next run goes on from
there, so a mass edit larger than a page never hides a later one.

The cursor is recorded in filtered_posts' metadata and, with the rows, in the analytical
database's so_pipeline_state table, where a run finds it when Dagster's history is lost.
"""

import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from so_pipeline.analytical_reads import recorded_state
from so_pipeline.core_sql import execute
from so_pipeline.metadata import labels, numbers
from so_pipeline.posts_merge import Applied
from so_pipeline.run_connections import RunConnections
from so_pipeline.source_posts import CHANGED_AT, SOURCE_TABLE, ChangeColumn, OddRows
from so_pipeline.table_contract import TYPE_FAMILIES, column_types, has_index_on

TIMESTAMP_TYPES = next(family for family in TYPE_FAMILIES if "timestamp with time zone" in family)

# Metadata keys of the change cursor in filtered_posts' materializations.
CHANGE_CURSOR_AT = "change_cursor_at"
CHANGE_CURSOR_ID = "change_cursor_id"
CHANGES_DRAINED = "changes_drained"
# Its name in so_pipeline_state.
CHANGE_CURSOR_STATE = "change_cursor"


@dataclass(frozen=True)
class ChangeCursor:
    """Where change capture stands.

    `at`: the newest change applied, never past the source's clock. `page`: the keyset
    position inside a read that stopped at a full page (None once drained: the next read
    starts `lookback` before `at`).
    """

    at: datetime
    page: tuple[datetime, int] | None = None

    def read_from(self, lookback: timedelta) -> tuple[datetime, int | None]:
        """Where the next read starts: right after the page, or back by `lookback`."""
        return self.page if self.page is not None else (self.at - lookback, None)

    def after_page(
        self, last: tuple[datetime, int] | None, full: bool, clock: datetime
    ) -> "ChangeCursor":
        """The cursor after a page whose last row was `last` (`full`: more may follow)."""
        if last is None:
            return ChangeCursor(self.at)
        at = max(self.at, min(last[0], clock))
        return ChangeCursor(at, last if full else None)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> "ChangeCursor | None":
        at = metadata.get(CHANGE_CURSOR_AT)
        if not at:
            return None
        page_id = metadata.get(CHANGE_CURSOR_ID)
        drained = metadata.get(CHANGES_DRAINED, "true") == "true"
        when = datetime.fromisoformat(at)
        if drained or page_id in (None, "None"):
            return cls(when)
        page_at = metadata.get("change_page_at")
        return cls(when, (datetime.fromisoformat(page_at) if page_at else when, int(page_id)))

    def metadata(self) -> dict[str, Any]:
        page_at, page_id = self.page if self.page is not None else (None, None)
        return labels(
            {
                CHANGE_CURSOR_AT: self.at.isoformat(),
                CHANGES_DRAINED: str(self.page is None).lower(),
                "change_page_at": page_at.isoformat() if page_at else None,
                CHANGE_CURSOR_ID: page_id,
            }
        )

    def to_state(self) -> str:
        return json.dumps({key: value.value for key, value in self.metadata().items()})

    @classmethod
    def from_state(cls, text: str | None) -> "ChangeCursor | None":
        return None if text is None else cls.from_metadata(json.loads(text))


@dataclass(frozen=True)
class ChangeCapture:
    """What one run's change capture did (`status` says whether it ran, and why not)."""

    status: str
    cursor: ChangeCursor | None = None
    index_missing: bool = False
    read: int = 0
    pages: int = 0
    applied: Applied | None = None
    odd: OddRows | None = None

    def metadata(self) -> dict[str, Any]:
        values: dict[str, Any] = {"change_capture": self.status}
        if self.cursor is not None:
            values.update(self.cursor.metadata())
        if self.applied is not None:
            applied = self.applied
            values.update(
                numbers(
                    {
                        "changes_read": self.read,
                        "changes_pages": self.pages,
                        "changes_inserted": applied.inserted_rows,
                        "changes_updated": applied.updated_rows,
                        "changes_rejected": applied.newly_rejected_rows,
                        "changes_restored": applied.restored_rows,
                    }
                )
            )
        if self.odd is not None:
            values.update(
                numbers(
                    {
                        "changes_ahead_of_source_clock": self.odd.ahead_of_clock,
                        "changes_without_time": self.odd.without_time,
                    }
                )
            )
        return values


def missing_index_advice(change_column: str) -> str:
    return (
        f"no index on {change_column}: each run reads the whole source table (ask the DBA for "
        f"CREATE INDEX CONCURRENTLY ON {SOURCE_TABLE} ({change_column}, id))"
    )


@dataclass(frozen=True)
class ChangeSettings:
    """How change capture reads the source (from filtered_posts' config)."""

    column: str | None
    lookback: timedelta
    batch_size: int
    require_owner: bool
    time_budget: timedelta = timedelta(minutes=2)


def previous_cursor(run: RunConnections, from_history: ChangeCursor | None) -> ChangeCursor | None:
    """The cursor of the history, else the one recorded with the rows (history lost)."""
    if from_history is not None:
        return from_history
    return ChangeCursor.from_state(recorded_state(run.analytical, CHANGE_CURSOR_STATE))


def capture_changes(
    run: RunConnections,
    settings: ChangeSettings,
    previous: ChangeCursor | None,
    up_to_id: int | None,
) -> ChangeCapture:
    """Apply the source's changes after `previous` to ids up to `up_to_id`."""
    if not settings.column:
        return ChangeCapture("off (change_column not set)")
    column_type = column_types(run.source, SOURCE_TABLE).get(settings.column)
    if column_type not in TIMESTAMP_TYPES:
        found = "has no column" if column_type is None else f"has {column_type} column"
        return ChangeCapture(f"off (source {SOURCE_TABLE} {found} {settings.column})")
    column = ChangeColumn(settings.column, column_type == "timestamp with time zone")
    clock = column.clock(run.source)
    if previous is None:
        # A new deployment: rows loaded up to now carry their current values, so the changes
        # up to the newest one (not ahead of the clock) are in them; read after it, and after
        # every id loaded at its time.
        start = column.latest_change(run.source, clock) or clock
        cursor = ChangeCursor(start, None if up_to_id is None else (start, up_to_id))
        with run.writer.transaction() as merge:
            merge.record(CHANGE_CURSOR_STATE, cursor.to_state())
        return ChangeCapture(f"on ({settings.column}), started", cursor)
    status = f"on ({settings.column})"
    index_missing = not has_index_on(run.source, SOURCE_TABLE, settings.column)
    if index_missing:
        status += f"; {missing_index_advice(settings.column)}"
    if up_to_id is None:
        return ChangeCapture(status, previous, index_missing=index_missing)
    capture = _page_through(run, settings, column, previous, up_to_id, clock)
    odd = column.odd_rows(run.source, clock, up_to_id)
    return ChangeCapture(
        status, capture.cursor, index_missing, capture.read, capture.pages, capture.applied, odd
    )


def _page_through(
    run: RunConnections,
    settings: ChangeSettings,
    column: ChangeColumn,
    cursor: ChangeCursor,
    up_to_id: int,
    clock: datetime,
) -> ChangeCapture:
    """Read and apply pages of changes until drained or out of time; each page commits with
    its cursor."""
    deadline = time.monotonic() + settings.time_budget.total_seconds()
    rules = run.rules(settings.require_owner)
    read, pages, applied = 0, 0, Applied()
    while True:
        after_at, after_id = cursor.read_from(settings.lookback)
        params = {
            "after_at": after_at,
            "after_id": after_id,
            "up_to_id": up_to_id,
            "limit": settings.batch_size,
            **rules,
        }
        with run.writer.transaction() as merge:
            changed_at = sa.Column(CHANGED_AT, pg.TIMESTAMP(timezone=False))
            page_rows = merge.stage(run.source, column.copy_changes(), params, changed_at)
            staged = merge.staging_table()
            newest = (
                sa.select(staged.c[CHANGED_AT], staged.c.id)
                .order_by(staged.c[CHANGED_AT].desc(), staged.c.id.desc())
                .limit(1)
            )
            last = execute(merge.connection, newest).fetchone()
            applied += merge.apply()
            full = page_rows >= settings.batch_size
            cursor = cursor.after_page((last[0], last[1]) if last else None, full, clock)
            merge.record(CHANGE_CURSOR_STATE, cursor.to_state())
        read, pages = read + page_rows, pages + 1
        if cursor.page is None or time.monotonic() > deadline:
            return ChangeCapture("", cursor, read=read, pages=pages, applied=applied)
