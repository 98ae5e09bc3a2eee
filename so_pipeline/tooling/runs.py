"""Runs of the job in this process, as the demo and the tests make them."""

from collections.abc import Iterator
from typing import Any

import dagster as dg

from so_pipeline.metadata import flattened
from so_pipeline.names import POSTS_JOB as JOB_NAME


def materialization_metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    """The metadata values of `asset`'s last materialization in the run (a catch-up run records
    one per window), groups flattened (`rows_loaded`, `ids_behind_source`, ...)."""
    materialization = result.asset_materializations_for_node(asset)[-1]
    return flattened({key: value.value for key, value in materialization.metadata.items()})


def execute_job(
    instance: dg.DagsterInstance, run_config: dict[str, Any], raise_on_error: bool = True
) -> dg.ExecuteInProcessResult:
    """One run of stackoverflow_posts_job in this process, recorded in `instance`."""
    from so_pipeline.definitions import defs

    job = defs.resolve_job_def(JOB_NAME)
    return job.execute_in_process(
        run_config=run_config, instance=instance, raise_on_error=raise_on_error
    )


def runs_until_caught_up(
    instance: dg.DagsterInstance, run_config: dict[str, Any]
) -> Iterator[dg.ExecuteInProcessResult]:
    """Run the job again and again; yield each run that found new ids, stop at one that did not."""
    while True:
        result = execute_job(instance, run_config)
        if not materialization_metadata(result, "source_posts_batch")["rows_in_window"]:
            return
        yield result
