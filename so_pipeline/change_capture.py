"""Edits at the source reach the analytical tables: keyset paging on (change column, id).

Every Stack Exchange posts table has `last_activity_date`, which moves forward on every edit
(title, body, the owner set NULL when a user is deleted). Each run reads the rows whose
(last_activity_date, id) lies after a change cursor kept in `filtered_posts`' metadata, for
ids the id cursor has already passed (newer ids arrive through the id windows with their
current values), classifies them under the same rules and applies them: unchanged rows are
not rewritten. Transactions commit late, so once the changes are drained a run starts again
`lookback_seconds` before the cursor; that re-read is cheap with an index on
(last_activity_date, id) at the source.
"""

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg

from so_pipeline import analytical_posts as analytical
from so_pipeline.copy_pipe import pipe_copy
from so_pipeline.core_sql import execute, server_encoding
from so_pipeline.metadata import labels, numbers
from so_pipeline.post_rules import rule_params
from so_pipeline.resources import PostgresResource
from so_pipeline.source_posts import (
    CHANGED_AT,
    SOURCE_TABLE,
    copy_changed_posts,
    latest_change,
)
from so_pipeline.table_contract import TYPE_FAMILIES, column_types, has_index_on

TIMESTAMP_TYPES = next(family for family in TYPE_FAMILIES if "timestamp with time zone" in family)

# A cursor's id that puts it after every row of its time: where a new deployment starts.
AFTER_EVERY_ID = 2**63 - 1

# Metadata keys of the change cursor in filtered_posts' materializations.
CHANGE_CURSOR_AT = "change_cursor_at"
CHANGE_CURSOR_ID = "change_cursor_id"
CHANGES_DRAINED = "changes_drained"


@dataclass(frozen=True)
class ChangeCursor:
    """A keyset position on (change column, id); `drained` when the last run read to the end."""

    at: datetime
    id: int | None
    drained: bool

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any]) -> "ChangeCursor | None":
        at = metadata.get(CHANGE_CURSOR_AT)
        if not at:
            return None
        cursor_id = metadata.get(CHANGE_CURSOR_ID)
        return cls(
            at=datetime.fromisoformat(at),
            id=int(cursor_id) if cursor_id not in (None, "None") else None,
            drained=metadata.get(CHANGES_DRAINED, "true") == "true",
        )

    def read_from(self, lookback: timedelta) -> tuple[datetime, int | None]:
        """Where the next read starts: back by `lookback` once drained, else right after."""
        if self.drained:
            return self.at - lookback, None
        return self.at, self.id

    def metadata(self) -> dict[str, Any]:
        return labels(
            {
                CHANGE_CURSOR_AT: self.at.isoformat(),
                CHANGE_CURSOR_ID: self.id,
                CHANGES_DRAINED: str(self.drained).lower(),
            }
        )


@dataclass(frozen=True)
class ChangeCapture:
    """What one run's change capture did (`status` says whether it ran, and why not)."""

    status: str
    cursor: ChangeCursor | None = None
    index_missing: bool = False
    read: int = 0
    applied: analytical.Applied | None = None

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
                        "changes_inserted": applied.inserted_rows,
                        "changes_updated": applied.updated_rows,
                        "changes_rejected": sum(applied.newly_rejected_by_reason.values()),
                        "changes_restored": applied.restored_rows,
                    }
                )
            )
        return values


def missing_index_advice(change_column: str) -> str:
    return (
        f"no index on {change_column}: each run reads the whole source table (ask the DBA for "
        f"CREATE INDEX CONCURRENTLY ON {SOURCE_TABLE} ({change_column}, id))"
    )


def capture_changes(
    source_db: PostgresResource,
    analytical_db: PostgresResource,
    change_column: str | None,
    previous: ChangeCursor | None,
    up_to_id: int | None,
    require_owner: bool,
    lookback: timedelta,
    batch_size: int,
) -> ChangeCapture:
    """Apply the source's changes after `previous` to ids up to `up_to_id`."""
    if not change_column:
        return ChangeCapture("off (change_column not set)")
    with source_db.connect() as source:
        column_type = column_types(source, SOURCE_TABLE).get(change_column)
        if column_type not in TIMESTAMP_TYPES:
            found = "has no column" if column_type is None else f"has {column_type} column"
            return ChangeCapture(f"off (source {SOURCE_TABLE} {found} {change_column})")
        if previous is None:
            # A new deployment: rows loaded from here on carry their current values, so edits
            # before now are already in them.
            start = latest_change(source, change_column)
            if start is None:
                return ChangeCapture(f"on ({change_column}), nothing to follow yet")
            cursor = ChangeCursor(start, AFTER_EVERY_ID, drained=False)
            return ChangeCapture(f"on ({change_column}), started", cursor)
        status = f"on ({change_column})"
        index_missing = not has_index_on(source, SOURCE_TABLE, change_column)
        if index_missing:
            status += f"; {missing_index_advice(change_column)}"
        if up_to_id is None:
            return ChangeCapture(status, previous, index_missing=index_missing)
        after_at, after_id = previous.read_from(lookback)
        params = {
            "after_at": after_at,
            "after_id": after_id,
            "up_to_id": up_to_id,
            "limit": batch_size,
            **rule_params(require_owner, server_encoding(source)),
        }
        with analytical_db.connect() as target, target.transaction():
            analytical.wait_for_lock(target)
            staged = analytical.create_classified_staging(
                target, sa.Column(CHANGED_AT, pg.TIMESTAMP(timezone=False))
            )
            copy_in = analytical.copy_in(staged.name, (*analytical.CLASSIFIED_COLUMNS, CHANGED_AT))
            read = pipe_copy(source, copy_changed_posts(change_column), params, target, copy_in)
            newest = (
                sa.select(staged.c[CHANGED_AT], staged.c.id)
                .order_by(staged.c[CHANGED_AT].desc(), staged.c.id.desc())
                .limit(1)
            )
            last = execute(target, newest).fetchone()
            applied = analytical.apply_classified(target, staged)
            analytical.add_to_row_count(target, applied.inserted_rows)
    cursor = previous  # unless the read got past it (a look-back may find only older rows)
    if last is not None and (last[0], last[1]) > (previous.at, previous.id or 0):
        cursor = ChangeCursor(last[0], last[1], drained=False)
    return ChangeCapture(
        status,
        ChangeCursor(cursor.at, cursor.id, drained=read < batch_size),
        index_missing=index_missing,
        read=read,
        applied=applied,
    )
