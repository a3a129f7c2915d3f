"""A file's descriptor shared with worker threads the event loop may give up on: closed once neither uses it."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import trio

from .listed_files import open_listed
from .producer_protocol import FileChanged, FileKey
from .worker_threads import NoThread, in_thread

logger = logging.getLogger(__name__)

# Seconds between tries to close a file whose close found no thread to run in (the tasks' limit).
CLOSE_RETRY = 1.0


class SharedDescriptor:
    """A file's descriptor, read by worker threads the event loop may give up on: closed once neither uses it.

    A read of storage that hangs (a dead NFS server) cannot be interrupted:
    the download gives up on its thread (``abandon_on_cancel``) and leaves it
    to return when it can.  The descriptor must outlive that thread: closed
    under it, its number could name another file, or a client's socket, by
    the time the thread reads on.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._fd = -1
        self._users = 1  # the event loop's side, until it drops it
        self._dropped = False

    def open(self, path: Path, size: int, key: FileKey | None) -> FileKey:
        """In a worker thread: open ``path`` (``listed_files.open_listed``) into this; its key."""
        fd, found = open_listed(path, size, key)
        with self._lock:
            if not self._dropped:
                self._fd = fd
                return found
        os.close(fd)  # given up on while it opened
        raise FileChanged(f"{path}: given up on")

    @property
    def dropped(self) -> bool:
        """Whether the event loop has given it up: a thread still using it may stop."""
        return self._dropped

    def borrow(self) -> int | None:
        """In a worker thread, before using the descriptor: it, or None if given up on (then do nothing)."""
        with self._lock:
            if self._dropped or self._fd < 0:
                return None
            self._users += 1
            return self._fd

    def give_back(self) -> None:
        """In the worker thread that borrowed it: closed here if the event loop has dropped it meanwhile."""
        with self._lock:
            self._users -= 1
        self._close_if_unused()

    def drop(self) -> None:
        """On the event loop, once done with it (or given up): closed by the last thread using it, or by a new one.

        Never closed on the event loop: a ``close`` on FUSE sends a FLUSH,
        which a dead file system (sshfs with its network gone) does not answer.
        """
        with self._lock:
            if self._dropped:
                return
            self._dropped = True
            self._users -= 1
            if self._users or self._fd < 0:
                return
        try:
            trio.lowlevel.start_thread_soon(self._close_if_unused, lambda _: None, name="archiver close")
        except RuntimeError:  # no thread to be had (the tasks' limit): closed once one can be (helper 49)
            trio.lowlevel.spawn_system_task(self._close_once_a_thread_can_be_had, name="archiver close")

    async def _close_once_a_thread_can_be_had(self) -> None:
        while True:
            try:
                await in_thread(self._close_if_unused)
                return
            except NoThread:
                await trio.sleep(CLOSE_RETRY)

    def _close_if_unused(self) -> None:
        with self._lock:
            fd, self._fd = (self._fd, -1) if self._users == 0 else (-1, self._fd)
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as error:  # the CRC is returned by now (or given up on): nothing to fail but a log line
                logger.warning("CRC reader: a file's close failed: %s", error.strerror)
