"""What the operator reads (issue 24), as pure functions: the status line, the dashboard's order
and units, the daily checks' repeated results, and log lines whose figures add up."""

import re
from datetime import UTC, datetime

import dagster as dg
import pytest

from so_pipeline import dashboard
from so_pipeline.dashboard import Progress, arranged, status_line
from so_pipeline.metadata import GROUPS, flattened
from so_pipeline.names import BODIES_LAST_RESULT, RECONCILED_LAST_RESULT
from so_pipeline.window import PostWindow
from so_pipeline.window_checks import DailyResult, check_last_result
from so_pipeline.window_loader import WindowLoad

NOW = datetime(2025, 3, 4, 12, 0, tzinfo=UTC)


def _progress(**changes: object) -> Progress:
    values: dict[str, object] = {
        "ids_behind": 0,
        "new_ids": 0,
        "cursor": 1000,
        "replay": False,
        "source_newest_at": "2025-03-04T11:00:00",
        "previous_cursor": 1000,
        "previous_at": NOW.timestamp() - 900,
        "now": NOW.timestamp(),
        **changes,
    }
    return Progress(**values)  # type: ignore[arg-type]


def test_the_status_line_tells_caught_up_idle_catching_up_and_stuck_apart() -> None:
    idle = status_line(_progress())
    caught_up = status_line(_progress(new_ids=50, previous_cursor=950))
    # 60,000 ids in the 15 minutes since the previous record; 240,000 left: an hour more.
    catching_up = status_line(
        _progress(ids_behind=240_000, new_ids=60_000, cursor=61_000, previous_cursor=1000)
    )
    first = status_line(_progress(ids_behind=10, new_ids=5, previous_cursor=None))
    stuck = status_line(_progress(ids_behind=10))

    assert idle.startswith("idle, the source is quiet") and "2025-03-04T11:00:00" in idle
    assert caught_up.startswith("caught up: loaded the source's 50 new ids")
    assert catching_up == (
        "catching up: 240,000 ids behind the source; at the pace since the run before "
        "(4,000 ids/min) done in about 60 min (around 13:00 UTC)"
    )
    assert first.startswith("catching up: 10 ids behind") and "no run before" in first
    assert stuck.startswith("stuck: 10 ids behind")


def _flat_metadata() -> dict[str, object]:
    return {
        "dagster/table_name": "posts",
        "dagster/row_count": 90,
        "changes_read": 4,
        "changes_updated": 2,
        "changes_inserted": 1,
        "changes_rejected": 0,
        "changes_restored": 0,
        "change_capture": dg.MetadataValue.text("on (last_activity_date)"),
        "ids_behind_source": 7,
        "lag_seconds": 150.0,
        "deleted_posts_total": 3,
        "rejected_total": 5,
        "rejected_total_owner_null": 5,
        "last_processed_id": 100,
        "rows_read": 12,
        "rows_loaded": 10,
        "rows_rejected": 2,
        "rejected_owner_null": 2,
        "lock_wait_seconds": 1.25,
        "cursor_before": dg.MetadataValue.text("88"),
    }


def test_the_dashboard_comes_first_in_order_with_units_and_every_other_number_is_grouped() -> None:
    shown = arranged(_flat_metadata(), "caught up: ...")

    numbers = [key for key, value in shown.items() if isinstance(value, int | float)]
    assert list(shown)[0] == dashboard.STATUS
    assert numbers == [
        "1 ids behind source",
        "2 lag (minutes)",
        "3 rows loaded",
        "4 rows rejected",
        "5 edits applied",
        "6 posts deleted (total)",
        "7 lock wait (seconds)",
        "dagster/row_count",
        "last_processed_id",
    ]
    # The UI plots numbers sorted by key: the same order.
    assert sorted(numbers) == numbers
    assert shown["2 lag (minutes)"] == 2.5
    assert shown["5 edits applied"] == 3
    assert set(GROUPS) <= set(shown)
    assert {key: shown[key].value["ids_behind_source"] for key in ["backlog"]} == {"backlog": 7}
    # Code that reads the figures by their names finds each where it was.
    plain = flattened({key: getattr(v, "value", v) for key, v in shown.items()})
    assert plain["rows_read"] == 12 and plain["rejected_total_owner_null"] == 5
    assert plain["changes_read"] == 4 and plain["lock_wait_seconds"] == 1.25


def test_a_daily_check_that_never_ran_says_so_in_words_and_warns() -> None:
    result = check_last_result(RECONCILED_LAST_RESULT, None, NOW)

    assert not result.passed and result.severity == dg.AssetCheckSeverity.WARN
    assert result.description is not None
    assert result.description.startswith("reconciled_with_source has never run")


@pytest.mark.parametrize(
    ("latest", "passed", "severity", "says"),
    [
        (
            DailyResult(True, dg.AssetCheckSeverity.ERROR, NOW.timestamp() - 3 * 3600, "ab" * 16),
            True,
            dg.AssetCheckSeverity.ERROR,
            r"^loaded_bodies_are_not_blank passed at 2025-03-04 09:00 UTC \(3\.0 h ago\) "
            r"in run abababab\.$",
        ),
        (
            DailyResult(False, dg.AssetCheckSeverity.ERROR, NOW.timestamp() - 600, "cd" * 16, "2 "),
            False,
            dg.AssetCheckSeverity.ERROR,
            r"^loaded_bodies_are_not_blank FAILED \(ERROR\) at 2025-03-04 11:50 UTC \(10 min "
            r"ago\) in run cdcdcdcd: 2 $",
        ),
        (
            DailyResult(True, dg.AssetCheckSeverity.ERROR, NOW.timestamp() - 40 * 3600, "ef" * 16),
            False,
            dg.AssetCheckSeverity.WARN,
            r"passed at .* \(40\.0 h ago\) .*, but has not run since",
        ),
    ],
)
def test_a_daily_checks_latest_result_is_repeated_with_when_it_ran(
    latest: DailyResult, passed: bool, severity: dg.AssetCheckSeverity, says: str
) -> None:
    result = check_last_result(BODIES_LAST_RESULT, latest, NOW)

    assert (result.passed, result.severity) == (passed, severity)
    assert result.description is not None and re.search(says, result.description)
    assert result.metadata["result"] == dg.MetadataValue.text(result.description)


def test_a_window_names_its_new_ids_apart_from_the_look_back() -> None:
    window = PostWindow(
        read_after_id=9000,
        after_id=10_000,
        last_id=11_000,
        cursor_before=10_000,
        new_rows=1000,
        source_max_id=11_000,
        cursor_origin="materialization history",
    )
    caught_up = PostWindow(9000, 10_000, 10_000, 10_000, 0, 10_000, "materialization history")

    assert (
        window.describe() == "new ids (10000, 11000] (1,000), look-back ids (9000, 10000] re-read"
    )
    assert caught_up.describe() == "no new id after 10000, look-back ids (9000, 10000] re-read"


def test_a_loads_figures_add_up_to_the_rows_it_read() -> None:
    load = WindowLoad(
        kept_rows=1148,
        loaded_rows=991,
        updated_rows=2,
        rejected_rows=9 + 5,
        newly_rejected_by_reason={"body_empty": 9},
    )

    text = load.describe()
    read, *parts = (
        int(n)
        for n in re.findall(
            r"(\d+) (?:posts read|loaded \+|updated|"
            r"rejected \(|re-read)",
            text,
        )
    )

    assert text.startswith("1162 posts read = 991 loaded + 2 updated + 9 rejected (body_empty 9)")
    assert "+ 160 re-read unchanged (155 already loaded, 5 already rejected" in text
    assert read == sum(parts) == load.rows_read
