"""The naming policy: names every system can hold, one file per name, whatever was uploaded."""

from __future__ import annotations

import itertools
import unicodedata

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from archiver.archive import names as names_module
from archiver.archive.best_fit import TRANSLATIONS, best_fit_forms
from archiver.archive.names import entry_names, portable_component

# The README's table of examples (What the person unpacks): on disk -> in the archive.
EXAMPLES = [
    ("a*b.jpg", "a_b.jpg"),
    ("q?.jpg", "q_.jpg"),
    ("x<y>.jpg", "x_y_.jpg"),
    ('say "hi".jpg', "say _hi_.jpg"),
    ("pipe|.jpg", "pipe_.jpg"),
    ("a\\b.jpg", "a_b.jpg"),
    ("C:photo.jpg", "C_photo.jpg"),
    ("trailing dot.", "trailing dot"),
    ("trailing space ", "trailing space"),
    ("CON.jpg", "_CON.jpg"),
    ("nul", "_nul"),
    ("com1.txt", "_com1.txt"),
    ("...", "_"),
    ("Cafe\u0301.jpg", "Café.jpg"),
    ("a∕b.jpg", "a_b.jpg"),
    ("．．＼．．＼x.exe", "．．_．．_x.exe"),
    ("C：photo.jpg", "C_photo.jpg"),
    ("．．", "_"),
    ("ＣＯＮ．jpg", "_ＣＯＮ．jpg"),
    ("ÇON.txt", "_ÇON.txt"),
    ("..∖..∖x.exe", ".._.._x.exe"),
    ("C∶x.exe", "C_x.exe"),
    ("Photog~1.jpg", "Photog_1.jpg"),
    ("DSC_00~1.JPG", "DSC_00_1.JPG"),
    ("Новаяп~1", "Новаяп_1"),
    ("CON．~1", "_CON．_1"),  # a device and a short name's shape (helper 59: was not idempotent)
    ("CON .txt", "_CON .txt"),  # Windows takes a device name with spaces before its extension too
]


@pytest.mark.parametrize(("on_disk", "in_archive"), EXAMPLES)
def test_each_troublesome_name_becomes_a_portable_one(on_disk: str, in_archive: str) -> None:
    assert portable_component(on_disk) == in_archive
    assert entry_names([on_disk.encode()]) == [in_archive]


def test_names_that_are_one_file_elsewhere_are_numbered_in_list_order() -> None:
    paths = ["Café.jpg", "Cafe\u0301.jpg", "IMG_0001.JPG", "img_0001.jpg", "img_0001 (2).jpg", "x"]
    assert entry_names(p.encode() for p in paths) == [
        "Café.jpg",
        "Café (2).jpg",
        "IMG_0001.JPG",
        "img_0001 (2).jpg",
        "img_0001 (2) (2).jpg",
        "x",
    ]


def test_directories_that_differ_in_case_merge_and_a_file_never_shadows_one() -> None:
    paths = [b"Photos/a.jpg", b"photos/A.JPG", b"photos/b.jpg", b"x", b"X/c.jpg"]
    assert entry_names(paths) == ["Photos/a.jpg", "Photos/A (2).JPG", "Photos/b.jpg", "x", "X (2)/c.jpg"]


def test_names_that_differ_by_a_code_point_unicode_says_to_ignore_are_numbered() -> None:
    # Helper 165: Linux's case folding (casefolded ext4 and f2fs: Android's shared storage) drops
    # Default_Ignorable code points, and HFS+ some: a soft hyphen, a zero-width space or joiner, a
    # word joiner, an emoji's variation selector.  Each pair below is one file there, and was two here.
    paths = [
        "PHOTO.JPG",
        "photo\u00ad.jpg",
        "photo\u200b.jpg",
        "❤ Маша.jpg",
        "❤\ufe0f Маша.jpg",
        "Новый год.jpg",
        "Новый\u2060 год.jpg",
        "ДР\u200d.jpg",
        "др.jpg",
    ]
    assert entry_names(p.encode() for p in paths) == [
        "PHOTO.JPG",
        "photo\u00ad (2).jpg",
        "photo\u200b (3).jpg",
        "❤ Маша.jpg",
        "❤\ufe0f Маша (2).jpg",
        "Новый год.jpg",
        "Новый\u2060 год (2).jpg",
        "ДР\u200d.jpg",
        "др (2).jpg",
    ]


def test_two_folders_cut_to_one_name_stay_two() -> None:
    # Helper 165: two long CP1251 folder names (twice as long in UTF-8) that differ past the cut to
    # 255 bytes were merged: part 2's photos numbered into part 1's folder, which part each came from lost.
    first, second = (("Выпускной вечер " + "Д" * 120 + f" часть {n}").encode("cp1251") for n in (1, 2))
    names = entry_names(
        [first + b"/IMG_0001.jpg", first + b"/IMG_0002.jpg", second + b"/IMG_0001.jpg", second + b"/x/y"]
    )
    folders = [name.rsplit("/", 1)[0] for name in names]
    assert folders[0] == folders[1] != folders[2]
    assert folders[2].endswith(" (2)") and folders[3] == folders[2] + "/x"
    assert [name.rsplit("/", 1)[1] for name in names] == ["IMG_0001.jpg", "IMG_0002.jpg", "IMG_0001.jpg", "y"]
    assert all(len(part.encode()) <= 255 for name in names for part in name.split("/"))
    # Folders that differ only in case, neither cut, still merge (as Windows and macOS merge them).
    assert entry_names([b"Album/a", b"ALBUM/b"]) == ["Album/a", "Album/b"]
    # And so does one long name under two such folders (helper 166: split in two).
    assert (
        len({name.rsplit("/", 1)[0] for name in entry_names([b"Album/" + first + b"/x", b"album/" + first + b"/y"])})
        == 1
    )
    # A name cut by the "_" put before a device's name (helper 166: "CON." and 251 bytes, merged).
    devices = [f"CON.{'x' * 250}{end}/photo.jpg".encode() for end in "AB"]
    assert len({name.rsplit("/", 1)[0] for name in entry_names(devices)}) == 2


def test_names_not_in_utf8_are_read_as_cp1251_then_replaced() -> None:
    cp1251 = "Отпуск/фото.jpg".encode("cp1251")
    assert entry_names([cp1251, b"caf\xe9.jpg", b"bad\x98.jpg"]) == ["Отпуск/фото.jpg", "cafй.jpg", "bad\ufffd.jpg"]
    assert entry_names([b"caf\xe9.jpg"], encoding="latin-1") == ["café.jpg"]


# Names of Russian and Ukrainian photo albums, as their uploaders type them.
ALBUM_NAMES = [
    *["Отпуск", "Фото", "Дача", "Саша", "Свадьба 2024", "ДР Маши", "Новый год", "Выпускной", "Утренник в садике"],
    *["Мама и папа", "Юбилей бабушки", "Сочи, июль", "фото", "видео", "вечер", "Новогодняя ёлка", "Київ", "Їжак"],
    "Наш отпуск",
]


def test_names_in_cp866_are_read_as_cp866_and_cp1251_ones_stay_cp1251() -> None:
    # Helper 186: Russian Windows writes names in its OEM code page too (the console's ftp.exe, FAR
    # Manager; zip archives from Explorer and 7-Zip, which 7z and bsdtar unpack on the server
    # byte for byte): read as CP1251, "Отпуск" was "ЋвЇгбЄ" and "Фото" "”®в®".
    for name in ALBUM_NAMES:
        oem, ansi = name.encode("cp866"), name.encode("cp1251")
        assert entry_names([oem + b"/IMG_0001.JPG", ansi + b".jpg"]) == [f"{name}/IMG_0001.JPG", f"{name}.jpg"]
    # A mixed album: one folder, each name once, whatever code page each upload came in.
    paths = ["Отпуск".encode("cp866") + b"/1.jpg", "Отпуск".encode("cp1251") + b"/2.jpg", "Отпуск/3.jpg".encode()]
    assert entry_names(paths) == ["Отпуск/1.jpg", "Отпуск/2.jpg", "Отпуск/3.jpg"]
    # CP1251 names whose bytes CP866 reads as letters too (lower case, dashes, quotes, signs) stay CP1251.
    for name in ["мама – папа", "„лейкома“", "лето…", "кот ©", "photo – x – y", "a — b — c…", "дача № 5", "‘а’"]:
        assert entry_names([name.encode("cp1251")]) == [name], name
    # Other encodings are read as they were: only CP1251's OEM code page is looked for.
    assert entry_names(["Отпуск".encode("cp866")], encoding="latin-1") == ["_â¯ãáª"]  # C1 0x8E is "_"
    assert entry_names([b"caf\xe9.jpg"]) == ["cafй.jpg"]


def test_cp866_words_starting_with_o_whose_yo_cp1251_reads_as_a_letter_are_read_as_cp866() -> None:
    # Helper 192: "отчёт.doc" in CP866 went out as "®взсв.doc": its "ё" is a small ES to CP1251, so no sign
    # stood between two letters, and one sign ("®", CP866's small O) against four letters was no CP866
    # name.  No CP1251 name puts "®" right before a small letter; "©" (CP866's "й") may: "©фото".
    for name in ["отчёт.doc", "объём.txt", "орёл.jpg", "отчёт за май.xlsx", "зелёный отчёт.pdf", "отчёт-2.doc"]:
        assert entry_names([name.encode("cp866")]) == [name], name
    for name in ["©фото.jpg", "® фото.jpg", "§глава.txt", "®Бренд.jpg", "«отчёт».doc", "©вадим", "отчёт"]:
        assert entry_names([name.encode("cp1251")]) == [name], name
    # What no test of code pages can tell, left as CP1251 reads it: every letter a letter to both.
    assert entry_names(["счёт.pdf".encode("cp866")]) == ["бзсв.pdf"]


def test_cp866_names_that_were_read_as_cp437_are_read_as_cp866() -> None:
    # Helper 186: PHP's ZipArchive (libzip) and Python's zipfile read the CP866 names of a zip made on a
    # Russian Windows as CP437, the zip format's code page, and write them in UTF-8: "Отпуск" is "ÄΓ»πß¬".
    for name in ALBUM_NAMES:
        on_disk = name.encode("cp866").decode("cp437").encode()
        assert entry_names([on_disk + b"/IMG_0001.JPG"]) == [f"{name}/IMG_0001.JPG"], on_disk.decode()
    # Names in Latin scripts that CP437 holds are UTF-8 as they are.
    for name in ["café.jpg", "Größe.jpg", "«abfraß».jpg", "Ñandú.jpg", "Zürich Hbf.jpg", "½ µm.jpg", "α-Centauri.jpg"]:
        assert entry_names([name.encode()]) == [name]
    assert entry_names(["ÄΓ»πß¬".encode()], encoding="latin-1") == ["ÄΓ»πß¬"]  # CP1251's alone
    assert entry_names(["ÄΓ»πß¬".encode(), "Фото".encode("cp866")], oem=False) == ["ÄΓ»πß¬", "”®в®"]  # helper 187
    # Helper 187: Greek and mathematical names that CP437 holds whole read as CP866 words too: "ΣΩ.txt"
    # went out as "фъ.txt", "100 µΩ.pdf" as "100 цъ.pdf", "Σε.mp3" as "фю.mp3" (68 of Greek hunspell's
    # 5 million names). CP866's capitals and small letters up to "п" are Latin letters and signs in CP437: a name
    # without any is Greek or mathematics, not CP866 (0.012 % of CP866 names, "тут", are missed for it).
    for name in ["ΣΩ.txt", "100 µΩ.pdf", "Σε.mp3", "Θα.txt", "Στα.txt", "αα.txt", "π≈3,14.txt", "≈≈.txt", "∞∞.txt"]:
        assert entry_names([name.encode()]) == [name]


def test_serbian_and_macedonian_names_in_cp1251_stay_cp1251() -> None:
    # Helper 187: CP1251 is the ANSI code page of Serbian and Macedonian Windows too, and their letters
    # were taken for CP866's capitals read as CP1251: "Јелена.jpg" went out as "гхыхэр.jpg", "Љубав"
    # as "Кєсрт" (2,844 of Serbian hunspell's 1.2 million names; CP866 names missed for it: 0.14 %).
    # So was a name with a dagger, as the dead are marked ("дед † 2019" was "фхф Ж 2019").
    names = ["Јелена", "Јован", "Јагодина", "Љубав", "Џон", "Ђаво", "ћерка", "њива", "Ѓорѓи", "Ќе", "дед † 2019"]
    for name in names:
        assert entry_names([name.encode("cp1251") + b".jpg"]) == [f"{name}.jpg"], name


@given(st.lists(st.sampled_from(ALBUM_NAMES), min_size=1, max_size=3).map(" ".join))
def test_no_cp1251_name_of_words_is_read_as_cp866(name: str) -> None:
    for form in (name, name.lower(), name.upper(), f"«{name}»", f"{name.lower()} – 2024", f"„{name.lower()}“…"):
        assert entry_names([form.encode("cp1251")]) == [form]


# Default_Ignorable code points: a soft hyphen, a zero-width space, a zero-width joiner, an emoji's variation selector.
IGNORED = ["\u00ad", "\u200b", "\u200d", "\ufe0f"]
TROUBLESOME = st.lists(
    st.sampled_from(
        [
            *["a", "A", "я", "Я", "e\u0301", "é", "ß", "SS", ".", " ", "*", ":", "\\", "\t", "😀", "CON"],
            *["．", "＼", "ＣＯＮ", "℀", "∖", "Ç", "Ø", "¥"],  # look-alikes that best fit makes ASCII
            *["ı", "I", "i", "ſ", "s"],  # one letter to NTFS's upper case
            *IGNORED,  # nothing to Linux's case folding
        ]
    ),
    min_size=1,
    max_size=6,
).map("".join)
RAW = st.one_of(
    TROUBLESOME.map(str.encode),
    TROUBLESOME.map(lambda text: text.encode("cp1251", errors="replace")),
    st.binary(min_size=1, max_size=6).filter(lambda raw: b"/" not in raw and b"\0" not in raw),
)


@given(st.lists(st.lists(RAW, min_size=1, max_size=3).map(b"/".join), min_size=1, max_size=12, unique=True))
@example([b"a", "a\u200b".encode(), "\u00adA/x".encode()])  # one file each to Linux's case folding
def test_every_name_is_portable_utf8_nfc_and_unique_when_case_folded(paths: list[bytes]) -> None:
    names = entry_names(sorted(paths))
    assert len(names) == len(paths)
    # One file each wherever it is unpacked: macOS (NFC, case folded), NTFS (upper case), and an
    # extractor through each ANSI code page (best fit, then Windows drops trailing dots and spaces).
    # And Linux's case folding (casefolded ext4 and f2fs), which drops what Unicode says to ignore.
    systems = [lambda name: unicodedata.normalize("NFC", name).casefold(), str.upper]
    systems.append(lambda name: "".join(c for c in unicodedata.normalize("NFC", name) if c not in IGNORED).casefold())
    systems += [
        lambda name, table=table: "/".join(part.rstrip(" .") for part in name.translate(table).split("/")).upper()
        for table in TRANSLATIONS
    ]
    for system in systems:
        keys = [system(name) for name in names]
        assert len(set(keys)) == len(keys), keys
        directories = {key.rsplit("/", 1)[0] for key in keys if "/" in key}
        assert not directories & set(keys)  # no file where a directory must be
    for name in names:
        assert unicodedata.is_normalized("NFC", name)
        name.encode("utf-8")  # valid UTF-8 (no surrogates)
        for part in name.split("/"):
            assert part and part == portable_component(part)  # nothing forbidden is left
            # What an extractor using a code page may make of it: no separator, no dots alone, no device.
            for form in [unicodedata.normalize("NFKC", part), *best_fit_forms(part)]:
                assert not set(form) & set("/\\:") and form.strip(" .")
                assert form.split(".", 1)[0].rstrip(" ").upper() not in names_module._RESERVED
    assert entry_names(sorted(paths)) == names  # deterministic


def test_no_component_is_longer_than_255_bytes_even_numbered() -> None:
    cyrillic = "Я".encode("cp1251") * 200 + b".jpg"  # 404 bytes once UTF-8
    long_ascii = b"a" * 251 + b".jpg"
    names = entry_names([cyrillic, long_ascii, long_ascii.upper(), b"d" * 255 + b"/x", b"D" * 255])
    assert all(len(part.encode()) <= 255 for name in names for part in name.split("/")), names
    assert names[0].endswith(".jpg") and names[0].startswith("Я")
    assert names[2].endswith(" (2).JPG")
    assert len({name.casefold() for name in names}) == 5


def test_names_one_file_after_best_fit_or_ntfs_upper_case_are_numbered() -> None:
    # Helper 69: an extractor through code page 1251 wrote "a", U+FF0E, "jpg" as "a.jpg" over the other,
    # and "photo", U+FF0E as "photo."; Windows drops the dot.  NTFS upper-cases U+0131 (dotless i) to "I".
    paths = ["a.jpg", "a．jpg", "photo", "photo．", "I.jpg", "ı.jpg", "Dir/x", "dir．/y"]
    assert entry_names(p.encode() for p in paths) == [
        "a.jpg",
        "a．jpg (2)",
        "photo",
        "photo． (2)",
        "I.jpg",
        "ı (2).jpg",
        "Dir/x",
        "Dir/y",
    ]


def test_no_name_is_longer_than_macos_holds_in_nfd() -> None:
    # Helper 69: 85 "ᾂ" are 255 bytes, and 340 UTF-16 units in NFD, as macOS keeps names (255 at most).
    names = entry_names([("ᾂ" * 85).encode(), ("ᾂ" * 85 + ".jpg").encode(), ("ᾂ" * 85).encode().upper()])
    for name in names:
        assert len(unicodedata.normalize("NFD", name).encode("utf-16-le")) // 2 <= 255, name
    assert names[1].endswith(".jpg") and names[2].endswith(" (2)")


def test_a_flood_of_case_variants_is_numbered_in_linear_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4,096 case variants of one name, as an uploader may make: each numbering tried from 2 was quadratic.
    variants = ["".join(letters) + ".jpg" for letters in itertools.product("aA", repeat=12)]
    tried = 0
    real = names_module.numbered

    def counting(component: str, number: int) -> str:
        nonlocal tried
        tried += 1
        return real(component, number)

    monkeypatch.setattr(names_module, "numbered", counting)
    names = entry_names(sorted(name.encode() for name in variants))
    assert len({name.casefold() for name in names}) == len(variants)
    assert tried <= 2 * len(variants)  # was ~n²/2: 8 million


def test_a_directory_moved_off_a_file_never_lands_in_another_directory() -> None:
    # The folder x moves off the file X, and must not merge into the unrelated folder X (2).
    names = entry_names([b"X", b"X (2)/a.jpg", b"x/b.jpg"])
    folders = {name.rsplit("/", 1)[0].casefold() for name in names if "/" in name}
    assert len(folders) == 2, names


def test_superscript_device_names_and_bidi_controls_are_defused() -> None:
    assert portable_component("COM¹.txt") == "_COM¹.txt"
    # Microsoft's list has COM0 and LPT0 too, and the console's CONIN$ and CONOUT$.
    for reserved in ("COM0.jpg", "lpt0", "CONIN$", "conout$.txt"):
        assert portable_component(reserved) == "_" + reserved
    assert portable_component("photo\u202egpj.exe") == "photo_gpj.exe"


def test_no_name_answers_to_the_short_name_ntfs_makes_up_for_another() -> None:
    # Helper 51: NTFS gives "Photograph.jpg" the short name "PHOTOG~1.JPG" too; "Photog~1.jpg"
    # unpacked after it opened it instead.  Only that shape: 8.3, "~" and a number last in the stem.
    paths = [b"Photograph.jpg", b"Photog~1.jpg", b"Photog_1.jpg", b"photos~12.jpg", b"a~1.jpeg", "Фото~1.jpg".encode()]
    # "~" is an 8.3 character too (helper 53): "a~bcdefghij.txt" is also "A~BCDE~1.TXT".
    paths += [b"a~bcdefghij.txt", b"a~bcde~1.txt", b"photo~~1.jpg"]
    # FAT keeps short names in the OEM code page: on a card written by a Russian Windows (866)
    # "Фотография.jpg" is also "ФОТОГР~1.JPG" (NTFS too with extended characters allowed).
    paths += ["Фотография.jpg".encode(), "Фотогр~1.jpg".encode()]
    assert entry_names(paths) == [
        "Photograph.jpg",
        "Photog_1.jpg",
        "Photog_1 (2).jpg",
        "photos~12.jpg",
        "a~1.jpeg",
        "Фото_1.jpg",
        "a~bcdefghij.txt",
        "a~bcde_1.txt",
        "photo~_1.jpg",
        "Фотография.jpg",
        "Фотогр_1.jpg",
    ]


def test_no_name_has_the_short_name_shape_in_the_form_a_code_page_writes_it_in() -> None:
    # Helper 142: the shape was looked for in the name alone; "PHOTOG~1" and a fullwidth full stop,
    # digit or tilde is "PHOTOG~1.JPG" written through an ANSI code page (best fit) or in NFKC.
    shape = names_module._SHORT_NAME
    names = ["PHOTOG~1\uff0eJPG", "PHOTOG~\uff11.JPG", "PHOTOG\uff5e1.JPG", "\uff30HOTOG\uff5e\uff11"]
    # Tilde operator, combining tilde (1252), small tilde (1250): "~" to their best fit (helper 144).
    names += ["PHOTOG\u223c1.JPG", "PHOTOG\u03031.JPG", "DSC\u223c1.JPG", "PHOTOG\u02dc1.JPG"]
    for name in names:
        (entry,) = entry_names([name.encode()])
        forms = [entry, unicodedata.normalize("NFKC", entry), *best_fit_forms(entry)]
        assert not any(shape.fullmatch(form) for form in forms), (name, entry)
        assert "_" in entry
    assert entry_names(["PHOTOG\uff5e1.JPG".encode()]) == ["PHOTOG_1.JPG"]
    # The name's own shape made "_" first, then a form's (helper 144: "a~1" U+FF0E "x_1" kept it in NFKC).
    for name in ["a~1\uff0ex~1", "AB~1\uff0eJ~2"]:
        (entry,) = entry_names([name.encode()])
        forms = [entry, unicodedata.normalize("NFKC", entry), *best_fit_forms(entry)]
        assert not any(shape.fullmatch(form) for form in forms), (name, entry)
        assert portable_component(entry) == entry  # and the rule leaves its own answer as it is
    assert entry_names(["фото\uff5ex.jpg".encode()]) == ["фото\uff5ex.jpg"]  # no number: no shape, kept
    # One file to an extractor through code page 1252: numbered apart.
    assert entry_names([b"a~b.txt", "a\u223cb.txt".encode()]) == ["a~b.txt", "a\u223cb (2).txt"]


def test_c1_controls_and_unicode_line_breaks_are_replaced() -> None:
    # Found by helper 35: U+009B is a terminal's control sequence introducer as `unzip -l` prints names.
    for control in ("\x80", "\x85", "\x9b", "\x9f", "\u2028", "\u2029", "\x7f"):
        assert portable_component(f"c1{control}x.txt") == "c1_x.txt"
    assert portable_component("\xa0nbsp.txt") == "\xa0nbsp.txt"  # the first character past C1 is a letter's neighbour


def test_look_alikes_that_best_fit_makes_separators_dots_or_devices_are_defused() -> None:
    # Windows' best-fit conversion to a code page (an extractor using the "A" APIs) maps fullwidth
    # and small forms to ASCII: fullwidth "..\\..\\x.exe" would unpack as "..\\..\\x.exe" (the WorstFit attacks).
    lookalikes = "／＼﹨：﹕︓∕⁄℀℁℅℆⩴∖∶։¥₩´"  # set minus, ratio, Armenian full stop, acute (1250-1254), yen, won
    assert portable_component(f"a{lookalikes}b") == "a" + "_" * len(lookalikes) + "b"
    for dots in ("．", "．．", "‥", "…", "﹒﹒", ". ．"):
        assert portable_component(dots) == "_", dots
    # Helper 46: letters best fit makes C, O, N, L: C-cedilla in code page 1251, L with stroke in 1250-1254.
    for device in ("ＣＯＮ", "ｎｕｌ．txt", "ＣＯＭ１.jpg", "ÇON.txt", "ĈON", "ŁPT1.jpg", "CØN"):
        assert portable_component(device) == "_" + device
    # Look-alikes that make no path stay: a Japanese title keeps its fullwidth question mark.
    assert portable_component("なぜ？.jpg") == "なぜ？.jpg"
    assert portable_component("file．jpg") == "file．jpg"


def test_a_slash_an_encoding_decodes_is_no_separator() -> None:
    # Components are split on b"/" before decoding; a decoder that made "/" of other bytes
    # (EBCDIC: 0x61) must not make "../" (helper 35).  Such encodings are refused at start too (test_config).
    (name,) = entry_names([b"\x4b\x4b\x61\x4b\x4b\x61x\xff"], encoding="cp037")  # "../../" and more in EBCDIC
    assert "/" not in name and name.startswith(".._.._"), name


def test_a_name_cut_to_255_bytes_is_checked_for_devices_and_dots_after_the_cut() -> None:
    # Found by helper 47: checked, then cut, "COM1" + spaces + "x." + a CP1251 extension (twice as
    # long in UTF-8) lost "   x" at the cut and unpacked as the device COM1, in every reader.
    cp1251 = b"COM1" + b" " * 218 + b"x." + b"\xe0" * 16
    grows = ("NUL" + " " * 227 + "x." + "\U0001d160" * 2).encode()  # NFC makes U+1D160 three characters
    folder = b"CON" + b" " * 220 + b"x." + b"\xe0" * 16 + b"/inside.txt"
    names = entry_names([cp1251, grows, folder])
    assert [name.split(".", 1)[0] for name in names] == ["_COM1", "_NUL", "_CON"], names
    for name in names:
        for part in name.split("/"):
            assert portable_component(part) == part and len(part.encode()) <= 255
    dots = ("．" * 90 + "x" * 20).encode()  # 290 bytes: cut to its fullwidth dots alone, ".." to best fit
    assert entry_names([dots]) == ["_"]


ASCII_PIECES = st.sampled_from(
    ["CON", "com1", "Lpt9", "nul", "CONIN$", "PHOTOG~1", "a~12", ".", " ", "~", ".jpg", "x" * 250]
)


@given(st.lists(st.one_of(ASCII_PIECES, st.text(st.characters(max_codepoint=127), max_size=12)), max_size=6))
@example(["x" * 256])  # one byte past the cut
@example(["x" * 250, ".", "y" * 40])  # an extension past 32 bytes, the whole past 255
@example(["COM1", " " * 260, ".txt"])
def test_an_ascii_component_is_named_as_by_the_general_rules(pieces: list[str]) -> None:
    # portable_component takes ASCII that needs no replacing and no cut by a shorter path: the
    # same name, devices, short names, dots and spaces, controls and lengths around 255 included.
    component = "".join(pieces)
    assert portable_component(component) == names_module._any_portable_component(component)
