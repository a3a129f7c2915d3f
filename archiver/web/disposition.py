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

from ..archive.names import portable_component, shortened

# Characters in a display name, ".zip" included: a long name is a probe, not a title.  And
# bytes in UTF-8: a file name on Linux and Android holds 255 (116 Chinese characters are 348).
MAX_DISPLAY_NAME = 120
MAX_DISPLAY_NAME_BYTES = 255
# The bytes a saved name may take: a file name holds 255, and clients write to the name and a
# suffix first (Chromium ".crdownload", 11 bytes; aria2c its ".aria2" control file; Firefox
# ".part"), cancelling the download, or its resume, when that does not fit.
MAX_SAVED_NAME_BYTES = 255 - len(".crdownload")
# Characters that make a name read otherwise than it is, refused with the link: controls, format
# characters (bidirectional ones: "\u202egpj.exe" shows as "exe.jpg"; invisible ones), line and
# paragraph separators, private-use and unassigned code points (a box, or nothing), and the other
# characters that show nothing: the Hangul fillers, the Braille blank ("\u3164.bashrc" reads as
# ".bashrc"), the grapheme joiner, Mongolian and Khmer invisibles.  Emoji need two format
# characters, allowed where they make one: the zero-width joiner (a family) and the tags (a
# subdivision's flag).
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cn"})
_JOINER = "\u200d"
_TAGS = frozenset(map(chr, range(0xE0020, 0xE007F)))
_CANCEL_TAG = "\U000e007f"
_BLACK_FLAG = "\U0001f3f4"
_EMOJI_FORMAT = frozenset({_JOINER, _CANCEL_TAG, *_TAGS})
# A subdivision's flag (UTS #51 ED-14a): the black flag, its code in tag digits and lower-case tag
# letters ("gbsct": Scotland), the cancel tag.  Any other tag text hides words (helper 53).
_SUBDIVISION_FLAG = re.compile("\U0001f3f4[\U000e0030-\U000e0039\U000e0061-\U000e007a]{1,7}\U000e007f")
_VARIATION_SELECTORS = frozenset({*map(chr, range(0xFE00, 0xFE10)), *map(chr, range(0xE0100, 0xE01F0))})
# Where emoji newer than this Python's Unicode data lie: unassigned to it, but pictographs to a
# phone (Unicode 15's pink heart, 16's U+1FAE9), not the unassigned code points that show a box.
_EMOJI_PLANE = range(0x1F000, 0x1FB00)
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u180b\u180c\u180d\u180f\u17b4\u17b5")
# Characters a saved name does not start with: what is left of an emoji after a cut, and
# variation selectors (which show nothing of themselves).
_NOTHING_ALONE = _EMOJI_FORMAT | _VARIATION_SELECTORS
# Slashes, and characters drawn as one, become "_": a name is never read as a path.  And "%": a
# client that decodes ``filename*`` twice (wget 1.21) would save "%2ebashrc" as ".bashrc" (helper 44).
_SLASHES = str.maketrans(dict.fromkeys("/\\\u2215\u2044\uff0f\uff3c\u29f8\u29f9\u29f5\u2216\u2571\u2572%", "_"))

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
    dots and spaces go (``_saved_name``): no hidden file, no "../"; a name
    with nothing left is ``archive.zip``.
    """
    if requested is None:
        return _zip_name(album)
    if len(requested) > MAX_DISPLAY_NAME - len(".zip"):
        raise DisplayNameRefused(f"filename longer than {MAX_DISPLAY_NAME - len('.zip')} characters")
    if len(requested.encode(errors="replace")) > MAX_DISPLAY_NAME_BYTES - len(".zip"):
        raise DisplayNameRefused(f"filename longer than {MAX_DISPLAY_NAME_BYTES - len('.zip')} bytes in UTF-8")
    if any(_deceptive(character) for character in requested) or _stray_emoji_format(requested):
        raise DisplayNameRefused("filename with control or invisible characters")
    # Nothing left ("...", " ."): not the album's name, which is the link's secret (helper 51).
    return _zip_name(requested) or "archive.zip"


def _zip_name(text: str) -> str:
    """``text`` saved (``_saved_name``), ending in ``.zip``, at most MAX_SAVED_NAME_BYTES; "" if nothing is left.

    Normalised, a name may have grown (NFC makes "\u0958" two code points, 6
    bytes), and a reserved name takes a "_" (an album named ``CON`` too).
    """
    name = _saved_name(text)
    if not name:
        return ""
    return shortened(name if name.lower().endswith(".zip") else f"{name}.zip", "", MAX_SAVED_NAME_BYTES)


def _deceptive(character: str) -> bool:
    category = unicodedata.category(character)
    if category == "Cn":
        return ord(character) not in _EMOJI_PLANE
    if category in _REFUSED_CATEGORIES:
        return character not in _EMOJI_FORMAT
    return character in _INVISIBLE


def _symbol(character: str) -> bool:
    """An emoji as far as this goes: a symbol (So ❤, Sm ↔, Sk a skin tone), or an emoji newer than our data."""
    return unicodedata.category(character)[0] == "S" or (
        unicodedata.category(character) == "Cn" and ord(character) in _EMOJI_PLANE
    )


def _stray_emoji_format(text: str) -> bool:
    """Whether a joiner, a tag or a variation selector stands where no emoji needs it, hiding something.

    Unicode TS #51: a joiner stands between two emoji (after a modifier or
    U+FE0F too: "\U0001f3f3\ufe0f\u200d\U0001f308", and before a symbol
    that is no So, "\U0001f642\u200d\u2194\ufe0f"); tags only in a
    subdivision's flag; one variation selector after a character, never a
    run of them ("photo" and 40 of them showed as "photo"; helper 53).
    """
    flags = [(match.start(), match.end()) for match in _SUBDIVISION_FLAG.finditer(text)]
    in_flag = {index for start, end in flags for index in range(start + 1, end)}
    for index, character in enumerate(text):
        before = text[index - 1] if index else ""
        after = text[index + 1 : index + 2]
        if character == _JOINER:
            joins = before and (
                _symbol(before) or (before in _VARIATION_SELECTORS and index > 1 and _symbol(text[index - 2]))
            )
            if not joins or not after or not _symbol(after):
                return True
        elif character in _TAGS or character == _CANCEL_TAG:
            if index not in in_flag:
                return True
        elif character in _VARIATION_SELECTORS and (
            not before or before in _VARIATION_SELECTORS or before in _EMOJI_FORMAT or before.isspace()
        ):
            return True
    return False


def _saved_name(text: str) -> str:
    """``text`` as a file name to save: no folder, nothing hidden, portable (``names``); "" if nothing is left.

    Normalised (NFC) first, then leading dots, spaces (any Unicode space),
    marks (with nothing to combine with, a reader may drop them) and what
    shows nothing alone (``_NOTHING_ALONE``) go, as many as there are, in any
    mix: " \u00a0.bashrc" stripped of spaces alone would start with a dot again.
    """
    text = unicodedata.normalize("NFC", text).translate(_SLASHES)
    start = 0
    while start < len(text) and _leading_and_unseen(text[start]):
        start += 1
    text = text[start:].rstrip()
    return portable_component(text) if text else ""


def _leading_and_unseen(character: str) -> bool:
    return (
        character == "."
        or character.isspace()
        or unicodedata.category(character).startswith("M")
        or character in _NOTHING_ALONE
    )


def ascii_fallback(name: str) -> str:
    """``name`` in printable ASCII for ``filename=``: Cyrillic transliterated, accents dropped, the rest ``_``.

    Made a saved name again (``_saved_name``): compatibility forms bring back
    what the name had not ("\uff0ebashrc" is ".bashrc", "\u2025" is "..", "\uff0f"
    is "/", "\uff23\uff2f\uff2e" is "CON").  A ``.zip`` ending is kept; a name with
    nothing left is ``archive``; a name grown past MAX_SAVED_NAME_BYTES is cut before it.
    """
    stem, suffix = (name[:-4], name[-4:]) if name.lower().endswith(".zip") else (name, "")
    letters = []
    for character in unicodedata.normalize("NFC", stem):
        latin = _CYRILLIC.get(character.lower())
        if latin is not None:
            letters.append(latin.capitalize() if character.isupper() else latin)
            continue
        for part in unicodedata.normalize("NFKD", character):
            if unicodedata.combining(part):
                continue
            letters.append(part if part.isascii() and part.isprintable() and part not in '"\\%' else "_")
    # Transliterated, a name may grow threefold ("щ" is "shh"): cut as the name itself is.
    return shortened((_saved_name("".join(letters)) or "archive") + suffix, "", MAX_SAVED_NAME_BYTES)


def content_disposition(name: str) -> str:
    """``attachment`` with ``name`` as RFC 6266 gives it: an ASCII ``filename`` and a UTF-8 ``filename*``."""
    fallback = ascii_fallback(name)
    if fallback == name:
        return f'attachment; filename="{name}"'
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"
