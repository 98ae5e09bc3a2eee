"""Streams one COPY from a source connection into a COPY on a target connection.

Rows travel in PostgreSQL's binary format (the source query casts every column to the
analytical type, so the bytes fit as they are): no row is ever decoded or held by Python (a
split looks at its first 6 bytes), so memory stays flat whatever the window size.
"""

import struct
from collections.abc import Generator, Iterable
from contextlib import closing
from queue import Queue
from typing import IO

import psycopg
from psycopg import sql
from psycopg.copy import QueuedLibpqWriter

# Rows are regrouped into chunks of this size on their way to the target, and at most
# PIPE_QUEUE_CHUNKS of them wait for the writer thread: memory stays bounded (~4 MB per pipe)
# when the source reads faster than the target writes.
PIPE_CHUNK_BYTES = 256 * 1024
PIPE_QUEUE_CHUNKS = 16


def pipe_copy(
    source: psycopg.Connection,
    copy_out: sql.Composed,
    params: dict[str, object],
    target: psycopg.Connection,
    copy_in: sql.Composed,
) -> int:
    """Stream a source `COPY ... TO STDOUT (FORMAT binary)` into a target `COPY ... FROM STDIN
    (FORMAT binary)`; return the rows written."""
    # closing(): if the target fails, end the source COPY now, before its transaction ends.
    with closing(_copy_out(source, copy_out, params)) as chunks:
        return _copy_in(target, copy_in, chunks)


def split_copy(
    source: psycopg.Connection,
    copy_out: sql.Composed,
    params: dict[str, object],
    target: psycopg.Connection,
    copy_in: sql.Composed,
    rejected: IO[bytes],
    kept_columns: int,
) -> tuple[int, int]:
    """Like pipe_copy, for a `copy_out` of a reject reason then `kept_columns` columns: rows
    without a reason go to `copy_in` (without that column), the others to `rejected` as a binary
    COPY stream of their own (header, rows, trailer) for a later COPY. Return (rows written,
    rows set aside).

    One source scan instead of one for the kept rows and one for the rejected: the second
    scan took ~0.5 s of a source backend's CPU per 1M posts from the cores the COPYs need.
    """
    split = _RejectedRows(rejected, kept_columns)
    with closing(_copy_out(source, copy_out, params, split)) as chunks:
        return _copy_in(target, copy_in, chunks), split.count


# PostgreSQL's binary COPY data: a 19-byte header (signature, flags, extension length 0) in
# front of the first row, then one message per row (its field count, then each field's length,
# -1 for NULL, and bytes), then a trailer (field count -1).
_BINARY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
_BINARY_HEADER = _BINARY_SIGNATURE + struct.pack("!ii", 0, 0)
_BINARY_TRAILER = struct.pack("!h", -1)


class _RejectedRows:
    """Rows whose first field (the reason) is not NULL, written to `sink` as COPY data."""

    def __init__(self, sink: IO[bytes], kept_columns: int) -> None:
        self.sink = sink
        self.count = 0
        self.kept_prefix = struct.pack("!hi", kept_columns + 1, -1)  # field count, NULL reason
        self.kept_fields = struct.pack("!h", kept_columns)

    def start(self, first_message: memoryview) -> memoryview:
        """Check the header of the first message, write it to the sink; return the rest."""
        header = bytes(first_message[: len(_BINARY_HEADER)])
        if header != _BINARY_HEADER:
            raise ValueError(f"unexpected binary COPY header from the source: {header!r}")
        self.sink.write(header)
        return first_message[len(_BINARY_HEADER) :]

    def take(self, row: memoryview) -> bytes:
        """Set a row with a reason aside, or pass the trailer on; return what the target gets."""
        if len(row) == len(_BINARY_TRAILER) and bytes(row) == _BINARY_TRAILER:
            self.sink.write(_BINARY_TRAILER)
            return _BINARY_TRAILER
        self.sink.write(row)
        self.count += 1
        return b""


def _copy_out(
    source: psycopg.Connection,
    statement: sql.Composed,
    params: dict[str, object],
    split: _RejectedRows | None = None,
) -> Generator[bytearray, None, None]:
    """The rows of a source COPY, regrouped into chunks of about PIPE_CHUNK_BYTES (with
    `split`, only those whose first field is NULL, without it).

    libpq hands over one row per read; writing whole chunks instead of rows, from a thread
    (see _copy_in), took 1M posts from 8.2 s to 4.4 s here.
    """
    with source.cursor() as reader, reader.copy(statement, params) as rows_out:
        chunk = bytearray()
        if split is None:
            for row in rows_out:
                chunk += row
                if len(chunk) >= PIPE_CHUNK_BYTES:
                    yield chunk  # handed over as it is: a new chunk is started, nothing copied
                    chunk = bytearray()
        else:
            kept_prefix, kept_fields = split.kept_prefix, split.kept_fields
            prefix_bytes = len(kept_prefix)
            rows = iter(rows_out)
            first = next(rows, None)
            if first is not None:
                chunk += _BINARY_HEADER
                rows = _prepend(split.start(memoryview(first)), rows)
            for row in rows:
                if row[:prefix_bytes] == kept_prefix:
                    chunk += kept_fields
                    chunk += row[prefix_bytes:]
                else:
                    chunk += split.take(memoryview(row))
                if len(chunk) >= PIPE_CHUNK_BYTES:
                    yield chunk
                    chunk = bytearray()
        if chunk:
            yield chunk


_Row = bytes | bytearray | memoryview


def _prepend(first: _Row, rest: Iterable[_Row]) -> Generator[_Row, None, None]:
    if first:
        yield first
    yield from rest


class _BoundedQueuedWriter(QueuedLibpqWriter):
    """psycopg's queued COPY writer, with a short queue instead of its default 1024 buffers."""

    def __init__(self, cursor: psycopg.Cursor) -> None:
        super().__init__(cursor)
        self._queue = Queue(maxsize=PIPE_QUEUE_CHUNKS)  # type: ignore[assignment]  # psycopg's alias


def _copy_in(target: psycopg.Connection, copy_in: sql.Composed, chunks: Iterable[bytearray]) -> int:
    """Write binary `chunks` through the `copy_in` statement; return the rows written."""
    with target.cursor() as writer:
        with writer.copy(copy_in, writer=_BoundedQueuedWriter(writer)) as rows_in:
            for chunk in chunks:
                rows_in.write(chunk)
        return writer.rowcount


def copy_in_from_file(target: psycopg.Connection, copy_in: sql.Composed, data: IO[bytes]) -> int:
    """Write the binary COPY data in `data` (from its position on) through `copy_in`; return
    the rows written."""
    return _copy_in(target, copy_in, iter(lambda: bytearray(data.read(PIPE_CHUNK_BYTES)), b""))


def copy_rows_in(
    target: psycopg.Connection, copy_in: sql.Composed, types: list[str], rows: Iterable[tuple]
) -> int:
    """Write Python `rows` of the given PostgreSQL `types` through a binary `copy_in`; return
    the rows written."""
    with target.cursor() as writer, writer.copy(copy_in) as rows_in:
        rows_in.set_types(types)
        for row in rows:
            rows_in.write_row(row)
    return writer.rowcount
