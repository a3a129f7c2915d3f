"""The archive's file name as the person saves it: ``Content-Disposition`` (RFC 6266, RFC 8187).

Without a display name the archive is named after the album, as before; but
the album's name is the link's secret, which then ends up in the Downloads
folder, and every archive looks alike.  So a link may carry one
(``?filename=Отпуск 2024``; signed with the rest of the link when links are
signed).  It is limited in length, may hold no control characters, and is
made portable by the naming policy (``archive.names``) like any entry name.

The header carries it twice: ``filename*=UTF-8''<percent-encoded>`` for
every current browser, and an ASCII ``filename="..."`` (Cyrillic
transliterated) for the rest.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import quote

from ..archive.names import portable_component

# Characters in a display name, ".zip" included: a long name is a probe, not a title.  And
# bytes in UTF-8: a file name on Linux and Android holds 255 (116 Chinese characters are 348).
MAX_DISPLAY_NAME = 120
MAX_DISPLAY_NAME_BYTES = 255
# Characters that make a name read otherwise than it is: bidirectional controls ("\u202egpj.exe"
# shows as "exe.jpg"), and invisible ones.  A link with them is refused, not cleaned.
_DECEPTIVE = frozenset(
    "\u061c\u200b\u200c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2060\u2066\u2067\u2068\u2069\ufeff"
)
# What a saved name may not start with: dots (a hidden file, "../") and any space, Unicode's
# too, in any mix: " \u00a0.bashrc" stripped of spaces alone would start with a dot again.
_LEADING_DOTS_AND_SPACES = re.compile(r"^[\s.]+")

# Russian letters in Latin (GOST 7.79-2000 system B, without diacritics), for the ASCII fallback.
_CYRILLIC = {
    "а": "a",
    "б": "b",
    "в": "v",
    "г": "g",
    "д": "d",
    "е": "e",
    "ё": "yo",
    "ж": "zh",
    "з": "z",
    "и": "i",
    "й": "j",
    "к": "k",
    "л": "l",
    "м": "m",
    "н": "n",
    "о": "o",
    "п": "p",
    "р": "r",
    "с": "s",
    "т": "t",
    "у": "u",
    "ф": "f",
    "х": "x",
    "ц": "c",
    "ч": "ch",
    "ш": "sh",
    "щ": "shh",
    "ъ": "_",
    "ы": "y",
    "ь": "_",
    "э": "e",
    "ю": "yu",
    "я": "ya",
}


class DisplayNameRefused(ValueError):
    """A ``filename`` the service does not take: too long, or with control characters."""


def display_name(requested: str | None, album: str) -> str:
    """The archive's file name, ending in ``.zip``: the requested one made portable, or the album's name.

    Raises DisplayNameRefused for a name over MAX_DISPLAY_NAME characters (or
    MAX_DISPLAY_NAME_BYTES in UTF-8), with control characters or characters
    that disguise a name (bidirectional controls, invisible ones).  Leading
    dots and spaces (any Unicode space) go: no hidden file, no "../"; an
    empty name means the album's.
    """
    if requested is None:
        return f"{album}.zip"
    if len(requested) > MAX_DISPLAY_NAME - len(".zip"):
        raise DisplayNameRefused(f"filename longer than {MAX_DISPLAY_NAME - len('.zip')} characters")
    if len(requested.encode(errors="replace")) > MAX_DISPLAY_NAME_BYTES - len(".zip"):
        raise DisplayNameRefused(f"filename longer than {MAX_DISPLAY_NAME_BYTES - len('.zip')} bytes in UTF-8")
    if any(unicodedata.category(character) == "Cc" or character in _DECEPTIVE for character in requested):
        raise DisplayNameRefused("filename with control or invisible characters")
    stripped = _LEADING_DOTS_AND_SPACES.sub("", requested.replace("/", "_")).rstrip()
    if not stripped:
        return f"{album}.zip"
    name = portable_component(stripped)
    return name if name.lower().endswith(".zip") else f"{name}.zip"


def ascii_fallback(name: str) -> str:
    """``name`` in printable ASCII for ``filename=``: Cyrillic transliterated, accents dropped, the rest ``_``."""
    letters = []
    for character in unicodedata.normalize("NFC", name):
        latin = _CYRILLIC.get(character.lower())
        if latin is not None:
            letters.append(latin.capitalize() if character.isupper() else latin)
            continue
        for part in unicodedata.normalize("NFKD", character):
            if unicodedata.combining(part):
                continue
            letters.append(part if part.isascii() and part.isprintable() and part not in '"\\%' else "_")
    return "".join(letters)


def content_disposition(name: str) -> str:
    """``attachment`` with ``name`` as RFC 6266 gives it: an ASCII ``filename`` and a UTF-8 ``filename*``."""
    fallback = ascii_fallback(name)
    if fallback == name:
        return f'attachment; filename="{name}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
