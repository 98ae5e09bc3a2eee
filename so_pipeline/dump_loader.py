"""Builds a source `posts` table from a Stack Exchange data dump's `Posts.xml`.

The XML is parsed as a stream (each row element is freed once written) and rows go to
PostgreSQL through COPY, committed every `commit_every` rows. Dumps list posts in ascending
id order, so a re-run resumes after the highest id already loaded.
"""

import gzip
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import psycopg
from psycopg import sql

from so_pipeline.resources import PostgresResource

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


class DumpError(Exception):
    """The file is not a readable posts dump; the message names the file and position."""


@dataclass(frozen=True)
class DumpLoad:
    rows_loaded: int
    rows_skipped: int
    resumed_after_id: int | None


def create_posts_table(connection: psycopg.Connection) -> None:
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(pg_type))
        for name, pg_type in DUMP_COLUMNS.values()
    )
    connection.execute(sql.SQL("CREATE TABLE IF NOT EXISTS posts ({})").format(columns))


@contextmanager
def open_dump(path: Path) -> Iterator[IO[bytes]]:
    """Open `Posts.xml` or `Posts.xml.gz` as bytes."""
    opener: Callable[[Path], IO[bytes]] = gzip.open if path.suffix == ".gz" else open  # type: ignore[assignment]
    try:
        stream = opener(path, "rb")  # type: ignore[call-arg]
    except OSError as error:
        raise DumpError(f"{path}: cannot open: {error.strerror or error}") from None
    with stream:
        yield stream


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


def load_dump(
    path: Path,
    database: PostgresResource,
    commit_every: int = 50_000,
    on_progress: Callable[[int], None] | None = None,
) -> DumpLoad:
    """Load the dump at `path` into `posts`, resuming after the highest id already there."""
    column_names = [name for name, _ in DUMP_COLUMNS.values()]
    attributes = list(DUMP_COLUMNS)
    copy_sql = sql.SQL("COPY posts ({}) FROM STDIN").format(
        sql.SQL(", ").join(map(sql.Identifier, column_names))
    )
    loaded = skipped = 0
    with database.connect() as connection, open_dump(path) as stream:
        create_posts_table(connection)
        resume_after = connection.execute("SELECT max(id) FROM posts").fetchone()[0]  # type: ignore[index]
        rows = iter_rows(stream, path)
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
                on_progress(loaded)
    return DumpLoad(loaded, skipped, resume_after)
