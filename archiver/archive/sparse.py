"""Sparse files: where their holes lie (``lseek``'s SEEK_DATA), and CRC-32s extended by zeros unread.

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


def hole_ahead(fd: int, most: int, minimum: int) -> int:
    """The length of the hole at ``fd``'s position, up to ``most`` bytes, and ``fd`` moved past it.

    0, and ``fd`` where it was, if that is under ``minimum`` or the
    filesystem cannot tell (ESPIPE, EINVAL): then the bytes are read.  If
    ``fd`` cannot be moved back, OSError: never a read from elsewhere.
    """
    if most < minimum:
        return 0
    try:
        position = os.lseek(fd, 0, os.SEEK_CUR)
        data = os.lseek(fd, position, os.SEEK_DATA)
    except OSError as error:  # a failed lseek moves nothing
        if error.errno != errno.ENXIO:
            return 0
        data = os.fstat(fd).st_size  # no data after ``position``: a hole to the end (none if it is the end)
    hole = min(data - position, most)
    if hole < minimum:
        hole = 0
    os.lseek(fd, position + hole, os.SEEK_SET)
    return hole
