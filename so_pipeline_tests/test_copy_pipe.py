"""The COPY pipe's one reach into psycopg's internals, pinned to the installed version.

`copy_pipe._BoundedQueuedWriter` bounds psycopg's queued COPY writer by replacing its private
`_queue` (psycopg offers no setting for it). If a psycopg release renamed or split that queue,
the replacement would be ignored and memory would grow with the window again: these tests
fail first.
"""

from queue import Queue

import psycopg
import pytest
from psycopg.copy import QueuedLibpqWriter

from so_pipeline.copy_pipe import PIPE_QUEUE_CHUNKS, _BoundedQueuedWriter
from so_pipeline_tests.helpers import ScratchDatabases

pytestmark = pytest.mark.integration


def test_psycopgs_queued_writer_keeps_its_buffers_in_one_queue_that_we_bound(
    scratch_databases: ScratchDatabases,
) -> None:
    url = scratch_databases.create("so_copy_pipe")
    with psycopg.connect(url) as connection, connection.cursor() as cursor:
        theirs = QueuedLibpqWriter(cursor)
        ours = _BoundedQueuedWriter(cursor)

        their_queues = [value for value in vars(theirs).values() if isinstance(value, Queue)]
        assert their_queues == [theirs._queue]  # the one queue psycopg's writer thread reads
        assert ours._queue.maxsize == PIPE_QUEUE_CHUNKS
        assert [v for v in vars(ours).values() if isinstance(v, Queue)] == [ours._queue]


def test_the_bounded_writer_copies_every_row(scratch_databases: ScratchDatabases) -> None:
    url = scratch_databases.create("so_copy_pipe")
    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("CREATE TABLE t (n bigint)")
        with (
            connection.cursor() as cursor,
            cursor.copy("COPY t (n) FROM STDIN", writer=_BoundedQueuedWriter(cursor)) as copy,
        ):
            for n in range(50_000):
                copy.write_row((n,))
        assert connection.execute("SELECT count(*), sum(n) FROM t").fetchone() == (
            50_000,
            sum(range(50_000)),
        )
