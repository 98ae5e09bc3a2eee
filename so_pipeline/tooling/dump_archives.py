"""Opens a posts dump as a stream of XML chunks: `Posts.xml`, `Posts.xml.gz`, or a `.7z`.

Each format is read (and decompressed) by a thread of its own into a queue bounded in bytes,
so memory is the same for every format and every file size, decompression overlaps parsing,
and closing the dump stops the thread at its next chunk instead of reading to the end.
"""

import lzma
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar

# Bytes of XML read ahead of the parser: enough to ride out a slow decompressor block.
READ_AHEAD_BYTES = 16 * 1024 * 1024
# Pieces handed to the parser: small enough to keep the queue's bound tight, large enough
# that handing them over (the GIL passes between threads each time) costs little.
PIECE_BYTES = 1024 * 1024
# Read or decompressed per call. Reads, zlib and lzma release the GIL while they work, and
# the reading thread then waits up to a switch interval (5 ms) to get it back from the
# parser, which holds it while lxml runs: each call should take well over 5 ms.
BLOCK_BYTES = 4 * 1024 * 1024
# LZMA, at 80 MB/s the slowest stage of a .7z load, gets larger calls still.
LZMA_BLOCK_BYTES = 8 * 1024 * 1024

T = TypeVar("T")


class DumpError(Exception):
    """The file is not a readable posts dump; the message names the file and position."""


class QueueClosed(Exception):
    """The consumer has gone: the producer should stop."""


class ByteQueue(Generic[T]):
    """A queue between two threads that holds at most `max_bytes` (or one larger item).

    Bounding bytes rather than items keeps memory flat whatever size the producer's pieces
    are. Either side can stop the other promptly: `close()` makes `put` raise QueueClosed,
    `fail(error)` makes `get` raise the error.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self._items: deque[tuple[T, int]] = deque()
        self._changed = threading.Condition()
        self._finished = False
        self._closed = False
        self._error: BaseException | None = None

    def put(self, item: T, size: int) -> None:
        with self._changed:
            while self.held_bytes and self.held_bytes + size > self.max_bytes and not self._closed:
                self._changed.wait()
            if self._closed:
                raise QueueClosed
            self._items.append((item, size))
            self.held_bytes += size
            self._changed.notify_all()

    def get(self) -> T | None:
        """The next item, or None once the producer has finished."""
        with self._changed:
            while not self._items and not self._finished and self._error is None:
                self._changed.wait()
            if self._error is not None:
                raise self._error
            if not self._items:
                return None
            item, size = self._items.popleft()
            self.held_bytes -= size
            self._changed.notify_all()
            return item

    def finish(self) -> None:
        """The producer has put its last item."""
        with self._changed:
            self._finished = True
            self._changed.notify_all()

    def fail(self, error: BaseException) -> None:
        """The producer has failed: the consumer's next `get` raises `error`."""
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def close(self) -> None:
        """The consumer has stopped: drop what is queued and stop the producer."""
        with self._changed:
            self._closed = True
            self._items.clear()
            self.held_bytes = 0
            self._changed.notify_all()


class DumpReader:
    """The XML of a dump in chunks, with how far it has got in XML bytes."""

    def __init__(self, path: Path, total_bytes: int | None, file_bytes: int = 0) -> None:
        self.path = path
        self.xml_bytes = 0
        self.file_bytes_read = 0  # of a .gz, set by the reading thread: estimates its XML size
        self.queue: ByteQueue[bytes | memoryview] = ByteQueue(READ_AHEAD_BYTES)
        self._total_bytes = total_bytes
        self._file_bytes = file_bytes
        self._done = False

    def read(self) -> bytes:
        """The next chunk of XML; b"" at the end."""
        chunk = self.queue.get()
        if chunk is None:
            self._done = True
            return b""
        self.xml_bytes += len(chunk)
        return chunk if isinstance(chunk, bytes) else chunk.tobytes()

    @property
    def total_bytes(self) -> int:
        """The XML's size: exact for .xml and .7z, estimated for .gz until it is read."""
        if self._done:
            return self.xml_bytes
        if self._total_bytes is not None:
            return self._total_bytes
        if not self.file_bytes_read:
            return 0
        return round(self.xml_bytes * self._file_bytes / self.file_bytes_read)

    def put_pieces(self, data: bytes | bytearray) -> None:
        """Queue `data` in PIECE_BYTES views: a large block is neither copied nor re-sliced."""
        view = memoryview(data)
        for start in range(0, len(view), PIECE_BYTES):
            piece = view[start : start + PIECE_BYTES]
            self.queue.put(piece, len(piece))


@contextmanager
def open_dump(path: Path) -> Iterator[DumpReader]:
    """Open `path` and start its reading thread; on exit, stop the thread without waiting."""
    if path.suffix == ".7z":
        with _open_7z(path) as reader:
            yield reader
        return
    try:
        raw = open(path, "rb")  # noqa: SIM115  # closed by the reading thread
        size = path.stat().st_size
    except OSError as error:
        raise DumpError(f"{path}: cannot read: {error.strerror or error}") from None
    gz = path.suffix == ".gz"
    reader = DumpReader(path, None if gz else size, size)

    def read_all() -> None:
        with raw:
            if gz:
                _gunzip(raw, reader)
            else:
                while chunk := raw.read(BLOCK_BYTES):
                    reader.put_pieces(chunk)

    with _reading_thread(reader, read_all, (EOFError, zlib.error)):
        yield reader


def _gunzip(raw: BinaryIO, reader: DumpReader) -> None:
    """Decompress a .gz (one or more members) into `reader`; zlib checks each member's CRC.

    Not GzipFile: it inflates 128 KB of input per call, about 2 ms, so its thread would
    spend more time waiting for the GIL than inflating.
    """
    decompressor = zlib.decompressobj(wbits=31)
    in_member = False
    data = b""
    while True:
        if not data:
            data = raw.read(BLOCK_BYTES // 4)
            reader.file_bytes_read = raw.tell()
            if not data and not in_member:
                return
        # With data b"" (the file has ended) this drains what the last call held back.
        chunk = decompressor.decompress(data, BLOCK_BYTES)
        if not data and not chunk:
            raise EOFError("the compressed stream ends early")
        in_member = True
        reader.put_pieces(chunk)
        data = decompressor.unconsumed_tail
        if decompressor.eof:  # another member may follow, after zero padding
            data = decompressor.unused_data.lstrip(b"\0")
            decompressor = zlib.decompressobj(wbits=31)
            in_member = False


@contextmanager
def _reading_thread(
    reader: DumpReader, read_all: Callable[[], None], corrupt: tuple[type[Exception], ...]
) -> Iterator[None]:
    """Run `read_all` in a thread feeding `reader`; its errors surface in `reader.read`."""

    def run() -> None:
        try:
            read_all()
            reader.queue.finish()
        except QueueClosed:
            pass
        except corrupt as error:
            reader.queue.fail(DumpError(f"truncated or corrupt archive: {error or 'ends early'}"))
        except OSError as error:
            reader.queue.fail(DumpError(f"cannot read: {error.strerror or error}"))
        except BaseException as error:  # handed to the parsing thread, which reports it
            reader.queue.fail(DumpError(f"cannot read: {error!r}"))

    thread = threading.Thread(target=run, daemon=True, name=f"read {reader.path.name}")
    thread.start()
    try:
        yield
    finally:
        reader.queue.close()
        # At most one chunk to finish; a daemon thread, so a stuck read cannot hold up exit.
        thread.join(timeout=2)


@contextmanager
def _open_7z(path: Path) -> Iterator[DumpReader]:
    """Stream the archive's Posts.xml out of py7zr's extraction, in the reading thread."""
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
    reader = DumpReader(path, member.uncompressed)

    class ChunkWriter(Py7zIO):
        def write(self, s: bytes | bytearray) -> int:
            # QueueClosed once the parser has stopped: it ends the extraction right here.
            reader.put_pieces(bytes(s) if isinstance(s, bytearray) else s)
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

    def read_all() -> None:
        packed = _plain_lzma2(archive, member.filename)
        if packed is None:
            archive.extract(targets=[member.filename], factory=ChunkWriterFactory())
        else:
            _decompress_lzma2(path, *packed, reader)

    try:
        corrupt = (py7zr.exceptions.ArchiveError, lzma.LZMAError, EOFError, ValueError)
        with _reading_thread(reader, read_all, corrupt):
            yield reader
    finally:
        archive.close()


def _plain_lzma2(archive: Any, filename: str) -> tuple[int, int, int, int | None] | None:
    """Offset, size, dictionary size and CRC of `filename`'s LZMA2 stream, if it has one alone.

    The usual dump archive (one LZMA2 stream per file, or a file alone in its folder) then
    skips py7zr's extraction loop: about 15% less CPU on a machine whose two cores are
    shared with parsing and the server's COPY. Anything else (solid blocks, BCJ, LZMA1,
    encryption) goes through py7zr.
    """
    streams = archive.header.main_streams
    folders = streams.unpackinfo.folders
    files = [file for file in archive.files if file.filename == filename]
    if archive.password_protected or len(files) != 1 or files[0].folder is None:
        return None
    index = next(i for i, folder in enumerate(folders) if folder is files[0].folder)
    coders = folders[index].coders
    simple = all(len(folder.coders) == 1 for folder in folders)
    per_folder = streams.substreamsinfo.num_unpackstreams_folders
    if not simple or per_folder[index] != 1 or coders[0]["method"] != b"!":
        return None
    dictionary = coders[0]["properties"][0]
    if dictionary > 40:
        return None
    dict_size = 0xFFFFFFFF if dictionary == 40 else (2 | dictionary & 1) << (dictionary // 2 + 11)
    digests = streams.substreamsinfo.digests
    crc = digests[sum(per_folder[:index])] if digests else None
    offset = archive.afterheader + streams.packinfo.packpositions[index]
    return offset, streams.packinfo.packsizes[index], dict_size, crc


def _decompress_lzma2(
    path: Path, offset: int, size: int, dict_size: int, crc: int | None, reader: DumpReader
) -> None:
    """Decompress one raw LZMA2 stream into `reader`, checking its CRC at the end."""
    decompressor = lzma.LZMADecompressor(
        lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "dict_size": dict_size}]
    )
    check = 0
    with open(path, "rb") as packed:
        packed.seek(offset)
        left = size
        while not decompressor.eof:
            data = b""
            if decompressor.needs_input:
                if not left:
                    raise EOFError("the compressed stream ends early")
                data = packed.read(min(left, LZMA_BLOCK_BYTES // 4))
                left -= len(data)
                if not data:
                    raise EOFError("the file ends early")
            chunk = decompressor.decompress(data, LZMA_BLOCK_BYTES)
            check = zlib.crc32(chunk, check)
            reader.put_pieces(chunk)
    if crc is not None and check != crc:
        raise EOFError(f"CRC mismatch in {path.name}")
