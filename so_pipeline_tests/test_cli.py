"""The commands users type: `dagster job execute` on the shipped dagster.yaml, and the demo."""

import os
import re
import subprocess
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from so_pipeline.definitions import defs
from so_pipeline_tests.helpers import (
    BIN,
    REPO_ROOT,
    PipelineDatabases,
    Post,
    background,
    dagster_job_execute,
    run_job,
    wait_for,
)

pytestmark = pytest.mark.integration


def test_dagster_job_execute_runs_end_to_end_and_keeps_the_cursor(
    databases: PipelineDatabases, dagster_home: Path, tmp_path: Path
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 6)] + [Post(id=6, body=" ")])
    run_config = tmp_path / "window.yaml"
    run_config.write_text("ops:\n  source_posts_batch:\n    config:\n      batch_size: 4\n")

    first = dagster_job_execute("-c", str(run_config))
    second = dagster_job_execute("-c", str(run_config))

    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    assert databases.loaded_ids() == [1, 2, 3, 4, 5]
    assert databases.rejected() == {6: "body_whitespace_only"}
    with dg.DagsterInstance.get() as instance:  # the PostgreSQL-backed instance of the runs
        event = instance.get_latest_materialization_event(dg.AssetKey("filtered_posts"))
        assert event is not None and event.asset_materialization is not None
        assert event.asset_materialization.metadata["last_processed_id"].value == 6
        assert len(instance.get_runs()) == 2


def test_dagster_job_execute_fails_clearly_when_a_url_is_missing(
    databases: PipelineDatabases, dagster_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SO_SOURCE_DATABASE_URL")

    result = dagster_job_execute()

    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "SO_SOURCE_DATABASE_URL" in output and "source_db" in output


def test_demo_loads_the_sample_until_caught_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(BIN / "so-pipeline"), "--home", str(tmp_path / "state"), "demo"],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    assert "Loaded 2595 posts, rejected 35 (body_empty 33, owner_null 2)" in result.stdout
    assert "last_processed_id = 4805" in result.stdout
    # The demo's source has the index change capture reads: no warning in a normal start.
    assert "WARNING" not in result.stdout + result.stderr


def test_status_prints_cursor_backlog_and_last_runs(
    databases: PipelineDatabases, dagster_home: Path
) -> None:
    databases.add_source_posts([Post(id=i) for i in range(1, 6)])
    with dg.DagsterInstance.get() as instance:
        assert run_job(instance, batch_size=3).success

    result = subprocess.run(
        [str(BIN / "so-pipeline"), "status"], capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert "cursor (last_processed_id): 3" in result.stdout
    assert "highest id 5; 2 posts after the cursor" in result.stdout
    # Live posts (issue 24: the count included soft-deleted ones), and one line on the state.
    assert "analytical posts: 3 live, 0 deleted" in result.stdout
    assert result.stdout.startswith("status: catching up: 2 ids behind the source")
    assert "SUCCESS" in result.stdout


def test_status_lists_every_job_and_says_stuck_since_when_and_why(
    databases: PipelineDatabases, dagster_home: Path
) -> None:
    """A reconciliation run is listed beside the job's; then a job run fails (the analytical
    table is broken): the status line says stuck, since when, and the error."""
    databases.add_source_posts([Post(id=i) for i in range(1, 4)])
    with dg.DagsterInstance.get() as instance:
        assert run_job(instance).success
        reconciliation = defs.resolve_job_def("stackoverflow_posts_reconciliation_job")
        assert reconciliation.execute_in_process(instance=instance).success
    with psycopg.connect(databases.analytical_url, autocommit=True) as connection:
        connection.execute("ALTER TABLE posts RENAME COLUMN body TO body_gone")
    with dg.DagsterInstance.get() as instance:
        assert not run_job(instance).success

    status = _so_pipeline("status")
    metrics = _so_pipeline("metrics")

    first = status.stdout.splitlines()[0]
    assert re.match(r"status: stuck since \d{4}-\d\d-\d\d [\d:]+ UTC \(\d+ s\): the last 1 ", first)
    assert "body" in first  # the error names what is wrong
    assert "stackoverflow_posts_reconciliation_job" in status.stdout
    assert "Starting the embedded PostgreSQL" not in status.stdout + status.stderr
    # OpenMetrics text a scraper takes: each family typed, units named, the figures as recorded.
    assert metrics.stdout.endswith("# EOF\n")
    assert "# UNIT so_pipeline_lag_seconds seconds" in metrics.stdout
    assert re.search(r"^so_pipeline_posts_live 3$", metrics.stdout, re.M)
    assert re.search(r"^so_pipeline_ids_behind_source 0$", metrics.stdout, re.M)
    assert re.search(r"^so_pipeline_last_success_timestamp_seconds \d+\.\d+$", metrics.stdout, re.M)
    for line in metrics.stdout.splitlines():
        assert re.match(
            r"# (TYPE|UNIT|HELP) so_pipeline_\w+ \S|# EOF$|so_pipeline_\w+ [\d.]+$", line
        )


def _so_pipeline(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / "so-pipeline"), *args], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def test_env_prints_the_settings_that_reach_the_demo_while_dev_runs(tmp_path: Path) -> None:
    """`so-pipeline env` beside a running demo server: its lines, evaluated in a shell, make
    psql and dagster reach the demo's databases and history; it starts nothing itself."""
    home = tmp_path / "state"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SO_", "DAGSTER_"))}
    command = [str(BIN / "so-pipeline"), "--home", str(home)]
    # `shell` with a "shell" that waits: the demo's server is up until the test stops it.
    waiting = tmp_path / "waiting-shell"
    waiting.write_text("#!/bin/sh\nexec sleep 600\n")
    waiting.chmod(0o755)
    with background(
        [*command, "shell"], tmp_path / "shell.log", env={**env, "SHELL": str(waiting)}
    ):
        wait_for(lambda: "A shell on the demo" in (tmp_path / "shell.log").read_text(), "shell")
        printed = subprocess.run(
            [*command, "env"], capture_output=True, text=True, timeout=120, env=env
        )
        used = subprocess.run(
            [
                "sh",
                "-c",
                f'{printed.stdout}\npsql -Atc "SELECT current_database()" '
                '"$SO_ANALYTICAL_DATABASE_URL" && dagster instance info',
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,  # no virtualenv on the PATH: the printed lines put it there
        )

    assert printed.returncode == 0, printed.stderr
    assert "Starting" not in printed.stdout + printed.stderr
    assert re.search(r"^export DAGSTER_HOME=\S+$", printed.stdout, re.M)
    assert used.returncode == 0, used.stderr[-2000:]
    assert used.stdout.splitlines()[0] == "so_analytical"
    assert str(home / "dagster_home") in used.stdout


def test_every_run_config_key_the_readme_gives_is_accepted_by_the_real_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's Configuration table, key by key, against the job that key belongs to."""
    for name in ("SO_SOURCE_DATABASE_URL", "SO_ANALYTICAL_DATABASE_URL"):  # never connected to
        monkeypatch.setenv(name, "postgresql://localhost/unused")
    from so_pipeline.definitions import defs

    readme = (REPO_ROOT / "README.md").read_text()
    cells = re.findall(r"^\| (`ops\.[^|]+)\|", readme, re.M)
    checked = []
    for cell in cells:
        names = re.findall(r"`([^`]+)`", cell)  # the key's path, then its siblings' names
        _, op, _, *_ = path = names[0].split(".")
        reconciliation = op.endswith("reconciled_with_source")
        job = defs.resolve_job_def(
            "stackoverflow_posts_reconciliation_job"
            if reconciliation
            else "stackoverflow_posts_job"
        )
        for key in [path[-1], *names[1:]]:
            run_config = {"ops": {op: {"config": {key: _value_for(key)}}}}
            dg.validate_run_config(job, run_config)  # raises, naming the key, if rejected
            checked.append(f"{op}.{key}")
    assert len(checked) >= 20, checked


def _value_for(key: str) -> object:
    if key in {"require_owner", "allow_mass_delete", "recopy_all"}:
        return True
    if key == "change_column":
        return "last_activity_date"
    return 1
