"""The code location's shape, the schedule, and the shipped Dagster instance settings.

The instance tests (marked integration) load each shipped dagster.yaml with Dagster itself,
its storage in a real PostgreSQL database and AWS replaced by a stand-in on loopback.
"""

import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster_postgres import PostgresRunStorage

from so_pipeline.definitions import defs
from so_pipeline_tests.helpers import REPO_ROOT, ScratchDatabases, prepare_dagster_home


def test_job_materializes_both_assets_in_order_and_checks_each_window() -> None:
    job = defs.resolve_job_def("stackoverflow_posts_job")
    nodes = [node.name for node in job.nodes_in_topological_order]
    assert nodes == ["source_posts_batch", "filtered_posts"]
    checks = {key.name for key in job.asset_layer.asset_graph.asset_check_keys}
    # The two daily checks' latest results are repeated with every window (issue 24).
    assert checks == {
        "post_ids_are_unique",
        "backlog_within_limits",
        "reconciled_with_source_last_result",
        "loaded_bodies_are_not_blank_last_result",
    }


def test_schedule_runs_the_job_every_15_minutes() -> None:
    schedule = defs.resolve_schedule_def("stackoverflow_posts_schedule")
    assert schedule.cron_schedule == "*/15 * * * *"
    assert schedule.job_name == "stackoverflow_posts_job"
    assert schedule.default_status == dg.DefaultScheduleStatus.RUNNING


def test_the_catch_up_sensor_starts_the_job_and_is_on_by_default() -> None:
    sensor = defs.resolve_sensor_def("stackoverflow_posts_catch_up_sensor")
    assert sensor.job_name == "stackoverflow_posts_job"
    assert sensor.default_status == dg.DefaultSensorStatus.RUNNING
    assert sensor.minimum_interval_seconds == 30  # the daemon logs 2 lines per evaluation


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
    assert resources is not None
    assert set(resources) >= {"source_db", "analytical_db"}
    assert resources["source_db"].url == dg.EnvVar("SO_SOURCE_DATABASE_URL")
    assert resources["analytical_db"].url == dg.EnvVar("SO_ANALYTICAL_DATABASE_URL")


def _limits_on_the_job(limits: Sequence[Mapping[str, Any]]) -> list[int]:
    """Of tag concurrency `limits`, those that apply to stackoverflow_posts_job's runs."""
    tags = defs.resolve_job_def("stackoverflow_posts_job").tags
    return [limit["limit"] for limit in limits if tags.get(limit["key"]) == limit["value"]]


def test_dagster_yaml_limits_the_job_to_one_run_at_a_time() -> None:
    settings = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text())
    limits = settings["concurrency"]["runs"]["tag_concurrency_limits"]
    assert _limits_on_the_job(limits) == [1]
    storage = settings["storage"]["custom"]
    assert (storage["module"], storage["class"]) == (
        "so_pipeline.dagster_storage",
        "PooledPostgresStorage",
    )
    assert storage["config"]["postgres_url"] == {"env": "DAGSTER_PG_URL"}


ECS_TASK_DEFINITION = "arn:aws:ecs:eu-west-1:1:task-definition/so_pipeline_run:3"


@pytest.fixture
def aws_on_loopback(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, dict]]]:
    """Every AWS API call goes to a stand-in on 127.0.0.1, never to AWS; yields what it got.

    Building EcsRunLauncher looks up its task definition (ecs:DescribeTaskDefinition) to check
    that the container it overrides exists: the stand-in answers with a task definition that
    holds one container, named so_pipeline. Any other call is answered with an error.
    """
    pytest.importorskip("dagster_aws", reason="the ECS run launcher needs the 'aws' extra")
    calls: list[tuple[str, dict]] = []

    class StandIn(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            operation = self.headers.get("X-Amz-Target", "").rpartition(".")[2]
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            calls.append((operation, body))
            answer: dict[str, object]
            if operation == "DescribeTaskDefinition":
                status, answer = (
                    200,
                    {
                        "taskDefinition": {
                            "taskDefinitionArn": ECS_TASK_DEFINITION,
                            "containerDefinitions": [{"name": "so_pipeline"}],
                        }
                    },
                )
            else:
                status, answer = 400, {"__type": "UnsupportedOperation", "message": operation}
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-amz-json-1.1")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for variable in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.server_port}",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": "127.0.0.1",
        "DAGSTER_ECS_TASK_DEFINITION": ECS_TASK_DEFINITION,
    }.items():
        monkeypatch.setenv(variable, value)
    yield calls
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.mark.integration
@pytest.mark.parametrize("variant", ["dagster.yaml", "deploy/ecs/dagster.yaml"])
def test_each_shipped_instance_config_loads_in_dagster(
    variant: str,
    tmp_path: Path,
    scratch_databases: ScratchDatabases,
    monkeypatch: pytest.MonkeyPatch,
    aws_on_loopback: list[tuple[str, dict]],
) -> None:
    """DAGSTER_HOME holds the file; Dagster builds the instance from it, as the daemon does,
    and queues this job one run at a time."""
    prepare_dagster_home(tmp_path / "home", REPO_ROOT / variant, scratch_databases, monkeypatch)

    with dg.DagsterInstance.get() as instance:
        storage, coordinator = instance.run_storage, instance.run_coordinator

        assert isinstance(storage, PostgresRunStorage)
        assert isinstance(coordinator, dg.QueuedRunCoordinator)
        queue = instance.get_concurrency_config().run_queue_config  # what the daemon applies
        assert queue is not None
        assert _limits_on_the_job(queue.tag_concurrency_limits) == [1]
        assert coordinator.dequeue_interval_seconds == 1
        if variant == "dagster.yaml":
            assert isinstance(instance.run_launcher, dg.DefaultRunLauncher)


@pytest.mark.integration
def test_the_ecs_variant_launches_runs_as_ecs_tasks_of_the_task_definition(
    tmp_path: Path,
    scratch_databases: ScratchDatabases,
    monkeypatch: pytest.MonkeyPatch,
    aws_on_loopback: list[tuple[str, dict]],
) -> None:
    from dagster_aws.ecs import EcsRunLauncher  # the 'aws' extra (aws_on_loopback skips without)

    ecs = REPO_ROOT / "deploy/ecs/dagster.yaml"
    prepare_dagster_home(tmp_path / "home", ecs, scratch_databases, monkeypatch)

    with dg.DagsterInstance.get() as instance:
        launcher = instance.run_launcher

        assert isinstance(launcher, EcsRunLauncher)
        assert launcher.task_definition == ECS_TASK_DEFINITION
        assert launcher.container_name == "so_pipeline"
        assert launcher.secrets_tags == ["so_pipeline"]  # the secrets the runs get
    assert aws_on_loopback == [("DescribeTaskDefinition", {"taskDefinition": ECS_TASK_DEFINITION})]


@pytest.mark.integration
def test_dagster_rejects_a_misspelt_launcher_option(
    tmp_path: Path,
    scratch_databases: ScratchDatabases,
    monkeypatch: pytest.MonkeyPatch,
    aws_on_loopback: list[tuple[str, dict]],
) -> None:
    """The checks above can fail: a misspelt launcher option is refused before AWS is asked."""
    settings = yaml.safe_load((REPO_ROOT / "deploy/ecs/dagster.yaml").read_text())
    settings["run_launcher"]["config"]["task_defintion"] = "typo"
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(settings))
    prepare_dagster_home(tmp_path / "home", broken, scratch_databases, monkeypatch)

    with (
        pytest.raises(dg.DagsterInvalidConfigError, match="task_defintion"),
        dg.DagsterInstance.get() as instance,
    ):
        _ = instance.run_launcher
    assert aws_on_loopback == []
