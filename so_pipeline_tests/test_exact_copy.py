"""The copy equals the source whatever the source's application writes, or a check fails.

Change capture trusts nothing in `last_activity_date` (future, infinity, NULL, backwards, a
mass edit larger than a page); what it cannot place, the reconciliation finds by comparing
contents and repairs. Every case ends by comparing the whole end state with the source: live
`posts` equal the kept source rows value for value, `posts_rejected` the rejected ones, no id
in both, and ids gone from the source not live.
"""

from collections.abc import Iterator
from datetime import datetime
from typing import Any

import dagster as dg
import psycopg
import pytest

from so_pipeline_tests import helpers
from so_pipeline_tests.helpers import (
    PipelineDatabases,
    Post,
    check_values,
    generate_source_posts,
    run_job,
)

pytestmark = pytest.mark.integration

COLUMNS = "id, title, body, owner_user_id, creation_date"


def _source(
    databases: PipelineDatabases, statement: str, params: list[object] | None = None
) -> None:
    with psycopg.connect(databases.source_url, autocommit=True) as connection:
        connection.execute(statement, params or [])  # type: ignore[arg-type]


def _analytical(databases: PipelineDatabases, statement: str) -> None:
    with psycopg.connect(databases.analytical_url, autocommit=True) as connection:
        connection.execute(statement)  # type: ignore[arg-type]


def _seed(databases: PipelineDatabases, ids: Iterator[int] | range) -> None:
    databases.add_source_posts([Post(id=i, body=f"<p>body {i}</p>") for i in ids])
    _source(databases, "UPDATE posts SET last_activity_date = now() - interval '1 hour'")
    _source(databases, "CREATE INDEX ON posts (last_activity_date, id)")


def _edit(databases: PipelineDatabases, post_id: int, body: str, at: str) -> None:
    """An edit as an application makes it: a new body, and last_activity_date set to `at` (SQL)."""
    _source(
        databases,
        f"UPDATE posts SET body = %s, last_activity_date = {at} WHERE id = %s",
        [body, post_id],
    )


def assert_copy_equals_source(databases: PipelineDatabases) -> None:
    """Live posts = the kept source rows, posts_rejected = the rejected ones, value for value."""
    source_rows = databases.query("source", f"SELECT {COLUMNS} FROM posts ORDER BY id")
    live = databases.query(
        "analytical", f"SELECT {COLUMNS} FROM posts WHERE deleted_at IS NULL ORDER BY id"
    )
    rejected = databases.query(
        "analytical", f"SELECT {COLUMNS} FROM posts_rejected WHERE deleted_at IS NULL ORDER BY id"
    )
    assert sorted(live + rejected) == source_rows
    assert all(row[2] and row[2].strip() for row in live)  # no blank body is live
    assert (
        databases.query("analytical", "SELECT id FROM posts JOIN posts_rejected USING (id)") == []
    )


def reconcile(instance: dg.DagsterInstance, **config: Any) -> dg.AssetCheckEvaluation:
    """The reconciliation, every content compared unless `config` says otherwise."""
    return helpers.reconcile(instance, **{"content_days": 1, **config})


def test_a_post_dated_in_the_future_does_not_hide_the_edits_after_it(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 6))
    assert run_job(instance).success
    _edit(databases, 1, "<p>from the future</p>", "now() + interval '10 years'")
    ahead = run_job(instance, lookback_ids=0)
    _edit(databases, 2, "<p>edited now</p>", "now()")
    after = run_job(instance, lookback_ids=0)

    assert ahead.success and after.success
    assert ahead.metadata()["changes_ahead_of_source_clock"] == 1
    clock = databases.query("source", "SELECT now() AT TIME ZONE 'UTC'")[0][0]
    assert ahead.metadata()["change_cursor_at"] <= clock.isoformat()
    assert after.metadata()["changes_updated"] >= 1
    assert_copy_equals_source(databases)


@pytest.mark.parametrize(
    "at", ["'infinity'", "'10000-01-01'", "NULL", "now() - interval '3 days'"], ids=str
)
def test_a_change_time_change_capture_cannot_place_neither_stalls_nor_loses_the_edit(
    databases: PipelineDatabases, instance: dg.DagsterInstance, at: str
) -> None:
    """infinity, a year past 9999, NULL, or a move backwards beyond the look-back: the run
    succeeds and records its cursor; the reconciliation applies the edit."""
    _seed(databases, range(1, 6))
    assert run_job(instance).success
    _edit(databases, 3, "<p>edited oddly</p>", at)

    # (lookback_ids 0: the id look-back would re-read, and so apply, these posts too)
    outcome = run_job(instance, lookback_ids=0)
    again = run_job(instance, lookback_ids=0)

    assert outcome.success and again.success
    assert "change_cursor_at" in again.metadata()
    evaluation = reconcile(instance)
    assert evaluation.passed, evaluation.description
    assert check_values(evaluation)["rows_updated_by_repair"] == 1
    assert_copy_equals_source(databases)


def test_a_mass_edit_larger_than_a_page_is_paged_through_and_a_late_edit_behind_it_applied(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 41))
    assert run_job(instance).success
    _source(
        databases,
        "UPDATE posts SET body = body || ' (mass edit)', last_activity_date = now() WHERE id <= 30",
    )
    mass = run_job(instance, change_batch_size=7, lookback_ids=0)
    # Committed late: dated before the mass edit, inside the look-back.
    _edit(databases, 35, "<p>late</p>", "now() - interval '1 minute'")
    late = run_job(instance, change_batch_size=7, lookback_ids=0)

    assert mass.metadata()["changes_pages"] >= 5  # 30 rows, 7 a page
    assert mass.metadata()["changes_updated"] == 30
    assert late.metadata()["changes_updated"] == 1
    assert_copy_equals_source(databases)


def test_the_cursors_survive_losing_dagsters_history(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 6))
    assert run_job(instance).success
    assert run_job(instance).success  # change capture under way
    _edit(databases, 2, "<p>edited while the history was lost</p>", "now()")
    databases.add_source_posts([Post(id=6)])

    with dg.DagsterInstance.ephemeral() as wiped:
        resumed = run_job(wiped, lookback_ids=0)

    metadata = resumed.metadata("source_posts_batch")
    assert metadata["cursor_origin"] == "analytical tables"
    assert resumed.metadata()["last_processed_id"] == 6
    assert "started" not in resumed.metadata()["change_capture"]
    assert resumed.metadata()["changes_updated"] == 1
    assert_copy_equals_source(databases)


def test_reconciliation_repairs_contents_not_only_ids(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 21))
    assert run_job(instance, change_column="").success
    _analytical(databases, "UPDATE posts SET body = '<p>tampered</p>' WHERE id = 4")
    # Deleted and inserted again with the same id and timestamps, but a blank body.
    _source(databases, "UPDATE posts SET body = '  ' WHERE id = 9")

    repaired = reconcile(instance)
    again = reconcile(instance)

    assert repaired.passed, repaired.description
    assert check_values(repaired)["rows_updated_by_repair"] == 1
    assert check_values(repaired)["buckets_differing"] == 1
    assert check_values(again)["buckets_differing"] == 0
    assert databases.rejected() == {9: "body_whitespace_only"}
    assert_copy_equals_source(databases)


def test_a_row_the_repair_cannot_fix_fails_the_check_naming_it(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 6))
    assert run_job(instance, change_column="").success
    _analytical(databases, "UPDATE posts SET title = 'wrong' WHERE id = 3")
    _analytical(  # something outside the pipeline swallows every update of post 3
        databases,
        "CREATE FUNCTION keep_3() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN IF OLD.id = 3 THEN RETURN NULL; END IF; RETURN NEW; END $$; "
        "CREATE TRIGGER keep_3 BEFORE UPDATE ON posts FOR EACH ROW EXECUTE FUNCTION keep_3()",
    )

    evaluation = reconcile(instance)

    assert not evaluation.passed
    assert "1 ids still differ after the repair (e.g. 3)" in (evaluation.description or "")
    assert check_values(evaluation)["unrepaired_ids"] == "3"


def test_only_the_days_share_of_contents_is_compared_yet_every_id_is(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """content_days 7: each day's run compares the contents of one bucket in seven, so a row
    is verified within a week; ids are compared every day."""
    _seed(databases, range(1, 6))
    assert run_job(instance, change_column="").success

    evaluation = reconcile(instance, content_days=7)

    assert check_values(evaluation)["buckets_compared"] == 1
    assert check_values(evaluation)["content_buckets_compared"] in (0, 1)


def test_a_mass_deletion_at_the_source_deletes_nothing_until_a_run_allows_it(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 301))
    assert run_job(instance, change_column="").success
    _source(databases, "DELETE FROM posts WHERE id > 150")

    held = reconcile(instance)
    deleted_then = databases.query("analytical", "SELECT count(*) FROM posts_live")[0][0]
    allowed = reconcile(instance, allow_mass_delete=True)

    assert not held.passed
    assert "150 posts are gone from the source, more than the 100" in (held.description or "")
    assert "allow_mass_delete" in (held.description or "")
    assert deleted_then == 300
    assert allowed.passed, allowed.description
    assert check_values(allowed)["rows_marked_deleted"] == 150
    assert_copy_equals_source(databases)


def test_an_emptied_source_never_deletes_anything(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 11))
    assert run_job(instance, change_column="").success
    _source(databases, "DELETE FROM posts")

    evaluation = reconcile(instance, allow_mass_delete=True)

    assert not evaluation.passed
    assert "The source holds no post up to id 10" in (evaluation.description or "")
    assert databases.query("analytical", "SELECT count(*) FROM posts_live") == [(10,)]


def test_a_repair_of_more_deletions_than_bind_parameters_allows(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """70,000 soft-deletions in one repair: more than the 65,535 parameters of a statement."""
    generate_source_posts(databases.source_url, 80_000)
    assert run_job(instance, batch_size=100_000, change_column="").success
    _source(databases, "DELETE FROM posts WHERE id <= 70000")

    evaluation = reconcile(instance, allow_mass_delete=True, content_days=30)

    assert evaluation.passed, evaluation.description
    assert check_values(evaluation)["rows_marked_deleted"] == 70_000
    assert_copy_equals_source(databases)


def test_deleted_posts_are_not_counted_as_live(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 11))
    assert run_job(instance, change_column="").success
    _source(databases, "DELETE FROM posts WHERE id IN (2, 5)")
    assert reconcile(instance).passed

    after = run_job(instance, change_column="")

    assert after.metadata()["dagster/row_count"] == 8
    assert after.metadata()["deleted_posts_total"] == 2
    live = databases.query("analytical", "SELECT id FROM posts_live ORDER BY id")
    assert [row[0] for row in live] == [1, 3, 4, 6, 7, 8, 9, 10]


def test_a_backfill_recopies_a_range_through_the_rules_without_moving_the_cursor(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _seed(databases, range(1, 21))
    assert run_job(instance, change_column="").success
    _source(databases, "UPDATE posts SET title = 'fixed at the source' WHERE id BETWEEN 5 AND 8")

    evaluation = reconcile(instance, recopy_after_id=4, recopy_up_to_id=8, content_days=30)
    after = run_job(instance, change_column="")

    assert evaluation.passed, evaluation.description
    assert check_values(evaluation)["rows_recopied"] == 4
    assert check_values(evaluation)["rows_updated_by_repair"] == 4
    assert after.metadata()["cursor_before"] == "20"
    assert_copy_equals_source(databases)


def test_a_source_in_another_time_zone_is_copied_in_utc_and_compares_equal(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """timestamptz columns at a source whose sessions default to New York time: the copy holds
    UTC, change capture reads the change column in UTC, and the contents compare equal."""
    with psycopg.connect(databases.source_url, autocommit=True) as connection:
        name = connection.info.dbname
        connection.execute(f"ALTER DATABASE {name} SET TimeZone = 'America/New_York'")
        connection.execute(
            "CREATE TABLE posts (id bigint PRIMARY KEY, title text, body text, "
            "owner_user_id bigint, creation_date timestamptz, last_activity_date timestamptz)"
        )
        connection.execute(
            "INSERT INTO posts SELECT g, 't', '<p>b</p>', 1, "
            "timestamptz '2024-03-10 06:30:00+00' + g * interval '1 hour', "
            "now() - interval '1 hour' FROM generate_series(1, 5) g"
        )
    assert run_job(instance).success
    _source(
        databases,
        "UPDATE posts SET body = '<p>edited</p>', last_activity_date = now() WHERE id = 2",
    )

    edited = run_job(instance, lookback_ids=0)
    evaluation = reconcile(instance)

    assert edited.metadata()["changes_updated"] == 1
    assert databases.query("analytical", "SELECT creation_date FROM posts WHERE id = 1")[0][0] == (
        datetime(2024, 3, 10, 7, 30)
    )
    assert evaluation.passed, evaluation.description
    assert check_values(evaluation)["buckets_differing"] == 0
