"""Loaded values are exactly the source values, whatever they hold."""

from datetime import datetime

import dagster as dg
import psycopg
import pytest

from so_pipeline_tests.helpers import (
    PipelineDatabases,
    Post,
    ScratchDatabases,
    generate_source_posts,
    run_job,
    run_until_caught_up,
)

pytestmark = pytest.mark.integration

ODD_POSTS = [
    Post(id=1, title=None, body="<p>an answer has no title</p>"),
    Post(id=2, title="Tabs\tand\nnewlines \\ backslash", body="line1\nline2\r\n\\N not null"),
    Post(id=3, title="Ünïcödé “quotes” 日本語 🙂", body="<p>emoji 🙂 and \u200e marks</p>"),
    Post(id=4, creation_date=datetime(1970, 1, 1, 0, 0, 0, 1)),
    Post(id=5, creation_date=datetime(2100, 12, 31, 23, 59, 59, 999999)),
    Post(id=2**31 + 5, owner_user_id=2**40),
    Post(id=2**62, owner_user_id=-1, title=""),
]

COLUMNS = "id, title, body, owner_user_id, creation_date"


def test_every_loaded_value_equals_its_source_value(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts(ODD_POSTS)

    assert run_job(instance, batch_size=3).success
    assert run_job(instance, batch_size=3).success
    assert run_job(instance, batch_size=3).success

    source = databases.query("source", f"SELECT {COLUMNS} FROM posts ORDER BY id")
    loaded = databases.query("analytical", f"SELECT {COLUMNS} FROM posts ORDER BY id")
    assert loaded == source
    assert len(loaded) == len(ODD_POSTS)


def test_values_survive_the_staged_merge_path_too(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """A replay over loaded ids takes the staging-table path; values must be the same."""
    databases.add_source_posts(ODD_POSTS[:3])
    assert run_job(instance).success
    databases.add_source_posts(ODD_POSTS[3:])

    replay = run_job(instance, start_after_id=0)

    assert replay.metadata()["load_path"] == "staged merge"
    source = databases.query("source", f"SELECT {COLUMNS} FROM posts ORDER BY id")
    assert databases.query("analytical", f"SELECT {COLUMNS} FROM posts ORDER BY id") == source


def test_one_large_window_loads_exactly_what_tick_sized_windows_load(
    databases: PipelineDatabases,
    scratch_databases: ScratchDatabases,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catching up in one window must give the same tables as loading tick by tick."""
    posts = [
        Post(
            id=i * 3,
            body=(" " if i % 7 == 0 else f"<p>{i} é</p>"),
            owner_user_id=None if i % 11 == 0 else i,
        )
        for i in range(1, 301)
    ]
    databases.add_source_posts(posts)
    tables = "SELECT id, title, body, owner_user_id, creation_date FROM posts ORDER BY id"
    rejected = "SELECT id, reason FROM posts_rejected ORDER BY id"

    with dg.DagsterInstance.ephemeral() as large:
        assert run_job(large, batch_size=1_000_000).metadata()["load_path"] == "direct COPY"
    large_posts = databases.query("analytical", tables)
    large_rejected = databases.query("analytical", rejected)

    tick_analytical = scratch_databases.create("so_ticks")
    monkeypatch.setenv("SO_ANALYTICAL_DATABASE_URL", tick_analytical)
    with dg.DagsterInstance.ephemeral() as ticks:
        assert len(run_until_caught_up(ticks, batch_size=17)) == 18  # 300 ids, 17 a window
    ticked = PipelineDatabases(databases.source_url, tick_analytical)

    assert ticked.query("analytical", tables) == large_posts
    assert ticked.query("analytical", rejected) == large_rejected
    assert len(large_posts) + len(large_rejected) == 300


def test_parallel_copy_streams_load_exactly_what_one_stream_loads(
    databases: PipelineDatabases,
    scratch_databases: ScratchDatabases,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large window is split across parallel COPY streams; the tables must not tell. Each
    stream sets its rejected rows aside while it reads (~10 MB of them here: past what a stream
    holds in memory) and the main pair copies them after."""
    kept = generate_source_posts(databases.source_url, 150_000)
    expected_rejected = {
        i: "body_whitespace_only" if i % 10 == 0 else "owner_null"
        for i in range(1, 150_001)
        if i % 10 == 0 or i % 13 == 0
    }
    fingerprint = (
        "SELECT count(*), md5(string_agg(t::text, '' ORDER BY id)) "
        f"FROM (SELECT {COLUMNS} FROM posts) t"
    )
    rejected = "SELECT md5(string_agg(id || reason, ',' ORDER BY id)) FROM posts_rejected"

    with dg.DagsterInstance.ephemeral() as instance:
        parallel = run_job(instance, batch_size=1_000_000, copy_streams=3)
    assert parallel.metadata()["copy_streams"] == "3"
    assert databases.loaded_ids() == kept
    assert databases.rejected() == expected_rejected
    assert parallel.metadata()["rows_rejected"] == len(expected_rejected)
    parallel_tables = databases.query("analytical", fingerprint) + databases.query(
        "analytical", rejected
    )

    one_stream = scratch_databases.create("so_one_stream")
    monkeypatch.setenv("SO_ANALYTICAL_DATABASE_URL", one_stream)
    with dg.DagsterInstance.ephemeral() as instance:
        single = run_job(instance, batch_size=1_000_000, copy_streams=1)
    assert single.metadata()["copy_streams"] == "1"
    single_db = PipelineDatabases(databases.source_url, one_stream)

    assert parallel_tables == single_db.query("analytical", fingerprint) + single_db.query(
        "analytical", rejected
    )
    assert parallel_tables[0][0] == len(kept)


def test_other_source_column_types_are_converted_to_the_analytical_ones(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """integer ids, varchar text and timestamptz dates (taken as UTC) load like the rest."""
    with psycopg.connect(databases.source_url, autocommit=True) as connection:
        connection.execute(
            "CREATE TABLE posts (id integer PRIMARY KEY, title varchar(200), body varchar, "
            "owner_user_id integer, creation_date timestamptz, score integer)"
        )
        connection.execute(
            "INSERT INTO posts VALUES (1, 'T', 'b', 5, '2021-06-01 12:00:00.123456+02', 3), "
            "(2, NULL, '  ', 6, '2021-06-01 00:00:00+00', 1)"
        )

    assert run_job(instance).success

    assert databases.query("analytical", f"SELECT {COLUMNS} FROM posts") == [
        (1, "T", "b", 5, datetime(2021, 6, 1, 10, 0, 0, 123456))
    ]
    assert databases.rejected() == {2: "body_whitespace_only"}
