"""Byte ranges and preconditions for resumable downloads (RFC 9110, sections 8.8.3, 13.1, 14).

Only what a download manager or ``curl -C -`` needs: one range per request
(several are answered with the whole archive, which RFC 9110 allows), a
strong ETag (``archive.etag``), If-Range by that ETag, and the ETag preconditions (If-Match,
If-None-Match).  No Last-Modified is sent, so the date preconditions are
ignored, as RFC 9110 13.1.3-4 have it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 9110's grammar: ASCII digits and optional whitespace (space, tab) only.
# Python's \d and \s would take any Unicode digit or space, and int() would
# read "٣" as 3.
_SINGLE_RANGE = re.compile(r"bytes[ \t]*=[ \t]*([0-9]*)[ \t]*-[ \t]*([0-9]*)", re.IGNORECASE | re.ASCII)
# RFC 9110 8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text (a comma is one,
# a space is not).  A list of them (5.6.1.2): elements between commas, blanks around them, empty ones allowed.
# Blanks are taken only before an element and after a tag, so a run of them is read one way, in linear time.
_ENTITY_TAG = r'(?:W/)?"[\x21\x23-\x7e\x80-\xff]*"'
_ENTITY_TAG_LIST = re.compile(rf"[ \t]*(?:{_ENTITY_TAG}[ \t]*)?(?:,[ \t]*(?:{_ENTITY_TAG}[ \t]*)?)*")
_TAG_IN_LIST = re.compile(_ENTITY_TAG)
_ANY = re.compile(r"[ \t]*\*[ \t]*")

# A position with more digits than this is past any archive (10^19 bytes is
# ten exabytes), and is read as this many nines rather than converted:
# int() refuses strings over 4,300 digits, and converting long ones costs
# quadratic time.
_MAX_DIGITS = 19
_HUGE = 10**_MAX_DIGITS - 1


# A single range is "bytes=" and two numbers: a longer header is not one we
# take.  The cap also bounds the regular expression's work, which grows with
# the square of a run of blanks.
MAX_RANGE_HEADER = 200


class RangeNotSatisfiable(ValueError):
    """The range asked for starts at or past the end of the archive."""


@dataclass(frozen=True)
class ByteRange:
    """Bytes ``start`` to ``end``, both included, as in a Content-Range header."""

    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_range(header: str, length: int) -> ByteRange | None:
    """The single range ``header`` asks for within ``length`` bytes, or None to send everything.

    A header we do not take (several ranges, another unit, bad syntax, a last
    byte before the first, over MAX_RANGE_HEADER characters) means the whole
    archive, as RFC 9110 lets a server ignore Range (14.2).  A last byte past
    the end is cut to it (14.1.2).  Raises RangeNotSatisfiable for a range
    that holds no byte of the archive: a first byte at or past ``length``, or a
    suffix of 0 bytes or of an empty archive (14.1.1, a 416: 15.5.17).
    """
    if len(header) > MAX_RANGE_HEADER:
        return None
    match = _SINGLE_RANGE.fullmatch(header.strip(" \t"))
    if match is None or match.group(1) == match.group(2) == "":
        return None
    first, last = match.group(1), match.group(2)
    if first == "":  # "-N": the last N bytes
        suffix = _position(last)
        if suffix == 0 or length == 0:
            raise RangeNotSatisfiable(header)
        return ByteRange(max(0, length - suffix), length - 1)
    start = _position(first)
    if last != "" and _position(last) < start:
        return None  # invalid: ignored
    end = length - 1 if last == "" else min(_position(last), length - 1)
    if start >= length:
        raise RangeNotSatisfiable(header)
    return ByteRange(start, end)


def surely_a_range(range_header: str | None, if_range: str | None) -> bool:
    """Whether a request will be answered with a range whatever the archive: one range asked, no If-Range.

    Known before the album is walked (the limits' early look); an If-Range
    needs the ETag, and a range past the end is a 416, not a range.
    """
    if range_header is None or if_range is not None:
        return False
    try:
        return parse_range(range_header, _HUGE) is not None
    except RangeNotSatisfiable:
        return False


def _position(digits: str) -> int:
    """A byte position written in ASCII digits, any number of them (leading zeros allowed)."""
    significant = digits.lstrip("0")
    return _HUGE if len(significant) > _MAX_DIGITS else int(significant or "0")


def if_range_allows(if_range: str | None, etag: str | None) -> bool:
    """Whether to honour Range given If-Range: absent, or the same strong ETag (a date never matches; nor,
    with ``etag`` None, anything)."""
    return if_range is None or (etag is not None and not if_range.startswith("W/") and if_range.strip() == etag)


class PreconditionFailed(Exception):
    """If-Match names no tag of this archive: answer 412 (RFC 9110 13.1.1)."""


class NotModified(Exception):
    """If-None-Match names this archive's tag: answer a GET or HEAD with 304 (RFC 9110 13.1.2)."""


def check_preconditions(if_match: str | None, if_none_match: str | None, etag: str | None) -> None:
    """Evaluate If-Match, then If-None-Match, against ``etag`` (None: the archive has none), as RFC 9110 13.2.2 orders.

    Header values are ``*`` or entity-tag lists (``"a", W/"b"``), several lines
    joined with commas.  If-Match compares strongly, If-None-Match weakly.  A
    value that is neither makes If-Match false and If-None-Match true (13.1.1-2).
    Raises PreconditionFailed or NotModified; returns when the request goes on.
    """
    if if_match is not None:
        tags = _entity_tags(if_match)
        if tags is None or ("*" not in tags and (etag is None or etag not in tags)):  # W/"x" is not a strong "x"
            raise PreconditionFailed(if_match)
    if if_none_match is not None:
        tags = _entity_tags(if_none_match)
        if tags is not None:
            tags = {tag.removeprefix("W/") for tag in tags}
            if "*" in tags or (etag is not None and etag in tags):
                raise NotModified(if_none_match)


def _entity_tags(field: str) -> set[str] | None:
    """The entity tags of an If-Match or If-None-Match field value, ``{"*"}`` for ``*``; None if it is neither.

    A quoted tag may hold commas (RFC 9110 8.8.3, ``etagc``): until 2026-12-06 the field was split on
    every comma, and ``"a,*,b"`` held a ``*`` (helper 143: If-None-Match with another server's such tag
    was a 304).  Then, until helper 189, whatever stood between commas was an element, and a tag
    was found in ``"x"y`` or ``*, "y"``, values that are no list of tags: an If-Match that passed
    and an If-None-Match that was a 304 where RFC 9110 says false and true (and nginx answers so).
    """
    if _ANY.fullmatch(field):
        return {"*"}
    if _ENTITY_TAG_LIST.fullmatch(field) is None:
        return None
    return set(_TAG_IN_LIST.findall(field))


def requested_range(range_header: str | None, if_range: str | None, etag: str | None, length: int) -> ByteRange | None:
    """The range to answer with 206, or None for the whole archive; RangeNotSatisfiable for a 416."""
    if not range_header or not if_range_allows(if_range, etag):
        return None
    return parse_range(range_header, length)
