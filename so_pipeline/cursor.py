"""The cursor: the highest source id processed, kept in `filtered_posts` materializations."""

from typing import Any

import dagster as dg

from so_pipeline.analytical_posts import highest_processed_id
from so_pipeline.resources import PostgresResource
from so_pipeline.window import CURSOR_METADATA_KEY

FILTERED_POSTS_KEY = dg.AssetKey("filtered_posts")


def latest_metadata(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey = FILTERED_POSTS_KEY
) -> dict[str, Any]:
    """Metadata values of the asset's latest materialization ({} when none)."""
    event = instance.get_latest_materialization_event(asset_key)
    materialization = event.asset_materialization if event else None
    if materialization is None:
        return {}
    return {key: value.value for key, value in materialization.metadata.items()}


def cursor_from_history(instance: dg.DagsterInstance) -> int | None:
    """`last_processed_id` of the latest `filtered_posts` materialization, if any."""
    return latest_metadata(instance).get(CURSOR_METADATA_KEY)


def cursor_from_analytical(analytical_db: PostgresResource) -> int | None:
    """The highest id already loaded or rejected: where to resume when history is lost."""
    with analytical_db.connect() as connection:
        return highest_processed_id(connection)


def current_cursor(
    instance: dg.DagsterInstance, analytical_db: PostgresResource
) -> tuple[int | None, str]:
    """(the cursor, where it came from): the history, else the analytical tables, else None."""
    cursor = cursor_from_history(instance)
    if cursor is not None:
        return cursor, "materialization history"
    cursor = cursor_from_analytical(analytical_db)
    return cursor, "analytical tables" if cursor is not None else "start of source"


def cursor_recorded_at(instance: dg.DagsterInstance) -> float | None:
    """When the latest `filtered_posts` materialization was recorded (a Unix timestamp)."""
    event = instance.get_latest_materialization_event(FILTERED_POSTS_KEY)
    return event.timestamp if event else None
