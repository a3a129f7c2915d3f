"""The app: built from the settings, its start and stop, the guards every request passes, its error pages.

What each path answers is ``routes``; the work happens elsewhere.
"""

from __future__ import annotations

import ipaddress
import logging
import re

import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..archive import launcher
from ..archive.producer import lingering as lingering_producers
from ..archive.uncached_status import statx_offered
from ..archive.worker_threads import NoThread, in_thread
from ..config import Settings
from ..fences import hypercorn_access, hypercorn_h2, hypercorn_h11, hypercorn_tcp
from ..fences.quart_trio import connection_class
from .connection import response_sender
from .limits import STALL_UNIT, connection_limit
from .pages import PAGE_NOT_FOUND, UNPARSED_REQUEST, error_page, unparsed_request_answer
from .routes import Routes
from .storage_root import check_storage_root, root_timeout
from .watchdog import feed_watchdog, watchdog_task

logger = logging.getLogger(__name__)


# The path and every header's name and value together: far more than any browser or CMS link needs.
MAX_HEADER_BYTES = 16 * 1024


def create_app(settings: Settings) -> QuartTrio:
    """Build the Quart-Trio app; fails fast if the storage root is missing (not if it does not answer)."""
    root_answered = check_storage_root(settings.storage_dir, root_timeout(settings.storage_timeout))
    hypercorn_h2.install()
    hypercorn_h11.install(error_answer=unparsed_request_answer)
    hypercorn_access.install(error_answer=unparsed_request_answer)
    hypercorn_tcp.install(
        write_timeout=settings.stall_timeout,
        max_connections=connection_limit(settings.max_connections, settings.max_jobs),
        write_unit=STALL_UNIT,
    )

    # An empty ARCHIVER_LINK_SECRET= is unset, as every empty variable: said at start, so that a
    # secret meant and left out is not silent (helper 68).
    if settings.link_secret:
        logger.info("links: signed and expiring (ARCHIVER_LINK_SECRET)")
    else:
        logger.info("links: an album's name alone opens it (ARCHIVER_LINK_SECRET unset)")
    if not statx_offered():  # helper 152: else silent, the operator never told
        logger.warning(
            "statx is refused here (a kernel before 4.11, or a sandbox's filter): on FUSE or NFS storage, "
            "a file edited beneath the mount may go out under its old CRC for as long as the kernel keeps "
            "its attributes (README, How it works)"
        )
    app = QuartTrio(__name__)
    app.asgi_http_class = connection_class(response_sender(settings.stall_timeout))
    # Quart cuts a response off after RESPONSE_TIMEOUT (60 s by default); an
    # archive of a few GB on a slow link takes as long as it takes (the slow run's
    # steady reader at 50 kB/s reads for 90 s).  Every other answer has the stall timeout.
    app.config["RESPONSE_TIMEOUT"] = None
    # No route reads a body: what a client sends with its request is kept only up to this
    # (Quart's default, 16 MB a request, held while the response runs, was a memory lever).
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    # "/archive//x//" is not a way to name an album: no redirect to a cleaned-up path.
    app.url_map.merge_slashes = False

    routes = Routes(settings, root_answered)
    _start_and_stop(app, routes)
    _guard_requests(app)
    _answer_errors(app)
    for rule, view in (
        ("/", routes.index),
        ("/archive/<name>/", routes.archive),
        ("/archive/<name>", routes.archive_without_slash),
        ("/healthz", routes.healthz),
        ("/metrics", routes.prometheus_metrics),
        ("/favicon.ico", routes.favicon),
    ):
        # GET only (Werkzeug adds HEAD); no automatic OPTIONS: any other method is a 405.
        app.add_url_rule(rule, view_func=view, methods=["GET"], provide_automatic_options=False)
    return app


def _start_and_stop(app: QuartTrio, routes: Routes) -> None:
    """What the app does as it starts serving and once it has stopped: the launcher, the watchdog, the last CRCs."""

    @app.before_serving
    async def start_launcher() -> None:
        # Before any storage file is opened: the spawner and launcher must hold none (``archive.launcher``).
        await launcher.start()

    # systemd's watchdog (WatchdogSec= in the unit): pinged from the event loop while it runs.
    watchdog_scope = trio.CancelScope()

    @app.before_serving
    async def start_watchdog() -> None:
        if (task := watchdog_task()) is not None:

            async def feed() -> None:
                with watchdog_scope:
                    await feed_watchdog(*task)

            app.nursery.start_soon(feed)

    @app.after_serving
    async def stop_watchdog() -> None:
        watchdog_scope.cancel()  # the pings end with the serving: a stopping process is TimeoutStopSec's to judge

    @app.after_serving
    async def write_the_last_crcs() -> None:
        # Rows a download's end left for the next (another was writing): given up on after
        # crc_index_file.SERVICE_BUSY_TIMEOUT.
        try:
            await in_thread(routes.crc_index.flush)
        except NoThread as error:  # the tasks' limit: a later download reads those files again (helper 50)
            logger.warning("stopping without writing the last CRCs to the index: %s", error)

    @app.after_serving
    async def close_the_mount_table() -> None:
        routes.root_filesystem.close()

    @app.after_serving
    async def report_lingering_producers() -> None:
        if count := lingering_producers():
            # They hold no slot and no download: the launcher leaves them to init as it ends.
            logger.warning("stopping with %d killed producers still waiting on the storage", count)


def _guard_requests(app: QuartTrio) -> None:
    """What every request passes before its route: one framing, a bounded head, no leading "//"."""

    @app.before_request
    async def refuse_two_framings() -> Response | None:
        # First: Quart stops at the first hook that answers, and a 431 would keep the connection (helper 110).
        # RFC 9112 6.3: a request with both a Content-Length and a Transfer-Encoding may be one a front
        # framed otherwise than h11 did (request smuggling); the server MUST close after answering it.
        # h11 frames it by Transfer-Encoding and kept the connection (helper 108).  As nginx: 400, closed.
        if "Transfer-Encoding" in request.headers and "Content-Length" in request.headers:
            # Its sentence, not the default 400's, which is about a link's filename (helper 138).
            return error_page(400, request.headers.get("Accept"), {"Connection": "close"}, message=UNPARSED_REQUEST)
        return None

    @app.before_request
    async def refuse_bodies() -> Response | None:
        # No route reads a body, and over HTTP/1.1 h11 parses a chunked one a chunk at a time in Python
        # (~11 us each): a GET that sent 1-byte chunks beside its own download kept a core busy for as
        # long as the download ran (helper 123: 16 CPU-s in 16 s).  Refused, and the connection closed.
        # An empty chunked body is no body: nginx sends one for an HTTP/2 client's GET whose HEADERS
        # left the stream open, ended by an empty DATA frame (helper 124: a 400 through nginx).
        # (HTTP/2's DATA frames have their budget: fences/hypercorn_h2_frames.)  Another method is
        # answered 405 at once, and the connection closed with the body unread (Hypercorn's recycle).
        if request.method not in ("GET", "HEAD") or not request.http_version.startswith("1"):
            return None
        if (request.content_length or 0) > 0 or (
            "Transfer-Encoding" in request.headers and not await _body_ends_empty()
        ):
            return error_page(400, request.headers.get("Accept"), {"Connection": "close"}, message=UNPARSED_REQUEST)
        return None

    @app.before_request
    async def limit_header_size() -> Response | None:
        # h11 caps only a request head that arrives in pieces; one that comes
        # in a single read, and HTTP/2's (up to 64 KiB), would pass whole.
        size = len(request.method) + len(request.scope.get("raw_path", b""))
        size += len(request.scope.get("query_string", b""))
        # Each header as it stands in an HTTP/1.1 head ("name: value\r\n"): 16,000 empty ones are 64 kB.
        size += sum(len(name) + len(value) + 4 for name, value in request.scope["headers"])
        if size > MAX_HEADER_BYTES:
            return error_page(431, request.headers.get("Accept"))
        return None

    @app.before_request
    async def refuse_invalid_hosts() -> Response | None:
        # RFC 9112 3.2: a server MUST answer 400 to a Host field with an invalid value (helper 143: "a b/c",
        # "user@x", "x:port" and an empty one were served), or to more than one.  Its absence over
        # HTTP/1.1 is h11's 400; over HTTP/1.0 it is allowed, and the scope's headers are read, not
        # Quart's, which adds an empty Host there (helper 149: every Host-less HTTP/1.0 request, a
        # load balancer's health check among them, was a 400).
        hosts = [value for name, value in request.scope["headers"] if name.lower() == b"host"]
        if not hosts or (len(hosts) == 1 and _valid_host(hosts[0].decode("latin-1"))):
            return None
        close = {"Connection": "close"} if request.http_version.startswith("1") else {}
        return error_page(400, request.headers.get("Accept"), close, message=UNPARSED_REQUEST)

    @app.before_request
    async def refuse_leading_slashes() -> Response | None:
        # Werkzeug's routing strips a path's leading slashes: "//archive/<name>/" served the album.
        if request.scope.get("raw_path", b"").startswith(b"//"):
            return error_page(404, request.headers.get("Accept"))
        return None


# RFC 9110 4.2.1 and 7.2, RFC 3986 3.2.2-3.2.3: uri-host [":" port], the host never empty for "http":
# an IP literal in brackets (an IPv6 address, with a zone as RFC 6874 writes it, "%25" and its name,
# let through though RFC 3986's grammar, which RFC 9110 cites, has none; or an IPvFuture), or a
# reg-name (IPv4 addresses among them) of unreserved, sub-delims and %HH.
_HOST = re.compile(
    r"(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)(?:%25(?:[0-9A-Za-z._~-]|%[0-9A-Fa-f]{2})+)?\]"
    r"|\[[vV][0-9A-Fa-f]+\.[0-9A-Za-z._~!$&'()*+,;=:-]+\]"
    r"|(?:[0-9A-Za-z._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+)"
    r"(?::[0-9]*)?"
)


def _valid_host(host: str) -> bool:
    """Whether ``host`` is a Host field's valid value for "http" (``_HOST``, its IPv6 address one)."""
    if not (match := _HOST.fullmatch(host)):
        return False
    if match["ipv6"] is None:
        return True
    try:
        ipaddress.IPv6Address(match["ipv6"])
    except ValueError:
        return False
    return True


# How long a GET's chunked body has to end, empty, before it is refused: nginx's comes with the head, or
# with the client's empty DATA frame that ends its request, which a lost segment may hold up by a
# retransmission's timeout, 1 s at first (helper 125: 1 s refused such a GET, through nginx).
EMPTY_BODY_WAIT = 5.0


async def _body_ends_empty() -> bool:
    """Whether the request's body ends, within EMPTY_BODY_WAIT s, with no byte; False at its first byte."""
    with trio.move_on_after(EMPTY_BODY_WAIT):
        async for data in request.body:
            if data:
                return False
        return True
    return False


def _answer_errors(app: QuartTrio) -> None:
    """The service's own pages for 404, 405 and 500: HTML for a browser, a sentence otherwise (``pages``)."""

    @app.errorhandler(404)
    async def not_found(error: HTTPException) -> Response:
        on_archive = request.path.startswith("/archive/")
        return error_page(404, request.headers.get("Accept"), message=None if on_archive else PAGE_NOT_FOUND)

    @app.errorhandler(500)
    async def internal_error(error: Exception) -> Response:
        # Whatever escaped a route (logged by Quart): the service's page, not Werkzeug's English one.
        return error_page(500, request.headers.get("Accept"))

    @app.errorhandler(405)
    async def method_not_allowed(error: HTTPException) -> Response:
        allowed = getattr(error, "valid_methods", None) or ()  # MethodNotAllowed's, a set
        # Sorted: a set's order changes with each process's hash seed, and one service's
        # instances behind nginx should not answer the same request in different words.
        headers = {"Allow": ", ".join(sorted(allowed))}
        if request.http_version.startswith("1") and (
            (request.content_length or 0) > 0 or "Transfer-Encoding" in request.headers
        ):
            # Its body is not read: Hypercorn closes the connection after the answer, which says so
            # (RFC 9110 10.1.1, RFC 9112 9.6; helper 143: a keep-alive client found it closed).
            headers["Connection"] = "close"
        return error_page(405, request.headers.get("Accept"), headers)
