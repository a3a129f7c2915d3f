"""The naming policy: every entry name valid UTF-8 and NFC, one that Windows, macOS and Linux can all hold.

The files on disk are never renamed; only the names in the archive are
chosen here, once per plan, for every reader alike:

- a path component that is not UTF-8 (FTP uploads from Windows: CP1251) is
  read in ``encoding`` (ARCHIVER_NAME_ENCODING), with U+FFFD for what even
  that cannot decode (with CP1251, in CP866 where only that reads as words:
  Russian Windows' OEM code page; so too a UTF-8 name that is CP866 read as
  CP437); then it is put in Unicode's NFC form (macOS writes NFD);
- ``\\`` (a separator to Windows and bsdtar, a character to unzip: APPNOTE
  4.4.17.1 allows only ``/``), the characters Windows forbids in a name
  (``< > : " | ? *``, which also rules out a drive letter), their look-alikes
  that Windows' best-fit conversion to a code page turns into ``/``, ``\\`` or
  ``:`` (``best_fit``: fullwidth U+FF0F, U+FF3C, U+FF1A, division slash U+2215,
  set minus U+2216, ratio U+2236, yen and won signs), and control
  characters become ``_``; a component that best fit makes all dots (two
  fullwidth full stops, U+2025) becomes ``_``; trailing dots
  and spaces go (Windows drops them);
  a reserved device name (``CON``, ``NUL``, ``COM1``, ``CONIN$``, with any extension,
  also as best fit may read it: ``CON`` in fullwidth letters, or with a C
  cedilla) gets a ``_`` in front; a name of the shape of a short name NTFS
  makes up (``PHOTOG~1.JPG``, which "Photograph.jpg" also answers to, or
  ``ФОТОГР~1.JPG`` on a FAT card written by a Russian Windows) has its
  ``~`` made ``_``, in any script;
- a component longer than 255 bytes in UTF-8 (what Linux and Android hold;
  Windows holds 255 UTF-16 units, never fewer), or 255 UTF-16 units in NFD (macOS), is shortened before its
  extension, on a character boundary;
- names that would be one file on a case-insensitive, normalising file
  system (NFC, then case folded, without Unicode's ignorable code points;
  NTFS's upper case), or once an extractor through a code page has written
  them (best fit, trailing dots dropped: ``_key``), get `` (2)``, `` (3)``
  before the extension, in list order; directories that differ only so are
  merged under the first one's spelling, as Windows and macOS would merge
  them, unless a name was cut to fit (then they may differ past the cut).

README ("What the person unpacks") has a table of examples;
tests/test_names.py draws names from the troublesome classes.
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from collections.abc import Iterable

from . import best_fit

# Bidirectional controls make a name read otherwise than it is ("photo\u202egpj.exe"): they become _ too.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# The most bytes of one path component on Linux and Android (NAME_MAX), and in characters on Windows.
MAX_COMPONENT_BYTES = 255
# Windows' forbidden characters, the backslash (a separator to some readers), controls (C0, DEL and
# C1: U+009B is a terminal's control sequence introducer as unzip -l prints it), the line and paragraph
# separators, and "/" (never in a component read from disk, but a name encoding could decode one).
_REPLACED = (
    frozenset('<>:"|?*\\/\u2028\u2029')
    | frozenset(chr(code) for code in (*range(32), *range(0x7F, 0xA0)))
    | _BIDI_CONTROLS
    # Look-alikes of the separators and of the drive's colon. An extractor that converts names to an
    # ANSI code page (Windows' "best fit": the WorstFit attacks) unpacks a fullwidth "..\x" as "..\x".
    # These are what some code page's best fit turns into "/", "\\" or ":" (Microsoft's tables), and every
    # character whose compatibility form (NFKC) holds one (small and vertical forms; "℀" is "a/c").
    # The look-alikes of ? * < > " | stay: best fit makes a name Windows refuses of them, no path.
    | best_fit.SEPARATORS
    | frozenset("\uff0f\uff3c\ufe68\uff1a\ufe55\ufe13\u2100\u2101\u2105\u2106\u2a74")
)
_REPLACED_ASCII = frozenset(character for character in _REPLACED if character.isascii())
_RESERVED = frozenset(
    # Microsoft's list ("Naming Files, Paths, and Namespaces"), COM0 and LPT0 included, and the console's two.
    [
        "CON",
        "PRN",
        "AUX",
        "NUL",
        "CONIN$",
        "CONOUT$",
        *(f"{device}{n}" for device in ("COM", "LPT") for n in "0123456789¹²³"),
    ]
)


# The shape of the short (8.3) name NTFS makes up for a long one: a stem of at most 8 characters
# ending in "~" and a number, an extension of at most 3 ("PHOTOG~1.JPG" for "Photograph.jpg";
# "PH1A2B~1.JPG" past the fourth).  Unpacked after that file, a name of this shape opens it instead:
# 7-Zip asks to replace it, Explorer overwrites it (helper 51; git refuses "GIT~1" for the same reason).
# "~" is an 8.3 character too: "a~bcdefghij.txt" is "A~BCDE~1.TXT" (helper 53).  NTFS makes short
# names of ASCII only by default, but FAT (the SD cards and USB sticks photos travel on) keeps them
# in the OEM code page, and so does NTFS with extended characters allowed (fsutil allowextchar): on a
# Russian Windows (code page 866) "Фотография.jpg" there is also "ФОТОГР~1.JPG".  Any script, then.
_SHORT_NAME = re.compile(r"(?=[^.]{1,8}(?:\.|$))([^.]*)~([0-9]+)((?:\.[^.]{0,3})?)", re.ASCII)


def decode_component(raw: bytes, encoding: str, oem: bool = True) -> str:
    """A path component as text: UTF-8 if it is, else ``encoding``, U+FFFD for what neither decodes.

    With CP1251 (Russian Windows' ANSI code page), a component in CP866, its
    OEM code page, is read as CP866 where only that makes words of it; and so
    is one that reached the disk as CP866 read as CP437, in UTF-8 (``_reads_as_oem``);
    not with ``oem`` false (ARCHIVER_OEM_NAMES=off).
    """
    russian = oem and codecs.lookup(encoding).name == "cp1251"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode(encoding, errors="replace")
        if russian and _reads_as_oem(raw, text, _NOT_IN_RUSSIAN_NAMES, _ANSI_LETTERS):
            return raw.decode("cp866")
        return text
    if russian and not text.isascii() and not _NOT_CP437.search(text) and _OEM_CAPITALS_TO_P_IN_CP437.search(text):
        written = text.encode("cp437")
        if _reads_as_oem(written, text, _NOT_IN_LATIN_NAMES, _LATIN_LETTERS):
            return written.decode("cp866")
    return text


# Russian Windows writes names in two code pages: CP1251 (its ANSI code page: Explorer, Total Commander,
# most FTP clients) and CP866 (its OEM code page: the console's ftp.exe, FAR Manager, and the zip
# archives Explorer and 7-Zip make, which 7z and bsdtar unpack on the server with the bytes as they
# are).  Read as CP1251, "Отпуск" in CP866 is "ЋвЇгбЄ" (helper 186).  In CP866 the bytes of CP1251's
# capitals, of its letters from "ш" on, and of "ё", "ї", "є", "ґ" and the dotted i are box drawing and
# signs, so a CP1251 name with any of them never reads as CP866 words; the rest is told apart by what
# each reading looks like.  Those zip archives unpacked by PHP's ZipArchive (libzip) or Python's
# zipfile have their names read as CP437, the zip format's own code page, and written in UTF-8:
# "Отпуск" is "ÄΓ»πß¬" on disk; such a name is written back in CP437 and read as CP866 the same way.
codecs.lookup("cp866")  # found now: a process that may no longer read the interpreter's files has it
codecs.lookup("cp437")
_RUSSIAN = "абвгдеёжзийклмнопрстуфхцчшщъыьэюя"
# Letters of Russian, Ukrainian and Belarusian in CP866 (it has no dotted i), and in CP1251.
_OEM_LETTERS = frozenset(_RUSSIAN + _RUSSIAN.upper() + "ЄєЇїЎў")
_ANSI_LETTERS = _OEM_LETTERS | frozenset("ІіҐґ")
# CP866's bytes past ASCII that are no letter: box drawing (0xB0-0xDF) and signs ("°", "№", a no-break space).
_OEM_NOT_A_LETTER = re.compile(rb"[\xb0-\xdf\xf8-\xff]")
_OEM_WORD = re.compile(f"[{''.join(sorted(_OEM_LETTERS))}]{{2}}")
# What CP1251 reads CP866's letters as, and a name in CP1251 never holds: signs no one types in a name,
# a soft hyphen, and U+FFFD (0x98, CP866's "Ш").  Not the Serbian and Macedonian letters, nor "†", as
# the dead are marked: "Јелена.jpg" in CP1251 was read as CP866, "гхыхэр.jpg" (helper 187).
_NOT_IN_RUSSIAN_NAMES = frozenset("‚‹›‡‰¤¦¬\xad\ufffd")
# CP866's small O read as CP1251, which no CP1251 name puts right before a small letter: "отчёт" in CP866 is
# "®взсв", its "ё" a letter to CP1251 (small ES), so that no sign stands between two letters (helper 192).
# Not "©" (CP866's "й": "©фото" may be a name), nor "§" (its "з": "§глава" may be).
_SIGNS_BEFORE_NO_SMALL_LETTER = frozenset("®")
# A character CP437 does not have (past ASCII): the name was not CP437 once.
_NOT_CP437 = re.compile(f"[^\\x00-\\x7f{re.escape(bytes(range(128, 256)).decode('cp437'))}]")
# What CP437 reads CP866's bytes 0xE0-0xF7 (the last 16 small letters, "ЁёЄєЇїЎў"), "Ю", "Я" and "й" as:
# Greek letters and mathematical signs, a peseta and a florin, which a name in a Latin script never holds
# (and a Greek name holds other letters too, which CP437 lacks).
_NOT_IN_LATIN_NAMES = frozenset(bytes(range(0xE0, 0xF8)).decode("cp437") + "₧ƒ⌐") - frozenset("ßµ±÷")
# What CP437 reads CP866's capitals and small letters up to "п" as (Latin letters, currency, "¿½¼¡«»"): a name without
# any is Greek or mathematics ("ΣΩ", "100 µΩ", "Σε" read as CP866 were "фъ", "100 цъ", "фю"; helper 187).
_OEM_CAPITALS_TO_P_IN_CP437 = re.compile(f"[{re.escape(bytes(range(0x80, 0xB0)).decode('cp437'))}]")
_LATIN_LETTERS = frozenset(character for character in bytes(range(128, 256)).decode("cp437") if character.isalpha())
_WORD = re.compile(r"[^\W\d_]+")


def _reads_as_oem(raw: bytes, other: str, foreign: frozenset[str], letters: frozenset[str]) -> bool:
    """Whether ``raw``, read as ``other`` (in CP1251, or CP437), is a name in CP866.

    Yes when its CP866 reading is letters (and ASCII) alone, a word of two
    at least, no capital inside a word, no word of Latin and Cyrillic letters;
    and ``other`` is not a name: a capital inside a word ("вЇг"), a sign
    between two letters, a character ``foreign`` to its names, "®" at a word's
    start before a small letter, or no fewer
    signs (characters past ASCII not in ``letters``) than letters, two at least
    ("”®в®", "Фото" in CP866 read as CP1251).
    Checked on 440,000 names made of Russian and Ukrainian words (hunspell's; lower-case,
    capitalised, in capitals, two words, with dashes, quotes, "…", "©", "№"): no CP1251
    name read as CP866; of the CP866 ones, words of 4 letters or more were found
    98-99.7 % of the time (the rest: lower-case words whose letters CP1251 reads as
    letters too, "литься"; and those CP866 makes valid UTF-8 of, "Ёлка").  Read as
    CP437: 97.7-99.8 % found; of 5 million German, French, Spanish and Turkish names (alone,
    capitalised, in capitals, in quotes) none read as CP866 but a Greek letter in quotes.
    """
    if _OEM_NOT_A_LETTER.search(raw):  # most CP1251 names: a capital, "ш" to "я"
        return False
    oem = raw.decode("cp866")
    if not _OEM_WORD.search(oem) or _capital_inside_a_word(oem) or _latin_and_cyrillic_in_a_word(oem):
        return False
    if _capital_inside_a_word(other) or not foreign.isdisjoint(other):
        return True
    if any(
        sign in _SIGNS_BEFORE_NO_SMALL_LETTER and after.islower() and not before.isalpha()
        for before, sign, after in zip(" " + other, other, other[1:], strict=False)
    ):
        return True
    signs = [not character.isascii() and character not in letters for character in other]
    if any(
        sign and before.isalpha() and after.isalpha() and character != "\xa0"
        for sign, before, character, after in zip(signs[1:], other, other[1:], other[2:], strict=False)
    ):
        return True
    return sum(signs) >= max(2, sum(character in letters for character in other))


def _latin_and_cyrillic_in_a_word(text: str) -> bool:
    """Whether a word of ``text`` has both ASCII letters and others ("cafщ": "café" in Latin-1 read as CP866)."""
    return any(not word.isascii() and any(map(str.isascii, word)) for word in _WORD.findall(text))


def _capital_inside_a_word(text: str) -> bool:
    """Whether a word of ``text`` with a letter past ASCII has a capital past its first letter, and a small letter."""
    return any(
        not word.isascii() and any(map(str.islower, word)) and any(map(str.isupper, word[1:]))
        for word in _WORD.findall(text)
    )


def portable_component(component: str) -> str:
    """One path component that Windows, macOS and Linux can all hold (NFC, nothing forbidden, never empty)."""
    if component.isascii() and len(component) <= MAX_COMPONENT_BYTES and _REPLACED_ASCII.isdisjoint(component):
        # Most names: NFC, NFKC and best fit leave ASCII as it is, and nothing is replaced or cut
        # (``_any_portable_component`` gives the same, property-tested; a 20,000-file plan: ~0.05 s less).
        component = component.rstrip(" .") or "_"
        return _not_a_device_nor_a_short_name(component, [component])
    return _any_portable_component(component)


def _any_portable_component(component: str) -> str:
    """``portable_component`` of any component."""
    component = unicodedata.normalize("NFC", component)
    component = "".join("_" if character in _REPLACED else character for character in component)
    # Cut first: the cut drops the dots and spaces it leaves at the end of the stem, and
    # "COM1" + 218 spaces + "x." + a Cyrillic extension (CP1251 on disk, twice as long in UTF-8) was
    # cut to the device "COM1." + that extension after it had been checked (helper 47).
    component = shortened(component.rstrip(" .") or "_", "")
    # What best fit may make of it: two fullwidth full stops or U+2025 are "..", a fullwidth "CON.txt"
    # is "CON.txt", and so is one with C-cedilla in code page 1251.
    forms = [unicodedata.normalize("NFKC", component), *best_fit.best_fit_forms(component)]
    if any(not form.rstrip(" .") for form in forms):
        return "_"
    return _not_a_device_nor_a_short_name(component, forms)


def _not_a_device_nor_a_short_name(component: str, forms: list[str]) -> str:
    """``component`` (as written in ``forms``) made no Windows device and no NTFS short name."""
    if any(form.split(".", 1)[0].rstrip(" ").upper() in _RESERVED for form in forms):
        # Cut again if need be: "_COM1" is no device.  On to the short-name rule: "CON", a fullwidth
        # full stop and "~1" is a device to best fit and has the shape of a short name (helper 59).
        component = shortened("_" + component, "")
    if short := _SHORT_NAME.fullmatch(component):
        component = f"{short[1]}_{short[2]}{short[3]}"  # no made-up short name has "_" before its number
        if component.isascii():
            return component
        # Its forms may still have the shape ("a~1" and a fullwidth full stop before "x~1": helper 144).
        forms = [unicodedata.normalize("NFKC", component), *best_fit.best_fit_forms(component)]
    if any(_SHORT_NAME.fullmatch(form) for form in forms):
        # The shape in a form only ("PHOTOG~1" and a fullwidth full stop, a fullwidth digit or
        # tilde, written "PHOTOG~1.JPG" through a code page: helper 142): every character that
        # some form writes as "~" becomes "_", and no form has the shape left.
        return "".join("_" if _writes_a_tilde(character) else character for character in component)
    return component


def _writes_a_tilde(character: str) -> bool:
    """Whether ``character`` is "~" in itself, in NFKC or in a code page's best fit."""
    return any("~" in form for form in (character, unicodedata.normalize("NFKC", character),
                                         *best_fit.best_fit_forms(character)))  # fmt: skip


def shortened(component: str, suffix: str, limit: int = MAX_COMPONENT_BYTES) -> str:
    """``component`` with ``suffix`` before its extension, its stem cut so that all fits ``limit`` bytes.

    And ``limit`` UTF-16 units in NFD, as macOS keeps a name: "ᾂ" is 3 bytes in UTF-8 and 4 units
    there, and 85 of them were a name macOS refuses (helper 69).
    """
    stem, dot, extension = component.rpartition(".")
    if not dot or not stem or len(extension.encode()) > 32:  # no extension (a leading dot is part of the name)
        stem, extension = component, ""
    extension = f".{extension}" if extension else ""
    room = limit - len(suffix.encode()) - len(extension.encode())
    if len(stem.encode()) > room:  # cut on a character boundary, and no dot or space left at the cut
        stem = stem.encode()[:room].decode(errors="ignore").rstrip(" .") or "_"
    while _nfd_units(f"{stem}{suffix}{extension}") > limit and len(stem) > 1:
        stem = stem[:-1].rstrip(" .") or "_"
    return f"{stem}{suffix}{extension}"


def _nfd_units(name: str) -> int:
    return len(unicodedata.normalize("NFD", name).encode("utf-16-le")) // 2


# Small (U+FE50-U+FE6F), fullwidth and halfwidth forms (U+FF00-U+FFEF) as NFKC has them.
_WIDTH_FORMS = str.maketrans(
    {
        code: unicodedata.normalize("NFKC", chr(code))
        for code in (*range(0xFE50, 0xFE70), *range(0xFF00, 0xFFF0))
        if unicodedata.normalize("NFKC", chr(code)) != chr(code)
    }
)


# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt, 15.1): invisible, and nothing to a
# file system that folds case: Linux's (casefolded ext4 and f2fs, Android's shared storage since 11;
# fs/unicode/mkutf8data.c maps each to nothing), and HFS+ ignores some (Apple TN1150).  "❤" and "❤"
# with its emoji variation selector U+FE0F, typed on two phones, are one file there (helper 165).
_IGNORABLE = re.compile(
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a"
    "\U000e0000-\U000e0fff]"
)


def _key(name: str) -> str:
    """One key for the names that some extractor and file system would make one file of.

    Best fit's ASCII for the look-alikes (an extractor through an ANSI code page writes "a", U+FF0E
    and "jpg" as "a.jpg", helper 69), fullwidth, halfwidth and small forms as NFKC has them (not all
    of NFKC: "…", "№" and "Ⅱ" are in code page 1251 as they are, and "Разное…" is no "Разное"
    there; helper 71), each component's trailing
    dots and spaces gone (Windows drops them: "photo" and U+FF0E is "photo"), then case folded both as
    macOS does (casefold) and as NTFS does (upper case: U+0131, dotless i, is "I" there), without the
    code points Unicode says to ignore (``_IGNORABLE``: Linux's case folding drops them).  Coarser than
    any one system: at worst a name is numbered that needed no number.
    """
    if name.isascii():  # no look-alike, no compatibility form, and no trailing dot left by either
        return name.lower()
    folded = _IGNORABLE.sub("", unicodedata.normalize("NFC", name)).translate(best_fit.FOLDED).translate(_WIDTH_FORMS)
    components = (component.rstrip(" .") for component in folded.split("/"))
    return unicodedata.normalize("NFC", "/".join(components).upper().casefold())


def _cut(component: str) -> bool:
    """True when ``portable_component`` might shorten ``component``: at MAX_COMPONENT_BYTES or more.

    In UTF-8 (NFC) or in UTF-16 units (NFD).  At, not past: the ``_`` put
    before a device's name adds one.  Its other
    changes never lengthen a name (a character replaced becomes one), so
    this is true of every name cut, and of a few that are not.
    """
    if component.isascii():
        return len(component) >= MAX_COMPONENT_BYTES
    composed = unicodedata.normalize("NFC", component)
    return len(composed.encode()) >= MAX_COMPONENT_BYTES or _nfd_units(composed) >= MAX_COMPONENT_BYTES


def numbered(component: str, number: int) -> str:
    """``photo (2).jpg`` for ``photo.jpg`` and 2: the number before the extension (none for a leading dot)."""
    return shortened(component, f" ({number})")


def entry_names(paths: Iterable[bytes], encoding: str = "cp1251", oem: bool = True) -> list[str]:
    """The archive's entry name for each relative path (``/``-separated bytes, in list order).

    ``encoding`` and ``oem``: how a component that is not UTF-8 is read (``decode_component``).
    """
    files: set[str] = set()  # keys of the names given to files
    directories: dict[str, str] = {}  # a directory's key -> its name in the archive (with its parents')
    # The last number given for a name's key: the next collision starts after it (a flood of
    # case variants of one name costs linear time, not quadratic).
    last_number: dict[str, int] = {}
    names: list[str] = []

    def free(prefix: str, part: str) -> tuple[str, str]:
        """``part`` or its first numbered form whose key no file and no directory has under ``prefix``, and the key."""
        base = _key(prefix + part)
        chosen, key, number = part, base, last_number.get(base, 1)
        if number > 1:
            chosen = numbered(part, number)
            key = _key(prefix + chosen)
        while key in files or key in directories:
            number += 1
            chosen = numbered(part, number)
            key = _key(prefix + chosen)
        last_number[base] = number
        return chosen, key

    # A folder's path on disk (and each folder's above it) -> its name in the archive: once made, the
    # same for every file in it.
    folders: dict[bytes, str] = {}
    # A directory's identity -> its name in the archive: its key, or for a name cut to fit, the key of
    # its whole name (after a NUL, which no key holds).  Folders of one identity are one folder.
    merged: dict[str, str] = {}
    for path in paths:
        folder, _, last = path.rpartition(b"/")
        prefix = folders.get(folder) if folder else ""
        if prefix is None:
            prefix, above = "", b""
            for raw in folder.split(b"/"):
                above = above + b"/" + raw if above else raw
                if (known := folders.get(above)) is not None:
                    prefix = known
                    continue
                decoded = decode_component(raw, encoding, oem)
                part = portable_component(decoded)
                key = _key(prefix + part)
                # Folders that differ only as Windows and macOS see no difference are merged, as those
                # systems would; not two that differ past the cut (two long CP1251 names cut to one:
                # "…часть 1" and "…часть 2" were one folder, which part a photo came from lost; helper 165).
                # (The whole name's key is the decoded name's: two long ones that differ only in a character
                # portable_component replaces stay apart too, as their short forms would not. Safe: numbered.)
                identity = f"\0{_key(prefix + decoded)}" if _cut(decoded) else key
                if (known := merged.get(identity)) is None:
                    # A new directory; if a file or another directory has its name, a name no one has.
                    taken = key in files or key in directories
                    chosen, chosen_key = free(prefix, part) if taken else (part, key)
                    known = merged[identity] = directories[chosen_key] = f"{prefix}{chosen}/"
                    # The first directory of a key keeps it (when a file had it, and this one was numbered):
                    # a later file of that key is numbered, and a later folder of it joins this one.
                    directories.setdefault(key, known)
                prefix = folders[above] = known
        chosen, key = free(prefix, portable_component(decode_component(last, encoding, oem)))
        files.add(key)
        names.append(prefix + chosen)
    return names
