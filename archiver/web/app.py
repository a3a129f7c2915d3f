"""The HTTP surface: routes, status codes and headers; the work happens elsewhere."""

from __future__ import annotations

import errno
import json
import logging
import os
import sqlite3
import stat
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import trio
from quart import Response, abort, request
from quart_trio import QuartTrio
from werkzeug.datastructures import Headers
from werkzeug.exceptions import HTTPException

from ..archive import launcher
from ..archive.crc_index import CrcIndex
from ..archive.crc_store import CrcStore
from ..archive.ctime_trust import CtimeTrust
from ..archive.entries import EntryPolicy
from ..archive.plan import ArchivePlan
from ..archive.plan_cache import CACHED_ENTRIES, PlanCache
from ..archive.producer import lingering as lingering_producers
from ..archive.producer import producer_available
from ..archive.storage import (
    ALBUM_NAME,
    AlbumNotFound,
    ListingFailed,
    SkippedLog,
    WalkProgress,
    check_settled,
    list_album,
    resolve_album,
)
from ..archive.worker_threads import NoThread, in_thread
from ..config import Settings, SettingsError
from ..fences import hypercorn_access, hypercorn_h2, hypercorn_h11, hypercorn_tcp
from ..fences.quart_trio import connection_class
from ..logs import cut_for_log
from .connection import limit_refusal, listing_refusal, send_archive_response
from .disposition import DisplayNameRefused, content_disposition, display_name
from .download import ArchiveBody
from .limits import (
    STALL_UNIT,
    WALKERS,
    ClientWalks,
    FairShareExceeded,
    JobLimitReached,
    JobSlots,
    PlannedFiles,
    RangeLimitReached,
    TrustedProxies,
    WalkLimitReached,
    connection_limit,
)
from .metrics import DownloadMetrics
from .pages import PAGE_NOT_FOUND, error_page, page, unparsed_request_answer
from .ranges import (
    FORMAT_VERSION,
    ByteRange,
    NotModified,
    PreconditionFailed,
    RangeNotSatisfiable,
    archive_etag,
    archive_validator,
    check_preconditions,
    requested_range,
    surely_a_range,
)
from .signing import LinkRefused, check_link
from .storage_calls import RESOLVERS, StorageSilent, call_storage
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


@dataclass(frozen=True)
class PreparedArchive:
    """What a download needs from its album: the archive's plan, and its ETag (``archive_validator``)."""

    plan: ArchivePlan
    etag: str | None
    left_out: int  # entries the walk passed over (links, unreadable files...: logged once a version)


def prepare_archive(
    album: Path,
    settings: Settings,
    plans: PlanCache,
    skips: SkippedLog,
    compression: int,
    progress: WalkProgress,
    trust: CtimeTrust,
) -> PreparedArchive:
    """Walk ``album``, plan its archive at deflate level ``compression`` (0: stored); in a worker thread.

    20,000 files take ~0.2 s.  ``progress`` moves on with the walk.  What the
    walk left out is logged once a version of the album (``skips``).
    """
    listing = list_album(album, progress, trust.learn, settings.max_files)
    check_settled(listing, round(settings.settle_time * 1e9))
    # Stored archives have a length known before the first byte: browsers show
    # progress and time left, and ranges resume them.  Deflated ones go chunked.
    policy = EntryPolicy(settings.timezone, settings.keep_modes, settings.name_encoding)
    # Everything the bytes depend on beside the files: the format, the compression, the naming, zone and modes.
    # And the Unicode version the names are normalised, folded and cut by: a Python upgrade may name
    # entries otherwise, and a resume across it must not join two archives (helper 71).
    variant = f"{FORMAT_VERSION};unicode={unicodedata.unidata_version};level={compression};{policy.describe()}"
    etag = archive_etag(listing, variant)
    skips.log(listing, etag)
    plan = plans.get(listing, etag, lambda: ArchivePlan(listing.directory, listing.files, compression, policy))
    return PreparedArchive(plan, archive_validator(listing, etag, plan.length, trust), len(listing.skipped))


SERVICE_BUSY_TIMEOUT = 1.0


def open_crc_store(settings: Settings, *, required: bool = False) -> CrcStore | None:
    """The CRC index's file (ARCHIVER_INDEX), or None to keep it in memory.

    One that cannot be used is, for the service, an ERROR line and the index
    in memory: it is only a cache, and a damaged or locked file must not keep
    the service from starting (under systemd's ``Restart=always``, a loop).
    ``required`` (``archiver index``, whose only work it is): SettingsError.
    """
    if not settings.index_path:
        return None
    try:
        # The service's writes wait 1 s at most on another process's lock (the CRCs are only lost
        # for the next start); ``archiver index``'s, SQLite's usual 5 s.
        return CrcStore(Path(settings.index_path), busy_timeout=5.0 if required else SERVICE_BUSY_TIMEOUT)
    except (sqlite3.Error, OSError) as error:
        if required:
            raise SettingsError(f"index {settings.index_path!r}: {error}") from None
        logger.error(
            "CRC index %r cannot be used (%s): CRCs are kept in memory only, until a restart. If it is damaged, "
            "or was deleted while another instance used it, stop the instances using it, delete %s* and start again",
            settings.index_path,
            error,
            settings.index_path,
        )
        return None


# What a look at the storage root may say that no later moment will change: the start stops.
# Anything else (ENOTCONN of a FUSE mount whose daemon died, an NFS server's ESTALE or EIO) is
# storage that may come back: the service starts, and /healthz says "storage": false (helper 55).
_ROOT_REFUSED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ELOOP, errno.ENAMETOOLONG})


def _check_storage_root(root: Path, timeout: float) -> None:
    """SettingsError if ``root`` is not a folder the service may search, is / (by a link or a bind
    mount), or no thread can be started to look; if it does not answer within ``timeout`` s, or
    answers an error the storage may recover from, an ERROR only.

    A mount that does not answer (a dead NFS server at boot) is no reason not
    to start: ``/healthz`` says ``storage: false`` until it answers.  The
    look runs in a daemon thread, left stuck if it is.
    """
    answer: list[tuple[os.stat_result, bool] | OSError] = []  # (what it is, searchable), or the error

    def look() -> None:
        try:
            found = os.stat(root)  # os.path.isdir would say False for ENOTCONN
            answer.append((found, os.access(root, os.X_OK)))
        except OSError as error:  # an error is an answer too: not "did not answer" (helper 54)
            answer.append(error)

    looker = threading.Thread(target=look, name="archiver storage root", daemon=True)
    try:
        looker.start()
    except RuntimeError as error:  # at the tasks' limit (TasksMax, ulimit -u): nothing else would start either
        raise SettingsError(
            f"cannot look at the storage directory {str(root)!r}: no thread could be started ({error})"
        ) from None
    looker.join(timeout)
    if not answer:
        logger.error("storage directory %r did not answer in %.0f s: starting anyway", str(root), timeout)
        return
    if isinstance(answer[0], OSError):
        failure = answer[0]
        if failure.errno not in _ROOT_REFUSED:
            logger.error("storage directory %r: %s: starting anyway", str(root), failure.strerror)
            return
        if failure.errno in (errno.ENOENT, errno.ENOTDIR):
            raise SettingsError(f"storage directory {str(root)!r} does not exist or is not a directory")
        raise SettingsError(f"storage directory {str(root)!r}: {failure.strerror}")
    found, searchable = answer[0]
    if not stat.S_ISDIR(found.st_mode):
        raise SettingsError(f"storage directory {str(root)!r} does not exist or is not a directory")
    # Its own mode 000 (or 0600): every download was a 500, and the start said nothing (helper 56).
    if not searchable:
        raise SettingsError(f"storage directory {str(root)!r}: the service's user may not search it")
    # / by any way there, a link or a bind mount: the same folder, so its device and inode (helpers
    # 52-54).  Another system's root mounted in (a container's -v /:/host) is a folder like any: the
    # root an operator names is trusted to be the storage.
    system_root = os.stat("/")
    if (found.st_dev, found.st_ino) == (system_root.st_dev, system_root.st_ino):
        raise SettingsError(f"storage directory {str(root)!r} is / (each folder in it would be served as an album)")


def _storage_root_searchable(root: Path) -> bool:
    """Whether albums can be reached under ``root``: a folder the service may search (x), not /.

    Not read (r): a root of mode 0711 hides the albums' names and serves them
    all (README, Deploying); /healthz asked for both, and said "storage": false
    for ever on such a root (helper 52).  Not /: a link swapped for one to it
    since the start makes every download a 500 (``resolve_album``).
    """
    return os.access(root, os.X_OK) and root.is_dir() and os.path.realpath(root) != "/"


def create_app(settings: Settings) -> QuartTrio:
    """Build the Quart-Trio app; fails fast if the storage root is missing (not if it does not answer)."""
    _check_storage_root(settings.storage_dir, min(settings.storage_timeout, HEALTH_STORAGE_TIMEOUT))
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
        # Rows a download's end left for the next (another was writing): given up on after SERVICE_BUSY_TIMEOUT.
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
            if requested_filename is not None and not _utf8_filename(request.scope.get("query_string", b"")):
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
            client = _client_address(proxies)
            # Limits before work: a download that would be refused is refused before its walk.  Not
            # a conditional request, which may need no job (304, 412): its body takes the slot, or
            # is refused, as any download's does (ArchiveBody).  And not as a range, unless the
            # request can only be one: a stale If-Range or several ranges get the whole archive.
            conditional = "If-Match" in request.headers or "If-None-Match" in request.headers
            if request.method == "GET" and not conditional:
                ranged = surely_a_range(_field(request.headers, "Range"), _field(request.headers, "If-Range"))
                slots.check(client, ranged=ranged)
            # A deflated archive has no length: its end is the chunked body's end, which
            # HTTP/1.0 lacks, so a failed one would end as the connection closes, looking
            # complete.  An HTTP/1.0 client gets the stored archive, whose length it checks.
            compression = 0 if "HTTP/1.0" in _protocols(proxies) else settings.compression
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
        answer = _answer_headers(prepared, filename)
        if isinstance(answer, Response):
            return answer  # 304, 412, 416
        headers, byte_range = answer
        if request.method == "HEAD":
            # Headers only: no producer.  An empty async body keeps Quart from
            # announcing a Content-Length of 0 that GET would not honour.
            return Response(_no_body(), mimetype="application/zip", headers=headers)
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
                partial(_storage_root_searchable, settings.storage_dir),
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


def _answer_headers(prepared: PreparedArchive, filename: str) -> tuple[dict[str, str], ByteRange | None] | Response:
    """A download's headers and the range it asks for (None: the whole archive); or its answer, if no body is due.

    That answer is a ``304`` or ``412`` (If-None-Match, If-Match) or a ``416``
    (a range past the archive's end).  RFC 9110 13 and 14.
    """
    headers = {
        "Content-Disposition": content_disposition(filename),
        # Never a shared cache's copy: it would outlive a signed link's expiry, and serve a
        # request without a signature where a cache keys without the query (helper 68).
        "Cache-Control": "private",
        # nginx in front: pass bytes on as they come, never spool the archive.
        "X-Accel-Buffering": "no",
    }
    length, etag = prepared.plan.length, prepared.etag
    byte_range: ByteRange | None = None
    if length is not None:
        headers |= {"Content-Length": str(length), "Accept-Ranges": "bytes"}
    if etag is not None:
        headers["ETag"] = etag
    try:
        check_preconditions(_field(request.headers, "If-Match"), _field(request.headers, "If-None-Match"), etag)
    except PreconditionFailed:
        return error_page(412, request.headers.get("Accept"))
    except NotModified:
        # The headers a 200 would carry, and no body.  Not its Content-Length, which RFC 9110 8.6
        # allows: HTTP/2 clients (h2, so httpx) take it as a promise of a body and fail the response.
        headers.pop("Content-Length", None)
        return Response(_no_body(), status=304, mimetype="application/zip", headers=headers)
    if length is not None:
        try:
            if request.method == "GET":
                # Several Range lines are one list (RFC 9110 5.3), and so several ranges: the whole archive.
                # Several If-Range lines name no one archive: never equal to the ETag, so no range.
                byte_range = requested_range(
                    _field(request.headers, "Range"), _field(request.headers, "If-Range"), etag, length
                )
        except RangeNotSatisfiable:
            return error_page(416, request.headers.get("Accept"), {"Content-Range": f"bytes */{length}"})
        if byte_range is not None:
            headers["Content-Range"] = f"bytes {byte_range.start}-{byte_range.end}/{length}"
            headers["Content-Length"] = str(byte_range.length)
    return headers, byte_range


def _client_address(proxies: TrustedProxies) -> str:
    """The request's client: its peer's address, or the one a trusted proxy forwards for."""
    peer = request.scope.get("client")
    forwarded_for = ",".join(request.headers.getlist("X-Forwarded-For"))
    return proxies.client_address(peer[0] if peer else None, forwarded_for)


def _field(headers: Headers, name: str) -> str | None:
    """Header ``name``'s value, its lines joined with ", " as RFC 9110 5.3 combines them; None if absent."""
    lines = headers.getlist(name)
    return ", ".join(lines) if lines else None


def _utf8_filename(query: bytes) -> bool:
    """Whether every ``filename`` value in the raw query string is UTF-8 once its %-escapes are decoded."""
    for field in query.split(b"&"):
        name, _, value = field.partition(b"=")
        if urllib.parse.unquote_to_bytes(name) == b"filename":
            try:
                urllib.parse.unquote_to_bytes(value.replace(b"+", b" ")).decode("utf-8")
            except UnicodeDecodeError:
                return False
    return True


def _protocols(proxies: TrustedProxies) -> set[str]:
    """The HTTP versions on the way from the client ("HTTP/1.0"): this request's, and what a trusted proxy says.

    nginx talks HTTP/1.1 to the service whatever its client speaks, and
    passes that on as X-Client-Protocol (deploy/nginx.conf: $server_protocol).
    Both count: a proxy talking HTTP/1.0 to the service cannot pass a
    chunked end on either, whatever its client speaks.
    """
    protocols = {"HTTP/" + request.scope.get("http_version", "1.1")}
    peer = request.scope.get("client")
    stated = request.headers.get("X-Client-Protocol")
    if stated is not None and peer and proxies.trusts(peer[0]):
        protocols.add(stated.strip().upper())
    return protocols


def chunk_size_for(http_version: str, chunk_size: int) -> int:
    """The chunk size for a download over ``http_version``: HTTP/2 reads at most one send batch a chunk.

    An HTTP/2 stream at a closed flow-control window holds its chunks in the
    server (``hypercorn_h2``): at most a batch (512 KiB, the default chunk) a
    chunk keeps that to a batch and a chunk.  An HTTP/1.1 download's chunks
    wait in the socket's send path and may be larger (ARCHIVER_CHUNK_SIZE).
    """
    return min(chunk_size, hypercorn_h2.SEND_BATCH) if http_version.startswith("2") else chunk_size


async def _no_body() -> AsyncIterator[bytes]:
    return
    yield
