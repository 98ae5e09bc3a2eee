"""The cursor: the highest source id processed, kept in `filtered_posts` materializations."""

from typing import Any

import dagster as dg
import psycopg

from so_pipeline.analytical_reads import highest_processed_id, recorded_state
from so_pipeline.metadata import flattened
from so_pipeline.names import FILTERED_POSTS
from so_pipeline.window import CURSOR_METADATA_KEY


def latest_metadata(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey = FILTERED_POSTS
) -> dict[str, Any]:
    """Metadata values of the asset's latest materialization, groups flattened ({} when none)."""
    event = instance.get_latest_materialization_event(asset_key)
    materialization = event.asset_materialization if event else None
    if materialization is None:
        return {}
    return flattened({key: value.value for key, value in materialization.metadata.items()})


def cursor_from_history(instance: dg.DagsterInstance) -> int | None:
    """`last_processed_id` of the latest `filtered_posts` materialization, if any."""
    return latest_metadata(instance).get(CURSOR_METADATA_KEY)


def current_cursor(
    instance: dg.DagsterInstance, analytical: psycopg.Connection
) -> tuple[int | None, str]:
    """(the cursor, where it came from): the history; when that is lost, the cursor recorded
    with the rows in the analytical database, else the highest id loaded or rejected there;
    else None."""
    cursor = cursor_from_history(instance)
    if cursor is not None:
        return cursor, "materialization history"
    recorded = recorded_state(analytical, CURSOR_METADATA_KEY)
    if recorded is not None:
        return int(recorded), "analytical tables"
    cursor = highest_processed_id(analytical)
    return cursor, "analytical tables" if cursor is not None else "start of source"


def cursor_recorded_at(instance: dg.DagsterInstance) -> float | None:
    """When the latest `filtered_posts` materialization was recorded (a Unix timestamp)."""
    event = instance.get_latest_materialization_event(FILTERED_POSTS)
    return event.timestamp if event else None
