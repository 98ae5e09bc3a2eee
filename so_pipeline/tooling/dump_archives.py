"""Opens a posts dump as a byte stream: `Posts.xml`, `Posts.xml.gz`, or a `.7z` holding it.

Each is read as a stream, never unpacked to disk or memory, and reports how far it has got
so that progress and an ETA can be shown.
"""

import gzip
import io
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import IO


class DumpError(Exception):
    """The file is not a readable posts dump; the message names the file and position."""


@dataclass(frozen=True)
class DumpStream:
    stream: IO[bytes]
    total_bytes: int
    bytes_done: Callable[[], int]  # of total_bytes, so far


@contextmanager
def open_dump(path: Path) -> Iterator[DumpStream]:
    try:
        if path.suffix == ".7z":
            with _open_7z(path) as dump:
                yield dump
            return
        with open(path, "rb") as raw:
            size = path.stat().st_size
            if path.suffix == ".gz":
                with gzip.GzipFile(fileobj=raw) as unpacked:
                    yield DumpStream(unpacked, size, raw.tell)  # type: ignore[arg-type]
            else:
                yield DumpStream(raw, size, raw.tell)
    except OSError as error:
        if isinstance(error, gzip.BadGzipFile):
            raise DumpError(f"{path}: truncated or corrupt archive: {error}") from None
        raise DumpError(f"{path}: cannot read: {error.strerror or error}") from None


@contextmanager
def _open_7z(path: Path) -> Iterator[DumpStream]:
    """Stream the archive's Posts.xml out of py7zr's extraction thread through a short queue."""
    try:
        import py7zr
        from py7zr.io import Py7zIO, WriterFactory
    except ImportError:
        raise DumpError(
            f"{path}: reading .7z needs py7zr: pip install 'so_pipeline[dumps]'"
        ) from None
    try:
        archive = py7zr.SevenZipFile(path)
    except (py7zr.Bad7zFile, EOFError, OSError) as error:
        raise DumpError(f"{path}: truncated or corrupt archive: {error}") from None
    members = [
        info
        for info in archive.list()
        if not info.is_directory and info.filename.rsplit("/", 1)[-1].lower() == "posts.xml"
    ]
    if not members:
        archive.close()
        raise DumpError(f"{path}: the archive holds no Posts.xml")
    member = members[0]
    chunks: Queue[bytes | BaseException | None] = Queue(maxsize=32)
    stop = threading.Event()

    class ChunkWriter(Py7zIO):
        def write(self, s: bytes | bytearray) -> int:
            if not stop.is_set():
                chunks.put(bytes(s))
            return len(s)

        def read(self, size: int | None = None) -> bytes:
            return b""

        def seek(self, offset: int, whence: int = 0) -> int:
            return 0

        def flush(self) -> None:
            pass

        def size(self) -> int:
            return 0

    class ChunkWriterFactory(WriterFactory):
        def create(self, filename: str) -> Py7zIO:
            return ChunkWriter()

    def extract() -> None:
        try:
            archive.extract(targets=[member.filename], factory=ChunkWriterFactory())
            chunks.put(None)
        except BaseException as error:  # handed to the reading thread, which raises it
            chunks.put(error)

    reader = _QueueReader(chunks, path)
    worker = threading.Thread(target=extract, daemon=True, name="7z-extract")
    worker.start()
    try:
        stream = io.BufferedReader(reader)  # type: ignore[type-var]  # RawIOBase is fine at runtime
        yield DumpStream(stream, member.uncompressed, reader.tell)
    finally:
        stop.set()
        while worker.is_alive():  # let the extraction thread finish writing into the void
            while not chunks.empty():
                chunks.get_nowait()
            worker.join(timeout=0.1)
        archive.close()


class _QueueReader(io.RawIOBase):
    """A readable stream over chunks put into a queue by another thread."""

    def __init__(self, chunks: "Queue[bytes | BaseException | None]", path: Path) -> None:
        self._chunks = chunks
        self._path = path
        self._pending = b""
        self._done = 0
        self._finished = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
        while not self._pending and not self._finished:
            item = self._chunks.get()
            if item is None:
                self._finished = True
            elif isinstance(item, BaseException):
                self._finished = True
                raise DumpError(f"{self._path}: truncated or corrupt archive: {item}")
            else:
                self._pending = item
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        self._done += size
        return size

    def tell(self) -> int:
        return self._done
