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

import unicodedata
from urllib.parse import quote

import emoji

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
# ".bashrc"), the grapheme joiner, Mongolian and Khmer invisibles.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Co", "Cn"})
# The two format characters emoji are made of: the zero-width joiner (a family, a profession) and
# the tags (a subdivision's flag).  Dropped, not refused (a title typed on a phone has them):
# Chromium saves each as "_" ("\U0001f468_\U0001f469_\U0001f467.zip", helper 57), and outside an
# emoji they hide text (tags spelling words after a black flag, helpers 51, 53, 54).  A family
# is then saved as its people, a subdivision's flag as the black flag.
_EMOJI_JOINERS = frozenset({"\u200d", *map(chr, range(0xE0020, 0xE0080))})
# Variation selectors show nothing themselves: kept inside an emoji (the ``emoji`` library's, from
# Unicode's own data, newer than this Python's) and after a CJK ideograph (its variant), dropped
# anywhere else (one after each letter hid a byte each).
_VARIATION_SELECTORS = frozenset({*map(chr, range(0xFE00, 0xFE10)), *map(chr, range(0xE0100, 0xE01F0))})
# So does the keycap's enclosing mark, once its "*" is made "_" by the naming policy (helper 58).
_EMOJI_MARKS = _VARIATION_SELECTORS | {"\u20e3"}
_EMOJI_FORMAT = _EMOJI_JOINERS | _EMOJI_MARKS
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u2800\u034f\u180b\u180c\u180d\u180f\u17b4\u17b5")
# Characters a saved name does not start with: what is left of an emoji after a cut, and
# variation selectors (which show nothing of themselves).
_NOTHING_ALONE = _EMOJI_FORMAT
# Slashes, and characters drawn as one, become "_": a name is never read as a path.  And "%": a
# client that decodes ``filename*`` twice (wget 1.21) would save "%2ebashrc" as ".bashrc" (helper 44).
_SLASHES = str.maketrans(dict.fromkeys("/\\\u2215\u2044\uff0f\uff3c\u29f8\u29f9\u29f5\u2216\u2571\u2572%", "_"))

# Cyrillic letters in Latin (GOST 7.79-2000 system B, without diacritics), for the ASCII fallback.
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
    # Ukrainian and Belarusian letters (the same system): they were "_" (helper 69).
    "і": "i",
    "ї": "yi",
    "є": "ye",
    "ґ": "g",
    "ў": "u",
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
    requested = _without_stray_emoji_format(requested)
    inside = _in_emoji(requested)
    if any(_deceptive(character) for index, character in enumerate(requested) if index not in inside):
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
    # A cut inside an emoji sequence leaves its joiner or tags stray: dropped as any stray one is.
    return _without_stray_emoji_format(
        shortened(name if name.lower().endswith(".zip") else f"{name}.zip", "", MAX_SAVED_NAME_BYTES)
    )


def _deceptive(character: str) -> bool:
    """A character outside an emoji that shows nothing, or shows otherwise than it is."""
    return unicodedata.category(character) in _REFUSED_CATEGORIES or character in _INVISIBLE


def _in_emoji(text: str) -> set[int]:
    """The indexes of ``text`` inside emoji sequences (RGI: families, flags, keycaps, skin tones...)."""
    return {index for found in emoji.emoji_list(text) for index in range(found["match_start"], found["match_end"])}


def _without_stray_emoji_format(text: str) -> str:
    """``text`` without joiners and tags (``_EMOJI_JOINERS``), and without the variation selectors
    that are no part of an emoji or an ideograph's variant ("\u845b\U000e0100" keeps its one).

    Dropped, not refused: a title pasted with a stray one ("\ufe0fPhotos",
    "\u2764\ufe0f\ufe0f") is still the title.
    """
    if not _EMOJI_FORMAT.intersection(text):
        return text
    text = "".join(character for character in text if character not in _EMOJI_JOINERS)
    inside = _in_emoji(text)
    kept: list[str] = []
    for index, character in enumerate(text):
        variant = character in _VARIATION_SELECTORS and kept and _ideograph(kept[-1])
        if character in _EMOJI_MARKS and index not in inside and not variant:
            continue
        kept.append(character)
    return "".join(kept)


def _ideograph(character: str) -> bool:
    return unicodedata.name(character, "").startswith(("CJK UNIFIED IDEOGRAPH", "CJK COMPATIBILITY IDEOGRAPH"))


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
