"""The HTTP surface's routes: what each path answers, and the app's start and stop; the work happens elsewhere."""

from __future__ import annotations

import json
import logging
import time
from functools import partial

import trio
from quart import Response, abort, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ..archive import launcher
from ..archive.crc_index import CrcIndex
from ..archive.ctime_trust import CtimeTrust
from ..archive.listing import AlbumNotFound, ListingFailed, SkippedLog, WalkProgress
from ..archive.plan_cache import CACHED_ENTRIES, PlanCache
from ..archive.producer import lingering as lingering_producers
from ..archive.producer import producer_available
from ..archive.storage import ALBUM_NAME, resolve_album
from ..archive.worker_threads import NoThread, in_thread
from ..config import Settings
from ..fences import hypercorn_access, hypercorn_h2, hypercorn_h11, hypercorn_tcp
from ..fences.quart_trio import connection_class
from ..logs import cut_for_log
from .answers import answer_headers, client_address, client_protocols, header_field, no_body, utf8_filename
from .clients import TrustedProxies
from .connection import limit_refusal, listing_refusal, send_archive_response
from .crc_index_file import open_crc_store
from .disposition import DisplayNameRefused, display_name
from .download import ArchiveBody, chunk_size_for
from .limits import (
    STALL_UNIT,
    WALKERS,
    FairShareExceeded,
    JobLimitReached,
    JobSlots,
    PlannedFiles,
    RangeLimitReached,
    WalkLimitReached,
    connection_limit,
)
from .metrics import DownloadMetrics
from .pages import PAGE_NOT_FOUND, error_page, page, unparsed_request_answer
from .preparation import prepare_archive
from .ranges import surely_a_range
from .signing import LinkRefused, check_link
from .storage_calls import RESOLVERS, StorageSilent, call_storage
from .storage_root import check_storage_root, storage_root_searchable
from .walk_turns import ClientWalks
from .watchdog import feed_watchdog, watchdog_task

logger = logging.getLogger(__name__)


# The path and every header's name and value together: far more than any browser or CMS link needs.
MAX_HEADER_BYTES = 16 * 1024

EXAMPLE_NAME = "3bea29ccabbbf64bdebcc055319c5745"

# /healthz says the storage fails if its root does not answer within this (or the storage timeout, if shorter).
HEALTH_STORAGE_TIMEOUT = 2.0

INDEX_TITLE = "Архивы фотографий"
INDEX_BODY = (
    "<p>Здесь папку с фотографиями можно скачать одним ZIP-архивом: он собирается, пока скачивается.</p>\n"
    "<p>Откройте ссылку вида <code>/archive/&lt;имя&gt;/</code>, которую вам дали.{example}</p>"
)
EXAMPLE_LINK = f' Например: <a href="/archive/{EXAMPLE_NAME}/">/archive/{EXAMPLE_NAME}/</a>.'


def create_app(settings: Settings) -> QuartTrio:
    """Build the Quart-Trio app; fails fast if the storage root is missing (not if it does not answer)."""
    check_storage_root(settings.storage_dir, min(settings.storage_timeout, HEALTH_STORAGE_TIMEOUT))
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
    app = QuartTrio(__name__)
    app.asgi_http_class = connection_class(send_archive_response)
    slots = JobSlots(settings.max_jobs, settings.max_jobs_per_client)
    planned = PlannedFiles(settings.planned_files_budget)
    proxies = TrustedProxies(settings.trusted_proxies)
    walkers = trio.CapacityLimiter(WALKERS)
    resolvers = trio.CapacityLimiter(RESOLVERS)
    # One look at the storage at a time for /healthz, and one for the index page: on dead storage, a thread
    # stuck each.  Apart: the sample album, if it is the mount that died, must not make the root look dead.
    health_lookers = trio.CapacityLimiter(1)
    index_lookers = trio.CapacityLimiter(1)
    root_timeout = min(settings.storage_timeout, HEALTH_STORAGE_TIMEOUT)
    # As many walks may wait as the client could hold job slots: 64 downloads at once from one address.
    client_walks = ClientWalks(settings.max_jobs)
    crc_index = CrcIndex(open_crc_store(settings), trust=CtimeTrust(settings.trusted_fuse))
    plans = PlanCache(max(CACHED_ENTRIES, settings.max_files))  # the largest album's plan is shared too
    skips = SkippedLog()
    metrics = DownloadMetrics(slots, planned)
    # Quart cuts a response off after RESPONSE_TIMEOUT (60 s by default); an
    # archive of a few GB on a slow link takes as long as it takes.
    app.config["RESPONSE_TIMEOUT"] = None
    # No route reads a body: what a client sends with its request is kept only up to this
    # (Quart's default, 16 MB a request, held while the response runs, was a memory lever).
    app.config["MAX_CONTENT_LENGTH"] = 64 * 1024
    # "/archive//x//" is not a way to name an album: no redirect to a cleaned-up path.
    app.url_map.merge_slashes = False

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
            await in_thread(crc_index.flush)
        except NoThread as error:  # the tasks' limit: a later download reads those files again (helper 50)
            logger.warning("stopping without writing the last CRCs to the index: %s", error)

    @app.after_serving
    async def report_lingering_producers() -> None:
        if count := lingering_producers():
            # They hold no slot and no download: the launcher leaves them to init as it ends.
            logger.warning("stopping with %d killed producers still waiting on the storage", count)

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
    async def refuse_leading_slashes() -> Response | None:
        # Werkzeug's routing strips a path's leading slashes: "//archive/<name>/" served the album.
        if request.scope.get("raw_path", b"").startswith(b"//"):
            return error_page(404, request.headers.get("Accept"))
        return None

    @app.get("/", provide_automatic_options=False)
    async def index() -> Response:
        # The sample album's link only where the sample album is (make run on data/).
        # Not with signed links on: the bare link would only get a 403.
        sample = settings.storage_dir / EXAMPLE_NAME
        try:
            sample_there = not settings.link_secret and await call_storage(
                sample.is_dir, timeout=root_timeout, limiter=index_lookers
            )
        except (ListingFailed, OSError):  # silent storage, no thread; or the root unsearchable since (helper 58)
            sample_there = False
        example = EXAMPLE_LINK if sample_there else ""
        return Response(page(INDEX_TITLE, INDEX_BODY.format(example=example)), mimetype="text/html")

    @app.route("/archive/<name>/", methods=["GET"], provide_automatic_options=False)
    async def archive(name: str) -> Response:
        try:
            # A real name never needs %-escapes; an escaped one is someone probing.
            if b"%" in request.scope.get("raw_path", b""):
                raise AlbumNotFound(name)
            args = request.args
            requested_filename = args.get("filename")
            if requested_filename is not None and not utf8_filename(request.scope.get("query_string", b"")):
                # Werkzeug keeps bytes that are not UTF-8 as "%FF": not a name anyone chose.
                raise DisplayNameRefused("filename is not UTF-8")
            if settings.link_secret:
                # Before the album is looked at: no walk, no producer, and no hint whether it exists.
                secret = settings.link_secret.encode()
                check_link(secret, name, args.get("expires"), args.get("sig"), time.time(), requested_filename)
            filename = display_name(requested_filename, name)
            if not ALBUM_NAME.fullmatch(name):
                raise AlbumNotFound(name)  # before a thread is taken: no probe costs one
            # Off the event loop, as every look at the storage: a dead mount must stop this request only.
            album = await call_storage(
                partial(resolve_album, settings.storage_dir, name),
                timeout=settings.storage_timeout,
                limiter=resolvers,
            )
            client = client_address(proxies)
            # Limits before work: a download that would be refused is refused before its walk.  Not
            # a conditional request, which may need no job (304, 412): its body takes the slot, or
            # is refused, as any download's does (ArchiveBody).  And not as a range, unless the
            # request can only be one: a stale If-Range or several ranges get the whole archive.
            conditional = "If-Match" in request.headers or "If-None-Match" in request.headers
            if request.method == "GET" and not conditional:
                ranged = surely_a_range(
                    header_field(request.headers, "Range"), header_field(request.headers, "If-Range")
                )
                slots.check(client, ranged=ranged)
            # A deflated archive has no length: its end is the chunked body's end, which
            # HTTP/1.0 lacks, so a failed one would end as the connection closes, looking
            # complete.  An HTTP/1.0 client gets the stored archive, whose length it checks.
            compression = 0 if "HTTP/1.0" in client_protocols(proxies) else settings.compression
            # A large album takes a while to walk (minutes on cold NFS): silence, not length, ends it,
            # and the wait for this client's turn and for a walker thread counts unless the queue moves.
            progress = WalkProgress()
            prepared = await call_storage(
                partial(prepare_archive, album, settings, plans, skips, compression, progress, crc_index.trust),
                timeout=settings.storage_timeout,
                limiter=walkers,
                progress=progress,
                admission=partial(client_walks.turn, client, progress),
                queue_moved=partial(client_walks.queue_moved, client, progress),
            )
        except (JobLimitReached, FairShareExceeded, RangeLimitReached, WalkLimitReached) as error:
            return limit_refusal(error, name, client, metrics, request.headers.get("Accept"))
        except AlbumNotFound:
            logger.debug("no album for %r", cut_for_log(name))
            abort(404)
        except ListingFailed as error:
            # Never an archive of part of the album: it would end cleanly and look complete.
            return listing_refusal(error, name, metrics, request.headers.get("Accept"))
        except DisplayNameRefused as refusal:
            # Refused before the name is checked: it may be 16 KiB long (helper 84: 10 MB of log a second).
            logger.info("refused %s: %s", cut_for_log(name), refusal)
            return error_page(400, request.headers.get("Accept"))
        except LinkRefused as refusal:
            logger.info("refused %s: %s", cut_for_log(name), refusal)
            return error_page(403, request.headers.get("Accept"))
        answer = answer_headers(prepared, filename)
        if isinstance(answer, Response):
            return answer  # 304, 412, 416
        headers, byte_range = answer
        if request.method == "HEAD":
            # Headers only: no producer.  An empty async body keeps Quart from
            # announcing a Content-Length of 0 that GET would not honour.
            return Response(no_body(), mimetype="application/zip", headers=headers)
        body = ArchiveBody(
            name,
            prepared.plan,
            slots=slots,
            planned=planned,
            metrics=metrics,
            crc_index=crc_index,
            chunk_size=chunk_size_for(request.scope.get("http_version", "1.1"), settings.chunk_size),
            channel_capacity=settings.channel_capacity,
            delay=settings.delay,
            rate_limit=settings.rate_limit,
            byte_range=byte_range,
            client=client,
            stall_timeout=settings.stall_timeout,
            storage_timeout=settings.storage_timeout,
            left_out=prepared.left_out,
        )
        status = 206 if byte_range is not None else 200
        response = Response(body, status=status, mimetype="application/zip", headers=headers)
        response.timeout = None
        return response

    @app.route("/archive/<name>", methods=["GET"], provide_automatic_options=False)
    async def archive_without_slash(name: str) -> Response:
        # Werkzeug's own slash redirect builds an absolute URL from the scheme
        # and Host it sees: behind a TLS proxy that is http:// with the port
        # lost.  A relative reference resolves against whatever URL the client
        # used, through any proxy ("/archive/x" + "x/" = "/archive/x/").
        if b"%" in request.scope.get("raw_path", b"") or not ALBUM_NAME.fullmatch(name):
            abort(404)
        # The query goes along: a signed link's expires and sig.
        query = request.scope.get("query_string", b"").decode("latin-1")
        return Response("", status=308, headers={"Location": f"{name}/" + (f"?{query}" if query else "")})

    @app.get("/healthz", provide_automatic_options=False)
    async def healthz() -> Response:
        """Liveness: the process answers, the storage root is searchable (in 2 s), the producer is there to run."""
        threads = True
        try:
            readable = await call_storage(
                partial(storage_root_searchable, settings.storage_dir),
                timeout=root_timeout,
                limiter=health_lookers,
            )
        except StorageSilent:
            readable = False
        except ListingFailed:  # no thread could be started (worker_threads.NoThread): the storage not asked
            readable = threads = False
        checks = {"storage": readable, "producer": producer_available()}
        if not threads:
            checks["threads"] = False
        healthy = all(checks.values())
        body = {"status": "ok" if healthy else "failing", **checks}
        return Response(json.dumps(body) + "\n", status=200 if healthy else 503, mimetype="application/json")

    @app.get("/metrics", provide_automatic_options=False)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), content_type=metrics.content_type)

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
        return error_page(405, request.headers.get("Accept"), {"Allow": ", ".join(sorted(allowed))})

    @app.get("/favicon.ico", provide_automatic_options=False)
    async def favicon() -> Response:
        # Every browser asks; no icon is better than an "archive deleted" page, and costs no walk.
        # A bytes body: Quart's default empty iterable needs asyncio (a traceback, a dropped connection).
        response = Response(b"", status=204)
        del response.headers["Content-Type"]
        return response

    return app
