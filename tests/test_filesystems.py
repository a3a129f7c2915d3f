"""Which filesystems' ctimes a CRC may be kept by (archive/filesystems.py, ctime_trust.CtimeTrust).

An image filesystem (erofs, squashfs) reports a time stored in its image as
the ctime: an image built again from files edited in place, their mtimes put
back, and mounted on the same loop device gives every file the key it had
(helper 95).  An overlay reports its layers' times, and is what they are.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from archiver.archive.ctime_trust import CtimeTrust
from archiver.archive.filesystems import overlay_layers
from archiver.config import Settings

from .conftest import ctimes_settled, read_archive, running_server, write_tree


def _mount_id(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY)
    try:
        fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
    finally:
        os.close(fd)
    return next(line.split()[1] for line in fdinfo.splitlines() if line.startswith("mnt_id:"))


def _layers_of(path: Path, mountinfo: Path) -> list[str] | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return overlay_layers(fd, mountinfo)
    finally:
        os.close(fd)


def test_an_overlays_layers_are_read_from_its_mounts_options(tmp_path: Path) -> None:
    mount_id, table = _mount_id(tmp_path), tmp_path / "mountinfo"

    def layers(options: str) -> list[str] | None:
        table.write_text(
            f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n{mount_id} 22 0:40 / /srv rw - overlay overlay {options}\n"
        )
        return _layers_of(tmp_path, table)

    assert layers("rw,lowerdir=/l1:/l2,upperdir=/u,workdir=/w,uuid=on") == ["/l1", "/l2", "/u"]
    # Data-only layers after "::" (composefs), and a path's space as mountinfo escapes it.
    assert layers("ro,lowerdir=/meta::/objects,redirect_dir=on") == ["/meta", "/objects"]
    assert layers(r"rw,lowerdir=/my\040photos,upperdir=/u") == ["/my photos", "/u"]
    assert layers("rw,lowerdir+=/a,lowerdir+=/b,datadir+=/d") == ["/a", "/b", "/d"]
    assert layers("rw,lowerdir=relative,upperdir=/u") is None  # the mounter's working directory's
    assert layers("rw,xino=off") is None
    table.write_text("22 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    assert _layers_of(tmp_path, table) is None  # no such mount


def _mounting_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount, losetup)"
    missing = [tool for tool in ("mount", "losetup", "mkfs.erofs") if shutil.which(tool) is None]
    return f"needs {', '.join(missing)} (erofs-utils)" if missing else None


def _run(*arguments: str) -> str:
    done = subprocess.run(arguments, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"{' '.join(arguments)}: {done.stderr.strip()} (not allowed here?)")
    return done.stdout.strip()


@contextmanager
def _mounted(*mount_arguments: str) -> Iterator[None]:
    _run("mount", *mount_arguments)
    try:
        yield
    finally:
        subprocess.run(["umount", mount_arguments[-1]], check=True)


@contextmanager
def _erofs(source: Path, image: Path, mountpoint: Path, loop: str | None) -> Iterator[str]:
    """``source`` built into an erofs ``image`` and mounted read-only on ``mountpoint``, through ``loop`` if named."""
    image.unlink(missing_ok=True)
    _run("mkfs.erofs", "--quiet", str(image), str(source))
    if loop is None:
        loop = _run("losetup", "--read-only", "--find", "--show", str(image))
    else:  # the same loop device again: the same device number
        _run("losetup", "--read-only", loop, str(image))
    try:
        with _mounted("-t", "erofs", "-o", "ro", loop, str(mountpoint)):
            yield loop
    finally:
        subprocess.run(["losetup", "--detach", loop], check=False)


def _edit_in_place(path: Path) -> bytes:
    """``dd conv=notrunc`` then ``touch -r``: the size, inode and mtime kept; the new bytes."""
    before = path.stat()
    with open(path, "r+b") as file:
        file.write(b"edited")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    return path.read_bytes()


@pytest.mark.skipif(_mounting_unavailable() is not None, reason=str(_mounting_unavailable()))
@pytest.mark.parametrize("overlaid", [False, True], ids=["erofs", "overlay on erofs"])
async def test_an_album_on_an_image_rebuilt_and_mounted_again_is_sent_as_it_now_is(
    settings: Settings, storage: Path, tmp_path: Path, overlaid: bool
) -> None:
    source, image, album = tmp_path / "source", tmp_path / "album.erofs", storage / "album"
    write_tree(source, {"photo.jpg": os.urandom(300_000), "small.jpg": os.urandom(5_000)})
    album.mkdir()
    lower = tmp_path / "lower" if overlaid else album
    lower.mkdir(exist_ok=True)
    for folder in ("upper", "work"):
        (tmp_path / folder).mkdir()
    overlay = (
        "-t",
        "overlay",
        "overlay",
        "-o",
        f"lowerdir={lower},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}",
    )

    @contextmanager
    def served_image(loop: str | None) -> Iterator[str]:
        with ExitStack() as mounts:
            loop = mounts.enter_context(_erofs(source, image, lower, loop))
            if overlaid:
                mounts.enter_context(_mounted(*overlay, str(album)))
            yield loop

    await ctimes_settled(source)  # not racy: a CRC the index would keep, were the ctimes trusted
    async with running_server(settings) as url, httpx.AsyncClient(base_url=url) as client:
        with served_image(None) as loop:
            key = (album / "photo.jpg").stat()
            first = await client.get("/archive/album/")
        edited = {"photo.jpg": _edit_in_place(source / "photo.jpg"), "small.jpg": _edit_in_place(source / "small.jpg")}
        await ctimes_settled(source)
        with served_image(loop):
            again_key = (album / "photo.jpg").stat()
            again = await client.get("/archive/album/")
    # Every part of the key as it was: only the bytes tell the files apart.
    assert (again_key.st_dev, again_key.st_ino, again_key.st_size) == (key.st_dev, key.st_ino, key.st_size)
    assert (again_key.st_mtime_ns, again_key.st_ctime_ns) == (key.st_mtime_ns, key.st_ctime_ns)
    assert first.status_code == again.status_code == 200
    assert "etag" not in first.headers  # no resume may join two builds of the image
    assert read_archive(again.content) == edited


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root and mount")
def test_an_overlay_is_trusted_as_far_as_its_layers_are(tmp_path: Path) -> None:
    for folder in ("lower", "upper", "work", "merged"):
        (tmp_path / folder).mkdir()
    write_tree(tmp_path / "lower", {"a.jpg": b"a"})
    options = f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    with _mounted("-t", "overlay", "overlay", "-o", options, str(tmp_path / "merged")):
        trust = CtimeTrust()
        for path in (tmp_path / "merged", tmp_path / "merged" / "a.jpg"):
            fd = os.open(path, os.O_RDONLY)
            try:
                device = os.fstat(fd).st_dev
                trust.learn(fd, device)
            finally:
                os.close(fd)
            assert trust.device(device), path  # ext4 or tmpfs layers: their ctimes move with every write
