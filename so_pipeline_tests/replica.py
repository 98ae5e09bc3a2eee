"""Test helpers for a read replica: a PostgreSQL primary and a hot standby streaming from it,
made with `pg_basebackup` (Debian's binaries, as tls.py starts them).

The standby cancels a read after `max_standby_streaming_delay` when WAL replay needs rows the
read still sees, and `hot_standby_feedback` is off, so the primary's VACUUM removes them: the
recovery conflicts of an RDS read replica, within a second.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg
import pytest

from so_pipeline.tooling.embedded import LocalServer
from so_pipeline_tests.tls import postgres_bin_dir


def _server_user() -> str | None:
    """The system user to run PostgreSQL as: none (this one) unless root, which it refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    pytest.skip("running as root without a postgres or nobody user to run PostgreSQL as")


class DebianPostgres(LocalServer):
    """One PostgreSQL server on 127.0.0.1:`port`, its data in `data_dir` (trust for local TCP)."""

    def __init__(self, directory: Path, name: str, port: int) -> None:
        self.bin_dir = postgres_bin_dir()
        self.user = _server_user()
        self.port = port
        self.data_dir = directory / name
        self.log = directory / f"{name}.log"

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def run(self, program: str, *args: str) -> None:
        completed = subprocess.run(
            [str(self.bin_dir / program), *args],
            user=self.user,
            cwd="/",
            capture_output=True,
            text=True,
            timeout=300,
        )
        if completed.returncode:
            log = self.log.read_text() if self.log.exists() else ""
            raise AssertionError(f"{program} failed: {completed.stderr}{completed.stdout}{log}")

    def configure(self, settings: str) -> None:
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(settings)

    def start(self) -> None:
        self.run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log), "-w", "start")

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data_dir), "-m", "immediate", "-w", "stop")


class StreamingReplica:
    """A primary on `primary_port` and a hot standby on `standby_port` streaming from it.

    `create_database` and `drop_database` act on the primary (the standby follows). Run as the
    `postgres` system user when the tests run as root; `stop` stops both and deletes them.
    """

    def __init__(self, primary_port: int, standby_port: int, standby_delay: str = "1s") -> None:
        # Its own directory right under /tmp: the server's system user cannot reach pytest's
        # 0700 basetemp.
        self.directory = Path(tempfile.mkdtemp(prefix="so_pipeline_replica_"))
        self.primary = DebianPostgres(self.directory, "primary", primary_port)
        self.standby = DebianPostgres(self.directory, "standby", standby_port)
        if self.primary.user is not None:
            entry = pwd.getpwnam(self.primary.user)
            os.chown(self.directory, entry.pw_uid, entry.pw_gid)
        self.primary.run(
            "initdb", "-D", str(self.primary.data_dir), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--no-sync",
        )  # fmt: skip
        (self.primary.data_dir / "pg_hba.conf").write_text(
            "host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n"
        )
        self.primary.configure(
            f"listen_addresses = '127.0.0.1'\nport = {primary_port}\n"
            "unix_socket_directories = ''\nfsync = off\nwal_level = replica\n"
            "max_wal_senders = 4\nwal_keep_size = '1GB'\n"
            # A vacuum run by the test must remove what it can at once.
            "autovacuum = off\n"
        )
        self.primary.start()
        try:
            self.standby.run(
                "pg_basebackup", "-h", "127.0.0.1", "-p", str(primary_port), "-U", "postgres",
                "-D", str(self.standby.data_dir), "--write-recovery-conf", "--wal-method=stream",
                "--checkpoint=fast", "--no-sync",
            )  # fmt: skip
            self.standby.configure(
                f"port = {standby_port}\nhot_standby = on\nhot_standby_feedback = off\n"
                f"max_standby_streaming_delay = '{standby_delay}'\n"
                f"max_standby_archive_delay = '{standby_delay}'\n"
            )
            self.standby.start()
        except BaseException:
            self.stop()
            raise

    def create_database(self, name: str) -> None:
        self.primary.create_database(name)
        self.wait_for_standby()

    def drop_database(self, name: str) -> None:
        self.primary.drop_database(name)

    def wait_for_standby(self, timeout: float = 60) -> None:
        """Until the standby has replayed everything the primary has written so far."""
        with psycopg.connect(self.primary.url("postgres"), autocommit=True) as primary:
            (target,) = primary.execute("SELECT pg_current_wal_lsn()::text").fetchone()  # type: ignore[misc]
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.standby.url("postgres"), autocommit=True) as standby:
            while True:
                (done,) = standby.execute(  # type: ignore[misc]
                    "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", [target]
                ).fetchone()
                if done:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"the standby did not replay up to {target}")
                time.sleep(0.05)

    def conflicts(self, database: str) -> int:
        """Queries the standby cancelled in `database` for recovery conflicts, so far."""
        with psycopg.connect(self.standby.url("postgres"), autocommit=True) as standby:
            standby.execute("SELECT pg_stat_clear_snapshot()")
            (count,) = standby.execute(  # type: ignore[misc]
                "SELECT confl_tablespace + confl_lock + confl_snapshot + confl_bufferpin "
                "+ confl_deadlock FROM pg_stat_database_conflicts WHERE datname = %s",
                [database],
            ).fetchone()
        return int(count)

    def stop(self) -> None:
        for server in (self.standby, self.primary):
            if (server.data_dir / "postmaster.pid").exists():
                server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
