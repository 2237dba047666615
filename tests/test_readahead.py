"""The read-ahead stream of remote files: the same bytes in the same order whatever the read sizes, the
store's error raised where the reader reaches it, and a close that stops the thread."""

from __future__ import annotations

import io
import threading

import pyarrow as pa
import pytest

from deepfm.data.readahead import ReadAhead


class Flaky(io.RawIOBase):
    """A stream of ``data`` that raises ``OSError`` once ``fail_at`` bytes have been read (if given)."""

    def __init__(self, data: bytes, fail_at: int | None = None) -> None:
        self.data, self.pos, self.fail_at, self.closed_by_reader = data, 0, fail_at, False

    def read(self, n: int = -1) -> bytes:
        if self.fail_at is not None and self.pos >= self.fail_at:
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection refused")
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def close(self) -> None:
        self.closed_by_reader = True


DATA = bytes(range(256)) * 1000 + b"tail"


@pytest.mark.parametrize("block,depth,size", [(1000, 1, 7), (4096, 3, 4096), (100_000, 2, 333), (7, 3, 10_000)])
def test_same_bytes_whatever_the_sizes(block, depth, size):
    ra = ReadAhead(Flaky(DATA), block, depth)
    parts = []
    while chunk := ra.read(size):
        assert len(chunk) <= size
        parts.append(chunk)
    assert b"".join(parts) == DATA
    assert ra.read(size) == b"" and ra.read() == b""
    ra.close()


def test_read_all_readinto_and_arrow_decompression():
    assert ReadAhead(Flaky(DATA), 5000).read() == DATA
    buf = bytearray(300)
    ra = ReadAhead(Flaky(DATA), 256)
    assert ra.readinto(buf) == 256 and bytes(buf[:256]) == DATA[:256]
    gz = pa.compress(DATA, "gzip", asbytes=True)
    stream = pa.CompressedInputStream(pa.PythonFile(ReadAhead(Flaky(gz), 1000), mode="r"), "gzip")
    assert stream.read() == DATA


def test_the_stores_error_reaches_the_reader_after_the_good_bytes():
    ra = ReadAhead(Flaky(DATA, fail_at=3000), 1000, 2)
    got = b""
    with pytest.raises(OSError, match="connection refused"):
        while chunk := ra.read(700):
            got += chunk
    assert got == DATA[:3000]  # every byte the store gave, then its error
    ra.close()


def test_close_stops_the_thread_and_closes_the_stream():
    before = {t.ident for t in threading.enumerate()}
    src = Flaky(DATA * 50)
    ra = ReadAhead(src, 10, 2)  # the thread fills its queue and waits
    assert ra.read(5) == DATA[:5]
    ra.close()
    assert src.closed_by_reader and ra.closed
    with pytest.raises(ValueError):
        ra.read(5)  # never a wait for a block that no thread will fetch
    assert {t.ident for t in threading.enumerate() if t.name == "deepfm-readahead"} <= before


def test_closing_arrows_decompressor_closes_the_read_ahead():
    ra = ReadAhead(Flaky(pa.compress(DATA, "gzip", asbytes=True)), 100)
    stream = pa.CompressedInputStream(pa.PythonFile(ra, mode="r"), "gzip")
    assert stream.read(10) == DATA[:10]
    stream.close()
    assert ra.closed
