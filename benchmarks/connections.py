"""How many connections the webserver, the daemon and a run open on each database.

    python -m benchmarks.connections [--rows 120000] [--idle-seconds 60] [--pool-overflow 20]

One PostgreSQL 15 (Debian's, on loopback, started here) holds the three databases, so one
view sees them all: Dagster's storage (`dagster`), the source (`so_source`) and the analytical
database (`so_analytical`). Each phase runs the real process as deploy/ runs it:
`dagster-webserver` (idle, then 16 clients asking what the UI asks at once), `dagster-daemon`
idle, then a tick of the job and a catch-up run with copy_streams=2 that the daemon launches.

Two measures per database and phase: connections opened (exact: the server logs each one,
log_connections) and the most open at once (pg_stat_activity sampled every 10 ms). The most
open at once is what max_connections must hold.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import psycopg
import yaml

from so_pipeline_tests.helpers import (
    BIN,
    REPO_ROOT,
    background,
    free_port,
    generate_source_posts,
    stop_schedule,
    wait_for,
    wait_for_webserver,
)
from so_pipeline_tests.pooler import LoopbackPostgres

DATABASES = ("dagster", "so_source", "so_analytical")
_AUTHORIZED = re.compile(
    r"connection authorized: user=\S+ database=(\S+)(?: application_name=(.*))?$", re.MULTILINE
)
RUN_PREFIX = "so_pipeline run "  # the application_name of a run's connections (run_connections)
UI_QUERY = """
{ runsOrError { ... on Runs { results { runId status } } }
  assetNodes { assetKey { path } }
  instance { daemonHealth { allDaemonStatuses { daemonType healthy } } } }
"""


class Sampler:
    """Samples pg_stat_activity every 10 ms: the most client backends open at once per
    database since the last `take`."""

    def __init__(self, url: str) -> None:
        self._connection = psycopg.connect(url, autocommit=True)
        self._peak: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        query = (
            "SELECT datname, count(*) FROM pg_stat_activity WHERE backend_type = "
            "'client backend' AND pid <> pg_backend_pid() AND datname IS NOT NULL GROUP BY 1"
        )
        while not self._stop.is_set():
            counts: dict[str, int] = dict(self._connection.execute(query).fetchall())
            with self._lock:
                for name, count in counts.items():
                    self._peak[name] = max(self._peak[name], count)
            time.sleep(0.01)

    def take(self) -> Counter[str]:
        with self._lock:
            peak, self._peak = self._peak, Counter()
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._connection.close()


class Measure:
    """Connections opened (from the server log) and the most open at once, per phase."""

    def __init__(self, server: LoopbackPostgres) -> None:
        self.log = server.log
        self.sampler = Sampler(server.url("postgres"))
        self.results: list[tuple[str, float, Counter[str], Counter[str]]] = []

    def _opened_since(self, offset: int) -> Counter[str]:
        with self.log.open("rb") as log:
            log.seek(offset)
            text = log.read().decode(errors="replace")
        opened: Counter[str] = Counter()
        for match in _AUTHORIZED.finditer(text):
            opened[match[1]] += 1
            if (match[2] or "").startswith(RUN_PREFIX):
                opened[f"{match[1]} by runs"] += 1
        return opened

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        time.sleep(0.1)  # connections of the step before are logged
        offset = self.log.stat().st_size
        self.sampler.take()
        started = time.monotonic()
        yield
        seconds = time.monotonic() - started
        time.sleep(0.1)
        self.results.append((name, seconds, self._opened_since(offset), self.sampler.take()))

    def report(self) -> str:
        lines = [
            f"{'phase':58} {'s':>5}  " + "  ".join(f"{d:>24}" for d in DATABASES),
            f"{'':58} {'':>5}  " + "  ".join(f"{'opened (runs) / at once':>24}" for _ in DATABASES),
        ]
        for name, seconds, opened, peak in self.results:
            cells = "  ".join(
                f"{opened[d]:>9} ({opened[d + ' by runs']:>3}) / {peak[d]:>6}" for d in DATABASES
            )
            lines.append(f"{name:58} {seconds:5.0f}  {cells}")
        return "\n".join(lines)


def _graphql(url: str) -> bool:
    request = urllib.request.Request(
        f"{url}/graphql",
        data=json.dumps({"query": UI_QUERY}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return "errors" not in json.loads(response.read())


def _runs_done(count: int) -> Callable[[], bool]:
    import dagster as dg

    def done() -> bool:
        with dg.DagsterInstance.get() as instance:
            finished = [
                run
                for run in instance.get_runs()
                if run.status in (dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE)
            ]
        if any(run.status == dg.DagsterRunStatus.FAILURE for run in finished):
            raise AssertionError("a run failed")
        return len(finished) >= count

    return done


def _launch(env: dict[str, str], config: Path | None = None) -> None:
    command = [str(BIN / "dagster"), "job", "launch", "-m", "so_pipeline"]
    command += ["-j", "stackoverflow_posts_job"] + (["-c", str(config)] if config else [])
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True, capture_output=True, timeout=300)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=120_000, help="source posts")
    parser.add_argument("--idle-seconds", type=int, default=60)
    parser.add_argument("--ui-clients", type=int, default=16, help="UI clients at once")
    parser.add_argument(
        "--pool-overflow", type=int, default=20, help="dagster-webserver --db-pool-max-overflow"
    )
    args = parser.parse_args()
    server = LoopbackPostgres(free_port())
    home = Path(tempfile.mkdtemp(prefix="so_bench_connections_"))
    measure: Measure | None = None
    try:
        server.execute("postgres", "ALTER SYSTEM SET log_connections = on")
        server.execute("postgres", "SELECT pg_reload_conf()")
        for name in DATABASES:
            server.create_database(name)
        (home / "dagster_home").mkdir()
        shutil.copyfile(REPO_ROOT / "dagster.yaml", home / "dagster_home" / "dagster.yaml")
        env = {
            **os.environ,
            "DAGSTER_HOME": str(home / "dagster_home"),
            "DAGSTER_PG_URL": server.url("dagster", "postgresql+psycopg2"),
            "SO_SOURCE_DATABASE_URL": server.url("so_source"),
            "SO_ANALYTICAL_DATABASE_URL": server.url("so_analytical"),
        }
        os.environ.update(env)
        generate_source_posts(server.url("so_source"), 1_000)
        stop_schedule(env)  # also creates Dagster's tables
        measure = Measure(server)

        port = free_port()
        webserver = [str(BIN / "dagster-webserver"), "-w", "workspace.yaml", "-h", "127.0.0.1"]
        webserver += ["-p", str(port), "--db-pool-max-overflow", str(args.pool_overflow)]
        url = f"http://127.0.0.1:{port}"
        with background(webserver, home / "webserver.log", env) as process:
            with measure.phase("webserver: start, then idle 20 s"):
                wait_for_webserver(url, process)
                time.sleep(20)
            clients = ThreadPoolExecutor(args.ui_clients)
            busy = f"webserver: {args.ui_clients} UI clients x 10 requests at once"
            with measure.phase(busy), clients:
                requests = range(args.ui_clients)
                answers = clients.map(lambda _: [_graphql(url) for _ in range(10)], requests)
                assert all(all(client) for client in answers), "a GraphQL error"
            with measure.phase("webserver: idle 20 s after"):
                time.sleep(20)

        daemon = [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"]
        with background(daemon, home / "daemon.log", env):
            with measure.phase(f"daemon: start, then idle {args.idle_seconds} s"):
                time.sleep(args.idle_seconds)
            with measure.phase("daemon + one tick (1,000 posts, default config)"):
                _launch(env)
                wait_for(_runs_done(1), "the tick")
            with psycopg.connect(server.url("so_source"), autocommit=True) as connection:
                connection.execute(
                    "INSERT INTO posts (id, title, body, owner_user_id, creation_date) "
                    "SELECT g, 't', '<p>x</p>', g, timestamp '2020-01-01' FROM "
                    "generate_series(1001, %s) g",
                    [1_000 + args.rows],
                )
            config = home / "catch-up.yaml"
            filtered = {"config": {"copy_streams": 2}}
            batch = {"config": {"batch_size": args.rows}}
            ops = {"source_posts_batch": batch, "filtered_posts": filtered}
            config.write_text(yaml.safe_dump({"ops": ops}))
            with measure.phase(f"daemon + catch-up run ({args.rows:,} posts, copy_streams=2)"):
                _launch(env, config)
                wait_for(_runs_done(2), "the catch-up run")
        print(measure.report())
    finally:
        if measure is not None:
            measure.sampler.close()
        server.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
