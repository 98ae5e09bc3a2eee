"""The code location's shape, the schedule, and the shipped Dagster instance settings."""

import dagster as dg
import yaml

from so_pipeline.definitions import defs
from so_pipeline.jobs import SERIAL_RUN_TAG
from so_pipeline_tests.conftest import REPO_ROOT


def test_job_materializes_both_assets_in_order_then_checks_them() -> None:
    job = defs.resolve_job_def("stackoverflow_posts_job")
    nodes = [node.name for node in job.nodes_in_topological_order]
    assert nodes[:2] == ["source_posts_batch", "filtered_posts"]
    assert set(nodes[2:]) == {
        "filtered_posts_post_ids_are_unique",
        "filtered_posts_backlog_within_limits",
    }
    assert job.tags == SERIAL_RUN_TAG


def test_schedule_runs_the_job_every_15_minutes() -> None:
    schedule = defs.resolve_schedule_def("stackoverflow_posts_schedule")
    assert schedule.cron_schedule == "*/15 * * * *"
    assert schedule.job_name == "stackoverflow_posts_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


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
