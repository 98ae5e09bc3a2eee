"""Hostile sources and operator mistakes: each case once lost data silently, stalled or leaked.

A replay past the source's end, a row count that drifted, a source without unique ids, source
encodings other than UTF8, a source whose default time zone is not UTC, an analytical table
without a primary key.
"""

import uuid
from collections.abc import Callable
from datetime import datetime

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from so_pipeline.tooling.embedded import LocalServer
from so_pipeline_tests.helpers import PipelineDatabases, Post, ScratchDatabases, run_job

pytestmark = pytest.mark.integration


def _execute(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        for statement in statements:
            connection.execute(statement)  # type: ignore[arg-type]


def _retries(outcome: object) -> list[dg.DagsterEvent]:
    events = outcome.result.all_events  # type: ignore[attr-defined]
    return [e for e in events if e.event_type_value == "STEP_UP_FOR_RETRY"]


def test_a_replay_past_the_source_end_leaves_the_cursor_and_says_so(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 11)])
    assert run_job(instance).metadata()["last_processed_id"] == 10

    replay = run_job(instance, start_after_id=5000)
    databases.add_source_posts([Post(id=i) for i in range(11, 21)])
    after = run_job(instance)

    assert replay.success
    assert replay.metadata()["last_processed_id"] == 10
    note = replay.metadata("source_posts_batch")["replay_note"]
    assert "start_after_id 5000" in note and "(10)" in note
    assert after.metadata()["rows_loaded"] == 10
    assert databases.loaded_ids() == list(range(1, 21))


def test_a_replay_beyond_the_cursor_but_inside_the_source_moves_it_only_to_ids_read(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=i) for i in (1, 2, 3, 50, 60)])
    run_job(instance, batch_size=2)

    replay = run_job(instance, start_after_id=40, batch_size=1)

    assert replay.metadata()["last_processed_id"] == 50
    assert databases.loaded_ids() == [1, 2, 50]


def test_the_row_count_follows_the_table_through_hand_deletions_and_lost_history(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    def table_rows() -> int:
        return databases.query("analytical", "SELECT count(*) FROM posts")[0][0]

    databases.add_source_posts([Post(id=i) for i in range(1, 31)])
    counts = []
    counts.append((run_job(instance, batch_size=20), table_rows()))
    _execute(databases.analytical_url, "DELETE FROM posts WHERE id IN (3, 4, 5)")
    counts.append((run_job(instance, batch_size=20, lookback_ids=0), table_rows()))
    with dg.DagsterInstance.ephemeral() as lost_history:  # e.g. killed before it was recorded
        databases.add_source_posts([Post(id=i) for i in range(31, 36)])
        counts.append((run_job(lost_history, lookback_ids=0), table_rows()))
    _execute(databases.analytical_url, "TRUNCATE posts")
    counts.append((run_job(instance, start_after_id=0, batch_size=7), table_rows()))

    assert [rows for _, rows in counts] == [20, 27, 32, 7]
    assert [run.metadata()["dagster/row_count"] for run, _ in counts] == [20, 27, 32, 7]


@pytest.mark.parametrize(
    ("rows", "named"),
    [
        ("(1, 'a', 1), (1, 'b', 1), (2, 'c', 1), (2, 'd', 1), (3, 'e', 1)", "duplicate ids 1, 2"),
        ("(1, 'a', 1), (NULL, 'b', 1), (3, 'c', 1)", "1 row(s) with a NULL id"),
    ],
)
def test_a_source_without_unique_ids_stops_once_before_writing(
    databases: PipelineDatabases, instance: dg.DagsterInstance, rows: str, named: str
) -> None:
    _execute(
        databases.source_url,
        "CREATE TABLE posts (id bigint, title text, body text, owner_user_id bigint, "
        "creation_date timestamp DEFAULT now())",
        f"INSERT INTO posts (id, body, owner_user_id) VALUES {rows}",
    )

    outcome = run_job(instance)

    message = outcome.failure_message()
    assert not outcome.success
    assert not _retries(outcome)
    assert "source_db: table posts" in message and named in message
    assert "ADD PRIMARY KEY (id)" in message
    assert databases.query("analytical", "SELECT to_regclass('posts')") == [(None,)]


def test_an_analytical_posts_table_without_a_primary_key_is_refused_before_writing(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=1)])
    _execute(
        databases.analytical_url,
        "CREATE TABLE posts (id bigint, title text, body text, owner_user_id bigint, "
        "creation_date timestamp)",
    )

    outcome = run_job(instance)

    assert not outcome.success
    assert not _retries(outcome)
    assert "existing table posts is incompatible: id is not its primary key" in (
        outcome.failure_message()
    )
    assert databases.query("analytical", "SELECT count(*) FROM posts") == [(0,)]


@pytest.mark.parametrize(
    ("ddl", "named"),
    [
        pytest.param(
            "CREATE TABLE posts (id bigint PRIMARY KEY DEFERRABLE, title text, body text, "
            "owner_user_id bigint, creation_date timestamp)",
            "non-deferrable",
            id="deferrable primary key",
        ),
        pytest.param(
            "CREATE TABLE posts (id bigint NOT NULL, title text, body text, "
            "owner_user_id bigint, creation_date timestamp); "
            "CREATE UNIQUE INDEX posts_id ON posts (id); "
            "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'posts_id'::regclass",
            "valid",
            id="invalid unique index",
        ),
    ],
)
def test_an_analytical_key_that_cannot_serve_on_conflict_is_refused_at_once(
    databases: PipelineDatabases, instance: dg.DagsterInstance, ddl: str, named: str
) -> None:
    """A DEFERRABLE key (ON CONFLICT cannot use it) or an INVALID unique index (left by a failed
    CREATE INDEX CONCURRENTLY) is no proof of one row per id: refused, never retried."""
    databases.add_source_posts([Post(id=1)])
    _execute(databases.analytical_url, ddl)

    outcome = run_job(instance)

    assert not outcome.success
    assert not _retries(outcome)
    message = outcome.failure_message()
    assert "existing table posts is incompatible: id is not its primary key" in message
    assert named in message
    assert databases.query("analytical", "SELECT count(*) FROM posts") == [(0,)]


def test_an_analytical_database_that_cannot_hold_every_character_is_refused_at_once(
    databases: PipelineDatabases,
    instance: dg.DagsterInstance,
    database_in: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    databases.add_source_posts([Post(id=1, body="<p>λ ☃</p>")])
    monkeypatch.setenv("SO_ANALYTICAL_DATABASE_URL", database_in("LATIN1"))

    outcome = run_job(instance)

    assert not outcome.success
    assert not _retries(outcome)
    assert "analytical_db: the database's encoding is LATIN1" in outcome.failure_message()
    assert "ENCODING 'UTF8'" in outcome.failure_message()


@pytest.fixture
def database_in(
    postgres_server: LocalServer, scratch_databases: ScratchDatabases
) -> Callable[[str], str]:
    """Creates a database in the given encoding (C locale); returns its URL."""

    def create(encoding: str) -> str:
        name = f"so_source_{encoding.lower()}_{uuid.uuid4().hex[:8]}"
        _execute(
            postgres_server.url("postgres"),
            sql.SQL("CREATE DATABASE {} ENCODING {} LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
            .format(sql.Identifier(name), sql.Literal(encoding))
            .as_string(),
        )
        scratch_databases.created.append(name)
        return postgres_server.url(name)

    return create


SOURCE_DDL = (
    "CREATE TABLE posts (id bigint PRIMARY KEY, title text, body text, owner_user_id bigint, "
    "creation_date timestamptz)"
)


@pytest.mark.parametrize(
    ("encoding", "bodies", "kept", "rejected"),
    [
        # In WIN1252, byte 0x85 is the ellipsis: text, not the NEL whitespace U+0085.
        ("WIN1252", {1: "\u2026", 2: "\u00a0 \t", 3: "ok"}, [1, 3], {2: "body_whitespace_only"}),
        (
            "LATIN1",
            {1: "\u0085", 2: "\u00a0", 3: "\u00e9"},
            [3],
            {1: "body_whitespace_only", 2: "body_whitespace_only"},
        ),
        (
            "UTF8",
            {1: "\u2026", 2: "\u3000\u2028", 3: "\u200b"},
            [1, 3],
            {2: "body_whitespace_only"},
        ),
    ],
)
def test_the_whitespace_rule_is_the_same_on_characters_in_every_source_encoding(
    databases: PipelineDatabases,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    database_in: Callable[[str], str],
    encoding: str,
    bodies: dict[int, str],
    kept: list[int],
    rejected: dict[int, str],
) -> None:
    source = database_in(encoding)
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", source)
    with psycopg.connect(source, autocommit=True) as connection:
        connection.execute(SOURCE_DDL)
        for post_id, body in bodies.items():
            connection.execute(
                "INSERT INTO posts VALUES (%s, 't', %s, 1, '2020-01-01 00:00:00+00')",
                [post_id, body],
            )

    outcome = run_job(instance)

    assert outcome.success, outcome.failure_message()
    assert databases.loaded_ids() == kept
    assert databases.rejected() == rejected
    for post_id in kept:
        (loaded,) = databases.query("analytical", "SELECT body FROM posts WHERE id = %s", [post_id])
        assert loaded == (bodies[post_id],)
    assert all(not bodies[i].isspace() for i in kept)
    assert all(bodies[i].isspace() for i in rejected)


def test_a_sql_ascii_source_is_refused_naming_the_encoding(
    databases: PipelineDatabases,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    database_in: Callable[[str], str],
) -> None:
    source = database_in("SQL_ASCII")
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", source)
    _execute(source, SOURCE_DDL, "INSERT INTO posts VALUES (1, 't', 'b', 1, now())")

    outcome = run_job(instance)

    assert not outcome.success
    assert not _retries(outcome)
    assert "the database encoding is SQL_ASCII" in outcome.failure_message()
    assert databases.query("analytical", "SELECT to_regclass('posts')") == [(None,)]


def test_a_source_whose_default_time_zone_is_not_utc_loads_utc_times(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    _execute(
        databases.source_url,
        SOURCE_DDL,
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET timezone TO %L', "
        "current_database(), 'America/New_York'); END $$",
        "INSERT INTO posts VALUES (1, 't', 'b', 1, '2020-06-01 12:00:00+00')",
    )

    assert run_job(instance).success
    assert databases.query("analytical", "SELECT creation_date FROM posts") == [
        (datetime(2020, 6, 1, 12, 0),)
    ]


def _server_compresses_with_lz4(url: str) -> bool:
    """Asked of the server itself: a column with lz4 compression is refused by a build without."""
    with psycopg.connect(url) as connection:
        try:
            connection.execute("CREATE TEMP TABLE lz4_probe (body text COMPRESSION lz4)")
        except psycopg.errors.FeatureNotSupported:
            return False
    return True


def test_new_tables_compress_bodies_with_lz4_where_the_server_has_it(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """lz4 where the server is built with it (Debian's packages, RDS); pglz otherwise (the
    embedded wheel's build); run the suite with SO_TEST_DATABASE_URL for the other branch."""
    databases.add_source_posts([Post(id=1), Post(id=2, body="")])

    outcome = run_job(instance)

    lz4 = _server_compresses_with_lz4(databases.analytical_url)
    assert outcome.metadata()["body_compression"] == ("lz4" if lz4 else "pglz")
    column_setting = "l" if lz4 else ""  # "": the server's default_toast_compression
    assert databases.query(
        "analytical",
        "SELECT attrelid::regclass::text, attcompression FROM pg_attribute "
        "WHERE attname = 'body' AND attrelid IN ('posts'::regclass, 'posts_rejected'::regclass) "
        "ORDER BY 1",
    ) == [("posts", column_setting), ("posts_rejected", column_setting)]


def test_an_existing_table_keeps_its_compression(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    """SET COMPRESSION on a table in use would wait for an exclusive lock: left to the operator."""
    _execute(
        databases.analytical_url,
        "CREATE TABLE posts (id bigint PRIMARY KEY, title text, body text, "
        "owner_user_id bigint, creation_date timestamp)",
    )
    databases.add_source_posts([Post(id=1)])

    outcome = run_job(instance)

    assert outcome.metadata()["body_compression"] == "pglz"
    assert databases.query(
        "analytical",
        "SELECT attcompression FROM pg_attribute WHERE attrelid = 'posts'::regclass "
        "AND attname = 'body'",
    ) == [("",)]
