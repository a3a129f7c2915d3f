"""The command line: ``archiver`` (``python -m archiver``) with the original flags; ``archiver sign``, ``index``."""

from __future__ import annotations

import argparse
import errno
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from .archive.storage import ALBUM_NAME
from .config import Settings, SettingsError, integer, number, warn_of_unknown_variables
from .fences import held_signals, hypercorn_tcp
from .fences.hypercorn_signals import wait_for_stop_signal
from .index_command import index_albums
from .logs import configure_logging, detach_standard_streams
from .web.app import create_app
from .web.disposition import DisplayNameRefused, display_name
from .web.signing import parse_duration, signed_query

logger = logging.getLogger(__name__)


# The flags, each with the field it sets and the variable it stands for: a flag given leaves its
# variable unread, so that a bad value there is overridden, not an error (helper 52).
_FLAGS = {
    "host": ("host", "ARCHIVER_HOST"),
    "port": ("port", "ARCHIVER_PORT"),
    "dir": ("storage_dir", "ARCHIVER_DIR"),
    "delay": ("delay", "ARCHIVER_DELAY"),
    "verbose": ("verbose", "ARCHIVER_VERBOSE"),
    "compression": ("compression", "ARCHIVER_COMPRESSION"),
}


def _host(text: str) -> str:
    # Hypercorn binds ":8080" to every IPv4 address: '-H "$HOST"' with HOST unset listened on all of them
    # unsaid, its line saying "serving ... on :8080" (helper 196), as "-D $UNSET" served the checkout.
    if not text.strip():
        raise argparse.ArgumentTypeError("the address to listen on must not be empty (0.0.0.0: every IPv4 address)")
    return text


def _storage_dir(text: str) -> Path:
    if not text.strip():  # Path("") is the working directory: "-D $UNSET" served the checkout (helper 52)
        raise argparse.ArgumentTypeError("the storage directory must not be empty")
    return Path(text)


def parse_settings(argv: Sequence[str] | None = None) -> Settings:
    """Settings from the command line; flags left out fall back to ARCHIVER_* variables, then defaults."""
    defaults = Settings()
    parser = argparse.ArgumentParser(
        prog="archiver",
        description="Serve GET /archive/<name>/ as a ZIP of <dir>/<name>/, made while it is sent. "
        "'archiver sign NAME --ttl 1h' prints a signed link (see ARCHIVER_LINK_SECRET); "
        "'archiver index [NAME...]' warms the CRC index (see ARCHIVER_INDEX). "
        "A flag left out is read from its ARCHIVER_* variable, then the default.",
        argument_default=argparse.SUPPRESS,
    )
    parser.add_argument("-H", "--host", type=_host, help=f"address to listen on (ARCHIVER_HOST; {defaults.host})")
    parser.add_argument("-P", "--port", type=integer, help=f"port to listen on (ARCHIVER_PORT; {defaults.port})")
    parser.add_argument(
        "-D",
        "--dir",
        type=_storage_dir,
        help=f"storage root holding one folder per archive (ARCHIVER_DIR; {defaults.storage_dir})",
    )
    parser.add_argument(
        "-d",
        "--delay",
        type=number,
        help=f"seconds to sleep between sent chunks, to test slow links (ARCHIVER_DELAY; {defaults.delay:g})",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, including every sent chunk (ARCHIVER_VERBOSE)"
    )
    parser.add_argument(
        "--compression",
        type=integer,
        choices=range(10),
        metavar="0-9",
        help=f"deflate level 1-9; 0 stores, best for JPEG (ARCHIVER_COMPRESSION; {defaults.compression})",
    )
    given = vars(parser.parse_args(argv))
    overridden = {_FLAGS[flag][1] for flag in given}
    try:
        base = Settings.from_env({name: value for name, value in os.environ.items() if name not in overridden})
    except SettingsError as error:
        sys.exit(f"archiver: {error}")
    try:
        return replace(base, **{_FLAGS[flag][0]: value for flag, value in given.items()})
    except SettingsError as error:  # one line and exit 1, as for a variable's (helper 57)
        sys.exit(f"archiver: {error}")


def hypercorn_config(settings: Settings) -> HypercornConfig:
    """Hypercorn settings for the CLI launch; hypercorn.toml holds the same for the other one."""
    config = HypercornConfig()
    # An IPv6 address in brackets, as a URL writes it; given so already ("[::1]"), not twice ("[[::1]]").
    host = f"[{settings.host}]" if ":" in settings.host and not settings.host.startswith("[") else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.accesslog = "-"
    config.graceful_timeout = settings.shutdown_grace
    return config


async def _until_signalled(grace: float) -> None:
    # A second signal during the grace period (a second Ctrl-C, a supervisor's repeat) must not cut
    # the downloads in flight: once the receiver closes, it restores what it found, SIG_IGN.
    received = await wait_for_stop_signal()
    logger.info("received %s: no new connections; in-flight downloads get %s", received.name, _grace_text(grace))
    hypercorn_tcp.shutting_down()


def _grace_text(grace: float) -> str:
    """The grace period as the stop's line says it: "2.5 s to finish" ("%.0f s" said 0 s for 0.5, and "inf s")."""
    return "as long as they take to finish" if grace == math.inf else f"{grace:g} s to finish"


def sign_link(argv: Sequence[str]) -> str:
    """``archiver sign NAME [--ttl 1h] [--base-url URL] [--filename F]``: a link signed with ARCHIVER_LINK_SECRET."""
    parser = argparse.ArgumentParser(
        prog="archiver sign",
        description="Print a signed link to an album, valid for --ttl (needs ARCHIVER_LINK_SECRET).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("name", help="the album's directory name")
    parser.add_argument("--ttl", default="1h", help="how long the link works: 90s, 15m, 1h, 7d")
    parser.add_argument("--base-url", default="", help="scheme and host to put in front, e.g. https://example.org")
    parser.add_argument("--filename", help="the name the archive is saved as (signed too), e.g. 'Отпуск 2024'")
    args = parser.parse_args(argv)
    try:
        ttl = parse_duration(args.ttl)
        secret = Settings.from_env().link_secret
    except (ValueError, SettingsError) as error:
        parser.error(str(error))
    if not secret:
        parser.error("ARCHIVER_LINK_SECRET is not set")
    if not ALBUM_NAME.fullmatch(args.name):
        parser.error(f"{args.name!r} is not an album name")
    if args.filename is not None:
        try:
            display_name(args.filename, args.name)
        except DisplayNameRefused as error:
            parser.error(str(error))
    expires = int(time.time()) + ttl
    query = signed_query(secret.encode(), args.name, expires, args.filename)
    return f"{args.base_url.rstrip('/')}/archive/{args.name}/?{query}"


def main(argv: Sequence[str] | None = None) -> None:
    """Run the service until SIGINT or SIGTERM (or, for ``archiver sign``/``index``, do that and exit)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    if arguments[:1] == ["sign"]:
        print(sign_link(arguments[1:]))
        return
    if arguments[:1] == ["index"]:
        try:
            index_albums(arguments[1:])
        except KeyboardInterrupt:  # Ctrl-C: no traceback; the CRCs committed so far are kept
            print("\narchiver index: interrupted", file=sys.stderr)
            sys.exit(130)
        return
    settings = parse_settings(arguments)
    detach_standard_streams()  # before any handler is made: a log reader that stops must not stop the service
    configure_logging(settings.verbose)
    warn_of_unknown_variables()
    # From here a stop signal is a graceful stop, also while the app is made and starts (a look at the
    # storage, the launcher: up to ~12 s) before the receiver runs: held, and taken by it (helpers 49, 50).
    held_signals.hold()
    try:
        app = create_app(settings)
    except SettingsError as error:
        sys.exit(f"archiver: {error}")
    config = hypercorn_config(settings)
    try:
        # Bound once to say plainly why it cannot be (a port in use, an address not this host's), rather
        # than the fatal error's traceback from inside Hypercorn; closed at once, bound again by Hypercorn.
        sockets = config.create_sockets()
        for listener in (*sockets.secure_sockets, *sockets.insecure_sockets, *sockets.quic_sockets):
            listener.close()
    except OSError as error:
        sys.exit(f"archiver: cannot listen on {config.bind[0]}: {error.strerror or error}")
    # The bind as Hypercorn reads it: an IPv6 address in brackets ("[::1]:8080", not "::1:8080").
    logger.info("serving %s on %s", os.path.abspath(settings.storage_dir), config.bind[0])
    shutdown_trigger = partial(_until_signalled, settings.shutdown_grace)
    try:
        trio.run(partial(serve, app, config, shutdown_trigger=shutdown_trigger))
    except Exception as error:
        if in_use := _address_in_use(error):
            # Taken since it was tried above (two starts at once, helper 52): the same one line.
            sys.exit(f"archiver: cannot listen on {config.bind[0]}: {in_use.strerror}")
        # Per-connection errors end their connection (hypercorn_tcp); this is the server itself.
        logger.critical("fatal error, the service stops", exc_info=True)
        sys.exit(70)  # EX_SOFTWARE: systemd's Restart= and any supervisor see a failure
    logger.info("stopped")


def _address_in_use(error: BaseException) -> OSError | None:
    """The EADDRINUSE that ``error`` is, alone or as a group's only exception (Trio's nurseries group them)."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error if isinstance(error, OSError) and error.errno == errno.EADDRINUSE else None
