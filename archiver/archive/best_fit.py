"""What Windows' best-fit conversion to a code page makes of a name: the characters it turns into ASCII.

An extractor that writes names through an ANSI code page (Windows' "A"
functions) has each character the code page lacks replaced by its "best
fit": the division slash U+2215 and the fullwidth solidus become ``/``, the
set minus U+2216 and (in code page 932) the yen sign become ``\\``, the ratio
U+2236 becomes ``:``, C with circumflex and L with stroke become ``C`` and
``L``.  A name made of such look-alikes unpacks as a path out of the
extraction folder, a drive, or a device name (the WorstFit attacks).

The tables are Microsoft's WindowsBestFit tables as published by
unicode.org (``bestfitNNNN.txt``, their WCTABLE), for the ten single-byte
Windows code pages and the four East Asian ones, as transcribed in
sebastianosrt/gori's ``src/gori/decoder/bestfit/*.tsv``.  Kept here: the
characters each turns into ``/``, ``\\``, ``:``, ``.`` or ``~``, or into a letter,
digit or ``$`` of a reserved device name (``CON``, ``COM1``, ``CONIN$`` ...):
what ``names`` must see.  (Characters no table lists become ``?``.)
"""

from __future__ import annotations

# Code page -> (the characters, what best fit makes of each): for str.maketrans.
_TABLES: dict[int, tuple[str, str]] = {
    874: (
        "\uff04\uff0e\uff0f\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19\uff1a\uff21\uff23"
        "\uff29\uff2c\uff2d\uff2e\uff2f\uff30\uff32\uff34\uff35\uff38\uff3c\uff41\uff43\uff49\uff4c\uff4d"
        "\uff4e\uff4f\uff50\uff52\uff54\uff55\uff58",
        "$./0123456789:ACILMNOPRTUX\\acilmnoprtux",
    ),
    932: (
        "\u00a5\u00a9\u00aa\u00ae\u00b2\u00b3\u00b9\u00ba\u00c0\u00c1\u00c2\u00c3\u00c4\u00c5\u00c6\u00c7"
        "\u00cc\u00cd\u00ce\u00cf\u00d1\u00d2\u00d3\u00d4\u00d5\u00d6\u00d8\u00d9\u00da\u00db\u00dc\u00de"
        "\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5\u00e6\u00e7\u00ec\u00ed\u00ee\u00ef\u00f1\u00f2\u00f3\u00f4"
        "\u00f5\u00f6\u00f8\u00f9\u00fa\u00fb\u00fc\u00fe",
        "\\caR231oAAAAAAACIIIINOOOOOOUUUUTaaaaaaaciiiinoooooouuuut",
    ),
    936: (
        "\u00aa\u00b2\u00b3\u00b9\u00ba\u00de\u00e2\u00fe",
        "a231oTat",
    ),
    949: (
        "\u00c0\u00c1\u00c2\u00c3\u00c4\u00c5\u00c7\u00cc\u00cd\u00ce\u00cf\u00d1\u00d2\u00d3\u00d4\u00d5"
        "\u00d6\u00d9\u00da\u00db\u00dc\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5\u00e7\u00ec\u00ed\u00ee\u00ef"
        "\u00f1\u00f2\u00f3\u00f4\u00f5\u00f6\u00f9\u00fa\u00fb\u00fc\u20a9",
        "AAAAAACIIIINOOOOOUUUUaaaaaaciiiinooooouuuu\\",
    ),
    950: (
        "\u00a9\u00aa\u00ae\u00b2\u00b3\u00b9\u00ba\u00c0\u00c1\u00c2\u00c3\u00c4\u00c5\u00c6\u00c7\u00cc"
        "\u00cd\u00ce\u00cf\u00d1\u00d2\u00d3\u00d4\u00d5\u00d6\u00d8\u00d9\u00da\u00db\u00dc\u00de\u00e0"
        "\u00e1\u00e2\u00e3\u00e4\u00e5\u00e6\u00e7\u00ec\u00ed\u00ee\u00ef\u00f1\u00f2\u00f3\u00f4\u00f5"
        "\u00f6\u00f8\u00f9\u00fa\u00fb\u00fc\u00fe",
        "caR231oAAAAAAACIIIINOOOOOOUUUUTaaaaaaaciiiinoooooouuuut",
    ),
    1250: (
        "\u00a2\u00a3\u00aa\u00b2\u00b3\u00b9\u00ba\u00bc\u00bd\u00be\u00c0\u00c3\u00c5\u00c6\u00cc\u00cf"
        "\u00d1\u00d2\u00d5\u00d8\u00d9\u00db\u00e0\u00e3\u00e5\u00e6\u00ec\u00ef\u00f1\u00f2\u00f5\u00f8"
        "\u00f9\u00fb\u0100\u0101\u0108\u0109\u010a\u010b\u0128\u0129\u012a\u012b\u012c\u012d\u012e\u012f"
        "\u0130\u0131\u013b\u013c\u0145\u0146\u014c\u014d\u014e\u014f\u0152\u0153\u0156\u0157\u0166\u0167"
        "\u0168\u0169\u016a\u016b\u016c\u016d\u0172\u0173\u0197\u019a\u019f\u01a0\u01a1\u01ab\u01ae\u01af"
        "\u01b0\u01cd\u01ce\u01cf\u01d0\u01d1\u01d2\u01d3\u01d4\u01d5\u01d6\u01d7\u01d8\u01d9\u01da\u01db"
        "\u01dc\u01de\u01df\u01ea\u01eb\u01ec\u01ed\u0589\u2044\u2074\u2075\u2076\u2077\u2078\u2080\u2081"
        "\u2082\u2083\u2084\u2085\u2086\u2087\u2088\u2089\u2102\u2110\u2111\u2112\u2113\u2115\u2118\u2119"
        "\u211b\u211c\u211d\u212d\u2133\u2134\u2215\u2216\u221f\u2236\u2514\u252c\u255a\u2566\u25cb\u25d9"
        "\u263c\uff04\uff0e\uff0f\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19\uff1a\uff21"
        "\uff23\uff29\uff2c\uff2d\uff2e\uff2f\uff30\uff32\uff34\uff35\uff38\uff3c\uff41\uff43\uff49\uff4c"
        "\uff4d\uff4e\uff4f\uff50\uff52\uff54\uff55\uff58",
        "cLa231o113AAAAIINOOOUUaaaaiinooouuAaCcCcIiIiIiIiIiLlNnOoOoOoRrTtUuUuUuUuIlOOotTUuAaIiOoUuUuUuUuU"
        "uAaOoOo:/456780123456789CIILlNPPRRRCMo/\\L:LTLT000$./0123456789:ACILMNOPRTUX\\acilmnoprtux",
    ),
    1251: (
        "\u00c0\u00c1\u00c2\u00c3\u00c4\u00c5\u00c7\u00cc\u00cd\u00ce\u00cf\u00d1\u00d2\u00d3\u00d4\u00d5"
        "\u00d6\u00d8\u00d9\u00da\u00db\u00dc\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5\u00e7\u00ec\u00ed\u00ee"
        "\u00ef\u00f1\u00f2\u00f3\u00f4\u00f5\u00f6\u00f8\u00f9\u00fa\u00fb\u00fc\u0100\u0101\u0102\u0103"
        "\u0104\u0105\u0106\u0107\u0108\u0109\u010a\u010b\u010c\u010d\u0128\u0129\u012a\u012b\u012c\u012d"
        "\u012e\u012f\u0130\u0139\u013a\u013b\u013c\u013d\u013e\u0141\u0142\u0143\u0144\u0145\u0146\u0147"
        "\u0148\u014c\u014d\u014e\u014f\u0150\u0151\u0154\u0155\u0156\u0157\u0158\u0159\u0162\u0163\u0164"
        "\u0165\u0166\u0167\u0168\u0169\u016a\u016b\u016c\u016d\u016e\u016f\u0170\u0171\u0172\u0173\u0197"
        "\u019a\u019f\u01a0\u01a1\u01ab\u01ae\u01af\u01b0\u01cd\u01ce\u01cf\u01d0\u01d1\u01d2\u01d3\u01d4"
        "\u01d5\u01d6\u01d7\u01d8\u01d9\u01da\u01db\u01dc\u01de\u01df\u01ea\u01eb\u01ec\u01ed\u221f\u2514"
        "\u252c\u2558\u2559\u255a\u2564\u2565\u2566\u25cb\u25d9\u263a\u263b\u263c\uff04\uff0e\uff0f\uff10"
        "\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19\uff1a\uff21\uff23\uff29\uff2c\uff2d\uff2e"
        "\uff2f\uff30\uff32\uff34\uff35\uff38\uff3c\uff41\uff43\uff49\uff4c\uff4d\uff4e\uff4f\uff50\uff52"
        "\uff54\uff55\uff58",
        "AAAAAACIIIINOOOOOOUUUUaaaaaaciiiinoooooouuuuAaAaAaCcCcCcCcIiIiIiIiILlLlLlLlNnNnNnOoOoOoRrRrRrTtT"
        "tTtUuUuUuUuUuUuIlOOotTUuAaIiOoUuUuUuUuUuAaOoOoLLTLLLTTT00OO0$./0123456789:ACILMNOPRTUX\\acilmnopr"
        "tux",
    ),
    1252: (
        "\u0100\u0101\u0102\u0103\u0104\u0105\u0106\u0107\u0108\u0109\u010a\u010b\u010c\u010d\u0128\u0129"
        "\u012a\u012b\u012c\u012d\u012e\u012f\u0130\u0131\u0139\u013a\u013b\u013c\u013d\u013e\u0141\u0142"
        "\u0143\u0144\u0145\u0146\u0147\u0148\u014c\u014d\u014e\u014f\u0150\u0151\u0154\u0155\u0156\u0157"
        "\u0158\u0159\u0162\u0163\u0164\u0165\u0166\u0167\u0168\u0169\u016a\u016b\u016c\u016d\u016e\u016f"
        "\u0170\u0171\u0172\u0173\u0197\u019a\u019f\u01a0\u01a1\u01ab\u01ae\u01af\u01b0\u01cd\u01ce\u01cf"
        "\u01d0\u01d1\u01d2\u01d3\u01d4\u01d5\u01d6\u01d7\u01d8\u01d9\u01da\u01db\u01dc\u01de\u01df\u01ea"
        "\u01eb\u01ec\u01ed\u0398\u03a9\u03b1\u03c0\u03c4\u0589\u2044\u2074\u2075\u2076\u2077\u2078\u207f"
        "\u2080\u2081\u2082\u2083\u2084\u2085\u2086\u2087\u2088\u2089\u20a7\u2102\u2110\u2111\u2112\u2113"
        "\u2115\u2118\u2119\u211b\u211c\u211d\u212d\u2133\u2134\u2215\u2216\u221e\u2229\u2236\uff04\uff0e"
        "\uff0f\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19\uff1a\uff21\uff23\uff29\uff2c"
        "\uff2d\uff2e\uff2f\uff30\uff32\uff34\uff35\uff38\uff3c\uff41\uff43\uff49\uff4c\uff4d\uff4e\uff4f"
        "\uff50\uff52\uff54\uff55\uff58",
        "AaAaAaCcCcCcCcIiIiIiIiIiLlLlLlLlNnNnNnOoOoOoRrRrRrTtTtTtUuUuUuUuUuUuIlOOotTUuAaIiOoUuUuUuUuUuAaO"
        "oOoTOapt:/45678n0123456789PCIILlNPPRRRCMo/\\8n:$./0123456789:ACILMNOPRTUX\\acilmnoprtux",
    ),
    1253: (
        "\u00b4\u00c0\u00c1\u00c2\u00c3\u00c4\u00c5\u00c7\u00cc\u00cd\u00ce\u00cf\u00d1\u00d2\u00d3\u00d4"
        "\u00d5\u00d6\u00d8\u00d9\u00da\u00db\u00dc\u00e0\u00e1\u00e2\u00e3\u00e4\u00e5\u00e7\u00ec\u00ed"
        "\u00ee\u00ef\u00f1\u00f2\u00f3\u00f4\u00f5\u00f6\u00f8\u00f9\u00fa\u00fb\u00fc\u0100\u0101\u0102"
        "\u0103\u0104\u0105\u0106\u0107\u0108\u0109\u010a\u010b\u010c\u010d\u0128\u0129\u012a\u012b\u012c"
        "\u012d\u012e\u012f\u0130\u0139\u013a\u013b\u013c\u013d\u013e\u0141\u0142\u0143\u0144\u0145\u0146"
        "\u0147\u0148\u014c\u014d\u014e\u014f\u0150\u0151\u0154\u0155\u0156\u0157\u0158\u0159\u0162\u0163"
        "\u0164\u0165\u0166\u0167\u0168\u0169\u016a\u016b\u016c\u016d\u016e\u016f\u0170\u0171\u0172\u0173"
        "\u0197\u019a\u019f\u01a0\u01a1\u01ab\u01ae\u01af\u01b0\u01cd\u01ce\u01cf\u01d0\u01d1\u01d2\u01d3"
        "\u01d4\u01d5\u01d6\u01d7\u01d8\u01d9\u01da\u01db\u01dc\u01de\u01df\u01ea\u01eb\u01ec\u01ed\u221f"
        "\u2514\u252c\u255a\u2566\u25cb\u25d9\u263a\u263b\u263c\uff04\uff0e\uff0f\uff10\uff11\uff12\uff13"
        "\uff14\uff15\uff16\uff17\uff18\uff19\uff1a\uff21\uff23\uff29\uff2c\uff2d\uff2e\uff2f\uff30\uff32"
        "\uff34\uff35\uff38\uff3c\uff41\uff43\uff49\uff4c\uff4d\uff4e\uff4f\uff50\uff52\uff54\uff55\uff58",
        "/AAAAAACIIIINOOOOOOUUUUaaaaaaciiiinoooooouuuuAaAaAaCcCcCcCcIiIiIiIiILlLlLlLlNnNnNnOoOoOoRrRrRrTt"
        "TtTtUuUuUuUuUuUuIlOOotTUuAaIiOoUuUuUuUuUuAaOoOoLLTLT00OO0$./0123456789:ACILMNOPRTUX\\acilmnoprtux",
    ),
    1254: (
        "\u0100\u0101\u0102\u0103\u0104\u0105\u0106\u0107\u0108\u0109\u010a\u010b\u010c\u010d\u0128\u0129"
        "\u012a\u012b\u012c\u012d\u012e\u012f\u0139\u013a\u013b\u013c\u013d\u013e\u0141\u0142\u0143\u0144"
        "\u0145\u0146\u0147\u0148\u014c\u014d\u014e\u014f\u0150\u0151\u0154\u0155\u0156\u0157\u0158\u0159"
        "\u0162\u0163\u0164\u0165\u0166\u0167\u0168\u0169\u016a\u016b\u016c\u016d\u016e\u016f\u0170\u0171"
        "\u0172\u0173\u0197\u019a\u019f\u01a0\u01a1\u01ab\u01ae\u01af\u01b0\u01cd\u01ce\u01cf\u01d0\u01d1"
        "\u01d2\u01d3\u01d4\u01d5\u01d6\u01d7\u01d8\u01d9\u01da\u01db\u01dc\u01de\u01df\u01ea\u01eb\u01ec"
        "\u01ed\u0589\u2044\u2074\u2075\u2076\u2077\u2078\u2081\u2084\u2085\u2086\u2087\u2088\u2089\u2102"
        "\u2110\u2111\u2112\u2113\u2115\u2118\u2119\u211b\u211c\u211d\u212d\u2133\u2134\u2215\u2216\u221f"
        "\u2236\u2514\u252c\u255a\u2566\u25cb\u25d9\u263a\u263b\u263c\uff04\uff0e\uff0f\uff10\uff11\uff12"
        "\uff13\uff14\uff15\uff16\uff17\uff18\uff19\uff1a\uff21\uff23\uff29\uff2c\uff2d\uff2e\uff2f\uff30"
        "\uff32\uff34\uff35\uff38\uff3c\uff41\uff43\uff49\uff4c\uff4d\uff4e\uff4f\uff50\uff52\uff54\uff55"
        "\uff58",
        "AaAaAaCcCcCcCcIiIiIiIiLlLlLlLlNnNnNnOoOoOoRrRrRrTtTtTtUuUuUuUuUuUuIlOOotTUuAaIiOoUuUuUuUuUuAaOoO"
        "o:/456780456789CIILlNPPRRRCMo/\\L:LTLT00OO0$./0123456789:ACILMNOPRTUX\\acilmnoprtux",
    ),
    1255: (
        "\uff04\uff0e\uff0f\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19\uff1a\uff21\uff23"
        "\uff29\uff2c\uff2d\uff2e\uff2f\uff30\uff32\uff34\uff35\uff38\uff3c\uff41\uff43\uff49\uff4c\uff4d"
        "\uff4e\uff4f\uff50\uff52\uff54\uff55\uff58",
        "$./0123456789:ACILMNOPRTUX\\acilmnoprtux",
    ),
    1256: (
        "\u00c0\u00c2\u00c7\u00ce\u00cf\u00d4\u00d9\u00db\u00dc\u0660\u0661\u0662\u0663\u0664\u0665\u0666"
        "\u0667\u0668\u0669\uff04\uff0e\uff0f\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19"
        "\uff1a\uff21\uff23\uff29\uff2c\uff2d\uff2e\uff2f\uff30\uff32\uff34\uff35\uff38\uff3c\uff41\uff43"
        "\uff49\uff4c\uff4d\uff4e\uff4f\uff50\uff52\uff54\uff55\uff58",
        "AACIIOUUU0123456789$./0123456789:ACILMNOPRTUX\\acilmnoprtux",
    ),
    1257: (
        "\uff04\uff0e\uff0f\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19\uff1a\uff21\uff23"
        "\uff29\uff2c\uff2d\uff2e\uff2f\uff30\uff32\uff34\uff35\uff38\uff3c\uff41\uff43\uff49\uff4c\uff4d"
        "\uff4e\uff4f\uff50\uff52\uff54\uff55\uff58",
        "$./0123456789:ACILMNOPRTUX\\acilmnoprtux",
    ),
    1258: (
        "\uff04\uff0e\uff0f\uff10\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18\uff19\uff1a\uff21\uff23"
        "\uff29\uff2c\uff2d\uff2e\uff2f\uff30\uff32\uff34\uff35\uff38\uff3c\uff41\uff43\uff49\uff4c\uff4d"
        "\uff4e\uff4f\uff50\uff52\uff54\uff55\uff58",
        "$./0123456789:ACILMNOPRTUX\\acilmnoprtux",
    ),
}
# And the characters each writes as "~" (helper 145, from the same tables), the mark of an NTFS short
# name (``names._SHORT_NAME``): a name of U+223C or U+0303 that code page 1252 writes "PHOTOG~1.JPG"
# was kept as it was (helper 144).  The four East Asian pages have none: their fullwidth tilde stays one.
_TILDES: dict[int, str] = {
    874: "\uff5e",
    1250: "\u02dc\u0303\u223c\uff5e",
    1251: "\uff5e",
    1252: "\u0303\u223c\uff5e",
    1253: "\uff5e",
    1254: "\u223c\uff5e",
    1255: "\uff5e",
    1256: "\uff5e",
    1257: "\uff5e",
    1258: "\uff5e",
}
_TABLES = {
    page: (characters + _TILDES.get(page, ""), ascii + "~" * len(_TILDES.get(page, "")))
    for page, (characters, ascii) in _TABLES.items()
}
TRANSLATIONS = tuple(str.maketrans(characters, ascii) for characters, ascii in _TABLES.values())
# Every character kept here as best fit writes it, in one table for all code pages (they agree but
# on U+2081, "1" in 1250 and 1252 and "0" in 1254: "1", as NFKC has it).
FOLDED = str.maketrans(
    {
        character: made
        for characters, ascii in reversed(_TABLES.values())
        for character, made in zip(characters, ascii, strict=True)
    }
)
_KEPT = frozenset(character for characters, _ in _TABLES.values() for character in characters)
# The characters some code page's best fit turns into "/", "\\" or ":".
SEPARATORS = frozenset(
    character
    for characters, ascii in _TABLES.values()
    for character, made in zip(characters, ascii, strict=True)
    if made in "/\\:"
)


def best_fit_forms(name: str) -> list[str]:
    """``name`` as each code page's best fit writes it (only the characters kept here translated); [] if ASCII."""
    if name.isascii() or _KEPT.isdisjoint(name):  # most names (Cyrillic too): 14 translations saved
        return []
    return [name.translate(table) for table in TRANSLATIONS]
