"""Builds a source `posts` table from a Stack Exchange data dump's `Posts.xml`.

Three threads keep both cores busy: one reads (and decompresses) the dump, this one parses
it with lxml and formats COPY text, and one writes that text to PostgreSQL, whose COPY
backend is the other busy process. The queues between them are bounded in bytes, so memory
is flat at any file size. Rows are committed every `commit_every` rows; dumps list posts in
ascending id order, so a re-run resumes after the highest id already loaded.
"""

import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Protocol

import psycopg
import sqlalchemy as sa
from lxml import etree  # type: ignore[import-untyped]
from psycopg import sql
from psycopg.conninfo import make_conninfo

from so_pipeline.database_url import (
    InvalidDatabaseURL,
    describe_location,
    libpq_conninfo,
    parse_url,
    scrub,
)
from so_pipeline.session import SESSION_SETTINGS
from so_pipeline.tooling.dump_archives import (
    ByteQueue,
    DumpError,
    DumpReader,
    QueueClosed,
    open_dump,
)

# Dump attribute -> (column, PostgreSQL type). Values are passed to COPY as the dump's text.
DUMP_COLUMNS: dict[str, tuple[str, str]] = {
    "Id": ("id", "bigint PRIMARY KEY"),
    "PostTypeId": ("post_type_id", "smallint"),
    "ParentId": ("parent_id", "bigint"),
    "AcceptedAnswerId": ("accepted_answer_id", "bigint"),
    "Title": ("title", "text"),
    "Body": ("body", "text"),
    "Tags": ("tags", "text"),
    "OwnerUserId": ("owner_user_id", "bigint"),
    "OwnerDisplayName": ("owner_display_name", "text"),
    "CreationDate": ("creation_date", "timestamp"),
    "Score": ("score", "integer"),
    "ViewCount": ("view_count", "integer"),
    "AnswerCount": ("answer_count", "integer"),
    "CommentCount": ("comment_count", "integer"),
    "FavoriteCount": ("favorite_count", "integer"),
    "LastEditorUserId": ("last_editor_user_id", "bigint"),
    "LastEditorDisplayName": ("last_editor_display_name", "text"),
    "LastEditDate": ("last_edit_date", "timestamp"),
    "LastActivityDate": ("last_activity_date", "timestamp"),
    "ClosedDate": ("closed_date", "timestamp"),
    "CommunityOwnedDate": ("community_owned_date", "timestamp"),
    "ContentLicense": ("content_license", "text"),
}


ATTRIBUTES = list(DUMP_COLUMNS)
COPY_SQL = sql.SQL("COPY posts ({}) FROM STDIN").format(
    sql.SQL(", ").join(sql.Identifier(column) for column, _ in DUMP_COLUMNS.values())
)
# COPY text queued for the writer thread: a few MB keeps the server fed through a commit.
COPY_AHEAD_BYTES = 4 * 1024 * 1024
# A resume parses every row already loaded before it reaches new ones: say so this often.
SKIP_REPORT_SECONDS = 2.0
# In a row's line and a block of rows: a field separator, NULL and a row end that cannot
# occur in XML 1.0 (not even as character references), so escaping is a few replace calls.
_FIELD, _NULL, _ROW_END = "\x00", "\x01", b"\x02"
_NULLS = [_NULL] * len(ATTRIBUTES)
# On the encoded block: bytes.replace of one byte is a memchr, about twice as fast as on str.
_COPY_TEXT_ESCAPES = [
    (b"\\", b"\\\\"),
    (b"\n", b"\\n"),
    (b"\r", b"\\r"),
    (b"\t", b"\\t"),
    (_FIELD.encode(), b"\t"),
    (_ROW_END, b"\n"),
    (_NULL.encode(), b"\\N"),
]
_LXML_POSITION = re.compile(r", line \d+, column \d+$")


class Database(Protocol):
    """Where the posts go: `connect()` yields a connection in autocommit mode.

    `so_pipeline.resources.PostgresResource` is one; `DatabaseURL` is the command line's.
    """

    def connect(self) -> AbstractContextManager[psycopg.Connection]: ...


@dataclass(frozen=True)
class DatabaseURL:
    """A database named by a libpq URL (or `postgresql+psycopg://`), reached without Dagster.

    Importing Dagster (for PostgresResource) costs the command line about half a second and
    60 MB before the first byte is read. The session speaks UTF-8 in ISO dates and UTC as the
    resource's does; errors are one-line DumpErrors naming the host, never the password.
    """

    url: str
    name: str = "source_db"

    def parsed(self) -> sa.URL:
        """The URL, parsed as the resource parses it; DumpError if it is not a PostgreSQL URL."""
        try:
            return parse_url(self.url, self.name)
        except InvalidDatabaseURL as error:
            raise DumpError(str(error)) from None

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        url = self.parsed()
        location = describe_location(url)

        def failure(what: str, error: psycopg.Error) -> DumpError:
            reason = scrub(str(error), url.password)
            return DumpError(f"{self.name}: {what} PostgreSQL at {location}: {reason}")

        try:
            conninfo = make_conninfo(libpq_conninfo(url), connect_timeout="10", **SESSION_SETTINGS)
            connection = psycopg.connect(conninfo, autocommit=True)
        except psycopg.Error as error:
            raise failure("cannot connect to", error) from None
        try:
            yield connection
        except psycopg.Error as error:
            raise failure("failed on", error) from None
        finally:
            connection.close()


@dataclass(frozen=True)
class DumpLoad:
    rows_loaded: int
    rows_skipped: int
    resumed_after_id: int | None


@dataclass(frozen=True)
class DumpProgress:
    rows_loaded: int
    rows_skipped: int
    bytes_done: int  # of XML, whatever the file's compression
    total_bytes: int  # of XML; estimated for .gz until the end
    seconds: float
    skipping_after_id: int | None = None  # set while a resume skips rows already loaded

    def describe(self) -> str:
        """One line for a terminal: rows, MB of XML, rates and the time left."""
        rate = self.rows_loaded / self.seconds if self.seconds else 0.0
        mb_per_second = self.bytes_done / 1e6 / self.seconds if self.seconds else 0.0
        eta = ""
        if self.bytes_done and self.total_bytes > self.bytes_done:
            left = self.seconds * (self.total_bytes - self.bytes_done) / self.bytes_done
            eta = f"  ETA {int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d}"
        xml = f"{self.bytes_done / 1e6:,.1f} of {self.total_bytes / 1e6:,.1f} MB of XML"
        if self.skipping_after_id is not None:
            return (
                f"skipping rows already loaded (ids up to {self.skipping_after_id}): "
                f"{self.rows_skipped:,} rows  {xml}  {mb_per_second:,.1f} MB/s{eta}"
            )
        skipped = f" ({self.rows_skipped:,} already present)" if self.rows_skipped else ""
        return (
            f"{self.rows_loaded:,} rows{skipped}  {xml}  {rate:,.0f} rows/s  "
            f"{mb_per_second:,.1f} MB/s{eta}"
        )


def create_posts_table(connection: psycopg.Connection) -> None:
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(pg_type))
        for name, pg_type in DUMP_COLUMNS.values()
    )
    connection.execute(sql.SQL("CREATE TABLE IF NOT EXISTS posts ({})").format(columns))


class DumpInterrupted(DumpError):
    """Ctrl-C during a load; the message says where, and what stays committed."""


class _RowTarget:
    """lxml parser target collecting each new `<row>` as one line of fields.

    A target sees attributes as a plain dict and builds no tree: about half the time of
    iterparse, and nothing to free.
    """

    def __init__(self, resume_after: int | None) -> None:
        self.resume_after = resume_after
        self.lines: list[str] = []
        self.skipped = 0
        self._root_seen = False

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if tag == "row":
            line = _FIELD.join(map(attrib.get, ATTRIBUTES, _NULLS))
            if line[0] == _NULL:  # Id comes first
                raise DumpError("a <row> without an Id attribute")
            if self.resume_after is not None and int(attrib["Id"]) <= self.resume_after:
                self.skipped += 1
                return
            self.lines.append(line)
        elif not self._root_seen and tag != "posts":
            raise DumpError(f"not a posts dump (root element <{tag}>, expected <posts>)")
        self._root_seen = True

    def close(self) -> None:
        """Required of a parser target; the rows were taken as they came."""


def copy_text(lines: list[str]) -> bytes:
    """COPY text format for rows whose fields are joined by _FIELD and NULLs are _NULL.

    Each line is encoded alone: one row with a non-ASCII character would otherwise widen the
    whole joined block to 2 or 4 bytes a character, and encoding that back is twice the work.
    """
    block = _ROW_END.join(map(str.encode, lines)) + _ROW_END
    for character, escaped in _COPY_TEXT_ESCAPES:
        block = block.replace(character, escaped)
    return block


@dataclass(frozen=True)
class _Commit:
    """Marks the end of a transaction in the COPY queue, with the progress it stands for."""

    rows_loaded: int
    rows_skipped: int
    bytes_done: int
    last_id: str | None  # of the rows committed so far in this load


class _Stop(Exception):
    """Queued after a failure: roll back the rows after the last `_Commit` queued before it."""


class _CopyWriter:
    """Writes queued COPY text on its own thread, one transaction per `_Commit` marker.

    The parsing thread never waits for the server while the queue has room, and the server
    never waits for parsing while it has text queued.
    """

    def __init__(self, connection: psycopg.Connection) -> None:
        self.queue: ByteQueue[bytes | _Commit | _Stop] = ByteQueue(COPY_AHEAD_BYTES)
        self.committed: SimpleQueue[_Commit] = SimpleQueue()
        self.last_committed: _Commit | None = None
        self.error: BaseException | None = None
        self._connection = connection
        self._thread = threading.Thread(target=self._run, daemon=True, name="COPY writer")
        self._thread.start()

    def _run(self) -> None:
        try:
            while self._transaction():
                pass
        except _Stop:
            pass
        except BaseException as error:  # handed to the parsing thread, which raises it
            self.error = error
            self.queue.close()

    def _transaction(self) -> bool:
        """Copy up to the next marker and commit; False once the queue has finished."""
        item = self.queue.get()
        if item is None or isinstance(item, _Stop):
            return False
        with self._connection.transaction(), self._connection.cursor().copy(COPY_SQL) as copy:
            while not isinstance(item, _Commit):
                if item is None:
                    raise RuntimeError("the COPY queue finished inside a transaction")
                if isinstance(item, _Stop):
                    raise item
                copy.write(item)
                item = self.queue.get()
        self.last_committed = item
        self.committed.put(item)
        return True

    def stop(self, error: BaseException | None) -> None:
        """Finish and wait for the thread; after `error`, commit only up to the last marker.

        What is queued is at most COPY_AHEAD_BYTES, a fraction of a second of COPY, so even
        Ctrl-C keeps every batch the parser had completed.
        """
        try:
            if error is None:
                self.queue.finish()
            else:
                self.queue.put(_Stop(), 0)
        except QueueClosed:
            pass  # the writer has failed, and self.error says why
        self._thread.join(timeout=None if error is None else 5)
        if self._thread.is_alive():  # stuck on the server: abandon the transaction
            self.queue.fail(_Stop())
            self._thread.join(timeout=5)
        if self.error is not None and error is None:
            raise self.error


class _Position:
    """1-based line and column just after the XML fed to the parser so far."""

    def __init__(self) -> None:
        self.line = 1
        self.column = 1

    def advance(self, chunk: bytes) -> None:
        newlines = chunk.count(b"\n")
        if newlines:
            self.line += newlines
            self.column = len(chunk) - chunk.rfind(b"\n")
        else:
            self.column += len(chunk)


def load_dump(
    path: Path,
    database: Database,
    commit_every: int = 50_000,
    on_progress: Callable[[DumpProgress], None] | None = None,
) -> DumpLoad:
    """Load the dump at `path` into `posts`, resuming after the highest id already there.

    Errors and Ctrl-C raise DumpError (DumpInterrupted) with one line naming the file, the
    position and what stays committed, after rolling back only the open transaction.
    """
    with database.connect() as connection:
        create_posts_table(connection)
        resume_after = connection.execute("SELECT max(id) FROM posts").fetchone()[0]  # type: ignore[index]
        with open_dump(path) as dump:
            load = _Load(dump, resume_after, commit_every, on_progress)
            writer = _CopyWriter(connection)
            try:
                load.run(writer)
            except BaseException as error:
                if not isinstance(error, KeyboardInterrupt | QueueClosed):
                    with suppress(QueueClosed):
                        load.queue_parsed_rows(writer)  # rows before a bad one are good
                writer.stop(error)
                raise load.stopped(error, writer) from None
            try:
                writer.stop(None)
            except BaseException as error:
                writer.stop(error)
                raise load.stopped(error, writer) from None
            load.report(writer)
    return DumpLoad(load.rows_loaded, load.target.skipped, resume_after)


class _Load:
    """The parsing side of one load: feeds lxml, batches rows into transactions."""

    def __init__(
        self,
        dump: DumpReader,
        resume_after: int | None,
        commit_every: int,
        on_progress: Callable[[DumpProgress], None] | None,
    ) -> None:
        self.dump = dump
        self.resume_after = resume_after
        self.commit_every = commit_every
        self.on_progress = on_progress
        self.target = _RowTarget(resume_after)
        self.position = _Position()
        self.rows_loaded = 0
        self.started = time.monotonic()
        self._in_batch = 0
        self._last_id: str | None = None
        self._last_skip_report = self.started

    def run(self, writer: _CopyWriter) -> None:
        parser = etree.XMLParser(target=self.target, huge_tree=True)
        while chunk := self.dump.read():
            parser.feed(chunk)
            self.position.advance(chunk)
            self.queue_parsed_rows(writer)
            self.report(writer)
        parser.close()
        self.queue_parsed_rows(writer)
        writer.queue.put(self._commit(self._last_id, final=True), 0)

    def queue_parsed_rows(self, writer: _CopyWriter) -> None:
        """Queue the rows parsed so far as COPY text, with a marker every commit_every rows."""
        lines = self.target.lines
        start = 0
        while start < len(lines):
            end = min(len(lines), start + self.commit_every - self._in_batch)
            text = copy_text(lines[start:end])
            writer.queue.put(text, len(text))
            self._in_batch += end - start
            self.rows_loaded += end - start
            self._last_id = lines[end - 1].partition(_FIELD)[0]
            if self._in_batch == self.commit_every:
                writer.queue.put(self._commit(self._last_id), 0)
                self._in_batch = 0
            start = end
        lines.clear()

    def _commit(self, last_id: str | None, final: bool = False) -> _Commit:
        """A marker; the final one counts the whole dump as done."""
        done = self.dump.total_bytes if final else self.dump.xml_bytes
        return _Commit(self.rows_loaded, self.target.skipped, done, last_id)

    def report(self, writer: _CopyWriter) -> None:
        """Progress for each commit the writer has made, and every few seconds of skipping."""
        if self.on_progress is None:
            return
        now = time.monotonic()
        while not writer.committed.empty():
            commit = writer.committed.get()
            self.on_progress(
                DumpProgress(
                    commit.rows_loaded,
                    commit.rows_skipped,
                    commit.bytes_done,
                    max(self.dump.total_bytes, commit.bytes_done),
                    now - self.started,
                )
            )
        skipping = not self.rows_loaded and self.target.skipped
        if skipping and now - self._last_skip_report >= SKIP_REPORT_SECONDS:
            self._last_skip_report = now
            self.on_progress(
                DumpProgress(
                    0,
                    self.target.skipped,
                    self.dump.xml_bytes,
                    self.dump.total_bytes,
                    now - self.started,
                    skipping_after_id=self.resume_after,
                )
            )

    def stopped(self, error: BaseException, writer: _CopyWriter) -> BaseException:
        """The one-line error for a load stopped by `error`: where, and what is committed."""
        where = f"line {self.position.line}, column {self.position.column}"
        if isinstance(error, etree.XMLSyntaxError):
            line, column = error.position
            reason = _LXML_POSITION.sub("", error.msg or "")
            what = f"malformed XML at line {line}, column {column}: {reason}"
        elif isinstance(error, KeyboardInterrupt):
            what = f"interrupted at {where}"
        elif isinstance(error, DumpError):
            what = f"{error} (at {where})"
        elif isinstance(error, psycopg.Error) or writer.error is not None:
            return writer.error or error  # the resource names the database
        else:
            what = f"stopped at {where}: {error!r}"
        committed = writer.last_committed
        if committed is None or committed.last_id is None:
            kept = (
                f"rows up to id {self.resume_after} stay as they were"
                if self.resume_after is not None
                else "nothing was committed"
            )
        else:
            kept = (
                f"{committed.rows_loaded:,} rows up to id {committed.last_id} are committed; "
                "run again to resume after them"
            )
        kind = DumpInterrupted if isinstance(error, KeyboardInterrupt) else DumpError
        return kind(f"{self.dump.path}: {what}; {kept}")
