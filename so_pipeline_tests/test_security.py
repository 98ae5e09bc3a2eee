"""Secrets stay out of every record, the documented least-privilege roles are enough, bad run
config is refused before anything is written, and TLS settings in a URL reach libpq."""

import uuid
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from so_pipeline.tooling.runs import execute_job
from so_pipeline_tests.helpers import (
    PipelineDatabases,
    Post,
    dagster_job_execute,
    run_job,
    with_password,
)

pytestmark = pytest.mark.integration

MARKER = "s3cret-MARKER-" + uuid.uuid4().hex[:8]


def test_passwords_never_reach_logs_metadata_or_errors(
    databases: PipelineDatabases, dagster_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded server trusts local logins, so any password works: use a unique marker."""
    databases.add_source_posts([Post(id=1), Post(id=2, body="")])
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", with_password(databases.source_url, MARKER))
    monkeypatch.setenv(
        "SO_ANALYTICAL_DATABASE_URL", with_password(databases.analytical_url, MARKER)
    )
    outputs = [dagster_job_execute()]  # succeeds
    assert outputs[0].returncode == 0, outputs[0].stderr[-2000:]
    for variable, url in [
        ("SO_SOURCE_DATABASE_URL", f"postgresql://so:{MARKER}@127.0.0.1:1/so"),  # refused
        ("SO_ANALYTICAL_DATABASE_URL", f"mysql://so:{MARKER}@127.0.0.1/so"),  # bad scheme
        ("SO_SOURCE_DATABASE_URL", f"postgresql://so:{MARKER}@127.0.0.1:notaport/so"),
    ]:
        monkeypatch.setenv(variable, url)
        outputs.append(dagster_job_execute())
        assert outputs[-1].returncode != 0

    assert not any(MARKER in out.stdout + out.stderr for out in outputs)
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        assert len(runs) == 4
        for run in runs:
            assert MARKER not in repr(run.run_config)
            for event in instance.all_logs(run.run_id):
                assert MARKER not in repr(event)
    for path in dagster_home.rglob("*"):  # compute logs, IO manager files, settings
        if path.is_file():
            assert MARKER.encode() not in path.read_bytes(), path


def test_the_documented_grants_are_enough_and_the_reader_cannot_write(
    databases: PipelineDatabases, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    databases.add_source_posts([Post(id=1), Post(id=2, body=" ")])
    suffix = uuid.uuid4().hex[:8]
    reader, loader = f"so_reader_{suffix}", f"so_loader_{suffix}"
    source_db = sa.make_url(databases.source_url).database
    analytical_db = sa.make_url(databases.analytical_url).database
    assert source_db is not None and analytical_db is not None
    try:
        with psycopg.connect(databases.source_url, autocommit=True) as admin:
            for role in (reader, loader):
                admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    except psycopg.errors.InsufficientPrivilege:
        pytest.skip("this server's test role cannot create roles")
    try:
        # The README's grants, word for word apart from the names.
        with psycopg.connect(databases.source_url, autocommit=True) as admin:
            for statement in (
                "GRANT CONNECT ON DATABASE {db} TO {role}",
                "GRANT USAGE ON SCHEMA public TO {role}",
                "GRANT SELECT ON public.posts TO {role}",
            ):
                admin.execute(
                    sql.SQL(statement).format(
                        db=sql.Identifier(source_db), role=sql.Identifier(reader)
                    )
                )
        with psycopg.connect(databases.analytical_url, autocommit=True) as admin:
            for statement in (
                "GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {role}",
                "GRANT USAGE, CREATE ON SCHEMA public TO {role}",
            ):
                admin.execute(
                    sql.SQL(statement).format(
                        db=sql.Identifier(analytical_db), role=sql.Identifier(loader)
                    )
                )
        reader_url = sa.make_url(databases.source_url).set(username=reader)
        loader_url = sa.make_url(databases.analytical_url).set(username=loader)
        monkeypatch.setenv("SO_SOURCE_DATABASE_URL", reader_url.render_as_string(False))
        monkeypatch.setenv("SO_ANALYTICAL_DATABASE_URL", loader_url.render_as_string(False))

        assert run_job(instance).success
        assert run_job(instance, start_after_id=0).success  # the staged path needs TEMPORARY

        assert databases.loaded_ids() == [1]
        with (
            psycopg.connect(reader_url.render_as_string(False)) as as_reader,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            as_reader.execute("DELETE FROM posts")
    finally:
        with psycopg.connect(databases.analytical_url, autocommit=True) as admin:
            admin.execute("DROP OWNED BY " + ", ".join((reader, loader)))
        with psycopg.connect(databases.source_url, autocommit=True) as admin:
            admin.execute("DROP OWNED BY " + ", ".join((reader, loader)))
            for role in (reader, loader):
                admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


@pytest.mark.parametrize(
    ("config", "expected"),
    [({"batch_size": "many"}, "batch_size"), ({"batch_sise": 10}, "batch_sise")],
)
def test_a_malformed_run_config_is_named_before_anything_runs(
    databases: PipelineDatabases, instance: dg.DagsterInstance, config: dict, expected: str
) -> None:
    with pytest.raises(dg.DagsterInvalidConfigError) as failure:
        execute_job(instance, {"ops": {"source_posts_batch": {"config": config}}})
    assert expected in str(failure.value)
    assert instance.get_runs() == []


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("batch_size", 0, "greater than 0"),
        ("lookback_ids", -1, "greater than or equal to 0"),
        ("copy_streams", 0, "greater than or equal to 1"),
        ("copy_streams", 9, "less than or equal to 8"),
    ],
)
def test_an_out_of_range_number_fails_its_step_before_it_writes(
    databases: PipelineDatabases,
    instance: dg.DagsterInstance,
    option: str,
    value: int,
    expected: str,
) -> None:
    """Dagster checks the bounds when the step starts (copy_streams: after the window step ran)."""
    databases.add_source_posts([Post(id=1)])

    outcome = run_job(instance, **{option: value})

    assert not outcome.success
    assert option in outcome.failure_message()
    assert expected in outcome.failure_message()
    assert instance.get_latest_materialization_event(dg.AssetKey("filtered_posts")) is None
    assert databases.query("analytical", "SELECT to_regclass('posts')") == [(None,)]


def test_tls_settings_in_the_url_reach_libpq(databases: PipelineDatabases) -> None:
    """RDS needs sslmode=verify-full and its root certificate: both travel in the URL.

    (libpq ignores them on the embedded server's Unix socket, so the connection still works
    here and the test can read back what libpq was given.)
    """
    from so_pipeline.resources import PostgresResource

    url = sa.make_url(databases.source_url).update_query_dict(
        {"sslmode": "verify-full", "sslrootcert": "/etc/ssl/rds/global-bundle.pem"}
    )
    source = PostgresResource(resource_name="source_db", url=url.render_as_string(False))

    with source.connect() as connection:
        given = connection.info.get_parameters()

    assert given["sslmode"] == "verify-full"
    assert given["sslrootcert"] == "/etc/ssl/rds/global-bundle.pem"


def test_an_unreadable_run_config_file_is_reported(
    databases: PipelineDatabases, dagster_home: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("ops:\n  source_posts_batch: [unclosed\n")

    result = dagster_job_execute("-c", str(broken))

    assert result.returncode != 0
    assert "broken.yaml" in result.stdout + result.stderr
