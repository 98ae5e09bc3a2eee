"""Whole-table asset checks on `filtered_posts`, run daily by the reconciliation job.

(The checks evaluated with every window are in window_checks.)
"""

from dataclasses import dataclass

import dagster as dg
import sqlalchemy as sa

from so_pipeline.analytical_posts import blank_bodies, processed_ids
from so_pipeline.assets import filtered_posts
from so_pipeline.core_sql import execute, server_encoding
from so_pipeline.cursor import cursor_from_history
from so_pipeline.post_rules import non_whitespace_regex
from so_pipeline.resources import PostgresResource
from so_pipeline.source_posts import source_posts

# Reconciliation compares id counts per bucket of this many ids, then narrows the first
# mismatching bucket down to buckets of FINE_BUCKET_IDS to name a small range.
COARSE_BUCKET_IDS = 1_000_000
FINE_BUCKET_IDS = 1_000
_LOWEST_ID = -(2**63)


def _bucket_counts(
    database: PostgresResource, ids: sa.FromClause, bucket: int, low: int, high: int
) -> dict[int, int]:
    """Ids of `ids` (a selectable with an `id` column) in (low, high], counted per bucket."""
    key = sa.func.div(ids.c.id, bucket)
    query = sa.select(key, sa.func.count()).where(ids.c.id > low, ids.c.id <= high).group_by(key)
    with database.connect() as connection:
        return {int(k): int(count) for k, count in execute(connection, query).fetchall()}


@dataclass(frozen=True)
class BucketComparison:
    """Source and analytical id counts per bucket over one id range."""

    source: dict[int, int]
    analytical: dict[int, int]

    def first_mismatch(self) -> tuple[int, int, int] | None:
        """(bucket, source count, analytical count) of the first bucket that differs."""
        for key in sorted(set(self.source) | set(self.analytical)):
            if self.source.get(key, 0) != self.analytical.get(key, 0):
                return key, self.source.get(key, 0), self.analytical.get(key, 0)
        return None

    def metadata(self) -> dict[str, int]:
        return {
            "source_posts_compared": sum(self.source.values()),
            "analytical_posts_and_rejected_compared": sum(self.analytical.values()),
            "buckets_compared": len(set(self.source) | set(self.analytical)),
        }


def _compare(
    source_db: PostgresResource, analytical_db: PostgresResource, bucket: int, low: int, high: int
) -> BucketComparison:
    return BucketComparison(
        source=_bucket_counts(source_db, source_posts, bucket, low, high),
        analytical=_bucket_counts(analytical_db, processed_ids(), bucket, low, high),
    )


@dg.asset_check(
    asset=filtered_posts,
    description="Every source id up to the cursor is in posts or posts_rejected, exactly once, "
    "and nothing else is: no post lost (a late row outside the look-back), none invented.",
)
def reconciled_with_source(
    context: dg.AssetCheckExecutionContext,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
) -> dg.AssetCheckResult:
    cursor = cursor_from_history(context.instance)
    if cursor is None:
        return dg.AssetCheckResult(passed=True, metadata={"ids_checked_up_to": "none yet"})
    comparison = _compare(source_db, analytical_db, COARSE_BUCKET_IDS, _LOWEST_ID, cursor)
    mismatch = comparison.first_mismatch()
    counts = {"ids_checked_up_to": cursor, **comparison.metadata()}
    if mismatch is None:
        return dg.AssetCheckResult(passed=True, metadata=counts)
    size, start = COARSE_BUCKET_IDS, mismatch[0] * COARSE_BUCKET_IDS
    high = min(cursor, start + COARSE_BUCKET_IDS - 1)
    refined = _compare(source_db, analytical_db, FINE_BUCKET_IDS, start - 1, high).first_mismatch()
    if refined is not None:
        mismatch, size = refined, FINE_BUCKET_IDS
    first_id = mismatch[0] * size
    range_text = f"{first_id}..{first_id + size - 1}"
    _, source_count, analytical_count = mismatch
    return dg.AssetCheckResult(
        passed=False,
        description=f"ids {range_text}: the source has {source_count} posts, the analytical "
        f"database {analytical_count} (posts + posts_rejected). Replay from before this range "
        "with start_after_id to load missing rows.",
        metadata={
            "first_mismatching_ids": range_text,
            "source_posts": source_count,
            "analytical_posts_and_rejected": analytical_count,
            **counts,
        },
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
