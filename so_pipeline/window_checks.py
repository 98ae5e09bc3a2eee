"""Checks evaluated with every window, inside the `filtered_posts` step.

Declared as the asset's check specs rather than separate check steps: the results are the
same in the UI, and a run saves two steps (~0.2 s, a tenth of a 1,000-post tick).

Two of them repeat the daily checks' latest results (`<check>_last_result`). The UI shows a
check's state for the asset's latest materialization only, and every 15-minute run makes a new
one: without them the daily checks read "Not evaluated" all day but the minutes after 03:30.
"""

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus
from pydantic import Field

from so_pipeline.analytical_reads import primary_key_columns
from so_pipeline.names import (
    BACKLOG_WITHIN_LIMITS,
    LAST_RESULT_OF,
    POST_IDS_ARE_UNIQUE,
    RECONCILIATION_JOB,
)

# A daily check last evaluated longer ago than this is reported as overdue (WARN).
DAILY_CHECK_OVERDUE = timedelta(hours=36)
_EVALUATED = {AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED}


def window_check_specs() -> list[dg.AssetCheckSpec]:
    return [
        dg.AssetCheckSpec(
            POST_IDS_ARE_UNIQUE.name,
            asset=POST_IDS_ARE_UNIQUE.asset_key,
            description="posts.id is still the primary key, so no id can be loaded twice.",
        ),
        dg.AssetCheckSpec(
            BACKLOG_WITHIN_LIMITS.name,
            asset=BACKLOG_WITHIN_LIMITS.asset_key,
            description="The cursor keeps up with the source: ids_behind_source of the window "
            "stays under the limits (warn, then fail).",
        ),
        *(
            dg.AssetCheckSpec(
                mirror.name,
                asset=mirror.asset_key,
                description=f"The latest result of the daily check {daily.name}, and when it "
                "ran, repeated with every window (WARN when it never ran or is overdue).",
            )
            for mirror, daily in LAST_RESULT_OF.items()
        ),
    ]


class BacklogLimits(dg.Config):
    warn_ids_behind: int = Field(
        default=1_000_000, description="Warn when the cursor is more ids than this behind."
    )
    fail_ids_behind: int = Field(
        default=10_000_000, description="Fail when the cursor is more ids than this behind."
    )


def check_backlog(ids_behind: int, limits: BacklogLimits) -> dg.AssetCheckResult:
    metadata = {"ids_behind_source": ids_behind, "warn_ids_behind": limits.warn_ids_behind}
    for limit, severity in (
        (limits.fail_ids_behind, dg.AssetCheckSeverity.ERROR),
        (limits.warn_ids_behind, dg.AssetCheckSeverity.WARN),
    ):
        if ids_behind > limit:
            return dg.AssetCheckResult(
                check_name=BACKLOG_WITHIN_LIMITS.name,
                passed=False,
                severity=severity,
                metadata=metadata,
            )
    return dg.AssetCheckResult(
        check_name=BACKLOG_WITHIN_LIMITS.name, passed=True, metadata=metadata
    )


def check_post_ids_are_unique(analytical: psycopg.Connection) -> dg.AssetCheckResult:
    key_columns = primary_key_columns(analytical)
    return dg.AssetCheckResult(
        check_name=POST_IDS_ARE_UNIQUE.name,
        passed=key_columns == ["id"],
        metadata={"primary_key": str(key_columns)},
    )


@dataclass(frozen=True)
class DailyResult:
    """A daily check's latest evaluation."""

    passed: bool
    severity: dg.AssetCheckSeverity
    timestamp: float
    run_id: str
    description: str | None = None


def latest_daily_result(instance: dg.DagsterInstance, key: dg.AssetCheckKey) -> DailyResult | None:
    """The latest evaluation of `key` in Dagster's history (None: never evaluated)."""
    storage = instance.event_log_storage
    records = storage.get_asset_check_execution_history(key, limit=1, status=_EVALUATED)
    evaluation = records[0].evaluation if records else None
    if evaluation is None:
        return None
    return DailyResult(
        passed=evaluation.passed,
        severity=evaluation.severity,
        timestamp=records[0].create_timestamp,
        run_id=records[0].run_id,
        description=evaluation.description,
    )


def _ago(seconds: float) -> str:
    minutes = max(0, round(seconds / 60))
    if minutes < 120:
        return f"{minutes} min ago"
    return f"{minutes / 60:.1f} h ago"


def check_last_result(
    mirror: dg.AssetCheckKey, latest: DailyResult | None, now: datetime
) -> dg.AssetCheckResult:
    """`mirror`'s result: the latest result of the daily check it repeats, in words."""
    daily = LAST_RESULT_OF[mirror].name
    if latest is None:
        text = (
            f"{daily} has never run: {RECONCILIATION_JOB} runs it daily at 03:30 UTC "
            "(launch the job to run it now)."
        )
        return dg.AssetCheckResult(
            check_name=mirror.name,
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description=text,
            metadata={"result": text, "last_evaluated": "never"},
        )
    age = now.timestamp() - latest.timestamp
    at = datetime.fromtimestamp(latest.timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")
    when = f"at {at} ({_ago(age)}) in run {latest.run_id[:8]}"
    passed, severity = latest.passed, latest.severity
    if not latest.passed:
        text = f"{daily} FAILED ({severity.value}) {when}: {latest.description or 'see the run'}"
    elif age > DAILY_CHECK_OVERDUE.total_seconds():
        passed, severity = False, dg.AssetCheckSeverity.WARN
        text = (
            f"{daily} passed {when}, but has not run since: is "
            "stackoverflow_posts_reconciliation_schedule running?"
        )
    else:
        text = f"{daily} passed {when}."
    return dg.AssetCheckResult(
        check_name=mirror.name,
        passed=passed,
        severity=severity,
        description=text,
        metadata={
            "result": text,
            "last_evaluated": dg.MetadataValue.timestamp(latest.timestamp),
            "last_evaluated_in_run": dg.MetadataValue.dagster_run(latest.run_id),
        },
    )


def check_daily_results(instance: dg.DagsterInstance) -> list[dg.AssetCheckResult]:
    now = datetime.now(UTC)
    return [
        check_last_result(mirror, latest_daily_result(instance, daily), now)
        for mirror, daily in LAST_RESULT_OF.items()
    ]
