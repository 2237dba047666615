"""A remote file read ahead by one thread, so that the parser never waits for the store.

A read from an object store is a request: without read-ahead the stream stops at every block boundary until
the store answers, and on a machine whose cores are all busy (every rank of a job parsing) that answer waits
for the store's process (or the network) to be scheduled too. One thread per open file keeps up to ``depth``
blocks fetched (and decompressed: the stream it reads is the store's stream with arrow's decompressor on it)
ahead of the reader; arrow releases the GIL while it fetches and inflates, so the thread runs beside the
parser. Errors (the store gone mid-read) reach the reader unchanged, at the point of the stream where they
happened, and closing the file stops the thread.
"""

from __future__ import annotations

import io
import queue
import threading

import pyarrow as pa

_END = b""


class ReadAhead(io.RawIOBase):
    """``stream`` (any object with ``read(n)`` and ``close()``) read ahead in ``block``-byte reads."""

    def __init__(self, stream, block: int, depth: int = 3) -> None:
        super().__init__()
        self._stream, self._block = stream, block
        self._blocks: queue.Queue[bytes | BaseException] = queue.Queue(max(1, depth))
        self._stop = threading.Event()
        self._head, self._pos, self._done = _END, 0, False
        self._thread = threading.Thread(target=self._fetch, name="deepfm-readahead", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            while not self._stop.is_set():
                block = self._stream.read(self._block)
                data = block.to_pybytes() if isinstance(block, pa.Buffer) else bytes(block)
                if not self._put(data) or not data:
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the reader, raised where it reads
            self._put(err)

    def _put(self, item: bytes | BaseException) -> bool:
        while not self._stop.is_set():
            try:
                self._blocks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def readable(self) -> bool:
        return True

    def _next(self) -> bool:
        """The next block at the head; False at the end of the stream."""
        if self._done:
            return False
        item = self._blocks.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        self._head, self._pos = item, 0
        self._done = not item
        return bool(item)

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        if self.closed:  # its thread is gone: a wait for the next block would never end
            raise ValueError("read of a closed stream")
        if size is None or size < 0:
            parts = []
            while self._pos < len(self._head) or self._next():
                parts.append(self._head[self._pos:])
                self._pos = len(self._head)
            return b"".join(parts)
        if self._pos >= len(self._head) and not self._next():
            return _END
        out = self._head[self._pos:self._pos + size]
        self._pos += len(out)
        return out

    def readinto(self, b) -> int:  # type: ignore[override]
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            self._thread.join()  # it finishes the read in progress (one block) and sees the stop
            self._stream.close()
        super().close()
