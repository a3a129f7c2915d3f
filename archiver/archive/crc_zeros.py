"""CRC-32 (ZIP's, zlib's) extended by zero bytes without reading them: a sparse file's holes.

Standard library only: the producer subprocess imports it.  Appending n
zero bytes to a message multiplies its CRC register by x**(8n) modulo the
CRC polynomial; that power is found by squaring, so a hole of any length
costs O(log n) steps.  zlib's ``crc32_combine`` (crc32.c: ``multmodp``,
``x2nmodp``) does the same; Python's ``zlib`` does not offer it.
"""

from __future__ import annotations

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
