"""Hands the window from `source_posts_batch` to `filtered_posts` through the event log.

The window is two ids and a few counts, and `source_posts_batch` records all of it in its
materialization. Reading it back from there needs no disk shared between the steps (run
launchers such as ECS put a re-execution on another machine), and only a window planned in
this run, or in the run it re-executes, is ever handed over: never a stale stored one.
"""

import dagster as dg

from so_pipeline.window import PostWindow

WINDOW_IO_MANAGER_KEY = "window_io_manager"


class WindowIOManager(dg.ConfigurableIOManager):
    """Stores nothing; loads the window from the upstream run's materialization event."""

    def handle_output(self, context: dg.OutputContext, obj: PostWindow) -> None:
        """Nothing to store: the output's metadata (PostWindow.metadata) holds the window."""

    def load_input(self, context: dg.InputContext) -> PostWindow | None:
        """The window materialized by the run that produced the input; None when there is none.

        None when `source_posts_batch` is not part of this run or the run it re-executes (e.g.
        `filtered_posts` materialized alone): the asset then plans a window itself.
        """
        upstream = context.upstream_output
        try:
            run_id = upstream.run_id if upstream is not None else None
        except dg.DagsterInvariantViolationError:  # an asset loaded from outside the run
            run_id = None
        if run_id is None:
            return None
        records = context.instance.all_logs(
            run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        )
        for record in reversed(records):
            materialization = record.asset_materialization
            if materialization is not None and materialization.asset_key == context.asset_key:
                return PostWindow.from_metadata(materialization.metadata)
        return None
