"""A run's connections to both databases, opened once and closed once."""

from contextlib import ExitStack
from types import TracebackType

import psycopg
from psycopg import sql

from so_pipeline.core_sql import server_encoding
from so_pipeline.post_rules import rule_params
from so_pipeline.posts_merge import PostsWriter
from so_pipeline.resources import PostgresResource


class RunConnections:
    """One source and one analytical connection for everything a step does.

    `source` plans windows, reads them (in a snapshot) and reads changes; `writer` owns the
    analytical connection: the write lock, every merge, and the reads for metadata and checks.
    Parallel COPY streams open pairs of their own (`open_stream_pair`). Each connection names
    the run in its application_name, so a run waiting for the write lock can say who holds it.
    """

    def __init__(
        self, source_db: PostgresResource, analytical_db: PostgresResource, run_id: str
    ) -> None:
        self._source_db = source_db
        self._analytical_db = analytical_db
        self.application_name = f"so_pipeline run {run_id[:8]}"
        self.source_location = source_db.location
        self._stack = ExitStack()

    def __enter__(self) -> "RunConnections":
        with ExitStack() as opening:
            self.source = opening.enter_context(self._source_db.connect(self.application_name))
            analytical = opening.enter_context(self._analytical_db.connect(self.application_name))
            self._stack = opening.pop_all()
        self.writer = PostsWriter(analytical)
        return self

    def __exit__(
        self,
        error_type: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.close()

    @property
    def analytical(self) -> psycopg.Connection:
        return self.writer.connection

    def reopen_source(self) -> None:
        """A new source connection in place of one the server ended (a read replica ends a
        session idle in a transaction that holds back its replay); both close with the run."""
        self.source = self._stack.enter_context(self._source_db.connect(self.application_name))

    def rules(self, require_owner: bool) -> dict[str, object]:
        """The rules' query parameters for the source's encoding."""
        return rule_params(require_owner, server_encoding(self.source))

    def open_stream_pair(
        self, connections: ExitStack, snapshot: str
    ) -> tuple[psycopg.Connection, psycopg.Connection]:
        """A (source, target) pair for one parallel stream, each in its own transaction.

        The source reads `snapshot` (the main source transaction's); the target's transaction
        stays open until the caller commits it. Both close with `connections`.
        """
        target = connections.enter_context(self._analytical_db.connect(self.application_name))
        source = connections.enter_context(self._source_db.connect(self.application_name))
        source.autocommit = target.autocommit = False
        start_snapshot_read(source)
        source.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        return source, target


def start_snapshot_read(source: psycopg.Connection) -> None:
    """Make the source's current transaction a read-only snapshot, without parallel query.

    Every source read of a window shares one snapshot, so kept + rejected is exactly the
    window. PostgreSQL expects few rows to pass the kept filter (it cannot see into the reject
    CASE) and plans a parallel scan whose workers hand every row to the leader through shared
    memory: 1.4 s of CPU per 1M posts for nothing, as the COPY is read by one client. Settings
    are local to the transaction, so they hold behind a pooler in transaction mode.
    """
    source.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    source.execute("SET LOCAL max_parallel_workers_per_gather = 0")
