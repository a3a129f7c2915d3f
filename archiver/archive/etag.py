"""The archive's identity: a strong ETag from everything its bytes depend on, and when it may be sent.

An ETag promises the same bytes under the same tag (RFC 9110 8.8.3): a resume
with If-Range splices the bytes sent under one tag to those of another
request.  So the tag covers the format's version, the naming and zone
policies, and each file's key, and is withheld (``archive_validator``)
wherever a change might not move it.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata

from .ctime_trust import racy_times
from .entries import EntryPolicy
from .filesystems import trusted_ids
from .listing import AlbumListing

# The records this version writes: changed whenever they change.
# 15: CP866 names whose first small O CP1251 reads as "®" before a small letter ("отчёт" was "®взсв") read as CP866
# (14: Greek and mathematical UTF-8 names that CP437 holds (no Latin letter) no longer read as CP866;
# 13: Serbian and Macedonian names in CP1251 (and names with a dagger) read as CP1251, not CP866;
# 12: names in CP866 that were read as CP437 and written in UTF-8 read as CP866;
# 11: names in CP866, Russian Windows' OEM code page, read as CP866 where CP1251 makes no words of them;
# 10: names one file without Unicode's ignorable code points numbered, folders cut to one name kept apart;
# 9: names one file after best fit, NFKC or NTFS's upper case numbered, names cut to fit macOS's NFD;
# 8: the short-name rule in any script; 7: short-name shapes' ~ becomes _)
FORMAT_VERSION = "archiver-zip-15"


def archive_variant(compression: int, policy: EntryPolicy) -> str:
    """Everything the bytes depend on beside the files: the format, the deflate level, the naming, zone and modes.

    And the Unicode version the names are normalised, folded and cut by: a
    Python upgrade may name entries otherwise, and a resume across it must not
    join two archives (helper 71).
    """
    return f"{FORMAT_VERSION};unicode={unicodedata.unidata_version};level={compression};{policy.describe()}"


def archive_etag(listing: AlbumListing, variant: str) -> str:
    """A strong ETag from all the archive's bytes depend on: ``variant`` (the format, the policies), each file's
    name, size, mtime, mode, and the ids of their filesystems as the walk saw them (``listing.filesystems``).

    And each file's ctime: a file rewritten in place with its size and mtime
    restored (``touch -r``) has other bytes, and a resume across that change
    must not splice two archives (If-Range).  Its ctime moved.  And its
    inode: another file renamed over it within the same clock tick would
    otherwise keep the ETag, and the cached plan (keyed by it) would name the
    old file, which the producer refuses, download after download.  Not the
    device: hosts sharing a storage over NFS see the same inodes under
    different device numbers, and must give one archive one ETag.  But the
    ids of the filesystems (``filesystems.Filesystem.id``), which NFS reports as 0
    on every client: a btrfs snapshot that took a deleted subvolume's device
    number keeps its files' inodes and times, and kept the tag with other
    bytes (helper 159).
    """
    digest = hashlib.sha256(variant.encode())
    for file in listing.files:
        fields = (os.fsencode(file.path), file.size, file.mtime_ns, file.mode, file.ctime_ns, file.inode)
        digest.update(b"\0%s\0%d\0%d\0%o\0%d\0%d" % fields)
    devices = {file.device for file in listing.files}
    ids = trusted_ids(listing.filesystems)
    filesystems = {ids[device] for device in devices if device in ids}
    digest.update(b"\0filesystems %s" % b",".join(b"%d" % fsid for fsid in sorted(filesystems)))
    return f'"{digest.hexdigest()[:32]}"'


def archive_validator(listing: AlbumListing, etag: str, length: int | None) -> str | None:
    """The ETag to send for ``listing``'s archive (``etag``), or None where it would not be a strong validator.

    None for a deflated archive (``length`` None: zlib's bytes are not
    promised twice), and where a file may change without its key moving (a
    ctime that may be only the mtime again, as sshfs reports: the walk's
    ``CtimeTrust``, ``listing.filesystems``),
    where an edit would keep the tag: a resume across it (If-Range) would
    splice two archives, and an If-None-Match would keep a stale copy.  Nor
    while a file's ctime lies within a clock tick of the walk that listed it
    (``is_racy``): written again later in that tick (or that second, on a
    filesystem of whole seconds), it would keep its key, and the archive its
    tag.  Without an ETag, If-Range never matches and a ranged request gets
    the whole archive.
    """
    if length is None:
        return None
    devices = {file.device for file in listing.files}
    started = listing.started_ns
    if any(listing.filesystems.get(device) is None for device in devices) or any(
        racy_times(f.mtime_ns, f.ctime_ns, started) for f in listing.files
    ):
        return None
    return etag
