"""The names of the pipeline's definitions (and the one setting their sensors share).

Assets, checks, jobs and sensors stand side by side and only `definitions` gathers them: a
module that needs another's definition (a job selecting an asset, an alert watching a job)
names it from here instead of importing it.
"""

import dagster as dg

SOURCE_POSTS_BATCH = dg.AssetKey("source_posts_batch")
FILTERED_POSTS = dg.AssetKey("filtered_posts")

# Checks evaluated by filtered_posts with every window.
POST_IDS_ARE_UNIQUE = dg.AssetCheckKey(FILTERED_POSTS, "post_ids_are_unique")
BACKLOG_WITHIN_LIMITS = dg.AssetCheckKey(FILTERED_POSTS, "backlog_within_limits")
# Checks that read whole tables, run daily.
RECONCILED_WITH_SOURCE = dg.AssetCheckKey(FILTERED_POSTS, "reconciled_with_source")
LOADED_BODIES_ARE_NOT_BLANK = dg.AssetCheckKey(FILTERED_POSTS, "loaded_bodies_are_not_blank")
# Their latest results, re-reported with every window: the UI shows a check's state only for
# the asset's latest materialization, which the next 15-minute run replaces.
RECONCILED_LAST_RESULT = dg.AssetCheckKey(FILTERED_POSTS, "reconciled_with_source_last_result")
BODIES_LAST_RESULT = dg.AssetCheckKey(FILTERED_POSTS, "loaded_bodies_are_not_blank_last_result")
# Each re-reporting check and the daily check whose result it repeats.
LAST_RESULT_OF = {
    RECONCILED_LAST_RESULT: RECONCILED_WITH_SOURCE,
    BODIES_LAST_RESULT: LOADED_BODIES_ARE_NOT_BLANK,
}

POSTS_JOB = "stackoverflow_posts_job"
RECONCILIATION_JOB = "stackoverflow_posts_reconciliation_job"

# How often the daemon evaluates each sensor (Dagster's default). It logs two INFO lines per
# evaluation, whatever the outcome, so every 10 s flooded an idle daemon's output; 30 s delays a
# catch-up run by at most 30 s after the one before (runs of up to CATCH_UP_RUN_SECONDS: 5%),
# and an alert by at most 30 s.
SENSOR_INTERVAL_SECONDS = 30
