"""An append-only spool of small records on disk, kept in runs, read back lazily run by run or merged.

A large scan streams its per-endpoint records here instead of holding them in memory: memory then
grows with the number of runs (one 64 KiB read buffer each while merging), not with the records.
"""

from __future__ import annotations

import heapq
import os
import pickle
import tempfile
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_LEN = 4  # bytes of the length prefix in front of each pickled record
_BLOCK = 64 * 1024


class Spool:
    """Runs of records in one unlinked temporary file (gone when the spool is closed or collected).

    `add_run` appends records; `run(i)` reads run i back in write order; `merged(key)` yields every
    record in `key` order when each run was written sorted by `key` (a k-way merge, as in an
    external sort). Records must be picklable; nothing in them is executable input from elsewhere.
    """

    def __init__(self, directory: str | None = None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory)  # O_TMPFILE or unlinked at once: no name left behind
        self._fd = self._file.fileno()
        self._end = 0
        self._runs: list[tuple[int, int, int]] = []  # (offset, bytes, records)
        self._finalizer = weakref.finalize(self, self._file.close)

    def add_run(self, records: Iterable[Any]) -> int:
        """Append one run; returns its index."""
        parts: list[bytes] = []
        count = 0
        for rec in records:
            data = pickle.dumps(rec, protocol=pickle.HIGHEST_PROTOCOL)
            parts.append(len(data).to_bytes(_LEN, "little"))
            parts.append(data)
            count += 1
        blob = b"".join(parts)
        view, offset = memoryview(blob), self._end
        while view:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n
        self._runs.append((self._end, len(blob), count))
        self._end += len(blob)
        return len(self._runs) - 1

    @property
    def runs(self) -> int:
        return len(self._runs)

    def __len__(self) -> int:
        return sum(r[2] for r in self._runs)

    def run(self, index: int) -> Iterator[Any]:
        """The records of run `index`, in the order they were written, read in 64 KiB blocks."""
        start, size, _ = self._runs[index]
        pos, end = start, start + size
        buf, i = b"", 0
        while True:
            have = len(buf) - i
            if have >= _LEN:
                n = int.from_bytes(buf[i:i + _LEN], "little")
                if have >= _LEN + n:
                    yield pickle.loads(memoryview(buf)[i + _LEN:i + _LEN + n])  # noqa: S301 - written above
                    i += _LEN + n
                    continue
                need = _LEN + n - have
            else:
                need = _LEN - have
            if pos >= end:
                if have:
                    raise EOFError("spool: truncated run")
                return
            chunk = os.pread(self._fd, min(max(_BLOCK, need), end - pos), pos)
            if not chunk:
                raise EOFError("spool: truncated run")
            pos += len(chunk)
            buf, i = buf[i:] + chunk, 0

    def records(self) -> Iterator[Any]:
        """Every record, run after run."""
        for i in range(len(self._runs)):
            yield from self.run(i)

    def merged(self, key: Callable[[Any], Any]) -> Iterator[Any]:
        """Every record in `key` order, given runs each written in `key` order."""
        return heapq.merge(*(self.run(i) for i in range(len(self._runs))), key=key)

    def close(self) -> None:
        self._finalizer()
