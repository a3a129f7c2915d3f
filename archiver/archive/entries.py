"""What each entry says of its file besides its name: its time (MS-DOS and UTC) and its mode.

The person unpacking an archive gets the file's true time wherever they are
(the extended timestamp, in UTC), a DOS time in one configured zone for the
readers that know no other (never the process's ``TZ``), and ordinary modes:
how a photo reached the server (FTP, the CMS) is not something the person
downloading it wants in its permissions.  README: What the person unpacks.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import io
import os
import stat
import zoneinfo
from dataclasses import dataclass
from datetime import datetime, tzinfo

from .zipformat import extended_timestamp_field

# The DOS date's range (4.4.6): 1980-01-01 00:00:00 to 2107-12-31 23:59:58.
DOS_TIME_MINIMUM = (1 << 21) | (1 << 16)
DOS_TIME_MAXIMUM = (127 << 25) | (12 << 21) | (31 << 16) | (23 << 11) | (59 << 5) | 29
# The extended timestamp's range: 1970-01-01 .. 2038-01-19 03:14:07 UTC, the seconds that every
# reader takes alike (Java reads the field's 32 bits signed, unzip with a 64-bit time_t and 7-Zip
# unsigned: past 2038 they disagree, and Java would show 1901 or 1969).
UNIX_TIME_RANGE = (0, 2**31 - 1)
# Regular files go out as rw-r--r-- unless modes are kept (EntryPolicy).
ORDINARY_MODE = stat.S_IFREG | 0o644


@dataclass(frozen=True)
class EntryPolicy:
    """How entries are named, dated and given modes (README, What the person unpacks).

    ``zone``: the IANA zone MS-DOS times are written in; ``keep_modes``: the
    modes on disk instead of 0644; ``name_encoding``: how names that are not
    UTF-8 on disk are read (``names``); ``oem_names``: with CP1251, names only
    CP866 makes words of read as CP866.
    """

    zone: str = "UTC"
    keep_modes: bool = False
    name_encoding: str = "cp1251"
    oem_names: bool = True

    def describe(self) -> str:
        """Everything here that shapes the bytes, for the ETag (renamed when what a kept mode loses changes).

        The zone by its rules as well as its name (``load_zone``): a tzdata
        update that moves an offset changes the DOS times (helper 95).
        """
        modes = "kept-owner-write" if self.keep_modes else "0644"
        names = self.name_encoding if self.oem_names else f"{self.name_encoding};oem=off"
        return f"zone={self.zone}@{load_zone(self.zone)[1]};modes={modes};names={names}"


@functools.cache
def load_zone(key: str) -> tuple[zoneinfo.ZoneInfo, str]:
    """The zone ``key`` (an IANA name), and a digest of the rules it was read from; once a process.

    Read as ``zoneinfo`` finds it (the first of ``zoneinfo.TZPATH`` holding it,
    else the ``tzdata`` package), and made from those very bytes, so that the
    digest names the rules every DOS time of this process was computed with,
    whatever the files become meanwhile.  ``zoneinfo.ZoneInfoNotFoundError``
    if there is no such zone; ValueError if ``key`` is no zone's name.
    """
    zoneinfo.ZoneInfo(key)  # its checks of the name (no "..", not absolute) and its errors
    data = _tzif_data(key)
    return zoneinfo.ZoneInfo.from_file(io.BytesIO(data), key=key), hashlib.sha256(data).hexdigest()[:16]


def _tzif_data(key: str) -> bytes:
    for directory in zoneinfo.TZPATH:
        path = os.path.join(directory, key)
        if os.path.isfile(path):
            with open(path, "rb") as file:
                return file.read()
    folders, _, resource = key.rpartition("/")
    package = ".".join(["tzdata.zoneinfo", *folders.split("/")]) if folders else "tzdata.zoneinfo"
    try:
        return importlib.resources.files(package).joinpath(resource).read_bytes()
    except (ImportError, OSError) as error:
        raise zoneinfo.ZoneInfoNotFoundError(f"no time zone key {key}") from error


def dos_date_time(mtime_ns: int, zone: tzinfo) -> int:
    """The MS-DOS date (high 16 bits) and time (low 16 bits) of an mtime, in ``zone``.

    Whole seconds (the fraction dropped, as the extended timestamp drops it)
    are rounded up to even, as Info-ZIP does (an extracted file is never
    older than the original's whole second); a time outside what a DOS date can hold
    is clamped to its first or last moment (never wrapped: 2108 is not 1980).
    """
    seconds = (mtime_ns // 1_000_000_000 + 1) & ~1
    try:
        local = datetime.fromtimestamp(seconds, zone)
    except (OverflowError, OSError, ValueError):
        return DOS_TIME_MINIMUM if seconds < 0 else DOS_TIME_MAXIMUM
    if local.year < 1980:
        return DOS_TIME_MINIMUM
    if local.year > 2107:
        return DOS_TIME_MAXIMUM
    return (
        ((local.year - 1980) << 25)
        | (local.month << 21)
        | (local.day << 16)
        | (local.hour << 11)
        | (local.minute << 5)
        | (local.second >> 1)
    )


def extended_timestamp(mtime_ns: int) -> bytes:
    """Info-ZIP's extended timestamp extra field (0x5455, APPNOTE 4.6.1's "UT"): the mtime only, UTC.

    The same 9 bytes in the local header and the central directory (flags:
    bit 0, modification time).  unzip, 7-Zip, bsdtar and Java restore this
    time, exact to the second and whatever the reader's zone, where they
    would take the DOS time as local time.  Empty for a time outside
    UNIX_TIME_RANGE, which readers would read differently: the clamped DOS
    time is then all there is.
    """
    seconds = mtime_ns // 1_000_000_000
    if not UNIX_TIME_RANGE[0] <= seconds <= UNIX_TIME_RANGE[1]:
        return b""
    return extended_timestamp_field(seconds)


# Bits a kept mode loses: set-user-ID, set-group-ID, sticky, and write by anyone but the owner.
# A reader that restores modes as given (bsdtar run as root) would make a downloaded file setuid,
# or one that others on the machine may change: the group on the server (an FTP group, the CMS's)
# is not the group the file lands in on the downloader's machine.
KEPT_MODE_DROPS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX | stat.S_IWGRP | stat.S_IWOTH


def external_attributes(mode: int, keep_modes: bool) -> int:
    """The external attributes (4.4.15): a Unix mode in the high 16 bits.

    0644 for every regular file unless modes are kept; then the mode on disk
    less KEPT_MODE_DROPS, and MS-DOS's read-only bit where the owner may not write.
    """
    if not keep_modes:
        return ORDINARY_MODE << 16
    return ((mode & ~KEPT_MODE_DROPS) << 16) | (0 if mode & stat.S_IWUSR else 1)
