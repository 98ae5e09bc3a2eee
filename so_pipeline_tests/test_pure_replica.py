"""A read replica as the source, without a database: which errors are recovery conflicts (read
again) and which are not, and how the replica's lag adds to the copy's in the metadata.
(test_read_replica.py runs the same against a real primary and standby.)
"""

from datetime import datetime

import psycopg
import pytest

from so_pipeline.posts_state import PostsState
from so_pipeline.resources import DatabaseUnavailableError
from so_pipeline.source_replica import ReplicaStatus, is_recovery_conflict
from so_pipeline.window import PostWindow

CANCELLED = (
    "canceling statement due to conflict with recovery\n"
    "DETAIL:  User query might have needed to see row versions that must be removed."
)
ENDED = "terminating connection due to conflict with recovery"


def _never_asked() -> bool:
    raise AssertionError("the source's role was asked although the words decide")


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.SerializationFailure(CANCELLED),
        psycopg.errors.SerializationFailure(ENDED),
        psycopg.OperationalError(f"consuming input failed: {ENDED}"),
        DatabaseUnavailableError(description=f"source_db: cannot use PostgreSQL at h/db: {ENDED}"),
    ],
)
def test_postgresqls_words_make_a_recovery_conflict(error: BaseException) -> None:
    assert is_recovery_conflict(error, _never_asked)


@pytest.mark.parametrize(("replica", "conflict"), [(True, True), (False, False)])
def test_a_serialization_failure_in_another_language_is_one_only_on_a_replica(
    replica: bool, conflict: bool
) -> None:
    error = psycopg.errors.SerializationFailure("annulation de la requête (conflit)")
    assert is_recovery_conflict(error, lambda: replica) is conflict


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.UniqueViolation("duplicate key value violates unique constraint"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
        DatabaseUnavailableError(description="source_db: cannot use PostgreSQL at h/db: timeout"),
    ],
)
def test_other_errors_are_not_recovery_conflicts(error: BaseException) -> None:
    assert not is_recovery_conflict(error, _never_asked)


def _state() -> PostsState:
    return PostsState(
        live_posts=10,
        deleted_posts=0,
        rejected_by_reason={},
        newest_loaded_at=datetime(2024, 1, 1, 12, 0, 0),
        body_compression="lz4",
    )


WINDOW = PostWindow(
    read_after_id=None,
    after_id=None,
    last_id=10,
    cursor_before=None,
    new_rows=10,
    source_max_id=12,
    cursor_origin="start of source",
    source_newest_at="2024-01-01T12:00:30",
)


def test_a_replicas_lag_adds_to_the_copys_and_both_parts_are_shown() -> None:
    metadata = _state().metadata(WINDOW, ReplicaStatus(is_replica=True, lag_seconds=45.0))
    assert metadata["copy_lag_seconds"] == 30.0  # behind what the replica shows
    assert metadata["source_replica_lag_seconds"] == 45.0  # the replica behind its primary
    assert metadata["lag_seconds"] == 75.0  # the copy behind the primary
    assert metadata["source_role"].value == "read replica (hot standby)"


def test_a_primary_shows_the_copys_lag_alone() -> None:
    metadata = _state().metadata(WINDOW, ReplicaStatus(is_replica=False))
    assert metadata["lag_seconds"] == 30.0
    assert metadata["source_role"].value == "primary"
    assert "copy_lag_seconds" not in metadata and "source_replica_lag_seconds" not in metadata
