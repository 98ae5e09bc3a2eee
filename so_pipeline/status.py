"""`so-pipeline status`: is it keeping up, and what did the last runs do?"""

from datetime import UTC, datetime

import dagster as dg
import sqlalchemy as sa

from so_pipeline.cursor import CURSOR_METADATA_KEY, FILTERED_POSTS_KEY
from so_pipeline.jobs import stackoverflow_posts_job
from so_pipeline.resources import PostgresResource
from so_pipeline.source_queries import source_max_id

# Above this many rows (PostgreSQL's estimate), tables are not counted exactly.
LARGE_TABLE_ROWS = 1_000_000


def _source_rows_after(source_db: PostgresResource, cursor: int | None) -> int:
    query = sa.text(
        "SELECT count(*) FROM posts WHERE CAST(:cursor AS bigint) IS NULL OR id > :cursor"
    )
    with source_db.begin() as connection:
        return connection.execute(query, {"cursor": cursor}).scalar_one()


def _analytical_rows(analytical_db: PostgresResource) -> dict[str, str]:
    """Row counts of the analytical tables: exact, or PostgreSQL's estimate ("~") when large."""
    query = sa.text(
        "SELECT relname, reltuples::bigint FROM pg_class "
        "WHERE oid IN (to_regclass('posts'), to_regclass('posts_rejected'))"
    )
    counts = {}
    with analytical_db.begin() as connection:
        for table, estimate in connection.execute(query).all():
            if estimate >= LARGE_TABLE_ROWS:
                counts[table] = f"~{estimate}"
            else:
                exact = sa.select(sa.func.count()).select_from(sa.table(table))
                counts[table] = str(connection.execute(exact).scalar_one())
    return counts


def status_report(
    instance: dg.DagsterInstance,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
    runs: int = 5,
) -> str:
    lines = []
    event = instance.get_latest_materialization_event(FILTERED_POSTS_KEY)
    materialization = event.asset_materialization if event else None
    cursor = None
    if event and materialization and CURSOR_METADATA_KEY in materialization.metadata:
        cursor = int(materialization.metadata[CURSOR_METADATA_KEY].value)  # type: ignore[arg-type]
        when = datetime.fromtimestamp(event.timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        lines.append(f"cursor (last_processed_id): {cursor}, recorded {when}")
    else:
        lines.append("cursor: none yet (no materialization of filtered_posts)")
    highest = source_max_id(source_db)
    backlog = _source_rows_after(source_db, cursor)
    lines.append(f"source: highest id {highest}; {backlog} posts after the cursor")
    for table, count in sorted(_analytical_rows(analytical_db).items()):
        lines.append(f"analytical {table}: {count} rows")
    lines.append(f"last runs of {stackoverflow_posts_job.name}:")
    records = instance.get_run_records(
        dg.RunsFilter(job_name=stackoverflow_posts_job.name), limit=runs
    )
    for record in records:
        started = record.start_time or record.create_timestamp.timestamp()
        duration = f"{record.end_time - started:.1f} s" if record.end_time else "running"
        stamp = datetime.fromtimestamp(started, UTC).strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            f"  {stamp}  {record.dagster_run.status.value:<9} {duration:>9}  "
            f"{record.dagster_run.run_id[:8]}"
        )
    if not records:
        lines.append("  none")
    return "\n".join(lines)
