"""A living source: edits reach the analytical tables within one run, under the same rules, and
the daily reconciliation compares ids exactly, soft-deletes what the source lost and restores
what came back."""

from datetime import datetime

import dagster as dg
import psycopg
import pytest

from so_pipeline.resources import PostgresResource
from so_pipeline.run_connections import RunConnections
from so_pipeline.window import PostWindow
from so_pipeline.window_loader import WindowLoader
from so_pipeline_tests.helpers import PipelineDatabases, Post, check_values, reconcile, run_job

pytestmark = pytest.mark.integration

START = datetime(2024, 1, 1)


def _source(databases: PipelineDatabases, statement: str, params: list[object] = []) -> None:  # noqa: B006
    with psycopg.connect(databases.source_url, autocommit=True) as connection:
        connection.execute(statement, params)  # type: ignore[arg-type]


def _edit(databases: PipelineDatabases, post_id: int, minute: int, **values: object) -> None:
    """Change a source post as Stack Overflow does: new values and a later last_activity_date
    (12:`minute` on the day the posts were made, at 00:00)."""
    assignments = ", ".join(f"{column} = %s" for column in values)
    _source(
        databases,
        f"UPDATE posts SET {assignments}, last_activity_date = %s WHERE id = %s",
        [*values.values(), START.replace(hour=12, minute=minute), post_id],
    )


def _seed(databases: PipelineDatabases, ids: range) -> None:
    databases.add_source_posts([Post(id=i, body=f"<p>body {i}</p>") for i in ids])
    _source(databases, "UPDATE posts SET last_activity_date = %s", [START])


def _analytical_row(databases: PipelineDatabases, post_id: int) -> list[tuple]:
    return databases.query(
        "analytical",
        "SELECT id, title, body, owner_user_id, creation_date FROM posts WHERE id = %s",
        [post_id],
    )


def _source_row(databases: PipelineDatabases, post_id: int) -> list[tuple]:
    return databases.query(
        "source",
        "SELECT id, title, body, owner_user_id, creation_date FROM posts WHERE id = %s",
        [post_id],
    )


def _in_both(databases: PipelineDatabases) -> list[tuple]:
    return databases.query(
        "analytical", "SELECT id FROM posts JOIN posts_rejected USING (id) ORDER BY id"
    )


def test_every_kind_of_edit_reaches_the_analytical_tables_in_one_run(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 11))
    _source(databases, "UPDATE posts SET body = ' ' WHERE id = 9")  # rejected from the start
    first = run_job(instance)
    assert first.metadata()["change_capture"].startswith("on (last_activity_date)")

    _edit(databases, 1, 1, title="New title", body="<p>edited</p>")
    _edit(databases, 2, 2, body="\u00a0\n")  # now blank: leaves posts
    _edit(databases, 3, 3, owner_user_id=None)  # the user was deleted
    _edit(databases, 9, 4, body="<p>fixed</p>")  # now valid: leaves posts_rejected
    _edit(databases, 4, 5, title=None)
    # (lookback_ids 0: the id look-back would re-read, and so apply, these newest posts too)
    edits = run_job(instance, lookback_ids=0)

    metadata = edits.metadata()
    assert metadata["changes_read"] == 5
    assert metadata["changes_updated"] == 2
    assert metadata["changes_inserted"] == 1  # post 9
    assert metadata["changes_rejected"] == 2
    for post_id in (1, 4, 9):
        assert _analytical_row(databases, post_id) == _source_row(databases, post_id)
    assert databases.rejected() == {2: "body_whitespace_only", 3: "owner_null"}
    assert databases.loaded_ids() == [1, 4, 5, 6, 7, 8, 9, 10]
    assert _in_both(databases) == []
    assert metadata["dagster/row_count"] == 8

    again = run_job(instance, lookback_ids=0)  # the time look-back re-reads them, unchanged
    assert again.metadata()["changes_read"] == 5
    assert again.metadata()["changes_updated"] == 0
    assert again.metadata()["changes_inserted"] == 0


def test_an_edit_committed_late_inside_the_look_back_is_applied(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 6))
    run_job(instance)
    _edit(databases, 1, 30, body="<p>on time</p>")
    run_job(instance)
    # Committed after that run, with a last_activity_date before its cursor.
    _edit(databases, 2, 25, body="<p>late</p>")
    late = run_job(instance, lookback_ids=0)

    assert late.metadata()["changes_updated"] == 1
    assert _analytical_row(databases, 2) == _source_row(databases, 2)


def test_edits_beyond_the_look_back_wait_for_the_reconciliation_or_a_replay(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 6))
    run_job(instance)
    _edit(databases, 1, 59, body="<p>on time</p>")
    run_job(instance)
    _edit(databases, 2, 30, body="<p>too late</p>")  # 29 minutes before the cursor

    quiet = run_job(instance, change_lookback_seconds=600, lookback_ids=0)
    assert quiet.metadata()["changes_updated"] == 0
    replay = run_job(instance, start_after_id=0)
    assert replay.metadata()["rows_updated"] == 1
    assert _analytical_row(databases, 2) == _source_row(databases, 2)


def test_a_source_without_the_change_column_works_as_before(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _source(
        databases,
        "CREATE TABLE posts (id bigint PRIMARY KEY, title text, body text, "
        "owner_user_id bigint, creation_date timestamp)",
    )
    _source(databases, "INSERT INTO posts VALUES (1, 't', 'b', 1, now()), (2, 't', ' ', 1, now())")

    outcome = run_job(instance)

    assert outcome.success
    assert outcome.metadata()["change_capture"] == (
        "off (source posts has no column last_activity_date)"
    )
    assert databases.loaded_ids() == [1]


def test_a_replay_after_a_source_fix_moves_the_post_between_the_tables(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 4))
    _source(databases, "UPDATE posts SET body = '' WHERE id = 2")
    run_job(instance, change_column="")
    _source(databases, "UPDATE posts SET body = '<p>fixed</p>' WHERE id = 2")

    replay = run_job(instance, start_after_id=0, change_column="")

    assert replay.metadata()["rows_loaded"] == 1
    assert databases.loaded_ids() == [1, 2, 3]
    assert databases.rejected() == {}
    assert _in_both(databases) == []


def test_a_replay_after_a_body_was_emptied_moves_the_post_out_of_posts(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """The other direction, through the window loader: a replay reads ids posts holds."""
    _seed(databases, range(1, 4))
    run_job(instance, change_column="")
    _source(databases, "UPDATE posts SET body = '' WHERE id = 2")

    replay = run_job(instance, start_after_id=0, change_column="")

    assert replay.metadata()["rows_rejected"] == 1
    assert databases.loaded_ids() == [1, 3]
    assert databases.rejected() == {2: "body_empty"}
    assert databases.query(
        "analytical", "SELECT row_count FROM so_pipeline_row_counts WHERE table_name = 'posts'"
    ) == [(2,)]
    assert _in_both(databases) == []


def _deleted(databases: PipelineDatabases) -> list[int]:
    rows = databases.query(
        "analytical",
        "SELECT id FROM posts WHERE deleted_at IS NOT NULL UNION ALL "
        "SELECT id FROM posts_rejected WHERE deleted_at IS NOT NULL ORDER BY 1",
    )
    return [row[0] for row in rows]


def test_deletions_are_soft_deleted_and_undeletes_restored(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 11))
    _source(databases, "UPDATE posts SET body = '' WHERE id = 7")
    run_job(instance)

    _edit(databases, 3, 10, body="<p>edited, then deleted</p>")
    _source(databases, "DELETE FROM posts WHERE id IN (3, 7)")
    run_job(instance)
    deleted = reconcile(instance)
    assert deleted.passed
    assert check_values(deleted)["rows_marked_deleted"] == 2
    assert _deleted(databases) == [3, 7]

    databases.add_source_posts([Post(id=3, body="<p>back</p>")])  # undeleted
    restored = reconcile(instance)
    assert restored.passed
    assert check_values(restored)["rows_restored"] == 1
    assert _deleted(databases) == [7]
    assert _analytical_row(databases, 3) == _source_row(databases, 3)
    assert check_values(reconcile(instance))["buckets_differing"] == 0


def test_a_deletion_and_a_late_row_in_one_bucket_no_longer_cancel_out(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 2001))
    run_job(instance, batch_size=5000)
    # A row committed late, below the look-back, and a deletion, in the same bucket: the counts
    # are equal; the ids are not.
    databases.add_source_posts([Post(id=-5, body="<p>late</p>")])
    _source(databases, "DELETE FROM posts WHERE id = 1500")

    evaluation = reconcile(instance)

    metadata = check_values(evaluation)
    assert evaluation.passed
    assert metadata["buckets_differing"] == 1
    assert metadata["rows_loaded_by_repair"] == 1
    assert metadata["rows_marked_deleted"] == 1
    assert -5 in databases.loaded_ids()
    assert _deleted(databases) == [1500]


def test_reconciliation_handles_negative_and_huge_ids(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    ids = [-(2**62), -1, 0, 1, 2**62, 2**63 - 1]
    databases.add_source_posts([Post(id=i) for i in ids])
    run_job(instance)
    _source(databases, "DELETE FROM posts WHERE id = %s", [2**62])

    evaluation = reconcile(instance)

    assert evaluation.passed
    assert _deleted(databases) == [2**62]
    assert check_values(evaluation)["ids_compared"] == 5


def test_an_old_posts_table_gains_deleted_at_in_place(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    with psycopg.connect(databases.analytical_url, autocommit=True) as connection:
        connection.execute(  # as the previous release created it
            "CREATE TABLE posts (id bigint PRIMARY KEY, title text, body text, "
            "owner_user_id bigint, creation_date timestamp, loaded_at timestamptz DEFAULT now())"
        )
        connection.execute("INSERT INTO posts (id, title, body) VALUES (1, 'kept', '<p>x</p>')")
    _seed(databases, range(1, 4))

    outcome = run_job(instance)

    assert outcome.success, outcome.failure_message()
    columns = databases.query(
        "analytical",
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'posts' "
        "ORDER BY ordinal_position",
    )
    assert [c[0] for c in columns][-1] == "deleted_at"
    assert databases.loaded_ids() == [1, 2, 3]


def test_change_capture_says_when_the_source_lacks_the_index_it_needs(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 4))
    run_job(instance)

    without = run_job(instance).metadata()["change_capture"]
    _source(databases, "CREATE INDEX ON posts (last_activity_date, id)")
    with_index = run_job(instance).metadata()["change_capture"]

    assert "no index on last_activity_date: each run reads the whole source table" in without
    assert "CREATE INDEX CONCURRENTLY ON posts (last_activity_date, id)" in without
    assert with_index == "on (last_activity_date)"


def test_a_window_whose_posts_were_deleted_before_its_load_loads_nothing(
    databases: PipelineDatabases,
) -> None:
    """Between `source_posts_batch` planning a window and `filtered_posts` reading it, the
    source may delete its posts: the load then reads an empty COPY and writes nothing."""
    databases.add_source_posts([Post(id=i) for i in range(1, 4)] + [Post(id=4, body=" ")])
    source = PostgresResource(resource_name="source_db", url=databases.source_url)
    analytical_db = PostgresResource(resource_name="analytical_db", url=databases.analytical_url)
    window = PostWindow(
        read_after_id=None,
        after_id=None,
        last_id=4,
        cursor_before=None,
        new_rows=4,
        source_max_id=4,
        cursor_origin="start",
    )
    _source(databases, "DELETE FROM posts")

    with RunConnections(source, analytical_db, run_id="test") as run:
        load = WindowLoader(run, require_owner=True).load(window)

    assert (load.rows_read, load.loaded_rows, load.rejected_rows) == (0, 0, 0)
    assert databases.loaded_ids() == []
    assert databases.rejected() == {}
