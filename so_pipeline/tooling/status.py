"""`so-pipeline status`: is it keeping up, and what did the last runs do?"""

from datetime import UTC, datetime

import dagster as dg

from so_pipeline import analytical_reads, source_posts
from so_pipeline.cursor import cursor_from_history, cursor_recorded_at
from so_pipeline.names import POSTS_JOB
from so_pipeline.resources import PostgresResource

# Above this many rows (PostgreSQL's estimate), tables are not counted exactly.
LARGE_TABLE_ROWS = 1_000_000


def _analytical_rows(analytical_db: PostgresResource) -> dict[str, str]:
    """Row counts of the analytical tables: exact, or PostgreSQL's estimate ("~") when large."""
    counts = {}
    with analytical_db.connect() as connection:
        for table, estimate in analytical_reads.row_estimates(connection).items():
            if estimate >= LARGE_TABLE_ROWS:
                counts[table] = f"~{estimate}"
            else:
                counts[table] = str(analytical_reads.count_rows(connection, table))
    return counts


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def status_report(
    instance: dg.DagsterInstance,
    source_db: PostgresResource,
    analytical_db: PostgresResource,
    runs: int = 5,
) -> str:
    lines = []
    cursor = cursor_from_history(instance)
    recorded = cursor_recorded_at(instance)
    if cursor is not None and recorded is not None:
        lines.append(f"cursor (last_processed_id): {cursor}, recorded {_when(recorded)} UTC")
    else:
        lines.append("cursor: none yet (no materialization of filtered_posts)")
    with source_db.connect() as connection:
        highest = source_posts.max_id(connection)
        backlog = source_posts.rows_after(connection, cursor)
    lines.append(f"source: highest id {highest}; {backlog} posts after the cursor")
    for table, count in sorted(_analytical_rows(analytical_db).items()):
        lines.append(f"analytical {table}: {count} rows")
    lines.append(f"last runs of {POSTS_JOB}:")
    records = instance.get_run_records(dg.RunsFilter(job_name=POSTS_JOB), limit=runs)
    for record in records:
        started = record.start_time or record.create_timestamp.timestamp()
        duration = f"{record.end_time - started:.1f} s" if record.end_time else "running"
        lines.append(
            f"  {_when(started)}  {record.dagster_run.status.value:<9} {duration:>9}  "
            f"{record.dagster_run.run_id[:8]}"
        )
    if not records:
        lines.append("  none")
    return "\n".join(lines)
