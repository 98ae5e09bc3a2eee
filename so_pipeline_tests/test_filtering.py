"""The body rule and the owner rule: what is kept, what is rejected and how it is recorded."""

import sys

import dagster as dg
import psycopg
import pytest

from so_pipeline.post_rules import NON_WHITESPACE_REGEX
from so_pipeline.tooling.embedded import LocalServer
from so_pipeline_tests.helpers import PipelineDatabases, Post, run_job

pytestmark = pytest.mark.integration

BLANK_BODIES = {
    1: None,
    2: "",
    3: "   ",
    4: "\t\r\n \x0b\x0c",
    5: "\u00a0\u2003\u2028\u2029\u3000\u1680\u202f\u205f\u0085",  # Unicode whitespace only
}
KEPT_BODIES = {
    10: "<p>ok</p>",
    11: "\u00a0x\u00a0",  # one visible character is enough
    12: "🙂",
    13: "\u200b",  # zero-width space is not whitespace in Unicode (category Cf): kept
    14: "  .  ",
}


def test_blank_bodies_are_rejected_with_their_reason_and_never_loaded(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    posts = [Post(id=i, body=b) for i, b in {**BLANK_BODIES, **KEPT_BODIES}.items()]
    databases.add_source_posts(posts + [Post(id=20, owner_user_id=None)])

    outcome = run_job(instance)

    assert outcome.success
    assert databases.loaded_ids() == sorted(KEPT_BODIES)
    assert databases.rejected() == {
        1: "body_null",
        2: "body_empty",
        3: "body_whitespace_only",
        4: "body_whitespace_only",
        5: "body_whitespace_only",
        20: "owner_null",
    }
    metadata = outcome.metadata()
    assert (metadata["rejected_body_null"], metadata["rejected_body_empty"]) == (1, 1)
    assert metadata["rejected_body_whitespace_only"] == 3
    assert metadata["rejected_owner_null"] == 1
    assert metadata["rows_rejected"] == 6
    assert metadata["rows_read"] == 11
    blank_loaded = databases.query(
        "analytical", "SELECT count(*) FROM posts WHERE body IS NULL OR btrim(body) = ''"
    )
    assert blank_loaded == [(0,)]


def test_owner_rule_can_be_switched_off(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=1, owner_user_id=None), Post(id=2, body="")])

    outcome = run_job(instance, require_owner=False)

    assert databases.loaded_ids() == [1]
    assert databases.rejected() == {2: "body_empty"}
    assert outcome.metadata()["rejected_owner_null"] == 0


def test_a_fully_rejected_window_still_advances_the_cursor(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=i, body=" ") for i in range(1, 4)] + [Post(id=9)])

    first = run_job(instance, batch_size=3)
    second = run_job(instance, batch_size=3)

    assert first.metadata()["rows_loaded"] == 0
    assert first.metadata()["last_processed_id"] == 3
    assert second.metadata("source_posts_batch")["window_after_id"] == "3"
    assert databases.loaded_ids() == [9]


def test_a_window_re_read_over_rejected_posts_only_counts_them_as_already_rejected(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """posts is empty, so the window goes the direct way; posts_rejected holds its ids, so its
    rejected rows are merged, not copied in again (a unique violation)."""
    databases.add_source_posts([Post(id=1, body=""), Post(id=2, body=None)])
    run_job(instance)

    replay = run_job(instance, start_after_id=0)

    assert replay.success
    assert replay.metadata()["rows_already_rejected"] == 2
    assert replay.metadata()["rows_rejected"] == 0
    assert replay.metadata()["rejected_total"] == 2
    assert databases.rejected() == {1: "body_empty", 2: "body_null"}


def test_sql_whitespace_rule_matches_python_isspace(postgres_server: LocalServer) -> None:
    """The rule runs in PostgreSQL; check it against Python for every relevant character.

    (That WHITESPACE_RANGES lists exactly Python's whitespace is checked without a database
    in test_pure_tables_and_rules.py.)
    """
    python_whitespace = {c for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    near_misses = [0x0000 + 1, 0x0008, 0x000E, 0x001B, 0x0021, 0x180E, 0x200B, 0x2060, 0xFEFF]
    characters = sorted((python_whitespace | set(near_misses)) - {0})
    with psycopg.connect(postgres_server.url("postgres")) as connection:
        has_visible = connection.execute(
            "SELECT c, chr(c) ~ %s FROM unnest(%s::int[]) AS c", [NON_WHITESPACE_REGEX, characters]
        ).fetchall()
    assert {c for c, visible in has_visible if not visible} == python_whitespace


@pytest.mark.parametrize("size", [1_000_000, 3_000_000])
def test_megabyte_bodies_are_loaded_whole(
    databases: PipelineDatabases, instance: dg.DagsterInstance, size: int
) -> None:
    body = "<p>" + "é" * size + "</p>"
    databases.add_source_posts([Post(id=1, body=body), Post(id=2, body=" " * size)])

    assert run_job(instance).success

    assert databases.query("analytical", "SELECT id, length(body) FROM posts") == [(1, size + 7)]
    assert databases.rejected() == {2: "body_whitespace_only"}
