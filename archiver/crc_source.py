"""One download's CRCs, computed ahead of zip in file order (``crc_index`` keeps them between downloads).

The header of file k waits only for file k's CRC: the CRCs are computed in
worker threads, small files a batch per call and large ones a block per
call, while zip reads the files before them.
"""

from __future__ import annotations

import os
from array import array
from pathlib import Path

import trio
from trio_util import AsyncValue  # type: ignore[attr-defined]

from .crc_index import BATCH_BYTES, BATCH_FILES, READ_SIZE, CrcIndex, FileChanged, FileKey, file_crc, small_file_crc


class CrcSource:
    """One download's CRCs, computed in file order ahead of zip; ``crc(k)`` waits for the k-th.

    ``known`` holds the CRCs the index had for the files' listed keys (-1
    where it had none, see ``CrcIndex.known``): those files are not opened
    at all.  One changed since it was listed is caught where its CRC is
    checked against zip's (``rewrite``).  Where no zip will check (the
    central directory of a range, ``partial``), ``mtimes`` are the listed
    ones, and a file read with another is FileChanged.
    """

    def __init__(
        self,
        directory: Path,
        names: bytes,
        sizes: array[int],
        index: CrcIndex,
        known: array[int] | None = None,
        mtimes: array[int] | None = None,
    ) -> None:
        self.directory = directory
        self.sizes = sizes
        self.index = index
        self.known = known
        self.mtimes = mtimes
        # zip's input: "./path\n" per file, in archive order.
        self._names = names
        self._crcs = array("I")
        self._ready = AsyncValue(0)

    async def compute(self) -> None:
        """Compute every CRC in order (run in the download's nursery)."""
        buffer = bytearray(READ_SIZE)
        entry, start = 0, 0
        while entry < len(self.sizes):
            if self.known is not None and self.known[entry] >= 0:
                # A run of known CRCs at once (a warm album is one run); the names are skipped
                # only if an unknown one follows.
                run_end = entry
                while run_end < len(self.sizes) and self.known[run_end] >= 0:
                    run_end += 1
                self._crcs.extend(self.known[entry:run_end].tolist())
                if run_end < len(self.sizes):
                    for _ in range(run_end - entry):
                        start = self._names.index(b"\n", start) + 1
                entry = self._ready.value = run_end
                continue
            if self.sizes[entry] > BATCH_BYTES:
                path, start = self._path(start)
                results = [await file_crc(path, self.sizes[entry], self.index, buffer)]
            else:
                results, start = await trio.to_thread.run_sync(
                    self._small_files, entry, start, buffer, limiter=self.index.readers
                )
            for read, (file_key, crc) in enumerate(results, entry):
                if self.mtimes is not None and file_key[3] != self.mtimes[read]:
                    raise FileChanged(f"{self._name(read)}: modified since it was listed")
                self._crcs.append(crc)
            entry += len(results)
            self._ready.value = entry
        self.known = None  # in ``_crcs`` now
        self._names = b""  # zip has them too; a download holds its names no longer than it needs them
        await trio.to_thread.run_sync(self.index.flush)

    def _path(self, start: int) -> tuple[Path, int]:
        """The path of the name at ``start`` in zip's input, and where the next name starts."""
        end = self._names.index(b"\n", start)
        return self.directory / os.fsdecode(self._names[start:end]), end + 1

    def _small_files(self, entry: int, start: int, buffer: bytearray) -> tuple[list[tuple[FileKey, int]], int]:
        """CRCs of the small files from ``entry`` on, as many as one batch holds (in a worker thread)."""
        results: list[tuple[FileKey, int]] = []
        budget = BATCH_BYTES
        while entry < len(self.sizes) and len(results) < BATCH_FILES:
            size = self.sizes[entry]
            if size > BATCH_BYTES or (results and size > budget):
                break
            if self.known is not None and self.known[entry] >= 0:
                break
            path, start = self._path(start)
            results.append(small_file_crc(path, size, self.index, buffer))
            budget -= size
            entry += 1
        return results, start

    async def crc(self, entry: int) -> int:
        if entry >= len(self._crcs):  # not computed yet: wait (the usual case is that it is)
            await self._ready.wait_value(lambda ready: ready > entry)
        return self._crcs[entry]

    def ready(self, entry: int) -> int | None:
        """The ``entry``-th CRC if it is computed, without waiting."""
        return self._crcs[entry] if entry < len(self._crcs) else None

    def forget(self, name: bytes) -> None:
        """Drop the CRC of the file ``name`` (as zip names it) from the index (zip found another one: it changed).

        The row to drop is the file's key now: the same as the one read or
        listed when the file changed behind the key's back (same size, mtime
        and ctime: only a clock set back does that), and if the key changed,
        the old row is never asked for again.
        """
        try:
            status = os.lstat(self.directory / os.fsdecode(name))
        except OSError:
            return
        self.index.forget((status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns))

    def _name(self, entry: int) -> str:
        """The ``entry``-th name (relative to the album)."""
        start = 0
        for _ in range(entry):
            start = self._names.index(b"\n", start) + 1
        return os.fsdecode(self._names[start + 2 : self._names.index(b"\n", start)])
