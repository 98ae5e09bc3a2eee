"""A catch-up's cost per window does not grow with the table: no window reads all of it."""

import dagster as dg
import psycopg

from so_pipeline.analytical_schema import ensure_tables
from so_pipeline_tests.helpers import PipelineDatabases, generate_source_posts, run_job


def _table_scans(url: str, table: str) -> int:
    """Sequential scans of `table` so far, as the statistics system counts them."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        row = connection.execute(
            "SELECT seq_scan FROM pg_stat_user_tables WHERE relname = %s", [table]
        ).fetchone()
    return 0 if row is None else row[0]


def _flush_statistics(url: str) -> None:
    """Make every ended session's counts visible (sessions report theirs when they end, and
    a run's connections have ended once its result is back)."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_force_next_flush()")
        connection.execute("SELECT 1")


def test_a_catch_up_never_scans_the_posts_table_it_grows(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    generate_source_posts(databases.source_url, 30_000)
    url = databases.analytical_url
    with psycopg.connect(url, autocommit=True) as connection:
        ensure_tables(connection)
        # As in a catch-up's first hours: the table grows before autovacuum ever analyzes it.
        connection.execute("ALTER TABLE posts SET (autovacuum_enabled = off)")
        # Without statistics, PostgreSQL plans this count of the (empty) partial index of
        # soft-deleted rows as a scan of the whole table:
        connection.execute("SELECT count(*) FROM posts WHERE deleted_at IS NOT NULL")
    _flush_statistics(url)
    scans_before = _table_scans(url, "posts")
    assert scans_before >= 1

    # Three windows of a catch-up (no look-back: at this size a merge's join is rightly a
    # scan), each recording the tables' state in its metadata.
    for _ in range(3):
        assert run_job(instance, batch_size=10_000, lookback_ids=0).success

    _flush_statistics(url)
    assert _table_scans(url, "posts") == scans_before


def test_a_tick_merging_its_look_back_never_scans_the_posts_table(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    generate_source_posts(databases.source_url, 30_000)
    url = databases.analytical_url
    assert run_job(instance, batch_size=30_000).success
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("ALTER TABLE posts SET (autovacuum_enabled = off)")
        # As in production: the tables have statistics, the staging table has none.
        connection.execute("ANALYZE posts")
        connection.execute("ANALYZE posts_rejected")
    _flush_statistics(url)
    scans_before = _table_scans(url, "posts")

    # Each tick re-reads the 1,000 ids below the cursor (the look-back) and merges them,
    # rejected ones included: the staged rows are joined with posts.
    for _ in range(3):
        assert run_job(instance).success

    _flush_statistics(url)
    assert _table_scans(url, "posts") == scans_before
