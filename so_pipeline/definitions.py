"""The Dagster code location: assets, checks, resources, jobs, schedules and sensors.

The one entry point: `workspace.yaml`, `pyproject.toml` (dagster and dg), the deployment files
and `dagster ... -m so_pipeline` (which the package forwards here) all load `defs`.
"""

import dagster as dg

from so_pipeline.alerts import check_and_recovery_alerts, failure_alerts
from so_pipeline.assets import filtered_posts, source_posts_batch
from so_pipeline.checks import loaded_bodies_are_not_blank, reconciled_with_source
from so_pipeline.jobs import (
    reconciliation_job,
    reconciliation_schedule,
    stackoverflow_posts_catch_up_sensor,
    stackoverflow_posts_job,
    stackoverflow_posts_schedule,
)
from so_pipeline.resources import PostgresResource
from so_pipeline.window_io import WINDOW_IO_MANAGER_KEY, WindowIOManager

defs = dg.Definitions(
    assets=[source_posts_batch, filtered_posts],
    asset_checks=[reconciled_with_source, loaded_bodies_are_not_blank],
    jobs=[stackoverflow_posts_job, reconciliation_job],
    schedules=[stackoverflow_posts_schedule, reconciliation_schedule],
    sensors=[stackoverflow_posts_catch_up_sensor, failure_alerts, check_and_recovery_alerts],
    resources={
        WINDOW_IO_MANAGER_KEY: WindowIOManager(),
        # SO_SOURCE_DATABASE_URL, and SO_SOURCE_DATABASE_PASSWORD_FILE etc. when set.
        "source_db": PostgresResource.from_env("source_db", "SO_SOURCE_DATABASE"),
        "analytical_db": PostgresResource.from_env("analytical_db", "SO_ANALYTICAL_DATABASE"),
    },
)
