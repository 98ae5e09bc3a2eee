"""Every figure of the catch-up goals in one run, on one server.

    python -m benchmarks.catch_up [--daemon-rows 3000000] [--daemon-rounds 3]
                                  [--floor-ticks 5] [the options of benchmarks.throughput]

1. `benchmarks.throughput`: one run of --rows posts against the raw pipes (the yardstick: two
   binary pipes at once), the original method, Sling and dlt when given, the load step alone,
   the schedule's windows, steady ticks;
2. `benchmarks.tick_floor` on the same source: a steady tick against a trivial Dagster job;
3. `benchmarks.daemon_catch_up` on a source of --daemon-rows posts: the unattended catch-up
   through `dagster-daemon` (with a CPU-bound process beside, unless --daemon-quiet), its
   ratio to the pipes, the CPU each process spends, and the 55M projection.
"""

import argparse

from benchmarks import daemon_catch_up, throughput, tick_floor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    throughput.add_arguments(parser)
    parser.add_argument("--floor-ticks", type=int, default=5)
    parser.add_argument("--daemon-rows", type=int, default=3_000_000)
    parser.add_argument("--daemon-rounds", type=int, default=3)
    parser.add_argument(
        "--daemon-quiet", action="store_true", help="the daemon's rounds without the CPU hog"
    )
    args = parser.parse_args()
    with throughput.bench_on_server(args.data_dir, "logs", args.sling, args.postgres_bin) as bench:
        throughput.run_benchmark(bench, args)
        print("\nA steady tick against Dagster's floor ...", flush=True)
        tick_floor.run(bench, args.floor_ticks)
        print("\nAn unattended catch-up through the daemon ...", flush=True)
        throughput.ensure_source(bench, args.daemon_rows, f"bench_source_{args.daemon_rows}")
        daemon_catch_up.run(bench, args.daemon_rows, args.daemon_rounds, not args.daemon_quiet)


if __name__ == "__main__":
    main()
