"""The predicted archive length against what the real zip writes."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from archiver.config import Settings
from archiver.layout import stored_archive_layout
from archiver.producer import find_zip, produce_zip, zip_arguments, zip_input
from archiver.storage import list_album

from .conftest import files_on_disk, http11_request, read_archive, server_in_thread

ZIP = zip_arguments(find_zip("zip"), 0)


def archive_size(album: Path) -> int | None:
    layout = stored_archive_layout(list_album(album))
    return None if layout is None else layout.size


async def zip_output_length(album: Path) -> int:
    send_channel, receive_channel = trio.open_memory_channel[bytes](4)
    length = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: produce_zip(ZIP, zip_input(list_album(album)), send_channel, chunk_size=1 << 20))
        async for chunk in receive_channel:
            length += len(chunk)
    return length


NAME_PART = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\x00"), min_size=1, max_size=30
).filter(lambda part: part not in (".", "..") and len(part.encode()) < 200)
TREES = st.dictionaries(
    st.lists(NAME_PART, min_size=1, max_size=4).map("/".join),
    st.integers(min_value=0, max_value=70_000),
    max_size=12,
)


def write_generated_tree(album: Path, tree: dict[str, int]) -> None:
    for relative, size in tree.items():
        path = album / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(size))
        except (IsADirectoryError, NotADirectoryError, FileExistsError):
            continue  # the tree names a file and a folder alike: keep the first


@given(tree=TREES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_prediction_equals_real_zip_output(tmp_path_factory: pytest.TempPathFactory, tree: dict[str, int]) -> None:
    album = tmp_path_factory.mktemp("album")
    write_generated_tree(album, tree)
    predicted = archive_size(album)
    assert predicted == trio.run(zip_output_length, album)


async def test_empty_album_prediction(tmp_path: Path) -> None:
    assert archive_size(tmp_path) == await zip_output_length(tmp_path) == 22


async def test_prediction_with_more_than_65535_entries(tmp_path: Path) -> None:
    for index in range(65_600):
        (tmp_path / f"f{index:05d}").touch()
    assert archive_size(tmp_path) == await zip_output_length(tmp_path)


@pytest.mark.slow
async def test_prediction_with_a_file_over_4_gib(tmp_path: Path) -> None:
    with open(tmp_path / "huge.bin", "wb") as file:
        file.truncate(4_500_000_000)  # sparse: reads as zeros, costs no disk
    (tmp_path / "after.txt").write_bytes(b"after the ZIP64 entry")
    assert archive_size(tmp_path) == await zip_output_length(tmp_path)


@pytest.fixture(scope="module")
def http_storage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, tuple[str, int]]]:
    storage = tmp_path_factory.mktemp("layout-storage")
    with server_in_thread(Settings(storage_dir=storage)) as address:
        yield storage, address


@given(tree=TREES)
@example(tree={"/".join(["глубоко"] * 20) + "/🌅.jpg": 10, "empty": 0})  # deep, emoji, empty
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_content_length_equals_bytes_sent(http_storage: tuple[Path, tuple[str, int]], tree: dict[str, int]) -> None:
    storage, address = http_storage
    album = Path(tempfile.mkdtemp(dir=storage))
    write_generated_tree(album, tree)
    status, headers, body = http11_request(address, "GET", f"/archive/{album.name}/".encode(), [])
    assert status == 200
    assert int(headers["content-length"]) == len(body)
    assert read_archive(body) == files_on_disk(album)
