"""Logging set-up shared by both ways of launching the service."""

from __future__ import annotations

import logging


def configure_logging(verbose: bool) -> None:
    """Send the service's own logs to stderr: DEBUG with ``verbose`` (per-chunk lines), else INFO.

    Only the ``archiver`` loggers are set up: Hypercorn writes its error and
    access logs through handlers of its own, and the root logger stays quiet
    so that ``-v`` does not switch on every library's debug chatter (hpack
    logs each header it encodes).
    """
    package_logger = logging.getLogger("archiver")
    package_logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        package_logger.addHandler(handler)
