"""Sparse files: where their holes lie (``lseek``'s SEEK_DATA, SEEK_HOLE), and CRC-32s extended by zeros unread.

Standard library only: the producer subprocess imports it.  A hole reads as
zeros; a file of a few bytes written can be made terabytes long
(`truncate`, an FTP `REST` past its end), and reading those zeros cost
hours (helpers 87, 89).  Appending n zero bytes to a message multiplies its
CRC register by x**(8n) modulo the CRC polynomial; that power is found by
squaring, so a hole of any length costs O(log n) steps.  zlib's
``crc32_combine`` (crc32.c: ``multmodp``, ``x2nmodp``) does the same;
Python's ``zlib`` does not offer it.
"""

from __future__ import annotations

import errno
import os

_POLYNOMIAL = 0xEDB88320  # reflected, as zlib's: bit 31 is x**0


def _multiply(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial, both reflected (zlib's ``multmodp``)."""
    product, bit = 0, 1 << 31
    while bit:
        if a & bit:
            product ^= b
            if not a & (bit - 1):
                break  # no lower term left
        bit >>= 1
        b = (b >> 1) ^ _POLYNOMIAL if b & 1 else b >> 1
    return product


def _powers() -> list[int]:
    """x**(2**k) modulo the polynomial, for k in 0 .. 66 (a count of up to 2**64 bytes: 2**67 bits)."""
    powers = [1 << 30]  # x**1
    for _ in range(66):
        powers.append(_multiply(powers[-1], powers[-1]))
    return powers


_POWERS = _powers()


def crc32_with_zeros(crc: int, count: int) -> int:
    """``crc`` extended by ``count`` zero bytes: ``zlib.crc32(bytes(count), crc)``, unread.

    ``count``: 0 .. 2**64 - 1 bytes; ``crc``: 0 .. 2**32 - 1.
    """
    power, k = 1 << 31, 3  # x**0; a byte is x**(2**3)
    while count:
        if count & 1:
            power = _multiply(_POWERS[k], power)
        count >>= 1
        k += 1
    return _multiply(power, crc ^ 0xFFFFFFFF) ^ 0xFFFFFFFF


def may_have_holes(status: os.stat_result) -> bool:
    """Whether a file holds fewer blocks than its length (a FUSE or NFS file saying 0 blocks: True).

    Only such a file is asked where its data lies: on NFS 4.2 each SEEK_DATA is a round trip.
    """
    return status.st_blocks * 512 < status.st_size


class Holes:
    """Where the holes of an open file lie, from its descriptor's position: asked once a hole and once a run of data.

    A reader calls ``next`` before each read.  Reading stops where a hole begins, not
    a read later: with SEEK_DATA asked only at each read's start, a file of 4 KiB of
    data every 1.25 MiB was read for a fifth of each hole, and deflated, compressed
    (helper 91).  ``lseek`` only: nothing is read here.
    """

    def __init__(self, fd: int, minimum: int) -> None:
        """``minimum``: the shortest hole skipped, in bytes (a shorter one is read as data)."""
        self.fd, self.minimum = fd, minimum
        self._data_end = -1  # where the run of data being read ends: no SEEK_DATA before it

    def next(self, most: int) -> int:
        """At the descriptor's position, ``most`` (> 0) bytes of the file left: what comes next.

        Negative: a hole of minus that many bytes (at least ``minimum``, at most
        ``most``), the descriptor moved past it.  Positive (1 .. ``most``): bytes to
        read before a hole could begin; ``most`` where the filesystem cannot tell
        (ESPIPE, EINVAL) or the file shrank.  OSError if the descriptor cannot be
        moved back: never a read from elsewhere.
        """
        fd = self.fd
        try:
            position = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:  # not a file that seeks (the reader's checks name it)
            return most
        if position < self._data_end:
            return min(self._data_end - position, most)
        if most < self.minimum:
            return most
        try:
            data = os.lseek(fd, position, os.SEEK_DATA)
        except OSError as error:  # a failed lseek moves nothing
            if error.errno != errno.ENXIO:
                self._data_end = position + most  # cannot tell: read it all
                return most
            data = os.fstat(fd).st_size  # no data after ``position``: a hole to the end
        hole = min(data - position, most)
        if hole >= self.minimum:
            os.lseek(fd, position + hole, os.SEEK_SET)
            return -hole
        try:  # data at ``position`` (or after a hole too short to skip): where does it end?
            end = os.lseek(fd, max(data, position), os.SEEK_HOLE)
        except OSError:
            end = position + most
        os.lseek(fd, position, os.SEEK_SET)
        if end <= position:  # the file shrank: the read says so
            return most
        self._data_end = end
        return min(end - position, most)
