"""A source that is a read replica (a hot standby): how far behind its primary it is, and the
reads it cancels.

On a hot standby, WAL replay waits at most `max_standby_streaming_delay` (RDS: 30 s) for a
query that still sees row versions the primary's VACUUM has removed, then cancels it; a
session idle inside such a transaction is ended instead. Both say "... due to conflict with
recovery" (SQLSTATE 40001). A window's read is one snapshot, so it is re-read whole: its
analytical transaction was rolled back with it and nothing of it was committed (the load is
idempotent besides), so no row is lost or loaded twice. The re-read takes a new snapshot, which
the replay has already passed. Re-reading the window inside the step, rather than retrying the
step, keeps the windows a catch-up run has committed and the step's retries for other errors,
and says in the log what happened.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg

from so_pipeline.metadata import labels, numbers
from so_pipeline.resources import DatabaseUnavailableError
from so_pipeline.run_connections import RunConnections

T = TypeVar("T")

# A read the replica cancels is read again up to this many times in the step; then the step
# fails with advice (and Dagster's step retries follow). Each conflict needs a VACUUM of rows
# changed after the read began: a read that keeps losing to it is too long for the replica's
# max_standby_streaming_delay.
MAX_READS = 4

# The words PostgreSQL uses for both a cancelled statement and an ended session.
_CONFLICT_WORDS = "conflict with recovery"
_SERIALIZATION_FAILURE = "40001"

# Replay lag of a standby: 0 when it has replayed all the WAL it received (the replay
# timestamp is that of the last transaction replayed, which grows old on an idle primary);
# else the age of that transaction. NULL on a primary, or a standby that has replayed nothing.
_REPLICA_STATUS_SQL = """
SELECT pg_is_in_recovery(),
       CASE WHEN NOT pg_is_in_recovery() THEN NULL
            WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN 0
            ELSE greatest(0, extract(epoch FROM now() - pg_last_xact_replay_timestamp()))
       END::float8
"""


@dataclass(frozen=True)
class ReplicaStatus:
    """Whether the source is a hot standby, and how many seconds its replay is behind."""

    is_replica: bool
    lag_seconds: float | None = None

    def metadata(self) -> dict[str, Any]:
        role = "read replica (hot standby)" if self.is_replica else "primary"
        lag = None if self.lag_seconds is None else round(self.lag_seconds, 3)
        return {
            **labels({"source_role": role}),
            **numbers({"source_replica_lag_seconds": lag}),
        }


def replica_status(connection: psycopg.Connection) -> ReplicaStatus:
    """The source server's role and replay lag (functions any role may call)."""
    in_recovery, lag = connection.execute(_REPLICA_STATUS_SQL).fetchone()  # type: ignore[misc]
    return ReplicaStatus(bool(in_recovery), lag)


def is_recovery_conflict(error: BaseException, source_is_replica: Callable[[], bool]) -> bool:
    """Whether `error` is a standby cancelling a read (or ending its session) to replay WAL.

    PostgreSQL's words, or, on servers that speak another language, a serialization failure
    on a source known to be a replica (the pipeline reads it in REPEATABLE READ only, where
    that SQLSTATE means nothing else; `source_is_replica` is asked only then). The words also
    survive a failure that wrapped the error.
    """
    if _CONFLICT_WORDS in str(error):
        return True
    return _sqlstate(error) == _SERIALIZATION_FAILURE and source_is_replica()


class ReplicaConflictError(DatabaseUnavailableError):
    """The replica cancelled the same read MAX_READS times: the step fails, and is retried."""


def read_through_conflicts(
    run: RunConnections, log: logging.Logger, what: str, read: Callable[[], T]
) -> tuple[T, int]:
    """`read()` and how many times the replica cancelled it: a read cancelled by a recovery
    conflict is done again (on a new source connection if the replica ended the session), up
    to MAX_READS times. `read` must be safe to do again after a failure (the pipeline's loads
    are idempotent)."""
    cancelled = 0
    is_replica: bool | None = None

    def source_is_replica() -> bool:
        nonlocal is_replica
        if is_replica is None:
            _reopen_if_ended(run)
            is_replica = replica_status(run.source).is_replica
        return is_replica

    while True:
        try:
            result = read()
        except (psycopg.Error, DatabaseUnavailableError) as error:
            # A standby that ends the session may close it before its message arrives: the
            # client then only sees the connection closed ("server closed the connection
            # unexpectedly"). On a replica that is read again too, like a cancelled read.
            ended_on_replica = run.source.broken and source_is_replica()
            if not (ended_on_replica or is_recovery_conflict(error, source_is_replica)):
                raise
            cancelled += 1
            reason = " ".join(str(error).split())
            if cancelled >= MAX_READS:
                raise ReplicaConflictError(
                    description=f"source_db: the replica cancelled the read of {what} "
                    f"{cancelled} times (recovery conflict: {reason}). Reads that last longer "
                    "than the replica's max_standby_streaming_delay lose to its WAL replay "
                    "while the primary vacuums rows they see: read smaller windows "
                    "(batch_size, catch_up_batch_size), raise max_standby_streaming_delay, or "
                    "turn on hot_standby_feedback on the replica."
                ) from error
            log.warning(
                "The replica cancelled the read (recovery conflict); re-reading %s "
                "(read %d of at most %d): %s",
                what,
                cancelled + 1,
                MAX_READS,
                reason,
            )
            _reopen_if_ended(run)
        else:
            # The replica may also end the session once its reads are done (window_loader).
            _reopen_if_ended(run)
            return result, cancelled


def _sqlstate(error: BaseException) -> str | None:
    return getattr(error, "sqlstate", None)


def _reopen_if_ended(run: RunConnections) -> None:
    """A new source connection if the replica ended the session (idle in a transaction)."""
    if run.source.broken or run.source.closed:
        run.reopen_source()
