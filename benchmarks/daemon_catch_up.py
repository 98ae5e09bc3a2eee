"""Unattended catch-up through the daemon, against two parallel binary COPY pipes, in one run.

    python -m benchmarks.daemon_catch_up [--rows 3000000] [--rounds 3] [--quiet]

On the throughput benchmark's server (its --data-dir), with a synthetic source of --rows posts
(a database of its own, generated once and reused), each round
1. times two binary `psql` COPY pipes over the id halves of the source into an empty table
   (the limit of this hardware for a COPY-to-COPY copy), plain and, where the server has lz4,
   into lz4 bodies (the faster is the yardstick);
2. starts `dagster-daemon run -m so_pipeline` on a fresh instance (PostgreSQL storage, the
   shipped dagster.yaml) and an empty analytical database, and waits, touching nothing, until
   the latest `filtered_posts` materialization's cursor reaches the source's max id: the
   catch-up sensor requests the runs, the run queue launches them.
Unless --quiet, a second CPU-bound process runs beside both (a busy server is the normal case).
Both are measured the same way: wall time, and the CPU seconds of every process on the path
(benchmarks/cpu_use.py). It prints, per round and as medians (worst), the ratios to the pipes
from the daemon's start and inside the run, the first run's start-up stages, the CPU seconds
per 1M posts by process, the peak RSS, the 55,000,000-post projection from the worst round,
and a one-line SUMMARY to compare with the README.
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from benchmarks.cpu_use import (
    CpuMeter,
    CpuUse,
    cpu_hog,
    cpu_table,
    descendants,
    postmaster_pid,
    process_title,
)
from benchmarks.throughput import (
    BIN,
    Bench,
    Measurement,
    add_postgres_bin_argument,
    bench_on_server,
    database_of,
    ensure_source,
    expected_fingerprint,
    high_water_mark,
    loaded_fingerprint,
    max_id,
    recorded_cursor,
    server_build,
    server_has_lz4,
)
from so_pipeline.jobs import CATCH_UP_RUN_SECONDS

if TYPE_CHECKING:
    import dagster as dg

FULL_TABLE_POSTS = 55_000_000
CATCH_UP_TIMEOUT_SECONDS = 3600

SOURCE_ROLE = "source backends"
ANALYTICAL_ROLE = "analytical backends"
DAEMON_ROLE = "Dagster daemon"
CODE_SERVER_ROLE = "Dagster code server"
RUN_ROLE = "the run's Python process"


@dataclass
class StartUp:
    """Seconds from the daemon's start to each step of the first run's start."""

    run_created: float
    run_dequeued: float
    run_process_started: float  # RUN_START: the run's process is up and has loaded the code
    first_window: float  # the filtered_posts step started

    def describe(self) -> str:
        return (
            f"run requested {self.run_created:.1f} s, dequeued {self.run_dequeued:.1f} s, its "
            f"process up {self.run_process_started:.1f} s, first window {self.first_window:.1f} s"
        )


@dataclass
class CatchUp:
    seconds: float
    start_up: StartUp
    run_seconds: list[float]
    windows: int
    run_peak_rss_mb: float
    tree_peak_rss_mb: float
    cpu: CpuUse

    @property
    def in_run_seconds(self) -> float:
        """From the first run's process start to the cursor at the end."""
        return self.seconds - self.start_up.run_process_started


@dataclass
class Round:
    pipes_seconds: float  # the faster of the two pipe tables (plain, lz4 where there is lz4)
    pipes_cpu: CpuUse
    catch_up: CatchUp

    @property
    def ratio(self) -> float:
        return self.pipes_seconds / self.catch_up.seconds

    @property
    def ratio_in_run(self) -> float:
        return self.pipes_seconds / self.catch_up.in_run_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=3_000_000, help="source posts")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no second CPU-bound process during the measurements (by default one runs, as on "
        "a busy server)",
    )
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "so_bench")
    add_postgres_bin_argument(parser)
    args = parser.parse_args()
    with bench_on_server(args.data_dir, "logs_daemon", postgres_bin=args.postgres_bin) as bench:
        ensure_source(bench, args.rows, database=f"bench_source_{args.rows}")
        run(bench, args.rows, args.rounds, loaded=not args.quiet)


def run(bench: Bench, rows: int, rounds: int, loaded: bool) -> None:
    lz4 = server_has_lz4(bench)
    machine = "loaded (a CPU-bound process beside)" if loaded else "quiet"
    print(f"Machine: {machine}; {os.cpu_count()} cores", flush=True)
    results: list[Round] = []
    for round_number in range(1, rounds + 1):
        print(f"Round {round_number}/{rounds} ...", flush=True)
        pipes = [_metered_pipes(bench, lz4=False, loaded=loaded)]
        if lz4:
            # so_pipeline's tables get lz4 bodies on such a server: the pipes, too, for the
            # strongest baseline.
            pipes.append(_metered_pipes(bench, lz4=True, loaded=loaded))
        for (pipe, _), label in zip(pipes, ("plain", "lz4 bodies"), strict=False):
            print(f"  two binary COPY pipes ({label}): {pipe.seconds:.1f} s")
        # Else autovacuum would visit the pipes' table during the catch-up.
        bench.server.drop_database("bench_raw")
        catch_up = daemon_catch_up(bench, round_number, loaded)
        fastest, fastest_cpu = min(pipes, key=lambda pipe: pipe[0].seconds)
        result = Round(fastest.seconds, fastest_cpu, catch_up)
        print(
            f"  daemon catch-up: {catch_up.seconds:.1f} s ({result.ratio:.2f}x the faster "
            f"pipes); in the run {catch_up.in_run_seconds:.1f} s ({result.ratio_in_run:.2f}x); "
            f"{catch_up.start_up.describe()}; {len(catch_up.run_seconds)} run(s) "
            f"({_listed(catch_up.run_seconds)} s), {catch_up.windows} window(s); peak RSS "
            f"{catch_up.run_peak_rss_mb:.0f} MB in a run, {catch_up.tree_peak_rss_mb:.0f} MB in "
            "any process of the daemon's tree",
            flush=True,
        )
        print(cpu_table([("pipes", fastest_cpu, rows), ("so_pipeline", catch_up.cpu, rows)]))
        results.append(result)
    target = bench.server.url("bench_daemon_target")  # the last round's
    exact = loaded_fingerprint(target) == expected_fingerprint(bench.source)
    report(bench, rows, results, machine)
    print(f"Loaded rows equal the kept source rows (md5 of every value, last round): {exact}")


def _metered_pipes(bench: Bench, lz4: bool, loaded: bool) -> tuple[Measurement, CpuUse]:
    """The two pipes, timed and their CPU use measured (with the hog beside if `loaded`)."""
    roles = {database_of(bench.source): SOURCE_ROLE, "bench_raw": ANALYTICAL_ROLE}
    meter = CpuMeter(postmaster_pid(bench.server.data_dir), roles)
    with ExitStack() as hog:
        if loaded:
            hog.enter_context(cpu_hog(meter))
        pipe = bench.raw_pipes_in_parallel(lz4, meter)
    return pipe, meter.result()


def daemon_catch_up(bench: Bench, round_number: int, loaded: bool) -> CatchUp:
    """Start the daemon on an empty target; return when the cursor is at the source's end."""
    target = bench.fresh_database("bench_daemon_target", create_posts=False)
    env = bench.pipeline_env(target, "bench_daemon_dagster")
    # The benchmark reads the cursor as the product does: from the instance's history.
    os.environ.update({key: env[key] for key in ("DAGSTER_HOME", "DAGSTER_PG_URL")})
    import dagster as dg

    from so_pipeline.cursor import cursor_from_history

    end = max_id(bench.source)
    log = bench.log_dir / f"daemon-{round_number}.log"
    roles = {
        database_of(bench.source): SOURCE_ROLE,
        "bench_daemon_target": ANALYTICAL_ROLE,
        "bench_daemon_dagster": "Dagster storage backends",
    }
    meter = CpuMeter(postmaster_pid(bench.server.data_dir), roles)
    with (
        dg.DagsterInstance.get() as instance,
        psycopg.connect(target, autocommit=True) as watcher,
        ExitStack() as hog,
        meter,
    ):
        # The watcher's own backend is the benchmark's, not the pipeline's.
        meter.label_backend(watcher.info.backend_pid, "benchmark's watcher")
        if loaded:
            hog.enter_context(cpu_hog(meter))
        with _daemon(env, log, meter) as peaks:
            started, wall_started = time.monotonic(), time.time()
            deadline = started + CATCH_UP_TIMEOUT_SECONDS
            # Watched cheaply (one connection, a one-row lookup) until the last window is
            # committed, then the cursor that follows it in Dagster's history: reading the
            # history every 0.1 s throughout took CPU from the run being measured.
            for done in (
                lambda: recorded_cursor(watcher) == end,
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
        start_up = _start_up(instance, runs[0], wall_started)
    return CatchUp(
        seconds=seconds,
        start_up=start_up,
        run_seconds=[(r.end_time or time.time()) - r.start_time for r in runs if r.start_time],
        windows=windows,
        run_peak_rss_mb=max(peaks.get(RUN_ROLE, [0])) / 1024,
        tree_peak_rss_mb=max(max(values) for values in peaks.values()) / 1024,
        cpu=meter.result(),
    )


def _start_up(instance: "dg.DagsterInstance", first_run: "dg.RunRecord", t0: float) -> StartUp:
    """When, after `t0` (the daemon's start), the first run went through each stage."""
    import dagster as dg

    stages = {
        dg.DagsterEventType.RUN_STARTING: "dequeued",  # the run queue took it and launches it
        dg.DagsterEventType.RUN_START: "started",
        dg.DagsterEventType.STEP_START: "filtered_posts",
    }
    seen: dict[str, float] = {}
    for record in instance.get_records_for_run(first_run.dagster_run.run_id, limit=1000).records:
        entry = record.event_log_entry
        stage = stages.get(entry.dagster_event_type)  # type: ignore[arg-type]
        if stage == "filtered_posts" and entry.step_key != "filtered_posts":
            continue
        if stage and stage not in seen:
            seen[stage] = entry.timestamp - t0
    return StartUp(
        run_created=first_run.create_timestamp.timestamp() - t0,
        run_dequeued=seen["dequeued"],
        run_process_started=seen["started"],
        first_window=seen["filtered_posts"],
    )


@contextmanager
def _daemon(env: dict[str, str], log: Path, meter: CpuMeter) -> Iterator[dict[str, list[int]]]:
    """`dagster-daemon run` while inside, its CPU use watched by `meter`; yields the peak RSS
    (kB) of its processes by role."""
    peaks: dict[str, list[int]] = {}
    with log.open("w") as output:
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-m", "so_pipeline"],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        meter.watch(daemon.pid, lambda pid: _role(daemon.pid, pid))
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
    while not done.is_set():
        for pid in [root_pid, *descendants(root_pid)]:
            role, previous = by_pid.get(pid) or (_role(root_pid, pid), 0)
            by_pid[pid] = (role, max(previous, high_water_mark(pid)))
        done.wait(0.25)
    for role, peak in by_pid.values():
        peaks.setdefault(role, []).append(peak)


def _role(root_pid: int, pid: int) -> str:
    """The daemon itself, its code server, or else a run (started by the code server through
    multiprocessing: its command line does not say which run it is)."""
    if pid == root_pid:
        return DAEMON_ROLE
    return CODE_SERVER_ROLE if "api grpc" in process_title(pid) else RUN_ROLE


def report(bench: Bench, rows: int, rounds: list[Round], machine: str) -> None:
    """Medians and worst rounds, the 55M projection from the worst round, and a one-line
    summary to compare with the README."""
    catch_ups = [r.catch_up for r in rounds]
    pipe, pipe_worst = _median_worst([r.pipes_seconds for r in rounds], high_is_worse=True)
    seconds, seconds_worst = _median_worst([c.seconds for c in catch_ups], high_is_worse=True)
    ratio, ratio_worst = _median_worst([r.ratio for r in rounds])
    in_run, in_run_worst = _median_worst([r.ratio_in_run for r in rounds])
    first, first_worst = _median_worst(
        [c.start_up.first_window for c in catch_ups], high_is_worse=True
    )
    print(
        f"\nMedian (worst) of {len(rounds)} round(s), {rows:,} posts, machine {machine}:\n"
        f"  two binary COPY pipes (the faster table): {pipe:.1f} s ({pipe_worst:.1f} s)\n"
        f"  daemon start -> cursor at the end: {seconds:.1f} s ({seconds_worst:.1f} s) = "
        f"{ratio:.2f}x ({ratio_worst:.2f}x) the pipes\n"
        f"  in the run (its process up -> cursor at the end): {in_run:.2f}x ({in_run_worst:.2f}x)"
        f" the pipes\n"
        f"  daemon start -> first window: {first:.1f} s ({first_worst:.1f} s)\n"
        f"  peak RSS of a catch-up run: {max(c.run_peak_rss_mb for c in catch_ups):.0f} MB; "
        f"of any daemon process: {max(c.tree_peak_rss_mb for c in catch_ups):.0f} MB"
    )
    print(
        cpu_table(
            [
                ("pipes (median)", _median_use([r.pipes_cpu for r in rounds]), rows),
                ("so_pipeline", _median_use([c.cpu for c in catch_ups]), rows),
            ]
        )
    )
    worst = min(rounds, key=lambda r: r.ratio_in_run).catch_up
    rate = rows / worst.in_run_seconds
    loading_full = FULL_TABLE_POSTS / rate
    runs = math.ceil(loading_full / CATCH_UP_RUN_SECONDS)
    start_up = worst.start_up.run_process_started
    projected = runs * start_up + loading_full
    print(
        f"Projection for {FULL_TABLE_POSTS:,} posts, from the worst round: "
        f"{FULL_TABLE_POSTS:,} / {rate:,.0f} rows/s = {loading_full:,.0f} s of loading in "
        f"{runs} run(s) of at most {CATCH_UP_RUN_SECONDS} s, + {runs} x {start_up:.1f} s to "
        f"start each (an upper bound: only the first waits for the daemon's start) = "
        f"{projected:,.0f} s = {projected / 60:.1f} min (this machine, source and target on "
        "one local server: no network, the source's pages in memory)"
    )
    print(
        f"SUMMARY daemon_catch_up {time.strftime('%Y-%m-%d')} {server_build(bench)} "
        f"{rows:,} posts, {machine}, median (worst) of {len(rounds)}: in the run "
        f"{in_run:.2f}x ({in_run_worst:.2f}x) two pipes; start to end {ratio:.2f}x "
        f"({ratio_worst:.2f}x); first window after {first:.1f} s ({first_worst:.1f} s); pipes "
        f"{pipe:.1f} s ({pipe_worst:.1f} s); 55M from the worst round {projected / 60:.1f} min"
    )


def _median_worst(values: list[float], high_is_worse: bool = False) -> tuple[float, float]:
    return statistics.median(values), (max(values) if high_is_worse else min(values))


def _median_use(uses: list[CpuUse]) -> CpuUse:
    """Each role's median over the rounds."""
    roles = {role for use in uses for role in use.by_role}
    return CpuUse(
        {role: statistics.median(use.by_role.get(role, 0.0) for use in uses) for role in roles}
    )


def _listed(values: list[float]) -> str:
    return ", ".join(f"{value:.1f}" for value in values)


if __name__ == "__main__":
    main()
