"""Command line: ``archiver`` / ``python -m archiver`` with the original flags."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from .app import create_app
from .config import Settings, SettingsError
from .logs import configure_logging
from .producer import ZipUnavailable

logger = logging.getLogger(__name__)


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from the command line; flags left out fall back to ARCHIVER_* variables, then defaults."""
    try:
        base = Settings.from_env()
    except SettingsError as error:
        sys.exit(f"archiver: {error}")
    parser = argparse.ArgumentParser(
        prog="archiver",
        description="Serve GET /archive/<name>/ as a ZIP of <dir>/<name>/, made while it is sent.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-H", "--host", default=base.host, help="address to listen on")
    parser.add_argument("-P", "--port", type=int, default=base.port, help="port to listen on")
    parser.add_argument(
        "-D", "--dir", type=Path, default=base.storage_dir, help="storage root holding one folder per archive"
    )
    parser.add_argument(
        "-d",
        "--delay",
        type=float,
        default=base.delay,
        help="seconds to sleep between sent chunks (to test slow links)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=base.verbose,
        help="debug logging, including every sent chunk",
    )
    parser.add_argument(
        "--compression",
        type=int,
        choices=range(10),
        metavar="0-9",
        default=base.compression,
        help="zip compression level; 0 stores (best for JPEG)",
    )
    args = parser.parse_args(argv)
    try:
        return replace(
            base,
            host=args.host,
            port=args.port,
            storage_dir=args.dir,
            delay=args.delay,
            verbose=args.verbose,
            compression=args.compression,
        )
    except SettingsError as error:
        parser.error(str(error))


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """Hypercorn settings for the CLI launch; hypercorn.toml holds the same for the other one."""
    config = HypercornConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = "-"
    config.graceful_timeout = settings.shutdown_grace
    return config


async def _until_signalled(grace: float) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            logger.info(
                "received %s: no new connections; in-flight downloads get %.0f s to finish",
                signal.Signals(signum).name,
                grace,
            )
            return


def main(argv: Sequence[str] | None = None) -> None:
    """Run the service until SIGINT or SIGTERM."""
    settings = parse_settings(argv)
    configure_logging(settings.verbose)
    try:
        app = create_app(settings)
    except (SettingsError, ZipUnavailable) as error:
        sys.exit(f"archiver: {error}")
    logger.info("serving %s on %s:%d", settings.storage_dir.resolve(), settings.host, settings.port)
    shutdown_trigger = partial(_until_signalled, settings.shutdown_grace)
    trio.run(partial(serve, app, hypercorn_config(settings), shutdown_trigger=shutdown_trigger))
    logger.info("stopped")
