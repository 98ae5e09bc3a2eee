"""The id window one run processes, and how its ids are split between load paths."""

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import dagster as dg

from so_pipeline.metadata import labels, numbers

# 100k posts (~120 MB of source data) take a few seconds per tick and keep each transaction
# short; raise it for a catch-up run, memory does not grow with it.
DEFAULT_BATCH_SIZE = 100_000

# The window as a whole, in source_posts_batch's metadata (see window_io).
WINDOW_METADATA_KEY = "window"

# cursor_origin of a window that replays from start_after_id.
REPLAY_ORIGIN = "start_after_id (replay)"

# The key under which filtered_posts' materializations record the cursor.
CURSOR_METADATA_KEY = "last_processed_id"

IdRange = tuple[int | None, int]  # (after_id, last_id]: ids after the first, up to the last


def ids_behind(source_max_id: int | None, cursor: int | None) -> int:
    """How far the source's highest id is beyond `cursor` (None: nothing processed yet)."""
    if source_max_id is None:
        return 0
    return source_max_id - (cursor if cursor is not None else 0)


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
    cursor_origin: str
    first_new_id: int | None = None
    source_newest_at: str | None = None  # ISO creation_date of the source's highest id

    @property
    def is_empty(self) -> bool:
        return self.last_id is None or self.last_id == self.read_after_id

    @property
    def cursor_after(self) -> int | None:
        """The cursor once this window is loaded.

        It moves only to an id this window examined: a window that found no new id (caught
        up, or a replay that starts beyond the source's end) leaves it where it was, and a
        replay of an older range never moves it back.
        """
        if not self.new_rows:
            return self.cursor_before
        return max((i for i in (self.cursor_before, self.last_id) if i is not None), default=None)

    @property
    def ids_behind_source(self) -> int:
        """How far the source's highest id is beyond the cursor after this window (the backlog)."""
        return max(0, ids_behind(self.source_max_id, self.cursor_after))

    @property
    def starts_beyond_source(self) -> bool:
        """A replay asked to start after the source's highest id: there was nothing to read."""
        return (
            self.after_id is not None
            and self.cursor_origin == REPLAY_ORIGIN
            and (self.source_max_id is None or self.after_id >= self.source_max_id)
        )

    def describe(self) -> str:
        """The new ids, and apart from them the look-back's re-read ones."""
        after = "start" if self.after_id is None else str(self.after_id)
        if self.new_rows:
            text = f"new ids ({after}, {self.last_id}] ({self.new_rows:,})"
        else:
            text = f"no new id after {after}"
        if self.after_id is not None and self.read_after_id != self.after_id:
            start = "start" if self.read_after_id is None else str(self.read_after_id)
            text += f", look-back ids ({start}, {self.after_id}] re-read"
        return text

    def replay_note(self) -> str | None:
        if not self.starts_beyond_source:
            return None
        return (
            f"start_after_id {self.after_id} is not below the source's highest id "
            f"({self.source_max_id}): nothing was read and the cursor stays at {self.cursor_before}"
        )

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, dg.MetadataValue]) -> "PostWindow":
        """The window that `metadata()` recorded."""
        return cls(**metadata[WINDOW_METADATA_KEY].value)  # type: ignore[arg-type]

    def metadata(self) -> dict[str, Any]:
        """What `source_posts_batch` records about the window (all of it, under `window`)."""
        note = self.replay_note()
        return {
            WINDOW_METADATA_KEY: dg.MetadataValue.json(asdict(self)),
            "cursor_origin": self.cursor_origin,
            **({"replay_note": note} if note else {}),
            **self._bounds(),
            **labels(
                {"lookback_after_id": self.read_after_id, "window_first_id": self.first_new_id}
            ),
            **numbers(
                {
                    "rows_in_window": self.new_rows,
                    "dagster/row_count": self.new_rows,
                    "source_max_id": self.source_max_id,
                    "ids_behind_source": self.ids_behind_source,
                }
            ),
        }

    def cursor_metadata(self) -> dict[str, Any]:
        """What `filtered_posts` records about the window: the cursor before and after.

        The cursor is a number (its plot shows progress); the window's bounds are labels.
        """
        return {**numbers({CURSOR_METADATA_KEY: self.cursor_after}), **self._bounds()}

    def _bounds(self) -> dict[str, dg.MetadataValue]:
        return labels(
            {
                "cursor_before": self.cursor_before,
                "window_after_id": self.after_id,
                "window_last_id": self.last_id,
            }
        )


@dataclass(frozen=True)
class LoadPlan:
    """Which ids COPY may write straight into `posts`, and which must be staged and merged."""

    direct: IdRange | None
    merged: list[IdRange]


def plan_load(window: PostWindow, highest_loaded: int | None) -> LoadPlan:
    """Send the window's new ids straight to `posts` when every one lies above every loaded id.

    Then no conflict is possible and COPY writes once. (Another writer would have to bypass
    the write lock to break this; the unique violation would then fail the run, and its
    retry would take the merge path.) The look-back, replays of loaded ranges and windows
    below loaded ids are merged.
    """
    new_after, last_id = window.after_id, window.last_id
    if last_id is None:
        return LoadPlan(None, [])  # an empty source: nothing to read
    merged: list[IdRange] = []
    if new_after is not None and window.read_after_id != new_after:
        merged.append((window.read_after_id, new_after))  # the look-back
    if new_after is not None and new_after >= last_id:
        return LoadPlan(None, merged)
    if highest_loaded is None or (new_after is not None and new_after >= highest_loaded):
        return LoadPlan((new_after, last_id), merged)
    return LoadPlan(None, [*merged, (new_after, last_id)])


def stream_count(rows: int, most_streams: int, min_rows_per_stream: int) -> int:
    """How many parallel COPY streams `rows` new rows get: each carries enough to pay off."""
    return max(1, min(most_streams, rows // min_rows_per_stream))


def cut_ranges(id_range: IdRange, cuts: list[int]) -> list[IdRange]:
    """`id_range` cut at the ids `cuts` (ascending, inside the range) into adjacent ranges."""
    after_id, last_id = id_range
    return list(zip([after_id, *cuts], [*cuts, last_id], strict=True))
