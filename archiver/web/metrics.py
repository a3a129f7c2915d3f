"""Prometheus metrics for downloads, in a registry of the app's own.

A registry per app (not prometheus-client's global one) keeps two apps in
one process, as in the tests, from counting into each other.  With several
Hypercorn workers each process counts for itself; see README, Deploying.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .limits import JobSlots, PlannedFiles

OUTCOMES = ("completed", "cancelled", "failed", "stalled")
REJECTIONS = (
    "job_limit",
    "fair_share",
    "range_limit",
    "walk_limit",
    "plan_limit",
    "producer_unavailable",
    "listing_failed",
)

# From a small album over a fast link to GBs over a slow one.
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)


class DownloadMetrics:
    """The counters one app keeps; ``render`` gives the text exposition format."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, slots: JobSlots | None = None, planned: PlannedFiles | None = None) -> None:
        self.registry = CollectorRegistry()
        if slots is not None:
            # Read at each scrape from the job slots themselves: nothing to keep in step.
            active = Gauge("archiver_active_clients", "Clients holding at least one job slot.", registry=self.registry)
            active.set_function(lambda: slots.active_clients)
            largest = Gauge(
                "archiver_largest_client_share", "The most job slots one client holds.", registry=self.registry
            )
            largest.set_function(slots.largest_share)
        if planned is not None:
            files = Gauge(
                "archiver_planned_files",
                "Files in the plans the downloads in flight hold, each plan counted once (ARCHIVER_MAX_PLANNED_FILES).",
                registry=self.registry,
            )
            files.set_function(lambda: planned.held)
        self.started = Counter(
            "archiver_downloads_started", "Downloads whose producer started.", registry=self.registry
        )
        self.finished = Counter(
            "archiver_downloads_finished",
            "Downloads that ended, by outcome (completed, cancelled by the client or shutdown, failed, "
            "stalled: the client took less than 256 KiB in the stall timeout).",
            ["outcome"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "archiver_downloads_rejected",
            "Downloads refused before any byte (503; 500 for an album that cannot be listed), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "archiver_bytes_sent", "Archive bytes handed to the server for sending.", registry=self.registry
        )
        self.archive_files = Counter(
            "archiver_archive_files",
            "Files in the archives started (a range counts its whole archive's).",
            registry=self.registry,
        )
        self.archive_file_bytes = Counter(
            "archiver_archive_file_bytes", "The size of those files.", registry=self.registry
        )
        self.in_flight = Gauge("archiver_downloads_in_flight", "Downloads in progress.", registry=self.registry)
        self.duration = Histogram(
            "archiver_download_duration_seconds",
            "Time from the producer's start to the download's end.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        # Every label value from the start, so that a scrape shows zeros, not gaps.
        for outcome in OUTCOMES:
            self.finished.labels(outcome)
        for reason in REJECTIONS:
            self.rejected.labels(reason)

    def download_started(self, archive_files: int, archive_file_bytes: int) -> None:
        self.started.inc()
        self.in_flight.inc()
        self.archive_files.inc(archive_files)
        self.archive_file_bytes.inc(archive_file_bytes)

    def download_finished(self, outcome: str, seconds: float) -> None:
        self.finished.labels(outcome).inc()
        self.duration.observe(seconds)
        self.in_flight.dec()

    def render(self) -> bytes:
        return generate_latest(self.registry)
