"""Builds a source `posts` table from a Stack Exchange data dump's `Posts.xml`.

The XML is parsed as a stream (each row element is freed once written) and rows go to
PostgreSQL through COPY, committed every `commit_every` rows. Dumps list posts in ascending
id order, so a re-run resumes after the highest id already loaded.
"""

import gzip
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psycopg
from psycopg import sql

from so_pipeline.resources import PostgresResource
from so_pipeline.tooling.dump_archives import DumpError, open_dump

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


@dataclass(frozen=True)
class DumpLoad:
    rows_loaded: int
    rows_skipped: int
    resumed_after_id: int | None


@dataclass(frozen=True)
class DumpProgress:
    rows_loaded: int
    rows_skipped: int
    bytes_done: int
    total_bytes: int
    seconds: float

    def describe(self) -> str:
        """One line for a terminal: rows, MB, rates and the time left."""
        rate = self.rows_loaded / self.seconds if self.seconds else 0.0
        mb_per_second = self.bytes_done / 1e6 / self.seconds if self.seconds else 0.0
        eta = ""
        if self.bytes_done and self.total_bytes > self.bytes_done:
            left = self.seconds * (self.total_bytes - self.bytes_done) / self.bytes_done
            eta = f"  ETA {int(left) // 3600}:{int(left) % 3600 // 60:02d}:{int(left) % 60:02d}"
        skipped = f" ({self.rows_skipped:,} already present)" if self.rows_skipped else ""
        return (
            f"{self.rows_loaded:,} rows{skipped}  {self.bytes_done / 1e6:,.1f} of "
            f"{self.total_bytes / 1e6:,.1f} MB  {rate:,.0f} rows/s  {mb_per_second:,.1f} MB/s{eta}"
        )


def create_posts_table(connection: psycopg.Connection) -> None:
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(pg_type))
        for name, pg_type in DUMP_COLUMNS.values()
    )
    connection.execute(sql.SQL("CREATE TABLE IF NOT EXISTS posts ({})").format(columns))


def iter_rows(stream: IO[bytes], path: Path) -> Iterator[dict[str, str]]:
    """Yield each `<row>`'s attributes, freeing parsed elements as it goes."""
    parser = ET.iterparse(stream, events=("start", "end"))
    try:
        _, root = next(parser)
        if root.tag != "posts":
            raise DumpError(
                f"{path}: not a posts dump (root element <{root.tag}>, expected <posts>)"
            )
        for event, element in parser:
            if event == "end" and element.tag == "row":
                if "Id" not in element.attrib:
                    raise DumpError(f"{path}: a <row> without an Id attribute")
                yield element.attrib
                root.clear()
    except ET.ParseError as error:
        line, column = error.position
        raise DumpError(f"{path}: malformed XML at line {line}, column {column}: {error}") from None
    except (EOFError, gzip.BadGzipFile) as error:
        raise DumpError(f"{path}: truncated or corrupt archive: {error}") from None
    except OSError as error:
        raise DumpError(f"{path}: cannot read: {error}") from None


def load_dump(
    path: Path,
    database: PostgresResource,
    commit_every: int = 50_000,
    on_progress: Callable[[DumpProgress], None] | None = None,
) -> DumpLoad:
    """Load the dump at `path` into `posts`, resuming after the highest id already there."""
    column_names = [name for name, _ in DUMP_COLUMNS.values()]
    attributes = list(DUMP_COLUMNS)
    copy_sql = sql.SQL("COPY posts ({}) FROM STDIN").format(
        sql.SQL(", ").join(map(sql.Identifier, column_names))
    )
    loaded = skipped = 0
    started = time.monotonic()
    with database.connect() as connection, open_dump(path) as dump:
        create_posts_table(connection)
        resume_after = connection.execute("SELECT max(id) FROM posts").fetchone()[0]  # type: ignore[index]
        rows = iter_rows(dump.stream, path)
        batch_full = True
        while batch_full:
            batch_full = False
            with connection.transaction(), connection.cursor().copy(copy_sql) as copy:
                for attrib in rows:
                    if resume_after is not None and int(attrib["Id"]) <= resume_after:
                        skipped += 1
                        continue
                    copy.write_row([attrib.get(name) for name in attributes])
                    loaded += 1
                    if loaded % commit_every == 0:
                        batch_full = True
                        break
            if on_progress:
                seconds = time.monotonic() - started
                done = dump.total_bytes if not batch_full else dump.bytes_done()
                on_progress(DumpProgress(loaded, skipped, done, dump.total_bytes, seconds))
    return DumpLoad(loaded, skipped, resume_after)
