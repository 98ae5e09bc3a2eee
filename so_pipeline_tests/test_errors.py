"""Failures a user meets first: missing or wrong URLs, unreachable servers, wrong tables."""

import dagster as dg
import psycopg
import pytest

from so_pipeline_tests.helpers import PipelineDatabases, Post, run_job

pytestmark = pytest.mark.integration

PASSWORD_MARKER = "pw-MARKER-5b1f0c"


def _event_log_text(instance: dg.DagsterInstance) -> str:
    run_ids = [run.run_id for run in instance.get_runs()]
    return "\n".join(repr(event) for run_id in run_ids for event in instance.all_logs(run_id))


def test_a_missing_url_names_the_variable_and_the_resource(
    databases: PipelineDatabases, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SO_ANALYTICAL_DATABASE_URL")

    with pytest.raises(dg.DagsterInvalidConfigError) as failure:
        run_job(instance)

    assert "SO_ANALYTICAL_DATABASE_URL" in str(failure.value)
    assert "analytical_db" in str(failure.value)


@pytest.mark.parametrize(
    ("variable", "resource"),
    [("SO_SOURCE_DATABASE_URL", "source_db"), ("SO_ANALYTICAL_DATABASE_URL", "analytical_db")],
)
def test_an_unreachable_server_fails_with_one_clear_line_and_no_password(
    databases: PipelineDatabases,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    resource: str,
) -> None:
    databases.add_source_posts([Post(id=1)])
    # Port 1 on loopback: nothing listens there, so the connection is refused at once.
    monkeypatch.setenv(variable, f"postgresql://so_user:{PASSWORD_MARKER}@127.0.0.1:1/so")

    outcome = run_job(instance)

    assert not outcome.success
    message = outcome.failure_message()
    assert f"{resource}: cannot use PostgreSQL at 127.0.0.1:1/so" in message
    assert PASSWORD_MARKER not in message
    assert PASSWORD_MARKER not in _event_log_text(instance)
    assert instance.get_latest_materialization_event(dg.AssetKey("filtered_posts")) is None


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"mysql://u:{PASSWORD_MARKER}@localhost/so", "source_db: unsupported URL scheme 'mysql'"),
        (f"postgresql://u:{PASSWORD_MARKER}@localhost:port/so", "source_db: the database URL is"),
        ("not a url", "source_db: the database URL is not a valid URL"),
    ],
)
def test_an_unusable_url_is_named_without_its_password(
    databases: PipelineDatabases,
    instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    expected: str,
) -> None:
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", url)

    outcome = run_job(instance)

    assert not outcome.success
    assert expected in outcome.failure_message()
    assert PASSWORD_MARKER not in outcome.failure_message()
    events = {event.event_type_value for event in outcome.result.all_events}
    assert "STEP_UP_FOR_RETRY" not in events


def test_an_incompatible_analytical_table_stops_the_run_before_any_write(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    databases.add_source_posts([Post(id=1)])
    _execute(
        databases.analytical_url,
        "CREATE TABLE posts (id bigint PRIMARY KEY, title text, body integer, "
        "owner_user_id bigint, creation_date timestamp)",
    )

    outcome = run_job(instance)

    assert not outcome.success
    assert "analytical_db: existing table posts is incompatible: column body is integer" in (
        outcome.failure_message()
    )
    assert databases.query("analytical", "SELECT to_regclass('posts_rejected')") == [(None,)]
    assert databases.query("analytical", "SELECT count(*) FROM posts") == [(0,)]


@pytest.mark.parametrize(
    ("ddl", "expected"),
    [
        (
            "CREATE TABLE posts (id bigint, title text, owner_user_id bigint, "
            "creation_date timestamp)",
            "column body is missing",
        ),
        (
            "CREATE TABLE posts (id bigint, title text, body text, owner_user_id bigint, "
            "creation_date text)",
            "column creation_date is text",
        ),
        ("CREATE TABLE other (id bigint)", "table posts not found"),
    ],
)
def test_an_unusable_source_table_is_reported_before_any_write(
    databases: PipelineDatabases, instance: dg.DagsterInstance, ddl: str, expected: str
) -> None:
    _execute(databases.source_url, ddl)

    outcome = run_job(instance)

    assert not outcome.success
    assert "source_db" in outcome.failure_message()
    assert expected in outcome.failure_message()
    assert databases.query("analytical", "SELECT to_regclass('posts')") == [(None,)]


def _execute(url: str, statement: str) -> None:
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute(statement)
