"""Dump loading on real PostgreSQL: exact tables, every way a load stops, and flat memory.

Covers the COPY text (escapes, NULL versus empty), truncated .gz and .7z, XML cut mid-row,
Ctrl-C (in process and through the command) with a resume to an identical table, prompt
clean-up of a .7z, queues that hold a bounded number of bytes whatever the chunk count, the
.gz reader's own inflate loop, and the command's connection without Dagster.
"""

import gzip
import os
import re
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path

import psycopg
import pytest

# Not a unit test file (all integration), but collected by the unit tier too: without the extra,
# skip the module instead of failing its collection.
pytest.importorskip("lxml", reason="load-dump's XML parser needs the 'local' extra")

from so_pipeline.resources import PostgresResource
from so_pipeline.tooling import dump_archives, dump_loader
from so_pipeline.tooling.dump_archives import PIECE_BYTES, ByteQueue, open_dump
from so_pipeline.tooling.dump_loader import (
    DUMP_COLUMNS,
    DatabaseURL,
    DumpError,
    DumpInterrupted,
    DumpProgress,
    create_posts_table,
    load_dump,
)
from so_pipeline_tests.helpers import PipelineDatabases, with_password

pytestmark = pytest.mark.integration

SAMPLE = Path(str(resources.files("so_pipeline.tooling") / "sample_data" / "cardano-posts.xml.gz"))
SAMPLE_ROWS = 2630
_ID = re.compile(rb'\bId="(\d+)"')


def _shift_ids(rows: bytes, base: int) -> bytes:
    return _ID.sub(lambda m: b'Id="%d"' % (int(m.group(1)) + base), rows)


def _sample_xml(copies: int = 1) -> bytes:
    """The sample `copies` times over, ids shifted per copy so they stay unique and ascending."""
    xml = gzip.decompress(SAMPLE.read_bytes())
    head, rest = xml.split(b"<posts>", 1)
    rows = rest.rsplit(b"</posts>", 1)[0]
    shifted = [_shift_ids(rows, copy * 10_000) for copy in range(copies)]
    return head + b"<posts>" + b"".join(shifted) + b"</posts>"


def _source(databases: PipelineDatabases) -> PostgresResource:
    return PostgresResource(resource_name="source_db", url=databases.source_url)


def _reference_load(xml: bytes, url: str) -> None:
    """The dump loaded the slow, obviously right way: ElementTree and psycopg's write_row."""
    columns = ", ".join(column for column, _ in DUMP_COLUMNS.values())
    with psycopg.connect(url, autocommit=True) as connection:
        create_posts_table(connection)
        with connection.cursor().copy(f"COPY posts ({columns}) FROM STDIN") as copy:
            for _, element in ET.iterparse(__import__("io").BytesIO(xml)):
                if element.tag == "row":
                    copy.write_row([element.attrib.get(name) for name in DUMP_COLUMNS])


def _table(url: str) -> list[tuple]:
    with psycopg.connect(url) as connection:
        return connection.execute("SELECT * FROM posts ORDER BY id").fetchall()


def _7z(xml: bytes, archive: Path, lzma1: bool = False) -> Path:
    """A .7z of `xml`: LZMA2 (read directly), or LZMA1 (read through py7zr's extraction)."""
    import py7zr

    member = archive.with_name("Posts.xml")
    member.write_bytes(xml)
    filters = [{"id": py7zr.FILTER_LZMA if lzma1 else py7zr.FILTER_LZMA2, "preset": 1}]
    with py7zr.SevenZipFile(archive, "w", filters=filters) as writer:
        writer.write(member, "Posts.xml")
    member.unlink()
    return archive


@pytest.mark.parametrize("suffix", [".xml", ".xml.gz", ".7z", ".lzma1.7z"])
def test_every_format_loads_the_table_the_xml_describes(
    databases: PipelineDatabases, tmp_path: Path, suffix: str
) -> None:
    xml = _sample_xml()
    dump = tmp_path / f"Posts{suffix}"
    if suffix.endswith(".7z"):
        _7z(xml, dump, lzma1="lzma1" in suffix)
    else:
        dump.write_bytes(gzip.compress(xml, 1) if suffix.endswith(".gz") else xml)

    loaded = load_dump(dump, _source(databases), commit_every=700)

    _reference_load(xml, databases.analytical_url)
    assert loaded.rows_loaded == SAMPLE_ROWS
    assert _table(databases.source_url) == _table(databases.analytical_url)


def test_copy_text_escapes_and_tells_null_from_empty(
    databases: PipelineDatabases, tmp_path: Path
) -> None:
    xml = (
        b"<?xml version='1.0' encoding='utf-8'?>\n<posts>\n"
        b"  <row Id='1' Title='' Body='back\\slash &#x9;tab &#xD;&#xA;line \\N \xc3\xa9' />\n"
        b"  <row Id='2' Body='\\' Tags='&lt;a&gt;' CreationDate='2020-01-01T00:00:00.5' />\n"
        b"</posts>"
    )
    dump = tmp_path / "Posts.xml"
    dump.write_bytes(xml)

    load_dump(dump, _source(databases))

    _reference_load(xml, databases.analytical_url)
    loaded = _table(databases.source_url)
    assert loaded == _table(databases.analytical_url)
    assert loaded[0][4:6] == ("", "back\\slash \ttab \r\nline \\N é")


def test_a_truncated_gz_stops_with_the_position_and_keeps_the_commits(
    databases: PipelineDatabases, tmp_path: Path
) -> None:
    packed = gzip.compress(_sample_xml(copies=4), 1)
    dump = tmp_path / "Posts.xml.gz"
    dump.write_bytes(packed[: len(packed) * 3 // 4])

    with pytest.raises(DumpError) as failure:
        load_dump(dump, _source(databases), commit_every=1000)

    message = str(failure.value)
    assert re.fullmatch(
        rf"{re.escape(str(dump))}: truncated or corrupt archive: .* \(at line \d+, column \d+\); "
        r"[\d,]+ rows up to id \d+ are committed; run again to resume after them",
        message,
    ), message
    committed = int(re.search(r"([\d,]+) rows up to", message).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert databases.query("source", "SELECT count(*) FROM posts") == [(committed,)]
    assert committed % 1000 == 0 and committed > 0


def test_a_truncated_7z_stops_with_the_file_and_position(
    databases: PipelineDatabases, tmp_path: Path
) -> None:
    archive = _7z(_sample_xml(copies=2), tmp_path / "dump.7z")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])

    with pytest.raises(DumpError, match="truncated or corrupt archive") as failure:
        load_dump(archive, _source(databases))

    assert str(failure.value).startswith(f"{archive}: ")
    assert "\n" not in str(failure.value)


def test_xml_cut_mid_row_names_line_and_column_once(
    databases: PipelineDatabases, tmp_path: Path
) -> None:
    xml = _sample_xml()
    rows = list(re.finditer(rb'<row Id="(\d+)"', xml))
    cut = rows[1700].start() + 40
    dump = tmp_path / "Posts.xml"
    dump.write_bytes(xml[:cut])
    line = xml[:cut].count(b"\n") + 1

    with pytest.raises(DumpError) as failure:
        load_dump(dump, _source(databases), commit_every=500)

    message = str(failure.value)
    assert message.startswith(f"{dump}: malformed XML at line {line}, column ")
    assert message.count("line") == 1 and message.count("column") == 1, message
    last_committed = int(rows[1499].group(1))
    assert message.endswith(
        f"1,500 rows up to id {last_committed} are committed; run again to resume after them"
    )


@pytest.mark.parametrize("suffix", [".xml", ".xml.gz", ".7z"])
def test_an_interrupted_load_resumes_to_an_identical_table(
    databases: PipelineDatabases,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    suffix: str,
) -> None:
    xml = _sample_xml(copies=3)
    dump = tmp_path / f"Posts{suffix}"
    if suffix == ".7z":
        _7z(xml, dump)
    else:
        dump.write_bytes(gzip.compress(xml, 1) if suffix.endswith(".gz") else xml)

    def ctrl_c_at_the_second_commit(progress: DumpProgress) -> None:
        if progress.rows_loaded >= 2000:
            raise KeyboardInterrupt

    with pytest.raises(DumpInterrupted) as failure:
        load_dump(dump, _source(databases), 1000, ctrl_c_at_the_second_commit)
    # The writer may have committed more batches than progress had reported.
    stated = re.fullmatch(
        rf"{re.escape(str(dump))}: interrupted at line \d+, column \d+; ([\d,]+) rows up to id "
        r"\d+ are committed; run again to resume after them",
        str(failure.value),
    )
    assert stated, failure.value
    committed = int(stated.group(1).replace(",", ""))
    assert committed >= 2000 and committed % 1000 == 0
    assert databases.query("source", "SELECT count(*) FROM posts") == [(committed,)]

    monkeypatch.setattr(dump_loader, "SKIP_REPORT_SECONDS", 0)
    progress: list[DumpProgress] = []
    resumed = load_dump(dump, _source(databases), 1000, progress.append)

    assert (resumed.rows_loaded, resumed.rows_skipped) == (3 * SAMPLE_ROWS - committed, committed)
    assert progress[0].describe().startswith("skipping rows already loaded (ids up to ")
    assert progress[-1].bytes_done == progress[-1].total_bytes == len(xml)
    _reference_load(xml, databases.analytical_url)
    assert _table(databases.source_url) == _table(databases.analytical_url)


@pytest.mark.parametrize("lzma1", [False, True])
def test_closing_a_7z_early_does_not_decompress_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lzma1: bool
) -> None:
    monkeypatch.setattr(dump_archives, "READ_AHEAD_BYTES", 1024 * 1024)
    xml = _sample_xml(copies=12)
    archive = _7z(xml, tmp_path / "dump.7z", lzma1)

    started = time.monotonic()
    with open_dump(archive) as dump:
        assert dump.read()
        assert dump.total_bytes == len(xml)
    seconds = time.monotonic() - started

    assert seconds < 1.5
    assert not [t for t in threading.enumerate() if t.name.startswith("read dump.7z")]


def test_the_byte_queue_holds_at_most_its_bound_whatever_the_chunk_count() -> None:
    queue: ByteQueue[bytes] = ByteQueue(max_bytes=1024 * 1024)
    peak = 0

    def produce() -> None:
        for _ in range(2000):
            queue.put(b"x" * 64 * 1024, 64 * 1024)
        queue.finish()

    producer = threading.Thread(target=produce)
    producer.start()
    received = 0
    while (chunk := queue.get()) is not None:
        peak = max(peak, queue.held_bytes + len(chunk))
        received += len(chunk)
    producer.join()

    assert received == 2000 * 64 * 1024
    assert peak <= 1024 * 1024


def test_large_decompressed_blocks_are_queued_in_pieces(tmp_path: Path) -> None:
    """py7zr hands over blocks of megabytes; the queue takes them in PIECE_BYTES views."""
    reader = dump_archives.DumpReader(tmp_path / "x.7z", None)
    reader.queue = ByteQueue(max_bytes=4 * PIECE_BYTES)
    block = bytes(range(256)) * (5 * 1024 * 1024 // 256)
    sizes: list[int] = []
    pieces: list[bytes] = []

    def consume() -> None:
        while (piece := reader.read()) != b"":
            sizes.append(reader.queue.held_bytes + len(piece))
            pieces.append(piece)

    consumer = threading.Thread(target=consume)
    consumer.start()
    reader.put_pieces(block)
    reader.queue.finish()
    consumer.join()

    assert b"".join(pieces) == block
    assert max(sizes) <= 4 * PIECE_BYTES


def test_stopping_either_side_of_the_queue_releases_the_other() -> None:
    full: ByteQueue[bytes] = ByteQueue(max_bytes=10)
    full.put(b"0123456789", 10)
    threading.Timer(0.2, full.close).start()
    with pytest.raises(dump_archives.QueueClosed):
        full.put(b"more", 4)

    empty: ByteQueue[bytes] = ByteQueue(max_bytes=10)
    threading.Timer(0.2, empty.fail, [DumpError("gone")]).start()
    with pytest.raises(DumpError, match="gone"):
        empty.get()


def test_ctrl_c_on_the_command_prints_one_line_and_stops_promptly(
    databases: PipelineDatabases, tmp_path: Path
) -> None:
    dump = tmp_path / "Posts.xml.gz"
    dump.write_bytes(gzip.compress(_sample_xml(copies=60), 1))
    command = [sys.executable, "-m", "so_pipeline.tooling.cli", "load-dump", str(dump)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "SO_SOURCE_DATABASE_URL": databases.source_url},
        # A child of a non-interactive shell could inherit SIGINT as ignored.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert process.stdout is not None
    first_progress = process.stdout.readline()
    process.send_signal(signal.SIGINT)
    sent = time.monotonic()
    stdout, stderr = process.communicate(timeout=30)
    seconds = time.monotonic() - sent

    assert "MB of XML" in first_progress
    assert process.returncode == 130, stderr
    assert seconds < 2
    assert "Traceback" not in stderr
    assert re.fullmatch(
        rf"load-dump: {re.escape(str(dump))}: interrupted at line \d+, column \d+; "
        r"[\d,]+ rows up to id \d+ are committed; run again to resume after them\n",
        stderr,
    ), stderr


def _read_through(path: Path) -> bytes:
    with open_dump(path) as dump:
        return b"".join(iter(dump.read, b""))


def test_a_gz_of_several_members_reads_whole_in_small_calls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Calls capped far below a member's size: every tail, drain and member boundary is hit."""
    monkeypatch.setattr(dump_archives, "BLOCK_BYTES", 4096)
    xml = _sample_xml()
    third = len(xml) // 3
    members = [gzip.compress(xml[i : i + third], 9) for i in range(0, len(xml), third)]
    dump = tmp_path / "Posts.xml.gz"
    dump.write_bytes(members[0] + b"\0" * 7 + b"".join(members[1:]))

    assert _read_through(dump) == xml

    damaged = bytearray(dump.read_bytes())
    damaged[-6] ^= 0xFF  # the last member's CRC
    dump.write_bytes(bytes(damaged))
    with pytest.raises(DumpError, match="truncated or corrupt archive: .*incorrect data check"):
        _read_through(dump)


def test_the_command_line_database_loads_without_dagster(
    databases: PipelineDatabases, tmp_path: Path
) -> None:
    """`load-dump` reaches PostgreSQL through DatabaseURL; Dagster is never imported."""
    dump = tmp_path / "Posts.xml"
    dump.write_bytes(_sample_xml())
    url = databases.source_url.replace("postgresql://", "postgresql+psycopg://", 1)
    script = (
        "import sys\n"
        "from so_pipeline.tooling.cli import main\n"
        "code = main(['load-dump', sys.argv[1], '--database-url', sys.argv[2]])\n"
        "assert 'dagster' not in sys.modules, 'dagster was imported'\n"
        "sys.exit(code)\n"
    )

    loaded = subprocess.run(
        [sys.executable, "-c", script, str(dump), url], capture_output=True, text=True
    )

    assert loaded.returncode == 0, loaded.stderr
    assert f"Loaded {SAMPLE_ROWS} posts" in loaded.stdout
    _reference_load(_sample_xml(), databases.analytical_url)
    assert _table(databases.source_url) == _table(databases.analytical_url)


def test_database_url_errors_are_one_line_without_the_password(
    databases: PipelineDatabases, tmp_path: Path
) -> None:
    secret = "pw-dump-3f9a"
    missing = with_password(databases.source_url, secret).replace("/so_source", "/no_such_db", 1)
    dump = tmp_path / "Posts.xml"
    dump.write_bytes(_sample_xml())

    with pytest.raises(DumpError) as refused:
        load_dump(dump, DatabaseURL(missing))
    with pytest.raises(DumpError, match="not a PostgreSQL URL"):
        load_dump(dump, DatabaseURL(f"mysql://loader:{secret}@localhost/so"))

    message = str(refused.value)
    assert message.startswith("source_db: cannot connect to PostgreSQL at "), message
    assert "no_such_db" in message and "\n" not in message
    assert secret not in message
