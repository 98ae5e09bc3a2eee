"""Real Stack Exchange posts: dump loading, and the pipeline's output checked against the XML."""

import gzip
import xml.etree.ElementTree as ET
from datetime import datetime
from importlib import resources
from pathlib import Path

import dagster as dg
import pytest

# Not a unit test file (all integration), but collected by the unit tier too: without the extra,
# skip the module instead of failing its collection.
pytest.importorskip("lxml", reason="load-dump's XML parser needs the 'local' extra")

from so_pipeline.resources import PostgresResource
from so_pipeline.tooling.dump_loader import DumpError, DumpProgress, load_dump
from so_pipeline_tests.helpers import PipelineDatabases, run_until_caught_up

pytestmark = pytest.mark.integration

SAMPLE = Path(str(resources.files("so_pipeline.tooling") / "sample_data" / "cardano-posts.xml.gz"))


def _expected_from_xml() -> tuple[list[tuple], set[int]]:
    """Kept rows and rejected ids, computed from the XML alone with Python's own rules."""
    kept, rejected = [], set()
    with gzip.open(SAMPLE) as stream:
        for _, element in ET.iterparse(stream):
            if element.tag != "row":
                continue
            row = element.attrib
            body, owner = row.get("Body"), row.get("OwnerUserId")
            if body is None or not body.strip() or owner is None:
                rejected.add(int(row["Id"]))
            else:
                kept.append(
                    (
                        int(row["Id"]),
                        row.get("Title"),
                        body,
                        int(owner),
                        datetime.fromisoformat(row["CreationDate"]),
                    )
                )
    return kept, rejected


def _source(databases: PipelineDatabases) -> PostgresResource:
    return PostgresResource(resource_name="source_db", url=databases.source_url)


def test_the_real_sample_arrives_exactly_as_the_xml_says(
    databases: PipelineDatabases, instance: dg.DagsterInstance
) -> None:
    loaded = load_dump(SAMPLE, _source(databases))
    assert loaded.rows_loaded == 2630

    runs = run_until_caught_up(instance, batch_size=700)

    windows = [run.metadata("source_posts_batch")["rows_in_window"] for run in runs]
    assert windows == [700, 700, 700, 530]
    kept, rejected = _expected_from_xml()
    assert databases.query(
        "analytical", "SELECT id, title, body, owner_user_id, creation_date FROM posts ORDER BY id"
    ) == sorted(kept)
    assert set(databases.rejected()) == rejected
    assert len(kept) == 2595


def test_reloading_a_dump_resumes_without_duplicates(databases: PipelineDatabases) -> None:
    load_dump(SAMPLE, _source(databases))
    again = load_dump(SAMPLE, _source(databases))

    assert (again.rows_loaded, again.rows_skipped, again.resumed_after_id) == (0, 2630, 4805)
    assert databases.query("source", "SELECT count(*) FROM posts") == [(2630,)]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"<posts><row Id='1' Body='x'/><row Id='2' Body='y'", "malformed XML at line 1"),
        (b"<users><row Id='1'/></users>", r"not a posts dump \(root element <users>"),
        (b"<posts><row Body='x'/></posts>", "without an Id"),
    ],
)
def test_malformed_dumps_stop_with_the_file_and_position(
    databases: PipelineDatabases, tmp_path: Path, content: bytes, expected: str
) -> None:
    dump = tmp_path / "Posts.xml"
    dump.write_bytes(content)

    with pytest.raises(DumpError, match=expected) as failure:
        load_dump(dump, _source(databases))

    assert str(dump) in str(failure.value)


def test_a_truncated_archive_is_reported(databases: PipelineDatabases, tmp_path: Path) -> None:
    truncated = tmp_path / "Posts.xml.gz"
    truncated.write_bytes(SAMPLE.read_bytes()[:50_000])

    with pytest.raises(DumpError, match="truncated or corrupt archive"):
        load_dump(truncated, _source(databases))


def test_a_7z_dump_streams_like_the_xml(databases: PipelineDatabases, tmp_path: Path) -> None:
    import py7zr

    xml = tmp_path / "Posts.xml"
    xml.write_bytes(gzip.decompress(SAMPLE.read_bytes()))
    archive = tmp_path / "cardano.stackexchange.com.7z"
    with py7zr.SevenZipFile(archive, "w") as writer:
        writer.write(xml, "Posts.xml")
    progress: list[DumpProgress] = []

    loaded = load_dump(archive, _source(databases), commit_every=1000, on_progress=progress.append)

    assert loaded.rows_loaded == 2630
    assert databases.query("source", "SELECT count(*), max(id) FROM posts") == [(2630, 4805)]
    assert [p.rows_loaded for p in progress] == [1000, 2000, 2630]
    assert progress[-1].bytes_done == progress[-1].total_bytes == xml.stat().st_size
    assert "2,630 rows" in progress[-1].describe()


@pytest.mark.parametrize("damage", ["truncate", "no posts"])
def test_a_broken_7z_is_reported(databases: PipelineDatabases, tmp_path: Path, damage: str) -> None:
    import py7zr

    member = tmp_path / ("Posts.xml" if damage == "truncate" else "Users.xml")
    member.write_bytes(gzip.decompress(SAMPLE.read_bytes()))
    archive = tmp_path / "dump.7z"
    with py7zr.SevenZipFile(archive, "w") as writer:
        writer.write(member, member.name)
    if damage == "truncate":
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    expected = "truncated or corrupt archive" if damage == "truncate" else "holds no Posts.xml"

    with pytest.raises(DumpError, match=expected) as failure:
        load_dump(archive, _source(databases))

    assert str(archive) in str(failure.value)
