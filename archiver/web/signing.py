"""Signed, expiring links (opt-in): ``/archive/<name>/?expires=<unix time>&sig=<base64url>[&filename=...]``.

With a link secret set, the album name alone no longer opens an archive: the
query must carry an expiry time and an HMAC-SHA256, keyed by the secret, of
the name and that expiry.  The CMS that hands out links signs them (README,
Signed links, shows the few lines it takes); ``archiver sign`` does the same
from a shell.  A leaked link then works until it expires, not for ever.
Ranges and resumes use the same URL, so they work until then too.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from urllib.parse import quote

# Seconds since the epoch: ten or so digits.  More would be a probe (and an
# int() of thousands of digits is slow).
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIGNATURE = re.compile(r"[A-Za-z0-9_-]{43}")  # 32 bytes, base64url without padding


class LinkRefused(PermissionError):
    """The link carries no valid, unexpired signature for this album."""


class LinkExpired(LinkRefused):
    """The link was signed, and its time has passed: what a user with an old link meets."""


def signature(secret: bytes, name: str, expires: int, filename: str | None = None) -> str:
    """The ``sig`` of a link to ``name`` valid until ``expires`` (unix seconds), with a display ``filename``.

    HMAC-SHA256 of ``name\nexpires``, and ``\nfilename`` after it when the
    link names the archive's file (``disposition``): that name cannot be
    changed without the secret either.
    """
    message = f"{name}\n{expires}" + ("" if filename is None else f"\n{filename}")
    mac = hmac.new(secret, message.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def signed_query(secret: bytes, name: str, expires: int, filename: str | None = None) -> str:
    query = f"expires={expires}&sig={signature(secret, name, expires, filename)}"
    return query if filename is None else f"{query}&filename={quote(filename, safe='')}"


def check_link(
    secret: bytes, name: str, expires: str | None, sig: str | None, now: float, filename: str | None = None
) -> None:
    """Raise LinkRefused unless ``sig`` signs ``name``, ``expires`` (and ``filename``) and that time is not past.

    The signature is compared in constant time; the reason goes to the log
    only, the client sees one answer for all of them.
    """
    if expires is None or sig is None:
        raise LinkRefused("no signature")
    if not _EXPIRES.fullmatch(expires) or not _SIGNATURE.fullmatch(sig):
        raise LinkRefused("malformed signature")
    if not hmac.compare_digest(signature(secret, name, int(expires), filename), sig):
        raise LinkRefused("bad signature")
    if int(expires) < now:
        raise LinkExpired(f"expired at {expires}")


# The longest a link may live: a century.  An expiry past 12 digits is refused as a probe, so
# "--ttl 99999999d" printed a link that never worked (helper 52).
MAX_TTL = 100 * 365 * 86400


def parse_duration(text: str) -> int:
    """Seconds in ``90``, ``90s``, ``15m``, ``1h`` or ``7d``, 1 to MAX_TTL; ValueError otherwise."""
    match = re.fullmatch(r"([0-9]{1,12})([smhd]?)", text.strip())  # 100 years is 10 digits of seconds
    if match is None:
        raise ValueError(f"not a duration: {text!r} (e.g. 90s, 15m, 1h, 7d)")
    seconds = int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    if not 0 < seconds <= MAX_TTL:
        raise ValueError(f"a link must live more than 0 s and at most 100 years, not {text!r}")
    return seconds
