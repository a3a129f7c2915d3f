"""The naming policy: names every system can hold, one file per name, whatever was uploaded."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

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


def test_names_not_in_utf8_are_read_as_cp1251_then_replaced() -> None:
    cp1251 = "Отпуск/фото.jpg".encode("cp1251")
    assert entry_names([cp1251, b"caf\xe9.jpg", b"bad\x98.jpg"]) == ["Отпуск/фото.jpg", "cafй.jpg", "bad\ufffd.jpg"]
    assert entry_names([b"caf\xe9.jpg"], encoding="latin-1") == ["café.jpg"]


TROUBLESOME = st.lists(
    st.sampled_from(["a", "A", "я", "Я", "e\u0301", "é", "ß", "SS", ".", " ", "*", ":", "\\", "\t", "😀", "CON"]),
    min_size=1,
    max_size=6,
).map("".join)
RAW = st.one_of(
    TROUBLESOME.map(str.encode),
    TROUBLESOME.map(lambda text: text.encode("cp1251", errors="replace")),
    st.binary(min_size=1, max_size=6).filter(lambda raw: b"/" not in raw and b"\0" not in raw),
)


@given(st.lists(st.lists(RAW, min_size=1, max_size=3).map(b"/".join), min_size=1, max_size=12, unique=True))
def test_every_name_is_portable_utf8_nfc_and_unique_when_case_folded(paths: list[bytes]) -> None:
    names = entry_names(sorted(paths))
    assert len(names) == len(paths)
    keys = [unicodedata.normalize("NFC", name).casefold() for name in names]
    assert len(set(keys)) == len(keys)  # one file each on Windows and macOS
    directories = {key.rsplit("/", 1)[0] for key in keys if "/" in key}
    assert not directories & set(keys)  # no file where a directory must be
    for name in names:
        assert unicodedata.is_normalized("NFC", name)
        name.encode("utf-8")  # valid UTF-8 (no surrogates)
        for part in name.split("/"):
            assert part and part == portable_component(part)  # nothing forbidden is left
    assert entry_names(sorted(paths)) == names  # deterministic
