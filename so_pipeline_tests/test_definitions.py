"""The code location's shape, the schedule, and the shipped Dagster instance settings."""

import shutil
from pathlib import Path

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.ref import InstanceRef
from dagster._serdes.config_class import class_from_code_pointer

from so_pipeline.definitions import defs
from so_pipeline.jobs import SERIAL_RUN_TAG
from so_pipeline_tests.conftest import REPO_ROOT


def test_job_materializes_both_assets_in_order_and_checks_each_window() -> None:
    job = defs.resolve_job_def("stackoverflow_posts_job")
    nodes = [node.name for node in job.nodes_in_topological_order]
    assert nodes == ["source_posts_batch", "filtered_posts"]
    checks = {key.name for key in job.asset_layer.asset_graph.asset_check_keys}
    assert checks == {"post_ids_are_unique", "backlog_within_limits"}
    assert job.tags == SERIAL_RUN_TAG


def test_schedule_runs_the_job_every_15_minutes() -> None:
    schedule = defs.resolve_schedule_def("stackoverflow_posts_schedule")
    assert schedule.cron_schedule == "*/15 * * * *"
    assert schedule.job_name == "stackoverflow_posts_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_the_catch_up_sensor_starts_the_job_and_is_on_by_default() -> None:
    sensor = defs.resolve_sensor_def("stackoverflow_posts_catch_up_sensor")
    assert sensor.job_name == "stackoverflow_posts_job"
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 10


def test_the_full_reconciliation_runs_daily_in_its_own_job() -> None:
    job = defs.resolve_job_def("stackoverflow_posts_reconciliation_job")
    assert {node.name for node in job.nodes_in_topological_order} == {
        "filtered_posts_reconciled_with_source",
        "filtered_posts_loaded_bodies_are_not_blank",
    }
    schedule = defs.resolve_schedule_def("stackoverflow_posts_reconciliation_schedule")
    assert (schedule.cron_schedule, schedule.job_name) == ("30 3 * * *", job.name)


def test_resources_read_their_urls_from_the_environment() -> None:
    resources = defs.resources
    assert set(resources) >= {"source_db", "analytical_db"}
    assert resources["source_db"].url == dg.EnvVar("SO_SOURCE_DATABASE_URL")
    assert resources["analytical_db"].url == dg.EnvVar("SO_ANALYTICAL_DATABASE_URL")


def test_dagster_yaml_limits_the_job_to_one_run_at_a_time() -> None:
    settings = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    limits = settings["run_coordinator"]["config"]["tag_concurrency_limits"]
    ((key, value),) = SERIAL_RUN_TAG.items()
    assert {"key": key, "value": value, "limit": 1} in limits
    assert settings["storage"]["postgres"]["postgres_url"] == {"env": "DAGSTER_PG_URL"}


def _validate_instance_config(home: Path) -> InstanceRef:
    """Load dagster.yaml with Dagster's instance loader, then check the run coordinator's and
    run launcher's own config against their classes' schemas, as instantiating them would
    (without starting them: the ECS launcher would call AWS)."""
    ref = InstanceRef.from_dir(str(home))
    for data in (ref.run_coordinator_data, ref.run_launcher_data):
        if data is not None:
            klass = class_from_code_pointer(data.module_name, data.class_name)
            result = process_config(klass.config_type(), data.config_dict)  # type: ignore[attr-defined]
            if not result.success:
                raise dg.DagsterInvalidConfigError(data.class_name, result.errors, data)
    return ref


@pytest.mark.parametrize("variant", ["dagster.yaml", "deploy/ecs/dagster.yaml"])
def test_each_shipped_instance_config_passes_dagsters_own_loader(
    variant: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copyfile(REPO_ROOT / variant, tmp_path / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_PG_URL", "postgresql+psycopg2://dagster@db.example/dagster")
    monkeypatch.setenv("DAGSTER_ECS_TASK_DEFINITION", "arn:aws:ecs:eu-west-1:1:task-definition/x")

    ref = _validate_instance_config(tmp_path)

    assert ref.storage_data.class_name == "DagsterPostgresStorage"  # type: ignore[union-attr]
    assert ref.run_coordinator_data.class_name == "QueuedRunCoordinator"  # type: ignore[union-attr]


def test_the_loader_rejects_a_broken_variant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check above can fail: a misspelt launcher option is refused."""
    settings = yaml.safe_load((REPO_ROOT / "deploy/ecs/dagster.yaml").read_text())
    settings["run_launcher"]["config"]["task_defintion"] = "typo"
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(settings))
    monkeypatch.setenv("DAGSTER_ECS_TASK_DEFINITION", "arn:aws:ecs:eu-west-1:1:task-definition/x")

    with pytest.raises(dg.DagsterInvalidConfigError, match="task_defintion"):
        _validate_instance_config(tmp_path)
