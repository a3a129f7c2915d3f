"""Which filesystems' ctimes a CRC may be kept by (archive/filesystems.py, ctime_trust.CtimeTrust).

An image reports times no write of its own stamped: erofs and squashfs the
mtime as the ctime, an ext4 image built with ``mkfs.ext4 -d`` each file's
ctime as it was, in whole seconds.  Built again from files edited in place,
their mtimes put back, and mounted on the same loop device, it gives every
file the key it had (helpers 95, 96).  An overlay reports its layers' times,
which filesystems those are its mount does not tell.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from archiver.archive import filesystems, uncached_status
from archiver.archive.ctime_trust import CtimeTrust
from archiver.archive.filesystems import loop_backed, on_a_loop_device
from archiver.config import Settings
from archiver.web.app import create_app

from .conftest import ctimes_settled, read_archive, running_server, write_tree


def test_a_loop_device_or_one_stacked_on_it_is_told_by_sysfs(tmp_path: Path) -> None:
    devices, sys_block = tmp_path / "devices", tmp_path / "dev-block"
    folders = ("loop0/loop", "loop0/loop0p1", "sda/slaves", "sda/sda1", "dm-0/slaves", "dm-1/slaves", "loop1")
    for folder in (*folders, "md0/slaves", "md0/md0p1"):
        (devices / folder).mkdir(parents=True, exist_ok=True)
    for partition in ("loop0/loop0p1", "sda/sda1", "md0/md0p1"):
        (devices / partition / "partition").write_text("1")
    (devices / "dm-0/slaves/loop0p1").symlink_to(devices / "loop0/loop0p1")
    (devices / "dm-1/slaves/sda1").symlink_to(devices / "sda/sda1")
    (devices / "md0/slaves/loop0").symlink_to(devices / "loop0")
    sys_block.mkdir()
    named = {"7:0": "loop0", "259:0": "loop0/loop0p1", "8:1": "sda/sda1", "253:0": "dm-0", "253:1": "dm-1"}
    named |= {"7:1": "loop1", "259:1": "md0/md0p1"}  # loop1: bound to no file, so no loop/ folder
    for device, folder in named.items():
        (sys_block / device).symlink_to(devices / folder)
    # The loop, its partition, dm-crypt on that partition, a partition of md on the loop; a number sysfs
    # does not show (a sandbox's partial /sys): cannot be told.  A disk's partition, dm on it, an unbound loop.
    assert all(loop_backed(sys_block / device) for device in ("7:0", "259:0", "253:0", "259:1", "8:2"))
    assert not any(loop_backed(sys_block / device) for device in ("8:1", "253:1", "7:1"))


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mkfs.btrfs") is None, reason="needs root and btrfs-progs")
def test_a_btrfs_is_told_by_the_devices_sysfs_lists_for_it(tmp_path: Path) -> None:
    # btrfs numbers each subvolume anew, on no block device: its members are sysfs's, whatever /dev the
    # service sees (a container's own lacks the loop device; helper 97).
    image, mountpoint = tmp_path / "btrfs.image", tmp_path / "mnt"
    mountpoint.mkdir()
    with open(image, "wb") as file:
        file.truncate(128 * 1024 * 1024)
    _run("mkfs.btrfs", "-q", str(image))
    with _mounted("-o", "loop", str(image), str(mountpoint)):
        fd = os.open(mountpoint, os.O_RDONLY)
        try:
            assert os.major(os.fstat(fd).st_dev) == 0
            assert on_a_loop_device(fd)
            empty = tmp_path / "sys-fs-btrfs"
            empty.mkdir()
            assert on_a_loop_device(fd, sys_btrfs=empty)  # its fsid not listed: cannot be told
            assert on_a_loop_device(fd, sys_block=tmp_path / "no-sysfs")  # no sysfs at all (a chroot)
            # Its fsid (BTRFS_IOC_FS_INFO's, at its offset) found under a sysfs whose member is a disk: trusted.
            fsid = next(folder.name for folder in Path("/sys/fs/btrfs").iterdir() if _member_of(folder, image))
            (tmp_path / "disk").mkdir()
            (empty / fsid / "devices").mkdir(parents=True)
            (empty / fsid / "devices" / "vda").symlink_to(tmp_path / "disk")
            assert not on_a_loop_device(fd, sys_btrfs=empty)
        finally:
            os.close(fd)
    with _mounted("-t", "tmpfs", "tmpfs", str(mountpoint)):
        fd = os.open(mountpoint, os.O_RDONLY)
        try:
            assert not on_a_loop_device(fd)  # numbered anew, on no device at all
        finally:
            os.close(fd)


def _member_of(sys_btrfs_folder: Path, image: Path) -> bool:
    """Whether the btrfs sysfs folder is that of the filesystem in ``image`` (its loop device a member)."""
    attached = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True).stdout
    loops = {line.split(":")[0] for line in attached.splitlines()}
    members = sys_btrfs_folder / "devices"
    return members.is_dir() and any(f"/dev/{member.name}" in loops for member in members.iterdir())


def _mounting_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mount, losetup)"
    missing = [
        tool for tool in ("mount", "losetup", "mkfs.erofs", "mkfs.ext4", "debugfs") if shutil.which(tool) is None
    ]
    return f"needs {', '.join(missing)} (erofs-utils, e2fsprogs)" if missing else None


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


# The ctime every file of an ext4 image is given, an hour ago: mkfs.ext4 -d copies the source's, in
# whole seconds, and an edit within that second keeps it (helper 96); a fixed one makes that certain.
IMAGE_CTIME = int(time.time()) - 3600


def _build(kind: str, source: Path, image: Path) -> None:
    image.unlink(missing_ok=True)
    if kind == "erofs":
        _run("mkfs.erofs", "--quiet", str(image), str(source))
        return
    _run("mkfs.ext4", "-q", "-d", str(source), str(image), "8M")
    script = image.with_suffix(".debugfs")
    script.write_text("".join(f"sif /{path.name} ctime @{IMAGE_CTIME}\n" for path in source.iterdir()))
    _run("debugfs", "-w", "-f", str(script), str(image))


@contextmanager
def _image(kind: str, source: Path, image: Path, mountpoint: Path, loop: str | None) -> Iterator[str]:
    """``source`` built into an image (``kind``: erofs, ext4), mounted read-only on ``mountpoint`` through ``loop``."""
    _build(kind, source, image)
    if loop is None:
        loop = _run("losetup", "--read-only", "--find", "--show", str(image))
    else:  # the same loop device again: the same device number
        _run("losetup", "--read-only", loop, str(image))
    try:
        with _mounted("-t", kind, "-o", "ro", loop, str(mountpoint)):
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
@pytest.mark.parametrize(
    "kind, overlaid", [("erofs", False), ("erofs", True), ("ext4", False)], ids=["erofs", "overlay on erofs", "ext4"]
)
async def test_an_album_on_an_image_rebuilt_and_mounted_again_is_sent_as_it_now_is(
    settings: Settings, storage: Path, tmp_path: Path, kind: str, overlaid: bool
) -> None:
    source, image, album = tmp_path / "source", tmp_path / "album.image", storage / "album"
    write_tree(source, {"photo.jpg": os.urandom(300_000), "small.jpg": os.urandom(5_000)})
    for path in source.iterdir():  # a day old, before IMAGE_CTIME: a ctime the index would trust
        os.utime(path, (IMAGE_CTIME - 86400, IMAGE_CTIME - 86400))
    album.mkdir()
    lower = tmp_path / "lower" if overlaid else album
    lower.mkdir(exist_ok=True)
    for folder in ("upper", "work"):
        (tmp_path / folder).mkdir()
    layers = f"lowerdir={lower},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"

    @contextmanager
    def served_image(loop: str | None) -> Iterator[str]:
        with ExitStack() as mounts:
            loop = mounts.enter_context(_image(kind, source, image, lower, loop))
            if overlaid:
                mounts.enter_context(_mounted("-t", "overlay", "overlay", "-o", layers, str(album)))
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
    # Every part of the key as it was: only the bytes tell the files apart.  An overlay's device numbers
    # are the machine's anonymous ones, which another test's mount (xdist) may take meanwhile: equal when
    # this file runs alone; the loop device's is this test's own.
    assert (again_key.st_ino, again_key.st_size) == (key.st_ino, key.st_size)
    assert (again_key.st_mtime_ns, again_key.st_ctime_ns) == (key.st_mtime_ns, key.st_ctime_ns)
    assert overlaid or again_key.st_dev == key.st_dev
    assert first.status_code == again.status_code == 200
    assert "etag" not in first.headers  # no resume may join two builds of the image
    assert read_archive(again.content) == edited


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="needs root and mount")
def test_an_overlay_is_not_trusted_whatever_its_layers(tmp_path: Path) -> None:
    # Its mount's options name its layers as they were given: paths since unmounted or repointed, or
    # "/" for one passed by descriptor (composefs on Linux 6.15): never what the layers are now (helper 96).
    for folder in ("lower", "upper", "work", "merged"):
        (tmp_path / folder).mkdir()
    write_tree(tmp_path / "lower", {"a.jpg": b"a"})
    options = f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    trust = CtimeTrust()

    def trusted(path: Path) -> bool:
        fd = os.open(path, os.O_RDONLY)
        try:
            device = os.fstat(fd).st_dev
            trust.learn(fd, device)
        finally:
            os.close(fd)
        return trust.device(device)

    with _mounted("-t", "overlay", "overlay", "-o", options, str(tmp_path / "merged")):
        assert trusted(tmp_path / "lower")  # this machine's own filesystem
        assert not trusted(tmp_path / "merged") and not trusted(tmp_path / "merged" / "a.jpg")


@pytest.mark.parametrize("magic", [0xFF534D42, 0xFE534D42], ids=["cifs", "smb3"])
def test_an_smb_share_is_not_trusted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, magic: int) -> None:
    # The kernel's SMB client reports the server's ChangeTime as the ctime, and Samba sends the mtime as
    # that (helper 97).  This kernel has no SMB client: its statfs answer stands in for one.
    monkeypatch.setattr(filesystems, "filesystem_magic", lambda fd: magic)
    trust, device = CtimeTrust(), tmp_path.stat().st_dev
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        trust.learn(fd, device)
    finally:
        os.close(fd)
    assert not trust.device(device)
    # A Windows server's ChangeTime moves with every write: the operator may say so.
    windows = CtimeTrust(trusted_fuse=("cifs", "smb3"))
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        windows.learn(fd, device)
    finally:
        os.close(fd)
    assert windows.device(device)
    monkeypatch.undo()
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        trust.learn(fd, device)
    finally:
        os.close(fd)
    assert trust.device(device)  # the real answer: this machine's own disk


@pytest.mark.parametrize(
    ("options", "trusted"),
    [
        ("rw,trans=virtio", True),  # cache=none, the default: every stat asks the host
        ("rw,cache=mmap,trans=fd", True),  # WSL's drives
        ("rw,cache=5,trans=virtio", True),  # mmap as Linux 6.6 writes it
        ("rw,cache=loose,trans=virtio", False),
        ("rw,cache=fscache,trans=virtio", False),
        ("rw,cache=f,trans=virtio", False),  # loose, since Linux 6.6
        ("rw,cache=0x8f,trans=virtio", False),  # fscache, later
        ("rw,cache=2,trans=virtio", False),  # metadata alone
        ("rw,cache=strange,trans=virtio", False),  # cannot be told
        # Before Linux 6.4 mountinfo names the mode bare (v9fs_show_options: ",%s"): Debian 12, WSL2.
        ("rw,loose,access=client,trans=virtio", False),
        ("rw,fscache,access=user,trans=virtio", False),
        ("rw,noatime,dirsync,aname=drvfs;path=C:\\;uid=1000,mmap,access=client,msize=65536,trans=fd", True),
        # aname printed unescaped: the options go on past a space.
        ("rw,aname=/srv/my albums,loose,trans=virtio", False),
    ],
)
def test_a_9p_mount_that_keeps_attributes_is_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: str, trusted: bool
) -> None:
    # Helper 150: with its attributes kept (cache=loose, fscache, metadata), 9p answers stat from them
    # and ignores AT_STATX_FORCE_SYNC: an edit on the host never seen.  This kernel has no 9p: its
    # statfs answer and a mountinfo line stand in for one.
    monkeypatch.setattr(filesystems, "filesystem_magic", lambda fd: filesystems.V9FS_MAGIC)
    device = tmp_path.stat().st_dev
    mountinfo = tmp_path / "mountinfo"
    line = f"40 30 {os.major(device)}:{os.minor(device)} / /srv/albums rw,relatime - 9p albums {options}\n"
    mountinfo.write_text(line)
    trust = CtimeTrust(mountinfo=mountinfo)
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        trust.learn(fd, device)
    finally:
        os.close(fd)
    assert trust.device(device) is trusted


def test_statx_refused_is_said_at_start(
    storage: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Helper 152: without statx every check reads the kernel's copy of a FUSE or NFS file's attributes,
    # which may hide an edit (uncached_status): silent, the operator never knew.
    monkeypatch.setattr(uncached_status, "_statx", None)
    create_app(Settings(storage_dir=storage))
    monkeypatch.undo()
    create_app(Settings(storage_dir=storage))
    assert [record.getMessage()[:28] for record in caplog.records if record.levelno == logging.WARNING] == [
        "statx is refused here (a ker"
    ]
