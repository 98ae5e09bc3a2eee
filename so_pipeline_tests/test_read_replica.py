"""The source is a read replica: a real primary and a hot standby streaming from it (made with
`pg_basebackup`), `max_standby_streaming_delay` 1 s and `hot_standby_feedback` off, as an RDS
read replica behaves (30 s there).

- While a catch-up window is copied from the standby by two COPY streams (an exported
  snapshot), a thread updates and vacuums the primary's posts: the standby cancels the read
  (and ends the session idle in its transaction). The window is read again in the step, not
  by a Dagster retry, the log says so, and the copy equals the source value for value.
- A read that the replica keeps cancelling is given up after MAX_READS reads, with advice.
- The replica's lag is metadata, and part of `lag_seconds`: a replica that stopped replaying
  is told apart from a copy that is behind; an idle primary does not look like lag.
- Change capture and the reconciliation work through the standby.

Needs Debian's PostgreSQL server (`apt-get install postgresql-15`); skipped, naming the
package, without it. The analytical database and Dagster's storage are the session's server.
"""

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import dagster as dg
import psycopg
import pytest

from so_pipeline.resources import PostgresResource
from so_pipeline.run_connections import RunConnections
from so_pipeline.source_replica import (
    MAX_READS,
    ReplicaConflictError,
    read_through_conflicts,
    replica_status,
)
from so_pipeline_tests.helpers import (
    PipelineDatabases,
    ScratchDatabases,
    free_port,
    generate_source_posts,
    reconcile,
    run_job,
    wait_for,
)
from so_pipeline_tests.replica import StreamingReplica
from so_pipeline_tests.tls import postgres_bin_dir

pytestmark = pytest.mark.integration

# Enough new posts for two COPY streams of at least 50,000 rows each (window_loader).
CATCH_UP_ROWS = 400_000  # read for ~2 s: longer than the standby waits for a conflicting read
COLUMNS = "id, title, body, owner_user_id, creation_date"
ROW_HASH = f"SELECT id, md5(ROW({COLUMNS})::text) FROM {{}} ORDER BY id"
LIVE_ROW_HASH = (
    f"SELECT id, md5(ROW({COLUMNS})::text) FROM {{}} WHERE deleted_at IS NULL ORDER BY id"
)
# The rules, for the bodies generate_source_posts and the tests write.
REASON = "CASE WHEN btrim(body) = '' THEN 'body_whitespace_only' WHEN owner_user_id IS NULL "
REASON += "THEN 'owner_null' END"


@pytest.fixture(scope="module")
def replica() -> Iterator[StreamingReplica]:
    postgres_bin_dir()  # skips, naming the package, without Debian's PostgreSQL server
    servers = StreamingReplica(free_port(), free_port(), standby_delay="1s")
    yield servers
    servers.stop()


@pytest.fixture
def through_replica(
    replica: StreamingReplica,
    scratch_databases: ScratchDatabases,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[PipelineDatabases]:
    """A source database on the primary, read by the pipeline through the standby; the
    analytical database on the session's server. `source_url` is the primary's (to write)."""
    name = f"so_source_{uuid.uuid4().hex[:10]}"
    replica.create_database(name)
    analytical = scratch_databases.create("so_analytical")
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", replica.standby.url(name))
    monkeypatch.setenv("SO_ANALYTICAL_DATABASE_URL", analytical)
    yield PipelineDatabases(replica.primary.url(name), analytical)
    replica.drop_database(name)


def _database(url: str) -> str:
    return url.rsplit("/", 1)[1]


def _logs(instance: dg.DagsterInstance, result: dg.ExecuteInProcessResult) -> list[str]:
    return [entry.user_message for entry in instance.all_logs(result.run_id)]


def _retried_steps(result: dg.ExecuteInProcessResult) -> list[Any]:
    return [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]


def assert_copy_equals_source(databases: PipelineDatabases) -> None:
    """Live posts hold the kept source rows and posts_rejected the rejected ones with their
    reason, value for value (an md5 of each row's columns, computed on each server)."""
    source = databases.query("source", ROW_HASH.format("posts"))
    kept = databases.query("analytical", LIVE_ROW_HASH.format("posts"))
    rejected = databases.query("analytical", LIVE_ROW_HASH.format("posts_rejected"))
    assert kept + rejected and sorted(kept + rejected) == source
    reasons = dict(databases.query("source", f"SELECT id, {REASON} FROM posts"))
    assert databases.rejected() == {i: reasons[i] for i, _ in rejected}
    assert not any(reasons[i] for i, _ in kept)


class PrimaryChurn:
    """Updates (a column the pipeline does not copy, as view counts change) and vacuums the
    primary's posts in a loop, in a thread, until the standby has cancelled `conflicts` reads
    in the database or `stop` is called: each VACUUM removes row versions the standby's older
    snapshots still see."""

    def __init__(self, replica: StreamingReplica, primary_url: str, conflicts: int) -> None:
        self.replica = replica
        self.url = primary_url
        self.conflicts = conflicts
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._churn, name="primary-churn", daemon=True)

    def __enter__(self) -> "PrimaryChurn":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _churn(self) -> None:
        database = _database(self.url)
        with psycopg.connect(self.url, autocommit=True) as primary:
            while not self._stop.is_set():
                if self.replica.conflicts(database) >= self.conflicts:
                    return
                primary.execute(
                    "UPDATE posts SET view_count = coalesce(view_count, 0) + 1 WHERE id %% 97 = %s",
                    [self.rounds % 97],
                )
                if self.replica.conflicts(database) >= self.conflicts:
                    return
                primary.execute("VACUUM posts")
                self.rounds += 1


ATTEMPTS = 6
REREAD = "The replica cancelled the read (recovery conflict); re-reading window "
ENDED_AFTER_READS = "The source ended the window's read transaction after every read in it"


def _empty_the_copy(databases: PipelineDatabases) -> None:
    with psycopg.connect(databases.analytical_url, autocommit=True) as connection:
        connection.execute("TRUNCATE posts, posts_rejected, so_pipeline_state")


def test_a_window_cancelled_by_the_replica_is_read_again_and_loaded_exactly_once(
    replica: StreamingReplica, through_replica: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    expected = generate_source_posts(through_replica.source_url, CATCH_UP_ROWS)
    with psycopg.connect(through_replica.source_url, autocommit=True) as primary:
        primary.execute("CREATE INDEX ON posts (last_activity_date, id)")  # change capture's
    replica.wait_for_standby()
    database = _database(through_replica.source_url)

    # The standby cancels whichever of the window's sessions holds a snapshot past
    # max_standby_streaming_delay when a VACUUM is replayed: a stream's COPY (the window is read
    # again in the step), or the main source session, idle in its transaction while the streams
    # copy (after every read in it is done: nothing to read again). Which one, or none if the
    # window was quicker, is a matter of timing: without a conflict in the window the copy is
    # emptied and the window read again, on a fresh instance.
    for attempt in range(ATTEMPTS):
        before = replica.conflicts(database)
        with PrimaryChurn(replica, through_replica.source_url, conflicts=before + 1) as churn:
            outcome = run_job(instance, batch_size=1_000_000, copy_streams=2, lookback_ids=0)
        replica.wait_for_standby()
        assert outcome.success, outcome.failure_message()
        assert churn.rounds > 0
        logs = _logs(instance, outcome.result)
        rereads = [line for line in logs if line.startswith(REREAD) and f"{CATCH_UP_ROWS}]" in line]
        ended = [line for line in logs if line.startswith(ENDED_AFTER_READS)]
        if rereads or ended or attempt == ATTEMPTS - 1:
            break
        _empty_the_copy(through_replica)
        instance = dg.DagsterInstance.ephemeral()

    assert rereads or ended, f"no conflict in the window in {ATTEMPTS} windows: {logs}"
    assert "conflict with recovery" in (rereads or ended)[0]
    assert not _retried_steps(outcome.result), "handled in the step, not by a Dagster retry"
    metadata = outcome.metadata()
    assert metadata["source_reads_cancelled"] == len(rereads)
    assert metadata["copy_streams"] == "2"
    assert metadata["load_path"] == "direct COPY"
    assert metadata["rows_loaded"] == len(expected)
    assert metadata["source_role"] == "read replica (hot standby)"
    assert through_replica.loaded_ids() == expected
    assert_copy_equals_source(through_replica)


def test_a_read_the_replica_keeps_cancelling_is_given_up_with_advice(
    replica: StreamingReplica, through_replica: PipelineDatabases
) -> None:
    """Each read holds its snapshot for 3 s while the primary keeps vacuuming: the standby
    cancels every one, and after MAX_READS the step fails saying what to change."""
    generate_source_posts(through_replica.source_url, 1_000)
    replica.wait_for_standby()
    database = _database(through_replica.source_url)
    before = replica.conflicts(database)
    resource = {
        name: PostgresResource(resource_name=name, url=url)
        for name, url in (
            ("source_db", replica.standby.url(database)),
            ("analytical_db", through_replica.analytical_url),
        )
    }
    reads = 0

    def long_read(run: RunConnections) -> None:
        nonlocal reads
        reads += 1
        with run.source.transaction():
            run.source.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            run.source.execute("SELECT count(*) FROM posts")
            run.source.execute("SELECT pg_sleep(3), count(*) FROM posts")

    with (
        PrimaryChurn(replica, through_replica.source_url, conflicts=before + 100),
        RunConnections(resource["source_db"], resource["analytical_db"], "test") as run,
        pytest.raises(ReplicaConflictError) as failure,
    ):
        read_through_conflicts(
            run, dg.get_dagster_logger(), "the test's read", lambda: long_read(run)
        )

    assert reads == MAX_READS
    assert replica.conflicts(database) - before >= MAX_READS
    message = failure.value.description or ""
    assert f"the replica cancelled the read of the test's read {MAX_READS} times" in message
    assert "max_standby_streaming_delay" in message and "hot_standby_feedback" in message


def _read_ended_once(url: str, reads: list[int]) -> Callable[[RunConnections], int]:
    """A read whose session is ended under it the first time (as a standby does on a recovery
    conflict, sometimes before its message reaches the client)."""

    def read(run: RunConnections) -> int:
        reads.append(len(reads) + 1)
        if len(reads) == 1:
            with psycopg.connect(url, autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(%s, 5000)", [run.source.info.backend_pid]
                )
        return run.source.execute("SELECT count(*) FROM posts").fetchone()[0]  # type: ignore[index]

    return read


def test_a_session_the_replica_ends_mid_read_is_read_again_on_a_new_one(
    replica: StreamingReplica, through_replica: PipelineDatabases
) -> None:
    generate_source_posts(through_replica.source_url, 1_000)
    replica.wait_for_standby()
    standby = replica.standby.url(_database(through_replica.source_url))
    source = PostgresResource(resource_name="source_db", url=standby)
    analytical = PostgresResource(resource_name="analytical_db", url=through_replica.analytical_url)
    reads: list[int] = []
    read = _read_ended_once(standby, reads)

    with RunConnections(source, analytical, "test") as run:
        count, cancelled = read_through_conflicts(
            run, dg.get_dagster_logger(), "the test's read", lambda: read(run)
        )

    assert (count, cancelled, reads) == (1_000, 1, [1, 2])


def test_a_session_ended_on_a_primary_is_not_read_again_there(
    databases: PipelineDatabases,
) -> None:
    generate_source_posts(databases.source_url, 100)
    source = PostgresResource(resource_name="source_db", url=databases.source_url)
    analytical = PostgresResource(resource_name="analytical_db", url=databases.analytical_url)
    reads: list[int] = []
    read = _read_ended_once(databases.source_url, reads)

    with RunConnections(source, analytical, "test") as run, pytest.raises(psycopg.Error):
        read_through_conflicts(run, dg.get_dagster_logger(), "the test's read", lambda: read(run))

    assert reads == [1]


def test_the_replicas_lag_is_metadata_and_part_of_the_lag(
    replica: StreamingReplica, through_replica: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    generate_source_posts(through_replica.source_url, 999)  # 999: kept, the newest
    replica.wait_for_standby()
    time.sleep(1.5)  # the primary idle: its last replayed commit grows old, yet no lag

    caught_up = run_job(instance).metadata()
    assert caught_up["source_role"] == "read replica (hot standby)"
    assert caught_up["source_replica_lag_seconds"] == 0
    assert caught_up["lag_seconds"] == caught_up["copy_lag_seconds"] == 0

    with psycopg.connect(replica.standby.url("postgres"), autocommit=True) as standby:
        standby.execute("SELECT pg_wal_replay_pause()")
        try:
            with psycopg.connect(through_replica.source_url, autocommit=True) as primary:
                primary.execute(
                    "INSERT INTO posts (id, title, body, owner_user_id, creation_date) VALUES "
                    "(5000, 't', '<p>new</p>', 1, timestamp '2020-01-01' + interval '2 hours')"
                )
            time.sleep(2)
            behind = run_job(instance).metadata()
        finally:
            standby.execute("SELECT pg_wal_replay_resume()")

    # The copy has everything the replica shows; the replica is 2 s and more behind.
    assert behind["copy_lag_seconds"] == 0
    assert behind["source_replica_lag_seconds"] >= 2
    assert behind["lag_seconds"] == pytest.approx(behind["source_replica_lag_seconds"], abs=0.01)
    assert behind["last_processed_id"] == 999

    replica.wait_for_standby()
    wait_for(lambda: _standby_lag(replica, _database(through_replica.source_url)) == 0, "replay")
    after = run_job(instance).metadata()
    assert after["last_processed_id"] == 5_000
    assert after["source_replica_lag_seconds"] == 0


def _standby_lag(replica: StreamingReplica, database: str) -> float | None:
    with psycopg.connect(replica.standby.url(database), autocommit=True) as standby:
        return replica_status(standby).lag_seconds


def test_a_primary_source_says_so_and_has_no_replica_lag(
    replica: StreamingReplica,
    through_replica: PipelineDatabases,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    generate_source_posts(through_replica.source_url, 100)
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", through_replica.source_url)
    metadata = run_job(instance).metadata()
    assert metadata["source_role"] == "primary"
    assert "source_replica_lag_seconds" not in metadata and "copy_lag_seconds" not in metadata
    assert metadata["source_reads_cancelled"] == 0


def test_change_capture_and_the_reconciliation_work_through_the_replica(
    replica: StreamingReplica, through_replica: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    generate_source_posts(through_replica.source_url, 2_000)
    with psycopg.connect(through_replica.source_url, autocommit=True) as primary:
        primary.execute("UPDATE posts SET last_activity_date = now() - interval '1 hour'")
        primary.execute("CREATE INDEX ON posts (last_activity_date, id)")
    replica.wait_for_standby()
    assert run_job(instance).success  # loads, and starts change capture

    with psycopg.connect(through_replica.source_url, autocommit=True) as primary:
        primary.execute(
            "UPDATE posts SET body = '<p>edited ' || id || '</p>', last_activity_date = now() "
            "WHERE id IN (5, 11, 20)"  # 20 was rejected (blank body): now kept
        )
        primary.execute(
            "UPDATE posts SET owner_user_id = NULL, last_activity_date = now() WHERE id = 7"
        )
        primary.execute("DELETE FROM posts WHERE id = 3")
    replica.wait_for_standby()
    changes = run_job(instance).metadata()
    assert changes["changes_updated"] + changes["changes_inserted"] >= 2
    assert through_replica.rejected()[7] == "owner_null"
    assert 20 in through_replica.loaded_ids()

    evaluation = reconcile(instance, content_days=1)
    assert evaluation.passed
    assert evaluation.metadata["rows_marked_deleted"].value == 1
    assert_copy_equals_source(through_replica)  # id 3 soft-deleted, no longer live
