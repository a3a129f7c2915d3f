"""The app for ``hypercorn --config hypercorn.toml archiver.asgi:app``, set up from ARCHIVER_* variables."""

import os
import signal
from types import FrameType

from .app import create_app
from .config import Settings
from .logs import configure_logging


def _terminate_as_interrupt(signum: int, frame: FrameType | None) -> None:
    os.kill(os.getpid(), signal.SIGINT)


# hypercorn.toml runs the app in Hypercorn's own process (workers = 0): a
# fatal error then ends that process with a non-zero status, where a worker
# process's status is lost (Hypercorn 0.18's run() returns 0 after a worker
# died with 1).  In that mode Hypercorn handles SIGINT (graceful shutdown,
# graceful_timeout) but leaves SIGTERM, the signal systemd sends, at its
# default: the process would die at once, cutting every download.  SIGTERM
# is turned into SIGINT, which Trio delivers safely.  Only where SIGINT is
# Python's default handler: in a worker process Hypercorn ignores SIGINT and
# stops workers through an event of its own.
if signal.getsignal(signal.SIGINT) is signal.default_int_handler and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)

settings = Settings.from_env()
configure_logging(settings.verbose)
app = create_app(settings)
