"""What each path answers: the index page, an album's archive, ``/healthz``, ``/metrics``, the favicon.

``Routes`` holds what the routes share for the life of the app (job slots,
limiters, the CRC index, the plan cache, the metrics); ``app.create_app``
makes one and routes each path to its method.
"""

from __future__ import annotations

import json
import logging
import time
from functools import partial

import trio
from quart import Response, abort, request

from ..archive.crc_index import CrcIndex
from ..archive.ctime_trust import CtimeTrust
from ..archive.listing import AlbumNotFound, ListingFailed, SkippedLog, WalkProgress
from ..archive.plan_cache import CACHED_ENTRIES, PlanCache
from ..archive.producer import producer_available
from ..archive.root_filesystem import RootFilesystem
from ..archive.storage import ALBUM_NAME, resolve_album
from ..config import Settings
from ..logs import Quieted, cut_for_log
from .answers import answer_headers, client_address, client_protocols, header_field, no_body, utf8_filename
from .clients import TrustedProxies, counted_client
from .connection import limit_refusal, listing_refusal
from .crc_index_file import open_crc_store
from .disposition import DisplayNameRefused, display_name
from .download import ArchiveBody, chunk_size_for
from .limits import (
    WALKERS,
    FairShareExceeded,
    JobLimitReached,
    JobSlots,
    PlannedFiles,
    RangeLimitReached,
    WalkLimitReached,
)
from .metrics import DownloadMetrics
from .pages import error_page, page
from .preparation import PreparedArchive, RecentWalks, prepare_archive
from .ranges import surely_a_range
from .signing import LinkExpired, LinkRefused, check_link
from .storage_calls import RESOLVERS, StorageSilent, call_storage
from .storage_root import root_timeout, storage_root_searchable
from .walk_turns import ClientWalks

logger = logging.getLogger(__name__)

EXAMPLE_NAME = "3bea29ccabbbf64bdebcc055319c5745"

# A link or a file name refused costs its client a request, and the service no walk and no thread: a
# line each let one client write the log at its own rate (helper 175: ~900 lines a second).  At most
# one a second of each kind, saying how many it stands for; each refusal has its access line.  An
# expired link, what a user with an old one meets, apart from the rest, which a flood is made of.
_refusal_lines = {kind: Quieted(logger, logging.INFO, interval=1.0) for kind in ("expired", "link", "filename")}

INDEX_TITLE = "Архивы фотографий"
INDEX_BODY = (
    "<p>Здесь папку с фотографиями можно скачать одним ZIP-архивом: он собирается, пока скачивается.</p>\n"
    "<p>Откройте ссылку вида <code>/archive/&lt;имя&gt;/</code>, которую вам дали.{example}</p>"
)
EXAMPLE_LINK = f' Например: <a href="/archive/{EXAMPLE_NAME}/">/archive/{EXAMPLE_NAME}/</a>.'


class Routes:
    """The app's routes and what they share; each method answers one path (``request`` is Quart's)."""

    def __init__(self, settings: Settings, root_answered: bool = True) -> None:
        """``root_answered``: whether the storage root answered the start's look (its mount learnt now, or later)."""
        self.settings = settings
        self.root_filesystem = RootFilesystem(settings.storage_dir, root_answered)
        self.slots = JobSlots(settings.max_jobs, settings.max_jobs_per_client)
        self.planned = PlannedFiles(settings.planned_files_budget)
        self.proxies = TrustedProxies(settings.trusted_proxies)
        self.walkers = trio.CapacityLimiter(WALKERS)
        self.resolvers = trio.CapacityLimiter(RESOLVERS)
        # One look at the storage at a time for /healthz, and one for the index page: on dead storage, a thread
        # stuck each.  Apart: the sample album, if it is the mount that died, must not make the root look dead.
        self.health_lookers = trio.CapacityLimiter(1)
        self.index_lookers = trio.CapacityLimiter(1)
        self.root_timeout = root_timeout(settings.storage_timeout)
        # As many walks may wait as the client could hold job slots: 64 downloads at once from one address.
        self.client_walks = ClientWalks(settings.max_jobs)
        self.crc_index = CrcIndex(open_crc_store(settings), trust=CtimeTrust(settings.trusted_fuse))
        self.plans = PlanCache(max(CACHED_ENTRIES, settings.max_files))  # the largest album's plan is shared too
        self.skips = SkippedLog()
        self.recent_walks = RecentWalks()
        self.metrics = DownloadMetrics(self.slots, self.planned, self.recent_walks, self.client_walks)

    async def index(self) -> Response:
        """``/``: what the service is, and the sample album's link where there is one."""
        # The sample album's link only where the sample album is (make run on data/).
        # Not with signed links on: the bare link would only get a 403.
        sample = self.settings.storage_dir / EXAMPLE_NAME
        try:
            sample_there = not self.settings.link_secret and await call_storage(
                sample.is_dir, timeout=self.root_timeout, limiter=self.index_lookers
            )
        except (ListingFailed, OSError):  # silent storage, no thread; or the root unsearchable since (helper 58)
            sample_there = False
        example = EXAMPLE_LINK if sample_there else ""
        return Response(page(INDEX_TITLE, INDEX_BODY.format(example=example)), mimetype="text/html")

    def _refusal_line(self, kind: str, name: str, refusal: Exception) -> None:
        """The line of a link or a file name refused, naming its client (worked out only for a line written)."""
        line = _refusal_lines[kind]
        client = "" if line.quiet() else client_address(self.proxies)
        line.log("refused %s for %s: %s", cut_for_log(name), client, refusal)

    async def archive(self, name: str) -> Response:
        """``/archive/<name>/``: the album's archive (or the range asked for), or why not."""
        try:
            filename, client, counted, prepared = await self._prepare(name)
        except (JobLimitReached, FairShareExceeded, RangeLimitReached, WalkLimitReached) as error:
            # Raised once the client's address was worked out (``_prepare``): the same again.
            return limit_refusal(error, name, client_address(self.proxies), self.metrics, request.headers.get("Accept"))
        except AlbumNotFound:
            logger.debug("no album for %r", cut_for_log(name))
            abort(404)
        except ListingFailed as error:
            # Never an archive of part of the album: it would end cleanly and look complete.
            return listing_refusal(error, name, self.metrics, request.headers.get("Accept"))
        except DisplayNameRefused as refusal:
            # Refused before the name is checked: it may be 16 KiB long (helper 84: 10 MB of log a second).
            self._refusal_line("filename", name, refusal)
            return error_page(400, request.headers.get("Accept"))
        except LinkRefused as refusal:
            self._refusal_line("expired" if isinstance(refusal, LinkExpired) else "link", name, refusal)
            return error_page(403, request.headers.get("Accept"))
        answer = answer_headers(prepared, filename)
        if isinstance(answer, Response):
            return answer  # 304, 412, 416
        headers, byte_range = answer
        if request.method == "HEAD":
            # Headers only: no producer.  An empty async body keeps Quart from
            # announcing a Content-Length of 0 that GET would not honour.
            return Response(no_body(), mimetype="application/zip", headers=headers)
        settings = self.settings
        body = ArchiveBody(
            name,
            prepared.plan,
            slots=self.slots,
            planned=self.planned,
            metrics=self.metrics,
            crc_index=self.crc_index,
            chunk_size=chunk_size_for(request.scope.get("http_version", "1.1"), settings.chunk_size),
            channel_capacity=settings.channel_capacity,
            delay=settings.delay,
            rate_limit=settings.rate_limit,
            byte_range=byte_range,
            client=client,
            counted_as=counted,
            stall_timeout=settings.stall_timeout,
            storage_timeout=settings.storage_timeout,
            left_out=prepared.left_out,
        )
        status = 206 if byte_range is not None else 200
        # No timeout of Quart's: RESPONSE_TIMEOUT is None for every response (``create_app``).
        return Response(body, status=status, mimetype="application/zip", headers=headers)

    async def _prepare(self, name: str) -> tuple[str, str, str, PreparedArchive]:
        """The download's file name, its client's address, who the limits count it as, and its album walked and planned.

        Raises what the route answers: AlbumNotFound, ListingFailed,
        DisplayNameRefused, LinkRefused, and the limits' refusals.
        """
        settings = self.settings
        arrived = self.recent_walks.ticket()  # a walk begun since may serve it
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
            partial(resolve_album, settings.storage_dir, name, self.root_filesystem),
            timeout=settings.storage_timeout,
            limiter=self.resolvers,
        )
        client = client_address(self.proxies)  # after the link and the album: X-Forwarded-For may be long
        counted = counted_client(client, settings.client_ipv6_prefix)  # by the limits: an IPv6 client's /64
        # Limits before work: a download that would be refused is refused before its walk.  Not
        # a conditional request, which may need no job (304, 412): its body takes the slot, or
        # is refused, as any download's does (ArchiveBody).  And not as a range, unless the
        # request can only be one: a stale If-Range or several ranges get the whole archive.
        conditional = "If-Match" in request.headers or "If-None-Match" in request.headers
        if request.method == "GET" and not conditional:
            ranged = surely_a_range(header_field(request.headers, "Range"), header_field(request.headers, "If-Range"))
            self.slots.check(counted, ranged=ranged)
        # A deflated archive has no length: its end is the chunked body's end, which
        # HTTP/1.0 lacks, so a failed one would end as the connection closes, looking
        # complete.  An HTTP/1.0 client gets the stored archive, whose length it checks.
        compression = 0 if "HTTP/1.0" in client_protocols(self.proxies) else settings.compression
        # A large album takes a while to walk (minutes on cold NFS): silence, not length, ends it,
        # and the wait for this client's turn and for a walker thread counts unless the queue moves.
        progress = WalkProgress()
        prepared = await call_storage(
            partial(
                prepare_archive,
                album,
                settings,
                self.plans,
                self.skips,
                compression,
                progress,
                self.crc_index.trust,
                self.recent_walks,
                arrived,
            ),
            timeout=settings.storage_timeout,
            limiter=self.walkers,
            progress=progress,
            admission=partial(self.client_walks.turn, counted, progress),
            queue_moved=partial(self.client_walks.queue_moved, counted, progress),
        )
        return filename, client, counted, prepared

    async def archive_without_slash(self, name: str) -> Response:
        """``/archive/<name>``: a redirect to the album's path with its slash."""
        # Werkzeug's own slash redirect builds an absolute URL from the scheme
        # and Host it sees: behind a TLS proxy that is http:// with the port
        # lost.  A relative reference resolves against whatever URL the client
        # used, through any proxy ("/archive/x" + "x/" = "/archive/x/").
        if b"%" in request.scope.get("raw_path", b"") or not ALBUM_NAME.fullmatch(name):
            abort(404)
        # The query goes along: a signed link's expires and sig.
        query = request.scope.get("query_string", b"").decode("latin-1")
        return Response("", status=308, headers={"Location": f"{name}/" + (f"?{query}" if query else "")})

    async def healthz(self) -> Response:
        """``/healthz``: the process answers, the storage root is searchable (in 2 s), the producer can run."""
        threads = True
        try:
            readable = await call_storage(
                partial(storage_root_searchable, self.settings.storage_dir, self.root_filesystem),
                timeout=self.root_timeout,
                limiter=self.health_lookers,
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

    async def prometheus_metrics(self) -> Response:
        """``/metrics``: the downloads' counters and gauges in Prometheus' text format."""
        return Response(self.metrics.render(), content_type=self.metrics.content_type)

    async def favicon(self) -> Response:
        """``/favicon.ico``: no icon (204)."""
        # Every browser asks; no icon is better than an "archive deleted" page, and costs no walk.
        # An empty async body: Quart's default empty iterable needs asyncio (a traceback, a dropped
        # connection), and a bytes one announced "Content-Length: 0", which a 204 must not (RFC 9110
        # 8.6; helper 140).
        response = Response(no_body(), status=204)
        del response.headers["Content-Type"]
        return response
