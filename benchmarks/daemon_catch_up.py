"""Unattended catch-up through the daemon, against two parallel binary COPY pipes, in one run.

    python -m benchmarks.daemon_catch_up [--rows 3000000] [--rounds 2]

On the throughput benchmark's server (its --data-dir), with a synthetic source of --rows posts
(a database of its own, generated once and reused), each round
1. times two binary `psql` COPY pipes over the id halves of the source into an empty table
   (the limit of this hardware for a COPY-to-COPY copy);
2. starts `dagster-daemon run -m so_pipeline` on a fresh instance (PostgreSQL storage, the
   shipped dagster.yaml) and an empty analytical database, and waits, touching nothing, until
   the latest `filtered_posts` materialization's cursor reaches the source's max id: the
   catch-up sensor requests the runs, the run queue launches them.
It prints, per round and as medians, the time from the daemon's start to that cursor, the
rows/s, the ratio to the pipes, where the time went (until the first run started, inside
runs, between runs), the runs and windows it took, and the peak RSS of the run processes and of
the daemon's whole process tree. Then a projection for 55,000,000 posts from those figures.
"""

import argparse
import math
import os
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import psycopg

from benchmarks.throughput import (
    BIN,
    Bench,
    add_postgres_bin_argument,
    bench_on_server,
    ensure_source,
    expected_fingerprint,
    high_water_mark,
    loaded_fingerprint,
    max_id,
    processed_max_id,
    server_has_lz4,
)
from so_pipeline.jobs import CATCH_UP_RUN_SECONDS

FULL_TABLE_POSTS = 55_000_000
CATCH_UP_TIMEOUT_SECONDS = 3600


@dataclass
class CatchUp:
    seconds: float
    first_run_started_after: float
    run_seconds: list[float]
    windows: int
    run_peak_rss_mb: float
    tree_peak_rss_mb: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000, help="source posts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "so_bench")
    add_postgres_bin_argument(parser)
    args = parser.parse_args()
    with bench_on_server(args.data_dir, "logs_daemon", postgres_bin=args.postgres_bin) as bench:
        ensure_source(bench, args.rows, database=f"bench_source_{args.rows}")
        run(bench, args.rows, args.rounds)


def run(bench: Bench, rows: int, rounds: int) -> None:
    lz4 = server_has_lz4(bench)
    pipes, lz4_pipes, catch_ups = [], [], []
    for round_number in range(1, rounds + 1):
        print(f"Round {round_number}/{rounds} ...", flush=True)
        pipe = bench.raw_pipes_in_parallel()
        print(f"  two binary COPY pipes: {pipe.seconds:.1f} s, {rows / pipe.seconds:,.0f} rows/s")
        if lz4:
            # so_pipeline's tables get lz4 bodies on such a server: the pipes, too, for the
            # strongest baseline.
            lz4_pipe = bench.raw_pipes_in_parallel(lz4=True)
            lz4_pipes.append(lz4_pipe.seconds)
            print(f"  the same into lz4 bodies: {lz4_pipe.seconds:.1f} s")
        # Else autovacuum would visit the pipes' 3M-row table during the catch-up.
        bench.server.drop_database("bench_raw")
        catch_up = daemon_catch_up(bench, round_number)
        fastest_pipe = min([pipe.seconds, *lz4_pipes[-1:]])
        print(
            f"  daemon catch-up: {catch_up.seconds:.1f} s, {rows / catch_up.seconds:,.0f} rows/s "
            f"({fastest_pipe / catch_up.seconds:.2f}x the faster pipes); first run started after "
            f"{catch_up.first_run_started_after:.1f} s; {len(catch_up.run_seconds)} run(s) "
            f"({_listed(catch_up.run_seconds)} s), {catch_up.windows} window(s); peak RSS "
            f"{catch_up.run_peak_rss_mb:.0f} MB in a run, {catch_up.tree_peak_rss_mb:.0f} MB in "
            "any process of the daemon's tree",
            flush=True,
        )
        pipes.append(pipe.seconds)
        catch_ups.append(catch_up)
    report(rows, min(pipes, lz4_pipes or pipes, key=statistics.median), catch_ups)
    target = bench.server.url("bench_daemon_target")  # the last round's
    exact = loaded_fingerprint(target) == expected_fingerprint(bench.source)
    print(f"Loaded rows equal the kept source rows (md5 of every value, last round): {exact}")


def daemon_catch_up(bench: Bench, round_number: int) -> CatchUp:
    """Start the daemon on an empty target; return when the cursor is at the source's end."""
    target = bench.fresh_database("bench_daemon_target", create_posts=False)
    env = bench.pipeline_env(target, "bench_daemon_dagster")
    # The benchmark reads the cursor as the product does: from the instance's history.
    os.environ.update({key: env[key] for key in ("DAGSTER_HOME", "DAGSTER_PG_URL")})
    import dagster as dg

    from so_pipeline.cursor import cursor_from_history

    end = max_id(bench.source)
    log = bench.log_dir / f"daemon-{round_number}.log"
    with dg.DagsterInstance.get() as instance, _daemon(env, log) as peaks:
        started, wall_started = time.monotonic(), time.time()
        deadline = started + CATCH_UP_TIMEOUT_SECONDS
        # Watched cheaply (one connection, two index probes) until the last window is
        # committed, then the cursor that follows it: reading the history every 0.1 s
        # throughout took CPU from the run being measured.
        with psycopg.connect(target, autocommit=True) as watcher:
            for done in (
                lambda: processed_max_id(watcher) == end,
                lambda: cursor_from_history(instance) == end,
            ):
                while not done():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"no catch-up in {CATCH_UP_TIMEOUT_SECONDS} s: {log}")
                    time.sleep(0.05)
        seconds = time.monotonic() - started
        records = instance.get_run_records(dg.RunsFilter(job_name="stackoverflow_posts_job"))
        windows = len(
            instance.fetch_materializations(dg.AssetKey("filtered_posts"), limit=10_000).records
        )
    runs = sorted(records, key=lambda record: record.create_timestamp)
    first_start = min(r.start_time for r in runs if r.start_time)
    return CatchUp(
        seconds=seconds,
        first_run_started_after=first_start - wall_started,
        run_seconds=[(r.end_time or time.time()) - r.start_time for r in runs if r.start_time],
        windows=windows,
        run_peak_rss_mb=max(peaks.get("run", [0])) / 1024,
        tree_peak_rss_mb=max(max(values) for values in peaks.values()) / 1024,
    )


@contextmanager
def _daemon(env: dict[str, str], log: Path) -> Iterator[dict[str, list[int]]]:
    """`dagster-daemon run` while inside; yields the peak RSS (kB) of its processes by role."""
    peaks: dict[str, list[int]] = {}
    with log.open("w") as output:
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-m", "so_pipeline"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        done = threading.Event()
        sampler = threading.Thread(target=_sample_tree, args=(daemon.pid, peaks, done))
        sampler.start()
        try:
            yield peaks
        finally:
            done.set()
            sampler.join()
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()


def _sample_tree(root_pid: int, peaks: dict[str, list[int]], done: threading.Event) -> None:
    """Every 0.25 s, the high-water RSS of each process under `root_pid`, by role.

    (A high-water mark: only a process that lives less than the interval could be missed;
    sampling more often took a few % of a core from the run being measured.)
    """
    by_pid: dict[int, tuple[str, int]] = {}
    root = psutil.Process(root_pid)
    while not done.is_set():
        try:
            for process in [root, *root.children(recursive=True)]:
                role, previous = by_pid.get(process.pid) or (_role(root_pid, process), 0)
                by_pid[process.pid] = (role, max(previous, high_water_mark(process.pid)))
        except psutil.Error:
            pass
        done.wait(0.25)
    for role, peak in by_pid.values():
        peaks.setdefault(role, []).append(peak)


def _role(root_pid: int, process: psutil.Process) -> str:
    """The daemon itself, its code server, or else a run (started by the code server through
    multiprocessing: its command line does not say which run it is)."""
    if process.pid == root_pid:
        return "daemon"
    return "code server" if "api grpc" in " ".join(process.cmdline()) else "run"


def report(rows: int, pipes: list[float], catch_ups: list[CatchUp]) -> None:
    pipe = statistics.median(pipes)
    seconds = statistics.median(c.seconds for c in catch_ups)
    start_up = statistics.median(c.first_run_started_after for c in catch_ups)
    loading = seconds - start_up
    rate = rows / loading
    print(
        f"\nMedians over {len(catch_ups)} round(s), {rows:,} posts:\n"
        f"  two binary COPY pipes (the faster table): {pipe:8.1f} s {rows / pipe:>10,.0f} rows/s\n"
        f"  daemon start -> cursor at the end: {seconds:8.1f} s {rows / seconds:>10,.0f} rows/s "
        f"= {pipe / seconds:.2f}x the pipes\n"
        f"    until the first run started:     {start_up:8.1f} s\n"
        f"    from then to the cursor at end:  {loading:8.1f} s {rate:>10,.0f} rows/s "
        f"= {pipe / loading:.2f}x the pipes\n"
        f"  peak RSS of a catch-up run: {max(c.run_peak_rss_mb for c in catch_ups):.0f} MB; "
        f"of any daemon process: {max(c.tree_peak_rss_mb for c in catch_ups):.0f} MB"
    )
    loading_full = FULL_TABLE_POSTS / rate
    runs = math.ceil(loading_full / CATCH_UP_RUN_SECONDS)
    projected = runs * start_up + loading_full
    print(
        f"Projection for {FULL_TABLE_POSTS:,} posts: {FULL_TABLE_POSTS:,} / {rate:,.0f} rows/s "
        f"= {loading_full:,.0f} s of loading in {runs} run(s) of at most {CATCH_UP_RUN_SECONDS} s, "
        f"+ {runs} x {start_up:.1f} s to start each (an upper bound: only the first waits for "
        f"the daemon's start) = {projected:,.0f} s = {projected / 60:.1f} min"
    )


def _listed(values: list[float]) -> str:
    return ", ".join(f"{value:.1f}" for value in values)


if __name__ == "__main__":
    main()
