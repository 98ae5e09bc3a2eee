"""Dagster's own floor for a tick: a two-asset job that does nothing, run the way ours is."""

import dagster as dg


@dg.asset
def first() -> int:
    return 1


@dg.asset
def second(first: int) -> int:
    return first + 1


trivial_job = dg.define_asset_job(
    "trivial_job", selection=[first, second], executor_def=dg.in_process_executor
)

defs = dg.Definitions(assets=[first, second], jobs=[trivial_job])
