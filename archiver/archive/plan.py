"""The archive's plan: every entry's records and where each lies, computed from the album's listing.

The plan is the single source of the archive's length (Content-Length),
its ranges and what the producer is asked to write.  Offsets come from the
lengths of the very records that are sent (``zipformat``'s functions, run
with a placeholder CRC: every CRC field is 4 bytes, whatever its value), as
zip_kit's SizeEstimator runs its Streamer against a null writer.

Stored archives (the default)::

    | local header 0 | data 0 | local header 1 | data 1 | ... | central directory | end records |

no data descriptors: each CRC is known before its header goes out (the CRC
index, or read ahead, see ``crc_source``).  Deflated archives have no length
ahead: their entries are written whole by the producer (``instructions``).
A range of a stored archive is cut into pieces in ``pieces``.

Held by a download for as long as it runs, so compact: arrays and joined
bytes, about 280 bytes a file with its path and its two records (kept with a
CRC of 0, the CRC patched in as they are sent: building them again cost more
than anything else the service does a file).
"""

from __future__ import annotations

import bisect
import os
from array import array
from collections.abc import Mapping, Sequence
from itertools import accumulate
from pathlib import Path

from .entries import (
    EntryPolicy,
    dos_date_time,
    extended_timestamp,
    external_attributes,
    load_zone,
)
from .filesystems import Filesystem, trusted_ids
from .listing import AlbumFile
from .local_headers import end_inside_an_entry
from .names import entry_names
from .producer_protocol import SECOND, FileKey
from .zipformat import (
    CENTRAL_CRC_AT,
    CRC_FIELD,
    CRC_SIZE,
    DEFLATED,
    LOCAL_CRC_AT,
    STORED,
    EntryFields,
    central_header,
    end_records,
    local_header,
    stored_when_deflating,
)


class ArchivePlan:
    """The plan of one album's archive: its entries, and in store mode where every record lies.

    ``directory``: the album's real path (absolute), which the producer opens
    its files beneath; ``files``: the listing's, in the archive's order.
    ``compression``: the deflate level, 1-9, or 0 for a stored archive.
    ``policy``: how entries are named, timed and given modes (``entries``).
    ``filesystems``: the listing's (``AlbumListing.filesystems``).
    ``length`` is None for a deflated archive (sizes unknown until written).
    ``local_offsets[k]`` is where entry k's local header starts (k = count:
    the central directory); ``central_offsets[k]`` where its central header
    starts, from the central directory's start (k = count: the end records).
    """

    def __init__(
        self,
        directory: Path,
        files: Sequence[AlbumFile],
        compression: int = 0,
        policy: EntryPolicy | None = None,
        filesystems: Mapping[int, Filesystem | None] | None = None,
    ) -> None:
        policy = policy or EntryPolicy()
        zone = load_zone(policy.zone)[0]
        self.directory = directory
        self.compression = compression
        self.count = len(files)
        self.total_size = sum(file.size for file in files)
        paths = [os.fsencode(file.path) for file in files]
        self._paths = b"".join(paths)
        self._path_ends = array("Q", accumulate(len(path) for path in paths))
        names = [name.encode() for name in entry_names(paths, policy.name_encoding, policy.oem_names)]
        # Entry names are the paths on disk, but where the naming policy changed one.
        self._names = None if names == paths else b"".join(names)
        self._name_ends = None if names == paths else array("Q", accumulate(len(name) for name in names))
        del paths, names
        self.sizes = array("Q", (file.size for file in files))
        # Device, inode and size, then mtime and ctime as whole seconds and nanoseconds: an
        # mtime past 2262 does not fit 64 bits of nanoseconds (a camera's clock can say so).
        self._identities = array("Q", (value for file in files for value in file.key[:3]))
        self._times = array("q", (part for file in files for ns in file.key[3:] for part in divmod(ns, SECOND)))
        self._dos_times = array("I", (dos_date_time(file.mtime_ns, zone) for file in files))
        self._unix_times = array("q", (file.mtime_ns // 1_000_000_000 for file in files))
        self._attributes = array("I", (external_attributes(file.mode, policy.keep_modes) for file in files))
        # The entries by ctime (whole seconds), newest last: the files changed lately, at once (changed_since).
        ctimes = self._times[2::4]
        self._by_ctime = array("Q", sorted(range(self.count), key=ctimes.__getitem__))
        self._ctimes_in_order = array("q", (ctimes[k] for k in self._by_ctime))
        # Every entry's CRC once one lookup found them all in the CRC index (``crc_source``), and the
        # devices whose ctimes that relied on: the next download of this plan looks none up (20,000
        # keys: ~30 ms before the first byte).  What the index answered for these keys, which every
        # change moves (the plan is its keys, ``key``): kept as long as the plan, even once the
        # index's memory has let them go (helper 93).  A CRC kept wrong (a write through a shared
        # mapping, a FUSE type trusted wrongly: README, Failure behaviour) lasts as it would in the
        # index file, until the file's key moves; without an index file, until the plan is let go.
        # Nor are these keys then used in the index's memory: with no index file, a popular album's
        # plan may outlive them there, and its next plan reads them again (time, not bytes).
        self.indexed_crcs: array[int] | None = None
        self.devices = frozenset(self._identities[0::3])
        # The trusted filesystem the walk saw on each device (``AlbumListing.filesystems``): this plan's
        # CRCs are looked up, read and kept under its id (``filesystem_ids``), and the producer checks
        # each file of that device against it.  A device number names a filesystem only while it is
        # mounted (``CtimeTrust.filesystem``).  None: made without a walk's view (tests): the
        # filesystems the index's trust saw last (``crc_index.LATEST``), and the producer checks none.
        self.filesystems: dict[int, Filesystem] | None = None
        self.filesystem_ids: dict[int, int] | None = None
        if filesystems is not None:
            self.filesystems = {
                device: seen for device in self.devices if (seen := filesystems.get(device)) is not None
            }
            self.filesystem_ids = trusted_ids(self.filesystems)
        self.local_offsets = array("Q")
        self.central_offsets = array("Q")
        # Stored: every entry's local and central header, with CRC 0, joined (see _lay_out).
        self._local_records = b""
        self._local_ends = array("Q")
        self._central_records = b""
        self.length: int | None = None
        if compression == 0:
            self._lay_out()

    def changed_since(self, seconds: int) -> list[int]:
        """The entries whose ctime is ``seconds`` (Unix time, whole) or later."""
        return list(self._by_ctime[bisect.bisect_left(self._ctimes_in_order, seconds) :])

    def path(self, k: int) -> bytes:
        """Entry k's file, relative to the album."""
        return self._paths[self._path_ends[k - 1] if k else 0 : self._path_ends[k]]

    def path_str(self, k: int) -> str:
        """Entry k's file, relative to the album, as text (for the log; undecodable bytes escaped)."""
        return os.fsdecode(self.path(k))

    def identity(self, k: int) -> tuple[int, ...]:
        """Entry k's key as the producer takes it (``producer_protocol.identity`` of ``key(k)``, from the tables)."""
        return (*self._identities[3 * k : 3 * k + 3], *self._times[4 * k : 4 * k + 4])

    def key(self, k: int) -> FileKey:
        """Entry k's file as listed: device, inode, size, mtime_ns, ctime_ns (the CRC index's key)."""
        identities, times, i, t = self._identities, self._times, 3 * k, 4 * k  # indexed: no slices made
        mtime, ctime = times[t] * SECOND + times[t + 1], times[t + 2] * SECOND + times[t + 3]
        return identities[i], identities[i + 1], identities[i + 2], mtime, ctime

    def name(self, k: int) -> bytes:
        """Entry k's name in the archive (UTF-8, see ``names``)."""
        if self._names is None or self._name_ends is None:
            return self.path(k)
        return self._names[self._name_ends[k - 1] if k else 0 : self._name_ends[k]]

    def fields(self, k: int) -> EntryFields:
        """What entry k's records say of it: name, method (stored, or deflated in a deflated plan), times, mode."""
        method = STORED if self.compression == 0 or stored_when_deflating(self.sizes[k]) else DEFLATED
        extra = extended_timestamp(self._unix_times[k] * 1_000_000_000)
        return EntryFields(self.name(k), method, self._dos_times[k], self._attributes[k], extra)

    def local_header(self, k: int, crc: int) -> bytes:
        """Entry k's local header (stored archives), with ``crc``."""
        start = self._local_ends[k - 1] if k else 0
        return _with_crc(self._local_records, start, self._local_ends[k], LOCAL_CRC_AT, crc)

    def central_header(self, k: int, crc: int) -> bytes:
        """Entry k's central directory header (stored archives), with ``crc``."""
        start, end = self.central_offsets[k], self.central_offsets[k + 1]
        return _with_crc(self._central_records, start, end, CENTRAL_CRC_AT, crc)

    def central_headers(self, first: int, stop: int, crcs: Sequence[int]) -> bytearray:
        """The central headers of entries ``first`` .. ``stop - 1`` joined, entry ``first + i`` with ``crcs[i]``.

        The same bytes as ``central_header`` entry by entry, copied at once and
        patched (APPNOTE 4.3.12): 20,000 records cost 0.03 s of the service's CPU
        one at a time, a tenth of that at once.
        """
        offsets = self.central_offsets
        base = offsets[first]
        records = bytearray(memoryview(self._central_records)[base : offsets[stop]])
        at = CENTRAL_CRC_AT - base
        for k, crc in zip(range(first, stop), crcs, strict=True):
            CRC_FIELD.pack_into(records, offsets[k] + at, crc)
        return records

    def whole_entries(self, start: int, end: int) -> range:
        """The entries whose local header and data lie wholly in bytes ``start`` .. ``end``."""
        offsets = self.local_offsets
        first = bisect.bisect_left(offsets, start)
        stop = min(bisect.bisect_right(offsets, end + 1) - 1, self.count)
        return range(first, max(first, stop))

    def whole_central_headers(self, start: int, end: int) -> range:
        """The entries whose central header lies wholly in bytes ``start`` .. ``end``."""
        offsets, at = self.central_offsets, self.central_offset
        first = bisect.bisect_left(offsets, start - at)
        stop = min(bisect.bisect_right(offsets, end + 1 - at) - 1, self.count)
        return range(first, max(first, stop))

    def entries_stored_when_deflating(self) -> array[int]:
        """The entries a deflated plan stores (``zipformat.stored_when_deflating``): their CRCs are read first."""
        return array("I", (k for k, size in enumerate(self.sizes) if stored_when_deflating(size)))

    def crc_entries(self, start: int, end: int) -> array[int]:
        """The entries whose CRC field bytes ``start`` .. ``end`` hold (in a local or a central header), in order sent.

        The CRC field itself, not merely its header: a range that holds a
        header but not its CRC (``bytes=0-0``, a resume from just past the
        field) needs no read of that file (helper 88: four bytes read the
        whole first file of an album not in the CRC index).
        """
        central_at = self.central_offset
        entries = array("I")  # compact: a whole download lists every entry
        if start < central_at:
            # Entries whose local CRC field ends at or after ``start`` and begins at or before ``end``.
            first = bisect.bisect_right(self.local_offsets, start - LOCAL_CRC_AT - CRC_SIZE)
            last = bisect.bisect_right(self.local_offsets, min(end, central_at - 1) - LOCAL_CRC_AT) - 1
            entries.extend(range(first, min(last, self.count - 1) + 1))
        if end >= central_at:
            offsets = self.central_offsets
            first = bisect.bisect_right(offsets, max(start, central_at) - central_at - CENTRAL_CRC_AT - CRC_SIZE)
            last = min(bisect.bisect_right(offsets, end - central_at - CENTRAL_CRC_AT) - 1, self.count - 1)
            done = range(entries[0], entries[-1] + 1) if entries else range(0)
            # Those of first .. last not in ``done``: before it, then after it (a whole download's: none).
            entries.extend(range(first, min(last + 1, done.start)))
            entries.extend(range(max(first, done.stop), last + 1))
        return entries

    def tail_size(self) -> int:
        """Bytes from the last entry's last byte to the stored archive's end (>= 1).

        The last byte of the last entry's data, or of its local header if it has none; then the
        central directory (4.3.12) and the end records (4.3.14-4.3.16).  A reader that has not got
        all of these cannot take the archive for whole, not even one that reads it front to back
        (Java's ZipInputStream, bsdtar from a pipe): its last entry is cut, inside it (Java's
        ZipInputStream takes a cut within the first 30 bytes of a local header, or between
        entries, for the archive's end; helper 75).
        """
        assert self.length is not None
        return self.length - max(self.central_offset - 1, 0)

    def cut_inside_an_entry(self, cut: int, floor: int) -> int:
        """The largest cut in [floor, cut] of the stored archive (a count of bytes from its start) inside an entry.

        Inside: past its local header's fixed part (4.3.7: 30 bytes), in its name, extra
        field or data.  A part that ends between two entries, or within that fixed part, reads
        to a reader that reads front to back (Java's ZipInputStream) as a whole archive of the
        entries before it (helper 75).  ``floor`` if there is no such cut; ``cut`` if it lies in
        the central directory or after (the tail, ``tail_size``).  Deflated, the entries' offsets
        are found as written (``local_headers.LocalHeaderFinder``).
        """
        return end_inside_an_entry(self.local_offsets, self.count, cut, floor)

    def written_local_header(self, k: int) -> bytes:
        """Entry k's local header as the producer writes it, its CRC 0 (deflated: the one it has)."""
        return local_header(self.fields(k), 0, self.sizes[k])

    def written_first_central_header(self) -> bytes:
        """The central directory's first header, as written but for its CRC and compressed size (0 here)."""
        return central_header(self.fields(0), 0, 0, self.sizes[0], 0)

    @property
    def central_offset(self) -> int:
        """Where the central directory starts (stored archives): the bytes before it are the entries'."""
        return self.local_offsets[-1]

    def end_records(self) -> bytes:
        """The end records after the central directory (stored archives; ZIP64's where needed, 4.3.14-4.3.16)."""
        return end_records(self.count, self.central_offsets[-1], self.central_offset)

    def _lay_out(self) -> None:
        """Every record, and its offset from the lengths of the records themselves (CRC 0: the length is the same)."""
        offset = central = 0
        local_records, central_records = [], []
        # One pass, each entry's fields made once (20,000 entries: ~0.03 s less than one pass a record kind).
        for k, size in enumerate(self.sizes):
            fields = self.fields(k)
            local = local_header(fields, 0, size)
            record = central_header(fields, 0, size, size, offset)
            self.local_offsets.append(offset)
            self.central_offsets.append(central)
            local_records.append(local)
            central_records.append(record)
            offset += len(local) + size
            central += len(record)
        self.local_offsets.append(offset)
        self.central_offsets.append(central)
        self._local_records = b"".join(local_records)
        self._local_ends = array("Q", accumulate(len(record) for record in local_records))
        self._central_records = b"".join(central_records)
        self.length = offset + central + len(self.end_records())


def _with_crc(records: bytes, start: int, end: int, crc_at: int, crc: int) -> bytes:
    """The record ``records[start:end]`` with ``crc`` in its CRC-32 field at ``crc_at``."""
    crc_start = start + crc_at
    return records[start:crc_start] + CRC_FIELD.pack(crc) + records[crc_start + CRC_SIZE : end]
