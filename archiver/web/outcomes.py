"""How a download ended, for its log line, its metrics and its answer: what failed first, and what kind of end.

A cancellation is the client leaving (or a shutdown past its grace period);
a client that stopped reading "stalled"; a file of the album changed or gone
"changed"; anything else a failure.
"""

from __future__ import annotations

import trio

from ..archive.producer import ProducerFailed
from ..archive.producer_protocol import FileChanged
from .limits import DownloadStalled, SlotReclaimed


class LengthMismatch(RuntimeError):
    """The bytes made are not the length announced (Content-Length): a fault of the service's, a failure."""


class StorageTimeout(RuntimeError):
    """The download waited ``storage_timeout`` s for bytes while nothing advanced: no output, no CRC read."""


def first_failure(error: BaseException) -> BaseException:
    """The first exception in ``error`` that is not a cancellation, digging through (nested) groups.

    A group of nothing but cancellations gives its first Cancelled.
    """
    if isinstance(error, BaseExceptionGroup):
        _, others = error.split(trio.Cancelled)  # recursive: no Cancelled is left in ``others``
        error = error if others is None else others
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
    return error


def download_outcome(error: BaseException | None) -> tuple[str, str]:
    """How a download ended, as a metrics label and a log phrase.

    A cancellation is the client leaving (or a shutdown past its grace
    period); a client that stopped reading is "stalled"; a download whose
    slot went to another client "reclaimed"; a file of the album changed or
    gone "changed"; anything else a failure.
    """
    if error is None:
        return "completed", "complete"
    error = first_failure(error)
    if isinstance(error, trio.Cancelled):
        return "cancelled", "client disconnected"
    if isinstance(error, DownloadStalled):
        return "stalled", f"stalled: {error}"
    if isinstance(error, SlotReclaimed):
        return "reclaimed", f"reclaimed: {error}"
    if album_changed(error):
        return "changed", f"album changed: {error}"
    return "failed", f"failed: {error}"


def album_changed(error: BaseException) -> bool:
    """Whether ``error`` is a file of the album found changed or gone (by a CRC read or the producer)."""
    return isinstance(error, FileChanged) or (isinstance(error, ProducerFailed) and error.file_changed)
