"""Whole-table asset checks on `filtered_posts`, run daily by the reconciliation job.

(The checks evaluated with every window are in window_checks.)
"""

import dagster as dg
from pydantic import Field

from so_pipeline.analytical_posts import blank_bodies
from so_pipeline.assets import filtered_posts
from so_pipeline.core_sql import server_encoding
from so_pipeline.cursor import cursor_from_history
from so_pipeline.post_rules import non_whitespace_regex
from so_pipeline.reconciliation import NAMED_IDS, reconcile
from so_pipeline.resources import PostgresResource


class ReconciliationConfig(dg.Config):
    require_owner: bool = Field(
        default=True,
        description="The rule the repair loads missing posts under (as filtered_posts' own).",
    )


@dg.asset_check(
    asset=filtered_posts,
    description="Every source id up to the cursor is in posts or posts_rejected and active, and "
    "every active id there is at the source: ids compared exactly per bucket. Missing posts "
    "are loaded, posts gone from the source soft-deleted (deleted_at); fails only for what "
    "could not be repaired.",
)
def reconciled_with_source(
    context: dg.AssetCheckExecutionContext,
    config: ReconciliationConfig,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
) -> dg.AssetCheckResult:
    cursor = cursor_from_history(context.instance)
    if cursor is None:
        return dg.AssetCheckResult(passed=True, metadata={"ids_checked_up_to": "none yet"})
    result = reconcile(source_db, analytical_db, cursor, config.require_owner)
    context.log.info(
        "Reconciled %d ids in %d buckets (%d differed): %d loaded, %d restored, %d marked "
        "deleted, %d unrepaired",
        result.ids_compared,
        result.buckets_compared,
        result.buckets_differing,
        result.loaded,
        result.restored,
        result.marked_deleted,
        len(result.unrepaired),
    )
    if not result.unrepaired:
        return dg.AssetCheckResult(passed=True, metadata=result.metadata())
    shown = ", ".join(map(str, result.unrepaired[:NAMED_IDS]))
    return dg.AssetCheckResult(
        passed=False,
        description=f"{len(result.unrepaired)} ids still differ after the repair (e.g. "
        f"{shown}): changed at the source while it ran, or not writable. Run the "
        "reconciliation again.",
        metadata=result.metadata(),
    )


@dg.asset_check(
    asset=filtered_posts,
    description="No post in posts has a NULL, empty or whitespace-only body.",
)
def loaded_bodies_are_not_blank(analytical_db: PostgresResource) -> dg.AssetCheckResult:
    with analytical_db.connect() as connection:
        regex = non_whitespace_regex(server_encoding(connection))
        blank, first_blank_id = blank_bodies(connection, regex)
    return dg.AssetCheckResult(
        passed=blank == 0,
        metadata={"blank_bodies": blank}
        | ({"first_blank_id": first_blank_id} if first_blank_id is not None else {}),
    )
