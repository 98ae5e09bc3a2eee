"""Shared test helpers: database servers, source posts, in-process runs and the CLI command.

Fixtures live in conftest.py and build on these; tests import from here, never from conftest.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import dagster as dg
import psycopg
import pytest
import sqlalchemy as sa
from psycopg import sql

from so_pipeline.tooling.cli import stop_process_group
from so_pipeline.tooling.embedded import LocalServer
from so_pipeline.tooling.runs import (
    JOB_NAME,
    execute_job,
    materialization_metadata,
    runs_until_caught_up,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


# --- servers and databases ----------------------------------------------------------------------


class ExternalServer(LocalServer):
    """The server of SO_TEST_DATABASE_URL (its role must be allowed to create databases)."""

    def __init__(self, admin_url: str) -> None:
        self._admin_url = sa.make_url(admin_url)

    def url(self, database: str, driver: str = "postgresql") -> str:
        return self._admin_url.set(drivername=driver, database=database).render_as_string(
            hide_password=False
        )


class DagsterStorageTemplate:
    """A database holding the tables Dagster's PostgreSQL storage makes on its first use, made
    once (on first need) for the whole session: each test's Dagster storage is a copy of it,
    which takes about 0.05 s where Dagster's own schema set-up takes about 1 s."""

    def __init__(self, server: LocalServer) -> None:
        self.server = server
        self._name: str | None = None

    def name(self) -> str:
        if self._name is None:
            name = f"dagster_template_{uuid.uuid4().hex[:10]}"
            self.server.create_database(name)
            with tempfile.TemporaryDirectory() as home, pytest.MonkeyPatch.context() as patch:
                shutil.copyfile(REPO_ROOT / "dagster.yaml", Path(home) / "dagster.yaml")
                patch.setenv("DAGSTER_HOME", home)
                patch.setenv("DAGSTER_PG_URL", self.server.url(name, "postgresql+psycopg2"))
                with dg.DagsterInstance.get() as instance:  # run, event log, schedule tables
                    instance.get_runs(limit=1)
                    instance.all_instigator_state()
                    instance.get_latest_materialization_event(dg.AssetKey("any"))
            with psycopg.connect(self.server.url("postgres"), autocommit=True) as connection:
                # A template may have no connection open while it is copied: none is allowed.
                connection.execute(
                    sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(
                        sql.Identifier(name)
                    )
                )
                connection.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                    [name],
                )
            self._name = name
        return self._name

    def drop(self) -> None:
        if self._name is not None:
            self.server.drop_database(self._name)


@dataclass
class ScratchDatabases:
    """Creates uniquely named databases on `server`; `drop_all` drops every one of them."""

    server: LocalServer
    dagster_storage: DagsterStorageTemplate | None = None
    created: list[str] = field(default_factory=list)

    def create(self, prefix: str, driver: str = "postgresql", template: str | None = None) -> str:
        """A new database named `prefix_<random>`, empty or a copy of `template`; return its
        URL for `driver`."""
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        self.created.append(name)
        if template is None:
            self.server.create_database(name)
        else:
            with psycopg.connect(self.server.url("postgres"), autocommit=True) as connection:
                connection.execute(
                    sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                        sql.Identifier(name), sql.Identifier(template)
                    )
                )
        return self.server.url(name, driver)

    def create_dagster_storage(self) -> str:
        """A database for a Dagster instance's storage (a copy of the session's template if
        there is one); its URL for Dagster (psycopg2)."""
        template = self.dagster_storage.name() if self.dagster_storage else None
        return self.create("dagster", "postgresql+psycopg2", template)

    def drop_all(self) -> None:
        while self.created:
            self.server.drop_database(self.created.pop())


def prepare_dagster_home(
    home: Path, config: Path, scratch: ScratchDatabases, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A DAGSTER_HOME holding `config` as its dagster.yaml, its storage in a fresh database."""
    home.mkdir()
    shutil.copyfile(config, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_PG_URL", scratch.create_dagster_storage())
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


# --- source and analytical data -----------------------------------------------------------------


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
        from so_pipeline.tooling.dump_loader import create_posts_table  # lxml: the local extra

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


def with_password(url: str, password: str) -> str:
    """`url` with another password (the embedded server trusts local logins: any works)."""
    return sa.make_url(url).set(password=password).render_as_string(hide_password=False)


def generate_source_posts(source_url: str, rows: int) -> list[int]:
    """Fill the source with `rows` ~1 KB posts; return the ids the pipeline must keep.

    Every 10th body is blank and every 13th owner NULL, so those are rejected.
    """
    from so_pipeline.tooling.dump_loader import create_posts_table  # lxml: the local extra

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


# --- runs of the job ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunOutcome:
    result: dg.ExecuteInProcessResult

    @property
    def success(self) -> bool:
        return self.result.success

    def metadata(self, asset: str = "filtered_posts") -> dict[str, Any]:
        return materialization_metadata(self.result, asset)

    def failure_message(self) -> str:
        """Every error text of the failed run, as a user would read it in the UI."""
        texts = []
        for event in self.result.all_events:
            if event.is_step_failure:
                error = event.step_failure_data.error
                texts.append(error.to_string() if error else "")
        return "\n".join(texts)


def job_run_config(
    batch_size: int | None = None,
    start_after_id: int | None = None,
    require_owner: bool | None = None,
    lookback_ids: int | None = None,
    copy_streams: int | None = None,
    change_column: str | None = None,
    change_lookback_seconds: int | None = None,
    change_batch_size: int | None = None,
) -> dict[str, Any]:
    """stackoverflow_posts_job's run config with the given options (the others: defaults)."""

    def given(**options: object) -> dict[str, object]:
        return {name: value for name, value in options.items() if value is not None}

    batch = given(batch_size=batch_size, start_after_id=start_after_id, lookback_ids=lookback_ids)
    load = given(
        require_owner=require_owner,
        copy_streams=copy_streams,
        change_column=change_column,
        change_lookback_seconds=change_lookback_seconds,
        change_batch_size=change_batch_size,
    )
    return {"ops": {"source_posts_batch": {"config": batch}, "filtered_posts": {"config": load}}}


def run_job(instance: dg.DagsterInstance, **options: Any) -> RunOutcome:
    """Run stackoverflow_posts_job in process, as the schedule would, with `job_run_config`'s
    options; a failed run is returned, not raised."""
    return RunOutcome(execute_job(instance, job_run_config(**options), raise_on_error=False))


def run_until_caught_up(instance: dg.DagsterInstance, **options: Any) -> list[RunOutcome]:
    """Run the job until a run finds no new id; the runs that found some (a failure raises)."""
    return [
        RunOutcome(result) for result in runs_until_caught_up(instance, job_run_config(**options))
    ]


def reconcile(instance: dg.DagsterInstance, **config: Any) -> dg.AssetCheckEvaluation:
    """Run the reconciliation job in process (its check's run config: `config`); return the
    evaluation of reconciled_with_source."""
    from so_pipeline.definitions import defs

    result = defs.resolve_job_def("stackoverflow_posts_reconciliation_job").execute_in_process(
        instance=instance,
        run_config={"ops": {"filtered_posts_reconciled_with_source": {"config": config}}},
        raise_on_error=False,
    )
    (evaluation,) = [
        e.asset_check_evaluation_data
        for e in result.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.asset_check_evaluation_data.check_name == "reconciled_with_source"
    ]
    return evaluation


def check_values(evaluation: dg.AssetCheckEvaluation) -> dict[str, object]:
    return {key: value.value for key, value in evaluation.metadata.items()}


LOCK_HOLDER = "so_pipeline run 0badc0de"


def run_job_behind_a_held_lock(
    databases: "PipelineDatabases", instance: dg.DagsterInstance, seconds: float = 2
) -> RunOutcome:
    """Run the job while another session, named as a run of the pipeline (LOCK_HOLDER), holds
    the write lock for `seconds`."""
    from so_pipeline.posts_merge import PIPELINE_LOCK_ID

    holding = threading.Event()

    def hold_the_lock() -> None:
        with psycopg.connect(databases.analytical_url, application_name=LOCK_HOLDER) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s)", [PIPELINE_LOCK_ID])
            holding.set()
            time.sleep(seconds)

    with ThreadPoolExecutor(1) as pool:
        released = pool.submit(hold_the_lock)
        holding.wait(10)
        outcome = run_job(instance)
        released.result()
    return outcome


# --- the command line ---------------------------------------------------------------------------


def dagster_job_execute_command(*extra_args: str) -> list[str]:
    """`dagster job execute` of the job in the code location, as an operator types it."""
    command = [str(BIN / "dagster"), "job", "execute", "-m", "so_pipeline", "-j", JOB_NAME]
    return [*command, *extra_args]


def dagster_job_execute(*extra_args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    """Run `dagster job execute` from the repository, in this process's environment."""
    return subprocess.run(
        dagster_job_execute_command(*extra_args),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- long-running processes: the daemon, the webserver, `dg dev` --------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(
    condition: Callable[[], object], what: str, timeout: float = 180, interval: float = 0.3
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def pipeline_waits_for_a_lock(url: str, wait_event: str | None = None) -> bool:
    """Whether a connection of the pipeline to `url` waits for a lock (of `wait_event`, e.g.
    `transactionid`, if given). Only `url`'s database: a server may be shared by test workers."""
    query = (
        "SELECT 1 FROM pg_stat_activity WHERE application_name LIKE 'so_pipeline%%' "
        "AND datname = current_database() "
        "AND wait_event_type = 'Lock' AND wait_event = coalesce(%s, wait_event)"
    )
    with psycopg.connect(url, autocommit=True) as connection:
        return bool(connection.execute(query, [wait_event]).fetchall())


@contextmanager
def background(
    command: Sequence[str], output: Path, env: dict[str, str] | None = None, cwd: Path = REPO_ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """`command` running in its own process group, its output in `output`; the whole group
    (a daemon's or `dg dev`'s children too) is stopped on leaving."""
    with output.open("wb") as sink:
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=env if env is not None else os.environ.copy(),
            stdout=sink,
            stderr=subprocess.STDOUT,
            process_group=0,
        )
    try:
        yield process
    finally:
        stop_process_group(process)


def stop_schedule(env: dict[str, str] | None = None) -> None:
    """Stop the 15-minute schedule, so a quarter hour passing mid-test starts no run of its own."""
    subprocess.run(
        [str(BIN / "dagster"), "schedule", "stop", "stackoverflow_posts_schedule"]
        + ["-m", "so_pipeline"],
        cwd=REPO_ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=180,
    )


def wait_for_webserver(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until `url`/server_info answers; fails at once if `process` exits."""

    def answers() -> bool:
        if process.poll() is not None:
            raise AssertionError(f"exited with {process.returncode} before serving {url}")
        try:
            with urllib.request.urlopen(f"{url}/server_info", timeout=2):
                return True
        except OSError:
            return False

    wait_for(answers, f"{url}/server_info", timeout)


def graphql(url: str, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST a query to the webserver's GraphQL API, as the UI does; its `data`."""
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": query, "variables": variables or {}}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    assert "errors" not in answer, answer["errors"]
    return answer["data"]


SENSORS = {
    "stackoverflow_posts_catch_up_sensor",
    "so_pipeline_failure_alerts",
    "so_pipeline_check_and_recovery_alerts",
}
_ANSI_COLOR = re.compile(r"\x1b\[[0-9;]*m")


def log_lines(output: Path) -> list[str]:
    """The lines of a Dagster service's output, without its colours."""
    return _ANSI_COLOR.sub("", output.read_text(errors="replace")).splitlines()


def warnings(lines: Sequence[str]) -> list[str]:
    """Dagster's log lines at WARNING or above."""
    return [line for line in lines if re.search(r" - (WARNING|ERROR|CRITICAL) - ", line)]


def sensor_evaluations(output: Path) -> Counter[str]:
    """How often the daemon evaluated each sensor: Dagster logs one such line per evaluation."""
    checking = re.compile(r"Checking for new runs for sensor: (\w+)")
    found = (checking.search(line) for line in log_lines(output))
    return Counter(match[1] for match in found if match)
