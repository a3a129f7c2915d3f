"""The producer subprocess: writes the archive's bytes that the service's plan asks for to stdout.

Forked for each download by the producers' launcher (``launcher_program``,
which has this module imported: ~2 ms a start), or run afresh as
``producer.PROGRAM_COMMAND`` (``python -I -S``, this module's ``main``; the
tests); standard library only.  ``producer`` in the service has it started
and feeds its stdin with instructions (``producer_protocol``).

The album is opened from ``/``, and every file beneath the album's directory
descriptor, a component at a time with ``O_NOFOLLOW`` (a directory or file
swapped for a symbolic link is refused, wherever it points).  Each file must
be the regular file planned (device, inode, size, mtime, ctime) before any
of its bytes goes out, and after.  ``sendfile`` puts references to the
file's page-cache pages into the pipe, not copies: a write to the file
changes the bytes still in the pipe, so a file sent so is checked when
opened and again only once the reader (the service) has taken them
(``Output.check_once_read``).  A small file's bytes are copied: read first,
then checked once (a write since the plan would have moved its ctime), then
written.  Anything else (a file changed, truncated, grown, swapped or gone)
is one line on stderr naming the file and exit status 3: the service then
aborts the transfer.  The exit statuses are ``producer_protocol``'s ``EXIT_*``.
"""

from __future__ import annotations

import os
import sys
import time
import zlib

from archiver.archive.producer_files import Album, FileBlocks, check_identity, close_quietly, close_read, named_failure
from archiver.archive.producer_output import WRITE_GATHER, Output
from archiver.archive.producer_protocol import (
    ALBUM_BODY,
    CHANGED_ERRNOS,
    CHECKED,
    COMPUTED_CRC_LIMIT,
    COMPUTED_RUN_BODY,
    DEFLATED_ENTRY_BODY,
    DONE,
    END,
    EXIT_CHANGED,
    EXIT_FAILED,
    EXIT_OUT_OF_RESOURCES,
    EXIT_OUTPUT_CLOSED,
    FILE_SLICE_BODY,
    FILESYSTEM,
    LITERAL_BODY,
    RESOURCE_ERRNOS,
    STORED_ENTRY_BODY,
    FileChanged,
    FileKey,
    OutOfResources,
    file_key,
    read_filesystems,
)
from archiver.archive.sparse import crc32_with_zeros, may_have_holes
from archiver.archive.uncached_status import refresh_attributes
from archiver.archive.zipformat import (
    DEFLATED,
    FIELD_LIMIT,
    LOCAL_CRC_AT,
    STORED,
    EntryFields,
    central_header,
    data_descriptor,
    end_records,
    local_header,
    uses_zip64,
)

# Type names only: importing ``typing`` would add ~7 ms to a start afresh (the launcher's, the tests').
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

# What one read moves at most.
BLOCK = 1024 * 1024
# Slices up to this size are copied into the gathered output with their headers rather
# than moved by sendfile: for small files the system calls cost more than the copy
# (20,000 files of 8 KB: the producer's CPU 0.51 -> 0.39 s a download, five system calls a file fewer).
COPY_LIMIT = 16 * 1024
# The read of a file being deflated.
DEFLATE_READ = 256 * 1024
# Deflated, a hole of a sparse file this long or longer is not read nor compressed: the
# stream is flushed whole (Z_FULL_FLUSH: nothing after refers back), and then goes out as
# copies of one block of compressed zeros, HOLE_BLOCK bytes each, itself flushed whole
# (``Producer._zeros_block``), its CRC folded unread (``sparse``).  A 16 TiB file of a few
# bytes cost ~8 CPU-s for each MB sent, zlib compressing zeros at ~70 MB/s (helper 89).  64 KiB:
# a shorter hole is compressed as read, ~0.9 ms at most, for 4 KiB or more of data on disk
# around it (helper 91: 4 KiB every 1.25 MiB cost ~5 CPU-s a MB sent with 1 MiB here, and
# reads that ran into holes); its block deflates to ~83 bytes at level 6, 1 MiB's to ~1 KB.
HOLE_BLOCK = 64 * 1024
# What deflating may cost, whatever the data: at most DEFLATE_CPU_PER_BYTE CPU-seconds and
# DEFLATE_READ_PER_BYTE bytes read for each byte written, beyond an allowance; past either,
# data goes out as stored blocks (RFC 1951 3.2.4, deflate's own: level 0) until the producer
# is within both again.  Helper 106: zlib at level 9 on data of little entropy (a dithered
# scan, random "a" and "b") cost 2.7 CPU-s a MiB read, ~18 a MB sent, and a client that did not
# read held that for its stall timeout (~24 CPU-s a request of 60 bytes); 64 MiB files of
# zeros were read whole (1 GB each) for the 277 KB that fit in the buffers.  Ordinary data
# costs less than either bound (text at level 6 ~0.3 CPU-s a MB sent, 3-10 bytes read a byte
# written; photos ~0.02): 0.5 CPU-s a MB sent and a ratio of 32 are what a client can make
# deflate cost.  Looked at every DEFLATE_STEP bytes read.
DEFLATE_CPU_PER_BYTE = 0.5e-6
DEFLATE_CPU_ALLOWANCE = 0.25
DEFLATE_READ_PER_BYTE = 32
DEFLATE_READ_ALLOWANCE = 8 * 1024 * 1024
DEFLATE_STEP = 64 * 1024
# A deflated entry without ZIP64 (``zipformat.uses_zip64``: deflate_bound of its size under
# 0xFFFFFFFF) has 4-byte sizes, and its data must fit them whatever zlib makes of it.  The bound
# is the reference zlib's; zlib-ng (the system's libz on some distributions) makes incompressible
# data ~5.5 % longer at level 1, and a 4.1 GB video passed 4 GiB with no ZIP64 (helper 142).  So
# before compressing each read the producer looks at what is written, what the compressor may hold unwritten
# with one more read compressed (PENDING_BOUND, far above any zlib's: its buffer of 16 K symbols
# at the default memLevel, a few bytes each, and 256 KiB at 9 bits a byte), and the rest stored
# (``stored_length``); once that would reach the limit, the rest of the entry goes through a
# compressor of level 0 after a full flush: stored blocks of 32 KiB or more (zlib's
# ``deflate_stored`` emits a block once it holds its window, 32 KiB), 5 bytes each (RFC 1951
# 3.2.4), whatever the reads' sizes, and the final block.
PENDING_BOUND = 1024 * 1024
STORED_BLOCK_MIN = 32 * 1024
STORED_BLOCK_HEADER = 5


class Producer:
    """Carries out the instructions on ``source``, writing to ``output``."""

    def __init__(self, source: BinaryIO, output: Output) -> None:
        self.source = source
        self.output = output
        self.album: Album | None = None
        self.level = 0
        self.buffer = bytearray(BLOCK)
        self.deflate_buffer = memoryview(self.buffer)[:DEFLATE_READ]
        self._zeros_blocks: dict[int, bytes] = {}  # by level: HOLE_BLOCK zeros, deflated and flushed whole
        self._zeros: bytes | None = None  # HOLE_BLOCK zeros, once a hole is sent stored
        # Deflating's budget (instance attributes: the tests set their own), what it has read, and
        # the compressor of stored blocks (level 0) used past it.
        self.cpu_per_byte, self.cpu_allowance = DEFLATE_CPU_PER_BYTE, DEFLATE_CPU_ALLOWANCE
        self.read_per_byte, self.read_allowance = DEFLATE_READ_PER_BYTE, DEFLATE_READ_ALLOWANCE
        self.deflated_read = 0
        self._storer: zlib._Compress | None = None
        # The entries written whole (``D``, ``S``), for the central directory: fields, crc, compressed, size, offset.
        self.written: list[tuple[EntryFields, int, int, int, int]] = []

    def run(self) -> None:
        """Carry out instructions until ``DONE`` (every byte written, every file sent checked).

        Raises FileChanged (a file not the one planned), OutOfResources,
        BrokenPipeError (stdout closed), ValueError (instructions not
        understood, or cut short) and OSError (the storage's errors).
        """
        read, kind_of = self._read, self.source.read
        while True:
            kind = kind_of(1)
            # The most frequent first: a stored file's header, then its data.
            if kind == b"B":
                (length,) = LITERAL_BODY.unpack(read(LITERAL_BODY.size))
                self.output.write(read(length))
            elif kind == b"F":
                *identity, offset, length, verify, crc, path_length = FILE_SLICE_BODY.unpack(read(FILE_SLICE_BODY.size))
                path = read(path_length)
                self._with_file(
                    path, file_key(tuple(identity)), self._send_slice, offset, length, crc if verify else None
                )
            elif kind == b"H":
                (count,) = COMPUTED_RUN_BODY.unpack(read(COMPUTED_RUN_BODY.size))
                for _ in range(count):
                    self._computed_entry()
            elif kind == DONE:
                self.output.flush()
                self.output.settle(0)
                return
            elif kind == b"A":
                level, length, count = ALBUM_BODY.unpack(read(ALBUM_BODY.size))
                self.level = level
                directory = read(length)
                self.album = Album(directory, read_filesystems(read(count * FILESYSTEM.size)))
            elif kind == b"D":
                record = DEFLATED_ENTRY_BODY.unpack(read(DEFLATED_ENTRY_BODY.size))
                *identity, dos_time, attributes, path_length, name_length, extra_length = record
                path, name, extra = read(path_length), read(name_length), read(extra_length)
                fields = EntryFields(name, DEFLATED, dos_time, attributes, extra)
                self._with_file(path, file_key(tuple(identity)), self._send_deflated, fields)
            elif kind == b"S":
                record = STORED_ENTRY_BODY.unpack(read(STORED_ENTRY_BODY.size))
                *identity, dos_time, attributes, crc, verify, path_length, name_length, extra_length = record
                path, name, extra = read(path_length), read(name_length), read(extra_length)
                fields = EntryFields(name, STORED, dos_time, attributes, extra)
                self._with_file(path, file_key(tuple(identity)), self._send_stored_entry, fields, crc, verify)
            elif kind == CHECKED:
                self.output.flush()
                self.output.settle(0)
            elif kind == END:
                self._write_central_directory()
            else:
                raise ValueError(f"instruction {kind!r}: the input ended or is not the producer's")

    def _read(self, length: int) -> bytes:
        data = self.source.read(length)
        if len(data) != length:
            raise ValueError("the input ended inside an instruction")
        return data

    def _computed_entry(self) -> None:
        """One entry of an ``H`` run: its ``B`` (the local header, CRC 0) and ``F`` (all its data), the CRC computed."""
        read, kind_of = self._read, self.source.read
        if kind_of(1) != b"B":
            raise ValueError("a computed entry without its local header")
        (length,) = LITERAL_BODY.unpack(read(LITERAL_BODY.size))
        header = read(length)
        if kind_of(1) != b"F":
            raise ValueError("a computed entry without its data")
        *identity, offset, length, verify, _, path_length = FILE_SLICE_BODY.unpack(read(FILE_SLICE_BODY.size))
        path = read(path_length)
        key = file_key(tuple(identity))
        if offset or length != key[2] or verify or length > COMPUTED_CRC_LIMIT or len(header) < LOCAL_CRC_AT + 4:
            raise ValueError("a computed entry is a small file's whole data, unverified")
        self._with_file(path, key, self._send_computed, header)

    def _with_file(self, path: bytes, file_key: FileKey, send: Callable[..., bool], *args: object) -> None:
        """Open ``path`` and ``send`` it; ``send`` checks it is ``file_key`` before any of its bytes goes out.

        ``send`` returns True if it moved the bytes by sendfile: the file is
        then checked again once the reader has taken them out of the pipe.
        A file whose bytes were copied, ``send`` has checked again already.
        """
        if self.album is None:
            raise ValueError("a file before the album")
        try:
            fd = self.album.open(path)
            try:
                self.album.check_filesystem(fd, file_key[0])
                moved = send(fd, file_key, *args)
            except BaseException as error:
                if isinstance(error, FileChanged):
                    # Found short or long before its uncached look (a file truncated beneath a FUSE or
                    # NFS mount): the kernel's copy of its attributes fetched anew, or the next listing
                    # plans it from the stale copy and fails too (helper 150).
                    refresh_attributes(fd)
                close_quietly(fd)
                raise
        except FileChanged as change:
            raise FileChanged(f"{os.fsdecode(path)}: {change}") from None
        except BrokenPipeError:  # the output: the reader has gone
            raise
        except OSError as error:
            # The storage failed a read (EIO), named: a bare "[Errno 5]" named no file (helper 70).
            # ESTALE: the file was replaced on an NFS server, as an upload does.
            raise named_failure(path, error) from None
        if moved:
            self.output.check_once_read(fd, file_key, path)  # again, once its pages are out of the pipe
        else:
            close_read(fd, path)
        # Small files gathered for a beat (slow opens and closes: every file, in every mode, even an
        # empty one, which has no read to check at): the service must see the archive move.
        if self.output.due():
            self.output.flush()
            self.output.next_beat()

    def _send_slice(self, fd: int, key: FileKey, offset: int, length: int, crc: int | None) -> bool:
        """Write the slice; True if it was moved by sendfile (its pages may still be in the pipe), False if copied."""
        if offset + length > key[2]:
            raise FileChanged("slice past the planned size")
        if crc is None and length <= COPY_LIMIT:
            self.output.write(_read_copy(fd, key, offset, length))
            return False
        check_identity(fd, key)
        if crc is None:
            self.output.send_file(fd, offset, length)
            return True
        # Verified: the whole file is read for its CRC, the slice's part of each block written;
        # a hole's zeros are neither read nor copied (``sparse``).
        computed, at, view = 0, 0, memoryview(self.buffer)
        for count in FileBlocks(fd, key[2], self.buffer, HOLE_BLOCK if may_have_holes(os.fstat(fd)) else 0):
            if count < 0:
                computed = crc32_with_zeros(computed, -count)
                self._write_zeros(min(offset + length, at - count) - max(offset, at))
                at -= count
                continue
            computed = zlib.crc32(view[:count], computed)
            low, high = max(offset, at), min(offset + length, at + count)
            if low < high:
                self.output.write(view[low - at : high - at])
            at += count
        if computed != crc:
            raise FileChanged("its bytes are not the ones its CRC-32 was read from")
        check_identity(fd, key, uncached=True)  # again, now that its bytes are out (copied)
        return False

    def _send_computed(self, fd: int, key: FileKey, header: bytes) -> bool:
        """A whole small entry: ``header`` (its local header) with the CRC-32 of the data read, then the data."""
        data = _read_copy(fd, key, 0, key[2])
        crc = zlib.crc32(data).to_bytes(4, "little")  # APPNOTE 4.4.7, at LOCAL_CRC_AT (4.3.7)
        self.output.write(header[:LOCAL_CRC_AT] + crc + header[LOCAL_CRC_AT + 4 :])
        self.output.write(data)
        return False

    def _send_deflated(self, fd: int, key: FileKey, fields: EntryFields) -> bool:
        check_identity(fd, key)
        size = key[2]
        offset = self.output.position
        self.output.write(local_header(fields, 0, size))
        compressor = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS)
        crc = compressed = 0
        limit = None if uses_zip64(fields, size) else FIELD_LIMIT - 1  # (PENDING_BOUND)
        unsent = size  # the file's bytes not yet read
        storing_the_rest = False
        view = memoryview(self.deflate_buffer)
        holes = HOLE_BLOCK if may_have_holes(os.fstat(fd)) else 0
        for count in FileBlocks(fd, size, self.deflate_buffer, holes):
            if count < 0:  # a hole of -count bytes, at least HOLE_BLOCK
                crc = crc32_with_zeros(crc, -count)
                compressed += self._send_hole(compressor, -count)
                unsent += count
                continue
            crc = zlib.crc32(view[:count], crc)
            if limit is not None and compressed + PENDING_BOUND + stored_length(unsent) > limit:
                data = compressor.flush(zlib.Z_FULL_FLUSH)  # whole blocks so far: any blocks may follow
                compressed += len(data)
                self.output.write(data)
                compressor = zlib.compressobj(0, zlib.DEFLATED, -zlib.MAX_WBITS)
                limit, storing_the_rest = None, True
            data = compressor.compress(view[:count]) if storing_the_rest else self._deflate(compressor, view[:count])
            unsent -= count
            if self.output.due():  # nothing went out for a beat (this file or those before)
                data += compressor.flush(zlib.Z_SYNC_FLUSH)
                compressed += len(data)
                self.output.write(data)
                self.output.flush()
                self.output.next_beat()
            else:
                compressed += len(data)
                self.output.write(data)
        data = compressor.flush()
        compressed += len(data)
        self.output.write(data)
        self.output.write(data_descriptor(crc, compressed, size, uses_zip64(fields, size)))
        self.written.append((fields, crc, compressed, size, offset))
        check_identity(fd, key, uncached=True)  # again, now that its bytes are out (copied)
        return False

    def _deflate(self, compressor: zlib._Compress, data: memoryview) -> bytes:
        """``data`` deflated by ``compressor``, or as stored blocks where that would pass the budget.

        A stretch of stored blocks follows a full flush of ``compressor`` and
        is itself flushed whole (RFC 1951 3.2.3: whole blocks, nothing after
        them refers back), so ``compressor`` goes on after it, as after a hole.
        """
        out = b""
        storing = False
        for start in range(0, len(data), DEFLATE_STEP):
            piece = data[start : start + DEFLATE_STEP]
            self.deflated_read += len(piece)
            written = self.output.position + len(out)
            if (
                self.deflated_read <= self.read_per_byte * written + self.read_allowance
                and time.process_time() <= self.cpu_per_byte * written + self.cpu_allowance
            ):
                out += compressor.compress(piece)
                storing = False
                continue
            if not storing:
                out += compressor.flush(zlib.Z_FULL_FLUSH)
                storing = True
            if self._storer is None:
                self._storer = zlib.compressobj(0, zlib.DEFLATED, -zlib.MAX_WBITS)
            out += self._storer.compress(piece) + self._storer.flush(zlib.Z_FULL_FLUSH)
        return out

    def _send_hole(self, compressor: zlib._Compress, length: int) -> int:
        """Deflated, ``length`` zero bytes (a hole: HOLE_BLOCK or more), unread: the bytes written.

        RFC 1951 3.2.3: a deflate stream is a series of blocks; after a full flush
        (an empty stored block ends it on a byte boundary, the window left
        unused) any whole blocks may follow, and the compressor's go on after them.
        """
        data = compressor.flush(zlib.Z_FULL_FLUSH)
        block = self._zeros_block()
        blocks, rest = divmod(length, HOLE_BLOCK)
        written = len(data)
        self.output.write(data)
        while blocks:
            copies = min(blocks, max(1, WRITE_GATHER // len(block)))
            written += copies * len(block)
            self.output.write(block * copies)
            blocks -= copies
        if rest:  # under HOLE_BLOCK: compressed as read
            data = compressor.compress(bytes(rest))
            written += len(data)
            self.output.write(data)
        return written

    def _write_zeros(self, count: int) -> None:
        """``count`` zero bytes (none if ``count`` <= 0), from one HOLE_BLOCK of them."""
        if count > 0 and self._zeros is None:
            self._zeros = bytes(HOLE_BLOCK)
        while count > 0:
            assert self._zeros is not None
            self.output.write(self._zeros[:count] if count < HOLE_BLOCK else self._zeros)
            count -= HOLE_BLOCK

    def _zeros_block(self) -> bytes:
        """HOLE_BLOCK zero bytes deflated at this album's level by a compressor of their own, flushed whole."""
        block = self._zeros_blocks.get(self.level)
        if block is None:
            compressor = zlib.compressobj(self.level, zlib.DEFLATED, -zlib.MAX_WBITS)
            block = compressor.compress(bytes(HOLE_BLOCK)) + compressor.flush(zlib.Z_FULL_FLUSH)
            self._zeros_blocks[self.level] = block
        return block

    def _send_stored_entry(self, fd: int, key: FileKey, fields: EntryFields, crc: int, verify: bool) -> bool:
        """A stored entry whole: its header, then its data as ``_send_slice`` sends a slice (checked the same)."""
        size = key[2]
        self.written.append((fields, crc, size, size, self.output.position))
        self.output.write(local_header(fields, crc, size))
        return self._send_slice(fd, key, 0, size, crc if verify else None)

    def _write_central_directory(self) -> None:
        # Its first byte tells the service that every file sent was checked (``CHECKED``).
        self.output.flush()
        self.output.settle(0)
        start = self.output.position
        for fields, crc, compressed, size, offset in self.written:
            self.output.write(central_header(fields, crc, compressed, size, offset))
        self.output.write(end_records(len(self.written), self.output.position - start, start))
        self.written.clear()


def stored_length(size: int) -> int:
    """The most the last ``size`` bytes of a deflated entry take through a compressor of level 0 (PENDING_BOUND).

    Its blocks, of STORED_BLOCK_MIN or more but the last, and the final one;
    a flush of it (a hole's, a heartbeat's) costs up to two more (the block it cuts
    short, and the empty one), which PENDING_BOUND's margin holds.
    """
    return size + STORED_BLOCK_HEADER * (-(-size // STORED_BLOCK_MIN) + 2)


def _read_copy(fd: int, key: FileKey, offset: int, length: int) -> bytes:
    """Bytes ``offset`` .. ``offset + length`` of ``fd``, read, then checked (``check_identity``) once.

    Nothing went out yet, and a copy cannot change after the check (one fstat
    a small file, not two: a fifth of the producer's system calls for 20,000
    files).  FileChanged if the file is not ``key`` or is shorter.
    """
    try:
        data = os.pread(fd, length, offset)
    except OSError as error:
        check_identity(fd, key)  # a directory or a FIFO in the file's place: "not a regular file"
        if error.errno not in CHANGED_ERRNOS:
            raise  # EIO: the storage's error, named by the caller (helper 71: it was "changed")
        raise FileChanged(error.strerror or str(error)) from None
    # Read before its type is known: whatever a path beneath the album can name (no device
    # node without root), reading it is harmless, and nothing read goes out unchecked.
    check_identity(fd, key, uncached=True)
    if len(data) != length:
        raise FileChanged("shorter than planned")
    return data


def main() -> int:
    """Carry out the instructions on stdin, the archive's bytes to stdout; the exit status (``producer_protocol``).

    0 once ``DONE`` is reached, every byte written and every file checked;
    ``EXIT_CHANGED`` (a file not the one planned) or ``EXIT_OUT_OF_RESOURCES``
    (no descriptor or memory) with one line on stderr; ``EXIT_OUTPUT_CLOSED``
    when stdout is closed (the service stopped reading); ``EXIT_FAILED`` for
    anything else (a storage error, instructions not understood), named on
    stderr.  What was written before a failure stands; the service decides
    what it means (an abort once the headers went out).
    """
    source = open(0, "rb", buffering=WRITE_GATHER, closefd=False)  # noqa: SIM115 (stdin, left open)
    try:
        # Its output's look at stdout (an fstat) too: failing outside, it was an uncaught traceback, the
        # download's line many lines long (helper 197's sweep).
        Producer(source, Output(1)).run()
    except FileChanged as change:
        print(f"archiver-producer: {change}", file=sys.stderr)
        return EXIT_CHANGED
    except OutOfResources as error:
        print(f"archiver-producer: {error}", file=sys.stderr)
        return EXIT_OUT_OF_RESOURCES
    except BrokenPipeError:
        return EXIT_OUTPUT_CLOSED
    except (ValueError, OSError) as error:
        print(f"archiver-producer: {error}", file=sys.stderr)
        if isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:  # not a file's: out of them all the same
            return EXIT_OUT_OF_RESOURCES
        return EXIT_FAILED
    return 0


if __name__ == "__main__":  # python -m archiver.archive.producer_program, with the package on the path
    sys.exit(main())
