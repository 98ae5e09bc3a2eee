"""Shared fixtures: a real PostgreSQL server, fresh databases per test, and a job runner.

The server is the embedded one from PyPI unless SO_TEST_DATABASE_URL names an external
server (its role must be allowed to create databases).
"""

import os
import shutil
import sys
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from so_pipeline.definitions import defs
from so_pipeline.tooling.dump_loader import create_posts_table


@dataclass
class PostgresServer:
    """Creates and drops databases on one server; hands out their URLs."""

    admin_url: sa.URL
    created: list[str] = field(default_factory=list)

    def url(self, database: str, driver: str = "postgresql") -> str:
        return self.admin_url.set(drivername=driver, database=database).render_as_string(
            hide_password=False
        )

    def create_database(self, prefix: str) -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        return name

    def drop_all(self) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            for name in self.created:
                connection.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        self.created.clear()


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    external = os.environ.get("SO_TEST_DATABASE_URL")
    if external:
        server = PostgresServer(sa.make_url(external))
        yield server
        server.drop_all()
        return
    from so_pipeline.tooling.embedded import EmbeddedPostgres

    embedded = EmbeddedPostgres(tmp_path_factory.mktemp("pg") / "data", delete_on_exit=True)
    server = PostgresServer(sa.make_url(embedded.url("postgres")))
    yield server
    embedded.stop()


@dataclass
class Post:
    id: int
    body: str | None = "<p>a body</p>"
    title: str | None = "A title"
    owner_user_id: int | None = 7
    creation_date: datetime = datetime(2020, 1, 2, 3, 4, 5, 678901)


@dataclass
class PipelineDatabases:
    source_url: str
    analytical_url: str

    def add_source_posts(self, posts: Sequence[Post]) -> None:
        """Insert posts into the source `posts` table (the dump's full schema)."""
        with psycopg.connect(self.source_url, autocommit=True) as connection:
            create_posts_table(connection)
            with connection.cursor().copy(
                "COPY posts (id, title, body, owner_user_id, creation_date, post_type_id) "
                "FROM STDIN"
            ) as copy:
                for post in posts:
                    copy.write_row(
                        [post.id, post.title, post.body, post.owner_user_id, post.creation_date, 1]
                    )

    def query(self, which: str, statement: str, params: Sequence[object] = ()) -> list[tuple]:
        url = self.source_url if which == "source" else self.analytical_url
        with psycopg.connect(url) as connection:
            return connection.execute(statement, params).fetchall()  # type: ignore[arg-type]

    def loaded_ids(self) -> list[int]:
        return [row[0] for row in self.query("analytical", "SELECT id FROM posts ORDER BY id")]

    def rejected(self) -> dict[int, str]:
        return dict(self.query("analytical", "SELECT id, reason FROM posts_rejected"))


def generate_source_posts(source_url: str, rows: int) -> list[int]:
    """Fill the source with `rows` ~1 KB posts; return the ids the pipeline must keep.

    Every 10th body is blank and every 13th owner NULL, so those are rejected.
    """
    with psycopg.connect(source_url, autocommit=True) as connection:
        create_posts_table(connection)
        connection.execute(
            "INSERT INTO posts (id, title, body, owner_user_id, creation_date) "
            "SELECT g, 't' || g, CASE WHEN g %% 10 = 0 THEN ' ' ELSE repeat('<p>x</p>', 120) "
            "|| g END, CASE WHEN g %% 13 = 0 THEN NULL ELSE g END, "
            "timestamp '2020-01-01' + g * interval '1 second' FROM generate_series(1, %s) g",
            [rows],
        )
    return [i for i in range(1, rows + 1) if i % 10 and i % 13]


@pytest.fixture
def databases(
    postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PipelineDatabases]:
    """A fresh, empty source and analytical database, named in the pipeline's env vars."""
    source = postgres_server.url(postgres_server.create_database("so_source"))
    analytical = postgres_server.url(postgres_server.create_database("so_analytical"))
    monkeypatch.setenv("SO_SOURCE_DATABASE_URL", source)
    monkeypatch.setenv("SO_ANALYTICAL_DATABASE_URL", analytical)
    yield PipelineDatabases(source, analytical)
    postgres_server.drop_all()


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    """One Dagster instance per test: it holds the cursor across the test's runs."""
    with dg.DagsterInstance.ephemeral() as ephemeral:
        yield ephemeral


@dataclass(frozen=True)
class RunOutcome:
    result: dg.ExecuteInProcessResult

    @property
    def success(self) -> bool:
        return self.result.success

    def metadata(self, asset: str = "filtered_posts") -> dict[str, object]:
        (materialization,) = self.result.asset_materializations_for_node(asset)
        return {key: value.value for key, value in materialization.metadata.items()}

    def failure_message(self) -> str:
        """Every error text of the failed run, as a user would read it in the UI."""
        texts = []
        for event in self.result.all_events:
            if event.is_step_failure:
                error = event.step_failure_data.error
                texts.append(error.to_string() if error else "")
        return "\n".join(texts)


def run_job(
    instance: dg.DagsterInstance,
    batch_size: int | None = None,
    start_after_id: int | None = None,
    require_owner: bool | None = None,
    lookback_ids: int | None = None,
    copy_streams: int | None = None,
) -> RunOutcome:
    """Run stackoverflow_posts_job in process, as the schedule would, with optional config."""
    batch_config: dict[str, object] = {}
    if batch_size is not None:
        batch_config["batch_size"] = batch_size
    if start_after_id is not None:
        batch_config["start_after_id"] = start_after_id
    if lookback_ids is not None:
        batch_config["lookback_ids"] = lookback_ids
    filter_config: dict[str, object] = {}
    if require_owner is not None:
        filter_config["require_owner"] = require_owner
    if copy_streams is not None:
        filter_config["copy_streams"] = copy_streams
    ops = {
        "source_posts_batch": {"config": batch_config},
        "filtered_posts": {"config": filter_config},
    }
    job = defs.resolve_job_def("stackoverflow_posts_job")
    result = job.execute_in_process(
        run_config={"ops": ops}, instance=instance, raise_on_error=False
    )
    return RunOutcome(result)


REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture
def dagster_home(
    tmp_path: Path, postgres_server: PostgresServer, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A DAGSTER_HOME with the repository's dagster.yaml, its storage in a fresh database."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    storage = postgres_server.create_database("dagster")
    monkeypatch.setenv("DAGSTER_PG_URL", postgres_server.url(storage, "postgresql+psycopg2"))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home
