"""Shared fixtures: a real PostgreSQL server, fresh databases per test, Dagster instances.

The server is the embedded one from PyPI unless SO_TEST_DATABASE_URL names an external
server (its role must be allowed to create databases). It is a session fixture, so it starts
only when a test asks for it: the unit tests (`-m "not integration"`) never start it. Under
`pytest -n 4` each worker is a session of its own, with its own server, temporary folders and
uniquely named databases, so the workers share nothing but an external server. The helpers
these fixtures build on are in helpers.py.
"""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from psycopg import sql

from so_pipeline.tooling.embedded import LocalServer
from so_pipeline_tests.helpers import (
    BIN,
    REPO_ROOT,
    DagsterStorageTemplate,
    ExternalServer,
    PipelineDatabases,
    ScratchDatabases,
    background,
    free_port,
    prepare_dagster_home,
    wait_for_webserver,
)

# The embedded server lives for one session and is deleted after it: durability buys nothing,
# and without it CREATE DATABASE (two or three per test) takes 0.08 s instead of 0.4 s.
# (An external server, SO_TEST_DATABASE_URL, is used as it is configured.)
TEST_SERVER_SETTINGS = {
    "fsync": sql.Literal("off"),
    "synchronous_commit": sql.Literal("off"),
    "full_page_writes": sql.Literal("off"),
}


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[LocalServer]:
    external = os.environ.get("SO_TEST_DATABASE_URL")
    if external:
        yield ExternalServer(external)
        return
    from so_pipeline.tooling.embedded import EmbeddedPostgres

    # Not under pytest's basetemp: a second pytest session on the machine prunes old basetemps,
    # and would delete this server's data directory under it while it runs.
    data_dir = Path(tempfile.mkdtemp(prefix="so_pipeline_test_pg_")) / "data"
    embedded = EmbeddedPostgres(data_dir, delete_on_exit=True)
    with psycopg.connect(embedded.url("postgres"), autocommit=True) as connection:
        for name, value in TEST_SERVER_SETTINGS.items():
            connection.execute(sql.SQL("ALTER SYSTEM SET {} = {}").format(sql.SQL(name), value))
        connection.execute("SELECT pg_reload_conf()")
    yield embedded
    embedded.stop()
    shutil.rmtree(data_dir.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def dagster_storage_template(postgres_server: LocalServer) -> Iterator[DagsterStorageTemplate]:
    template = DagsterStorageTemplate(postgres_server)
    yield template
    template.drop()


@pytest.fixture
def scratch_databases(
    postgres_server: LocalServer, dagster_storage_template: DagsterStorageTemplate
) -> Iterator[ScratchDatabases]:
    """Creates uniquely named databases for one test, and drops them after it."""
    scratch = ScratchDatabases(postgres_server, dagster_storage_template)
    yield scratch
    scratch.drop_all()


@pytest.fixture
def databases(
    scratch_databases: ScratchDatabases, monkeypatch: pytest.MonkeyPatch
) -> PipelineDatabases:
    """A fresh, empty source and analytical database, named in the pipeline's env vars."""
    source = scratch_databases.create("so_source")
    analytical = scratch_databases.create("so_analytical")
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", source)
    monkeypatch.setenv("SO_ANALYTICAL_DATABASE_URL", analytical)
    return PipelineDatabases(source, analytical)


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """One Dagster instance per test: it holds the cursor across the test's runs."""
    with dg.DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


@pytest.fixture
def dagster_home(
    tmp_path: Path, scratch_databases: ScratchDatabases, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A DAGSTER_HOME with the repository's dagster.yaml, its storage in a fresh database."""
    return prepare_dagster_home(
        tmp_path / "dagster_home", REPO_ROOT / "dagster.yaml", scratch_databases, monkeypatch
    )


@pytest.fixture
def webserver(dagster_home: Path, tmp_path: Path) -> Iterator[str]:
    """dagster-webserver on a free loopback port, against the test's DAGSTER_HOME."""
    port = free_port()
    command = [str(BIN / "dagster-webserver"), "-m", "so_pipeline", "-h", "127.0.0.1"]
    with background([*command, "-p", str(port)], tmp_path / "webserver.log") as process:
        url = f"http://127.0.0.1:{port}"
        wait_for_webserver(url, process)
        yield url
