"""The pipeline through PgBouncer in transaction pooling mode (Debian's 1.18), on both sides.

A PostgreSQL 15 server and a PgBouncer in front of it, both started by the test: the pipeline
reaches the source and the analytical database only through the pooler, which shares a few
server connections between its clients transaction by transaction. Both databases have
settings that would change results if any depended on the session (TimeZone
America/St_Johns, UTC-3:30 or -2:30; DateStyle `SQL, DMY`), and the source's creation_date is
`timestamp with time zone`. Windows, a catch-up window in two parallel COPY streams (an
exported snapshot imported through the pooler), edits, a deletion and the reconciliation job
all go through it, and the analytical tables then equal the source value for value.
"""

from collections.abc import Iterator

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from so_pipeline.definitions import defs
from so_pipeline.resources import PostgresResource
from so_pipeline_tests.helpers import PipelineDatabases, free_port, run_job, run_until_caught_up
from so_pipeline_tests.pooler import LoopbackPostgres, PgBouncer, require_pgbouncer

pytestmark = pytest.mark.integration

RECONCILIATION_OP = "filtered_posts_reconciled_with_source"
# A run holds at most 1 + copy_streams server connections on each side at once: the main
# transaction (which exports the snapshot and holds the write lock) and one per stream.
POOL_SIZE = 3
# Two streams need 50,000 new rows each (window_loader.MIN_ROWS_PER_STREAM).
CATCH_UP_ROWS = 100_000
SESSION_TRAPS = {"TimeZone": "America/St_Johns", "DateStyle": "SQL, DMY"}
COLUMNS = "id, title, body, owner_user_id, creation_date"


@pytest.fixture(scope="module")
def pooled() -> Iterator[tuple[LoopbackPostgres, PgBouncer]]:
    require_pgbouncer()
    server = LoopbackPostgres(free_port())
    try:
        server.create_database("tiny")
        # tiny_pool: one server connection for every client, which take turns on it.
        bouncer = PgBouncer(
            server, free_port(), POOL_SIZE, {"tiny_pool": "dbname=tiny pool_size=1"}
        )
        try:
            yield server, bouncer
        finally:
            bouncer.stop()
    finally:
        server.stop()


def test_the_pooler_refuses_options_and_shares_a_backend_yet_the_resource_works_through_it(
    pooled: tuple[LoopbackPostgres, PgBouncer],
) -> None:
    _, bouncer = pooled
    with pytest.raises(psycopg.OperationalError, match="unsupported startup parameter: options"):
        psycopg.connect(bouncer.url("tiny"), options="-c TimeZone=UTC")

    # psycopg prepares a statement on the server once it has run 5 times: two clients on one
    # backend then collide (the pooler really shares it) ...
    statement = "SELECT count(*) FROM pg_class WHERE relname = %s"
    with (
        psycopg.connect(bouncer.url("tiny_pool"), autocommit=True) as one,
        psycopg.connect(bouncer.url("tiny_pool"), autocommit=True) as other,
        pytest.raises(psycopg.errors.DuplicatePreparedStatement),
    ):
        for _ in range(8):
            one.execute(statement, ["pg_class"])
            other.execute(statement, ["pg_class"])

    # ... the pipeline's connections prepare nothing, and connect without `options`.
    resource = PostgresResource(resource_name="source_db", url=bouncer.url("tiny_pool"))
    with resource.connect() as one, resource.connect() as other:
        for _ in range(8):
            assert one.execute(statement, ["pg_class"]).fetchone() == (1,)
            assert other.execute(statement, ["pg_class"]).fetchone() == (1,)


def _fill_source(url: str, first_id: int, last_id: int) -> None:
    """Posts first_id..last_id, every 10th body blank and every 13th owner NULL (rejected), a
    creation_date with microseconds, at 12:00 UTC on 31 January plus a second per id."""
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(
            "INSERT INTO posts (id, post_type_id, title, body, owner_user_id, creation_date) "
            "SELECT g, 1, 't' || g, CASE WHEN g %% 10 = 0 THEN ' ' ELSE '<p>post ' || g || "
            "'</p>' END, CASE WHEN g %% 13 = 0 THEN NULL ELSE g END, "
            "timestamptz '2021-01-31 12:00:00.000001+00' + g * interval '1 second' "
            "FROM generate_series(%s::bigint, %s::bigint) g",
            [first_id, last_id],
        )


def _assert_copy_equals_source(server: LoopbackPostgres, databases: PipelineDatabases) -> None:
    """Live posts and posts_rejected = the source rows, creation_date as its UTC time."""
    with psycopg.connect(databases.source_url) as connection:
        source = connection.execute(
            "SELECT id, title, body, owner_user_id, creation_date AT TIME ZONE 'UTC' "
            "FROM posts ORDER BY id"
        ).fetchall()
    live = databases.query(
        "analytical", f"SELECT {COLUMNS} FROM posts WHERE deleted_at IS NULL ORDER BY id"
    )
    rejected = databases.query(
        "analytical", f"SELECT {COLUMNS} FROM posts_rejected WHERE deleted_at IS NULL"
    )
    assert sorted(live + rejected) == source
    assert not databases.query("analytical", "SELECT id FROM posts JOIN posts_rejected USING (id)")


def test_runs_and_the_reconciliation_through_pgbouncer_copy_the_source_exactly(
    pooled: tuple[LoopbackPostgres, PgBouncer],
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from so_pipeline.tooling.dump_loader import create_posts_table  # lxml: the local extra

    server, bouncer = pooled
    names = {"source": "so_source_pooled", "analytical": "so_analytical_pooled"}
    for name in names.values():
        server.drop_database(name)
        server.create_database(name)
        for setting, value in SESSION_TRAPS.items():
            server.execute(
                "postgres",
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(name), sql.Identifier(setting), sql.Literal(value)
                ),
            )
    direct = PipelineDatabases(server.url(names["source"]), server.url(names["analytical"]))
    with psycopg.connect(direct.source_url, autocommit=True) as connection:
        create_posts_table(connection)
        connection.execute(
            "ALTER TABLE posts ALTER creation_date TYPE timestamp with time zone "
            "USING creation_date AT TIME ZONE 'UTC'"
        )
    _fill_source(direct.source_url, 1, 300)
    # The pipeline sees both databases only through the pooler.
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", bouncer.url(names["source"]))
    monkeypatch.setenv("SO_ANALYTICAL_DATABASE_URL", bouncer.url(names["analytical"]))

    ticks = run_until_caught_up(instance, batch_size=100)
    assert [run.metadata()["last_processed_id"] for run in ticks] == [100, 200, 300]
    replay = run_job(instance, start_after_id=150, batch_size=100)  # staged and merged
    assert replay.success and replay.metadata()["rows_loaded"] == 0
    _assert_copy_equals_source(server, direct)

    _fill_source(direct.source_url, 301, 300 + CATCH_UP_ROWS)
    catch_up = run_job(instance, batch_size=2 * CATCH_UP_ROWS, copy_streams=2)
    assert catch_up.success, catch_up.failure_message()
    metadata = catch_up.metadata()
    assert str(metadata["copy_streams"]) == "2"
    assert metadata["load_path"] == "direct COPY"
    assert metadata["last_processed_id"] == 300 + CATCH_UP_ROWS
    _assert_copy_equals_source(server, direct)

    with psycopg.connect(direct.source_url, autocommit=True) as connection:
        connection.execute("UPDATE posts SET body = '<p>edited</p>' WHERE id = 5")
        connection.execute("UPDATE posts SET body = '' WHERE id IN (7, 60007)")  # now rejected
        connection.execute("DELETE FROM posts WHERE id IN (11, 70011)")
    reconciliation = defs.resolve_job_def("stackoverflow_posts_reconciliation_job")
    result = reconciliation.execute_in_process(
        instance=instance,
        run_config={"ops": {RECONCILIATION_OP: {"config": {"content_days": 1}}}},
        raise_on_error=False,
    )
    assert result.success
    _assert_copy_equals_source(server, direct)
    deleted = direct.query(
        "analytical",
        "SELECT id FROM posts WHERE deleted_at IS NOT NULL UNION "
        "SELECT id FROM posts_rejected WHERE deleted_at IS NOT NULL ORDER BY id",
    )
    assert deleted == [(11,), (70011,)]
