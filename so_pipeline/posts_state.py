"""Where the analytical tables stand after a run: what an operator checks every morning."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from so_pipeline import analytical_reads as analytical
from so_pipeline.metadata import labels, numbers
from so_pipeline.source_replica import ReplicaStatus
from so_pipeline.window import PostWindow


@dataclass(frozen=True)
class PostsState:
    live_posts: int  # in posts and at the source (the posts_live view)
    deleted_posts: int  # in posts, soft-deleted: gone from the source
    rejected_by_reason: dict[str, int]
    newest_loaded_at: datetime | None
    body_compression: str

    def metadata(self, window: PostWindow, source: ReplicaStatus | None = None) -> dict[str, Any]:
        """Row counts, rejection totals, and the backlog in ids and in time.

        `lag_seconds` is how far the copy is behind the source's primary: behind the newest
        post the source shows, plus, when the source is a read replica, how far the replica's
        replay is behind its primary. A replica's metadata shows both parts
        (`copy_lag_seconds`, `source_replica_lag_seconds`): the copy behind, or the replica.
        """
        copy_lag = None
        if window.source_newest_at is not None and self.newest_loaded_at is not None:
            source_newest = datetime.fromisoformat(window.source_newest_at)
            copy_lag = max(0.0, (source_newest - self.newest_loaded_at).total_seconds())
        replica = source if source is not None and source.is_replica else None
        lag = copy_lag
        if replica is not None and copy_lag is not None:
            lag = copy_lag + (replica.lag_seconds or 0.0)
        times = {
            "source_newest_post_at": window.source_newest_at,
            "loaded_newest_post_at": (
                self.newest_loaded_at.isoformat() if self.newest_loaded_at else None
            ),
        }
        return {
            "dagster/row_count": self.live_posts,
            **{key: value for key, value in times.items() if value is not None},
            **labels({"body_compression": self.body_compression}),
            **(source.metadata() if source is not None else {}),
            **numbers(
                {
                    "ids_behind_source": window.ids_behind_source,
                    "deleted_posts_total": self.deleted_posts,
                    "lag_seconds": lag,
                    "copy_lag_seconds": copy_lag if replica is not None else None,
                    "rejected_total": sum(self.rejected_by_reason.values()),
                    **{
                        f"rejected_total_{reason}": rows
                        for reason, rows in sorted(self.rejected_by_reason.items())
                    },
                }
            ),
        }


def read_posts_state(connection: psycopg.Connection) -> PostsState:
    """The state of the tables, from the row counters and the newest loaded post."""
    deleted = analytical.deleted_posts_count(connection)
    return PostsState(
        live_posts=analytical.posts_row_count(connection) - deleted,
        deleted_posts=deleted,
        rejected_by_reason=analytical.rejected_totals(connection),
        newest_loaded_at=analytical.newest_loaded_time(connection),
        body_compression=analytical.body_compression(connection),
    )
