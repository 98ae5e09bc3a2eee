"""Dagster's storage as dagster.yaml configures it: connections kept open, replaced when the
server ends them, and closed with the instance."""

import os
import time
from pathlib import Path

import dagster as dg
import psycopg

from so_pipeline.dagster_storage import PooledPostgresStorage


def _storage_sessions(dagster_db: str) -> list[int]:
    """Backend pids of this test process's sessions on the Dagster database, other than the
    one asking."""
    with psycopg.connect(dagster_db, autocommit=True) as connection:
        rows = connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        ).fetchall()
    return [pid for (pid,) in rows]


def _sessions_after_a_moment(dagster_db: str) -> list[int]:
    """The sessions left once the server has seen the closed ones go (within 5 s)."""
    deadline = time.monotonic() + 5
    while (sessions := _storage_sessions(dagster_db)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return sessions


def test_the_storage_keeps_its_connections_and_replaces_one_the_server_ended(
    dagster_home: Path,
) -> None:
    dagster_db = os.environ["DAGSTER_PG_URL"].replace("+psycopg2", "", 1)
    with dg.DagsterInstance.get() as instance:
        assert isinstance(instance.get_ref().storage, PooledPostgresStorage)
        assert _storage_sessions(dagster_db) == []
        for _ in range(20):
            instance.get_runs(limit=1)
            instance.get_latest_materialization_event(dg.AssetKey("filtered_posts"))
        # dagster-postgres alone closes each connection after its call: none would be left.
        sessions = _storage_sessions(dagster_db)
        assert 1 <= len(sessions) <= 2, sessions  # the run and the event log storage's

        with psycopg.connect(dagster_db, autocommit=True) as admin:
            for pid in sessions:
                admin.execute("SELECT pg_terminate_backend(%s, 5000)", [pid])
        # A restart or a failover ends them the same way: the next calls reconnect.
        assert instance.get_runs(limit=1) == []
        assert instance.get_latest_materialization_event(dg.AssetKey("filtered_posts")) is None
        assert not set(_storage_sessions(dagster_db)) & set(sessions)
    # Disposing of the instance (the code server makes one per sensor evaluation, a run one
    # for its life) closes its connections instead of leaving them to the garbage collector.
    assert _sessions_after_a_moment(dagster_db) == []
