"""The window's arithmetic, without a database: load plans, COPY streams, the cursor, backlog.

`plan_load` decides which ids COPY may write straight into `posts` and which are merged;
`PostWindow` says where the cursor goes and how far behind it is; `check_backlog` grades that.
"""

from itertools import pairwise

import dagster as dg
import pytest

from so_pipeline.window import (
    REPLAY_ORIGIN,
    LoadPlan,
    PostWindow,
    cut_ranges,
    ids_behind,
    plan_load,
    stream_count,
)
from so_pipeline.window_checks import BacklogLimits, check_backlog


def make_window(
    after_id: int | None,
    last_id: int | None,
    *,
    read_after_id: int | None = None,
    cursor_before: int | None = None,
    new_rows: int = 1,
    source_max_id: int | None = None,
    cursor_origin: str = "materialization history",
) -> PostWindow:
    """A window of the ids after `after_id` up to `last_id`; by default with no look-back."""
    return PostWindow(
        read_after_id=after_id if read_after_id is None else read_after_id,
        after_id=after_id,
        last_id=last_id,
        cursor_before=cursor_before,
        new_rows=new_rows,
        source_max_id=source_max_id,
        cursor_origin=cursor_origin,
    )


@pytest.mark.parametrize(
    ("window", "highest_loaded", "expected"),
    [
        pytest.param(
            make_window(None, 10), None, LoadPlan((None, 10), []), id="first run, empty tables"
        ),
        pytest.param(
            make_window(None, 10),
            5,
            LoadPlan(None, [(None, 10)]),
            id="first run, rows already loaded",
        ),
        pytest.param(
            make_window(100, 150, read_after_id=90),
            100,
            LoadPlan((100, 150), [(90, 100)]),
            id="look-back merged, new ids direct",
        ),
        pytest.param(
            make_window(100, 150), 80, LoadPlan((100, 150), []), id="new ids above the highest"
        ),
        pytest.param(
            make_window(100, 150, read_after_id=90),
            120,
            LoadPlan(None, [(90, 100), (100, 150)]),
            id="new ids below the highest",
        ),
        pytest.param(
            make_window(0, 10, cursor_origin=REPLAY_ORIGIN),
            100,
            LoadPlan(None, [(0, 10)]),
            id="replay of loaded ids",
        ),
        pytest.param(
            make_window(100, 100, read_after_id=90, new_rows=0),
            100,
            LoadPlan(None, [(90, 100)]),
            id="empty new range, look-back only",
        ),
        pytest.param(
            make_window(100, 100, new_rows=0), 100, LoadPlan(None, []), id="empty, no look-back"
        ),
    ],
)
def test_plan_load_writes_directly_only_above_every_loaded_id(
    window: PostWindow, highest_loaded: int | None, expected: LoadPlan
) -> None:
    assert plan_load(window, highest_loaded) == expected


@pytest.mark.parametrize(
    ("rows", "most_streams", "min_rows_per_stream", "expected"),
    [
        (0, 8, 1000, 1),  # never fewer than one stream
        (1999, 8, 1000, 1),  # a second stream needs a full share of rows
        (2000, 8, 1000, 2),
        (7999, 8, 1000, 7),
        (10**6, 8, 1000, 8),  # capped by most_streams
        (10**6, 1, 1000, 1),
    ],
)
def test_stream_count_gives_each_stream_enough_rows(
    rows: int, most_streams: int, min_rows_per_stream: int, expected: int
) -> None:
    assert stream_count(rows, most_streams, min_rows_per_stream) == expected


@pytest.mark.parametrize(
    ("id_range", "cuts", "expected"),
    [
        ((None, 10), [], [(None, 10)]),
        ((None, 10), [4], [(None, 4), (4, 10)]),
        ((0, 100), [30, 60], [(0, 30), (30, 60), (60, 100)]),
    ],
)
def test_cut_ranges_gives_adjacent_ranges_covering_the_range(
    id_range: tuple[int | None, int], cuts: list[int], expected: list[tuple[int | None, int]]
) -> None:
    ranges = cut_ranges(id_range, cuts)

    assert ranges == expected
    assert (ranges[0][0], ranges[-1][1]) == id_range
    assert all(left[1] == right[0] for left, right in pairwise(ranges))


@pytest.mark.parametrize(
    ("source_max_id", "cursor", "expected"),
    [(None, None, 0), (None, 5, 0), (100, None, 100), (100, 40, 60), (100, 100, 0)],
)
def test_ids_behind_counts_from_the_start_without_a_cursor(
    source_max_id: int | None, cursor: int | None, expected: int
) -> None:
    assert ids_behind(source_max_id, cursor) == expected


@pytest.mark.parametrize(
    ("window", "expected"),
    [
        pytest.param(make_window(None, 20, new_rows=20), 20, id="first window"),
        pytest.param(make_window(10, 20, cursor_before=10, new_rows=5), 20, id="next window"),
        pytest.param(
            make_window(0, 10, cursor_before=100, new_rows=3, cursor_origin=REPLAY_ORIGIN),
            100,
            id="replay of an older range: never back",
        ),
        pytest.param(
            make_window(90, 150, cursor_before=100, new_rows=60, cursor_origin=REPLAY_ORIGIN),
            150,
            id="replay reaching into new ids",
        ),
        pytest.param(
            make_window(500, 500, cursor_before=100, new_rows=0, cursor_origin=REPLAY_ORIGIN),
            100,
            id="replay beyond the source: no jump ahead",
        ),
        pytest.param(make_window(50, 50, cursor_before=50, new_rows=0), 50, id="caught up"),
        pytest.param(make_window(None, None, new_rows=0), None, id="empty source"),
    ],
)
def test_cursor_after_moves_only_forward_to_an_id_the_window_examined(
    window: PostWindow, expected: int | None
) -> None:
    assert window.cursor_after == expected


def test_the_backlog_is_counted_from_the_cursor_after_the_window_and_never_negative() -> None:
    behind = make_window(10, 20, cursor_before=10, new_rows=5, source_max_id=1000)
    replay = make_window(0, 10, cursor_before=900, new_rows=3, source_max_id=1000)
    shrunk = make_window(50, 50, cursor_before=50, new_rows=0, source_max_id=40)

    assert (behind.ids_behind_source, replay.ids_behind_source) == (980, 100)
    assert shrunk.ids_behind_source == 0


@pytest.mark.parametrize(
    ("window", "empty"),
    [
        pytest.param(make_window(None, None, new_rows=0), True, id="empty source"),
        pytest.param(make_window(50, 50, new_rows=0), True, id="caught up, no look-back"),
        pytest.param(
            make_window(50, 50, read_after_id=40, new_rows=0), False, id="look-back still read"
        ),
        pytest.param(make_window(50, 60), False, id="new ids"),
    ],
)
def test_a_window_is_empty_when_it_reads_no_id(window: PostWindow, empty: bool) -> None:
    assert window.is_empty is empty


LIMITS = BacklogLimits(warn_ids_behind=1_000, fail_ids_behind=50_000)
WARN, ERROR = dg.AssetCheckSeverity.WARN, dg.AssetCheckSeverity.ERROR


def grade(ids_behind_source: int, limits: BacklogLimits) -> object:
    """ "passed", or the severity of the failed check."""
    result = check_backlog(ids_behind_source, limits)
    assert result.metadata["ids_behind_source"].value == ids_behind_source
    assert result.metadata["warn_ids_behind"].value == limits.warn_ids_behind
    return "passed" if result.passed else result.severity


@pytest.mark.parametrize(
    ("ids_behind_source", "expected"),
    [
        (0, "passed"),
        (1_000, "passed"),  # at the warn limit
        (1_001, WARN),  # just above it
        (50_000, WARN),  # at the fail limit
        (50_001, ERROR),  # just above it
        (10**12, ERROR),  # far above
    ],
)
def test_check_backlog_warns_above_the_warn_limit_and_fails_above_the_fail_limit(
    ids_behind_source: int, expected: object
) -> None:
    assert grade(ids_behind_source, LIMITS) == expected


def test_check_backlog_defaults_warn_above_a_million_and_fail_above_ten_million() -> None:
    graded = [grade(behind, BacklogLimits()) for behind in (10**6, 10**6 + 1, 10**7, 10**7 + 1)]

    assert graded == ["passed", WARN, WARN, ERROR]
