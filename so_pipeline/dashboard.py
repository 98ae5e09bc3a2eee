"""What an operator reads first on filtered_posts' page: one status line, then seven figures.

The UI lists a materialization's metadata in the order given, and plots its numbers in the
alphabetical order of their keys: the figures' keys start with their rank, so both show them
in the order they are looked at, each with its unit. Everything else is grouped (see
metadata.GROUPS).
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from so_pipeline.metadata import GROUPS

STATUS = "pipeline_status"
IDS_BEHIND = "1 ids behind source"
LAG_MINUTES = "2 lag (minutes)"
ROWS_LOADED = "3 rows loaded"
ROWS_REJECTED = "4 rows rejected"
EDITS_APPLIED = "5 edits applied"
DELETED_TOTAL = "6 posts deleted (total)"
LOCK_WAIT = "7 lock wait (seconds)"


# Kept at the top level besides the dashboard: the cursor (its plot shows progress).
_TOP_LEVEL_NUMBERS = ("dagster/row_count", "last_processed_id")


def _group_of(key: str) -> str:
    if key.startswith("changes_"):
        return "changes"
    if "_total" in key:
        return "totals"
    if key in ("ids_behind_source", "source_max_id") or key.endswith("lag_seconds"):
        return "backlog"
    return "this_run"


def arranged(values: dict[str, Any], status: str) -> dict[str, Any]:
    """filtered_posts' metadata `values` (flat, as each part reports it) as the page shows it:
    the status line and the dashboard's figures first, then the cursor and the row count, then
    every other number in its group (metadata.GROUPS), then the labels, tables and schema."""
    edits = [values[k] for k in _EDIT_KEYS if isinstance(values.get(k), int)]
    lag = values.get("lag_seconds")
    figures = {
        IDS_BEHIND: values.get("ids_behind_source"),
        LAG_MINUTES: None if lag is None else round(lag / 60, 1),
        ROWS_LOADED: values.get("rows_loaded"),
        ROWS_REJECTED: values.get("rows_rejected"),
        EDITS_APPLIED: sum(edits) if edits else None,
        DELETED_TOTAL: values.get("deleted_posts_total"),
        LOCK_WAIT: values.get("lock_wait_seconds"),
    }
    grouped: dict[str, dict[str, Any]] = {name: {} for name in GROUPS}
    rest: dict[str, Any] = {}
    for key, value in values.items():
        if key in _TOP_LEVEL_NUMBERS or isinstance(value, bool | dg.MetadataValue | dict):
            rest[key] = value
        elif isinstance(value, int | float):
            grouped[_group_of(key)][key] = value
        else:
            rest[key] = value
    return {
        STATUS: dg.MetadataValue.text(status),
        **{key: value for key, value in figures.items() if value is not None},
        **{key: rest.pop(key) for key in _TOP_LEVEL_NUMBERS if key in rest},
        **{name: dg.MetadataValue.json(members) for name, members in grouped.items() if members},
        **rest,
    }


# Change capture's counts of rows it wrote: together, the edits applied.
_EDIT_KEYS = ("changes_updated", "changes_inserted", "changes_rejected", "changes_restored")


@dataclass(frozen=True)
class Progress:
    """Where the cursor stands after a window, and where it stood at the previous record."""

    ids_behind: int
    new_ids: int  # new ids this window read
    cursor: int | None
    replay: bool
    source_newest_at: str | None  # creation_date of the source's highest id (ISO)
    previous_cursor: int | None  # at the previous materialization
    previous_at: float | None  # its time (Unix)
    now: float

    @property
    def ids_per_second(self) -> float | None:
        """How fast the cursor moved since the previous materialization (None: unknown)."""
        if None in (self.previous_cursor, self.previous_at, self.cursor):
            return None
        moved = self.cursor - self.previous_cursor  # type: ignore[operator]
        elapsed = self.now - self.previous_at  # type: ignore[operator]
        return moved / elapsed if moved > 0 and elapsed > 0 else None


def _clock(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%H:%M UTC")


def duration(seconds: float) -> str:
    """`seconds` in the unit an operator thinks in: "40 s", "12 min", "3.5 h"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def status_line(progress: Progress) -> str:
    """caught up / idle (the source is quiet) / catching up (and when done) / stuck, in words."""
    newest = f"the source's newest post was created {progress.source_newest_at or 'never'}"
    if progress.replay:
        return f"replayed {progress.new_ids:,} ids; {progress.ids_behind:,} ids behind the source"
    if progress.ids_behind == 0 and progress.new_ids:
        return f"caught up: loaded the source's {progress.new_ids:,} new ids; {newest}"
    if progress.ids_behind == 0:
        return f"idle, the source is quiet: no new post since the run before; {newest}"
    if not progress.new_ids:
        return (
            f"stuck: {progress.ids_behind:,} ids behind the source and this run found no new "
            "id to load (see the run's log)"
        )
    rate = progress.ids_per_second
    if rate is None:
        return (
            f"catching up: {progress.ids_behind:,} ids behind the source (no run before "
            "this one to measure the pace by)"
        )
    left = progress.ids_behind / rate
    return (
        f"catching up: {progress.ids_behind:,} ids behind the source; at the pace since the "
        f"run before ({rate * 60:,.0f} ids/min) done in about {duration(left)} "
        f"(around {_clock(progress.now + left)})"
    )
