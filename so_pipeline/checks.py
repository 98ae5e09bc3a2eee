"""Whole-table asset checks on `filtered_posts`, run daily by the reconciliation job.

(The checks evaluated with every window are in window_checks.)
"""

from datetime import date

import dagster as dg
from pydantic import Field

from so_pipeline.analytical_reads import blank_bodies
from so_pipeline.core_sql import server_encoding
from so_pipeline.cursor import current_cursor
from so_pipeline.names import LOADED_BODIES_ARE_NOT_BLANK, RECONCILED_WITH_SOURCE
from so_pipeline.post_rules import non_whitespace_regex
from so_pipeline.reconciliation import (
    MASS_DELETE_SHARE,
    MIN_MASS_DELETE,
    ReconcileSettings,
    reconcile,
)
from so_pipeline.resources import PostgresResource
from so_pipeline.run_connections import RunConnections
from so_pipeline.source_replica import read_through_conflicts


class ReconciliationConfig(dg.Config):
    require_owner: bool = Field(
        default=True,
        description="The rule the repair loads missing posts under (as filtered_posts' own).",
    )
    content_days: int = Field(
        default=7,
        ge=1,
        description="Compare contents (every value) of 1/content_days of the id buckets each "
        "run, so every post is verified at least every content_days days (1: all, every run). "
        "Ids are compared in full every run.",
    )
    allow_mass_delete: bool = Field(
        default=False,
        description="Soft-delete posts gone from the source even when they are more than "
        "mass_delete_threshold (re-run with this after a failed check says why).",
    )
    mass_delete_threshold: int | None = Field(
        default=None,
        ge=0,
        description=f"Most posts one run soft-deletes on its own (default: "
        f"{MASS_DELETE_SHARE:.0%} of live posts or {MIN_MASS_DELETE}, whichever is larger).",
    )
    recopy_after_id: int | None = Field(
        default=None,
        description="Backfill: first re-copy the source ids above this one (up to "
        "recopy_up_to_id, or the cursor) through the rules, under the write lock. The cursors "
        "do not move.",
    )
    recopy_up_to_id: int | None = Field(
        default=None, description="Backfill: the last id to re-copy (default: the cursor)."
    )
    recopy_all: bool = Field(
        default=False, description="Backfill: re-copy every source id up to the cursor."
    )

    def settings(self, cursor: int) -> ReconcileSettings:
        asked = self.recopy_all or self.recopy_after_id is not None
        up_to = self.recopy_up_to_id if self.recopy_up_to_id is not None else cursor
        return ReconcileSettings(
            require_owner=self.require_owner,
            content_days=self.content_days,
            day=date.today().toordinal(),
            allow_mass_delete=self.allow_mass_delete,
            mass_delete_threshold=self.mass_delete_threshold,
            recopy=(None if self.recopy_all else self.recopy_after_id, up_to) if asked else None,
        )


@dg.asset_check(
    asset=RECONCILED_WITH_SOURCE.asset_key,
    name=RECONCILED_WITH_SOURCE.name,
    description="The copy equals the source up to the cursor: every id compared exactly, and "
    "every value of a rotating share of the ids (all within content_days). What differs is "
    "repaired through the rules; posts gone from the source are soft-deleted (deleted_at), "
    "up to a limit. Fails, naming the ids, for what could not be repaired or deleted.",
)
def reconciled_with_source(
    context: dg.AssetCheckExecutionContext,
    config: ReconciliationConfig,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
) -> dg.AssetCheckResult:
    with RunConnections(source_db, analytical_db, context.run.run_id) as run:
        cursor, _ = current_cursor(context.instance, run.analytical)
        if cursor is None:
            return dg.AssetCheckResult(passed=True, metadata={"ids_checked_up_to": "none yet"})
        # On a read replica a recovery conflict cancels a read: the comparison is done again.
        result, _ = read_through_conflicts(
            run,
            context.log,
            "the reconciliation",
            lambda: reconcile(run, cursor, config.settings(cursor)),
        )
    context.log.info(
        "Reconciled %d ids in %d buckets (%d differed, contents of %d compared): %d loaded, "
        "%d updated, %d restored, %d marked deleted, %d deletions held back, %d unrepaired",
        result.ids_compared,
        result.buckets_compared,
        result.buckets_differing,
        result.content_buckets_compared,
        result.loaded,
        result.updated,
        result.restored,
        result.marked_deleted,
        len(result.deletions_held_back),
        len(result.unrepaired),
    )
    problem = result.problem()
    return dg.AssetCheckResult(
        passed=problem is None, description=problem, metadata=result.metadata()
    )


@dg.asset_check(
    asset=LOADED_BODIES_ARE_NOT_BLANK.asset_key,
    name=LOADED_BODIES_ARE_NOT_BLANK.name,
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
