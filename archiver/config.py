"""Settings: one frozen object, built from CLI flags or from the environment.

This is the only module that reads ``os.environ``; everything else is handed a
:class:`Settings`.  Environment variables carry the ``ARCHIVER_`` prefix and
the same names as the fields (``ARCHIVER_DELAY``, ``ARCHIVER_MAX_JOBS``, ...), but
``ARCHIVER_DIR`` and ``ARCHIVER_INDEX`` (``storage_dir``, ``index_path``), named as their flags.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import zoneinfo
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "ARCHIVER_"

logger = logging.getLogger(__name__)


# The most one download may buffer: 16 chunks of 16 MiB.  The defaults are 512 KiB and 1.
MAX_CHUNK_SIZE = 16 * 1024 * 1024
MAX_CHANNEL_CAPACITY = 16
# A pause between chunks (to try slow links) of more would stop a download for good.
MAX_DELAY = 60.0
# The files in the plans of the downloads in flight, by default (~450 bytes each: ~450 MB).
PLANNED_FILES = 1_000_000
# Less, and a request would be given up on before any storage could answer.
MIN_STORAGE_TIMEOUT = 0.1
# Less, and no client could take a chunk in time: 1e-300 passed, and every answer, /healthz's
# too, was cut as stalled (helper 46).
MIN_STALL_TIMEOUT = 1.0
# More, and an album uploaded to every few minutes would hardly ever be served.
MAX_SETTLE_TIME = 60.0
MIN_SETTLE_TIME = 0.001
# A link secret's least length in bytes: anyone holding one signed link can try secrets offline
# against its signature, and a short one falls (helper 68 ran the service on "a").
MIN_LINK_SECRET_BYTES = 16


class SettingsError(ValueError):
    """A setting has a value the service cannot run with."""


@dataclass(frozen=True)
class Settings:
    """Everything the service can be told; defaults fit the sample data."""

    storage_dir: Path = Path("data")
    host: str = "0.0.0.0"
    port: int = 8080
    # Seconds slept after each chunk is handed to the server: a way to test slow links.
    delay: float = 0.0
    verbose: bool = False
    # Deflate level 1 .. 9, or 0 to store (the default: the payload is mostly JPEG).
    compression: int = 0
    # Bytes asked of the producer's stdout per read (HTTP/2: at most 512 KiB, see
    # ``download.chunk_size_for``), and chunks buffered between reader and writer.  Memory per
    # download is about chunk_size * (channel_capacity + 1) (+1 being sent; the few bytes of
    # the archive's tail held until the central directory's first byte proves every file sent
    # checked, and the files changed lately were looked at again: ``tail_hold.TailHold``):
    # 1 MiB over HTTP/1.1, plus up to 1 MiB of kernel memory in the producer's widened pipe.
    # Measured (2026-11-30, one download of 2 GB, HTTP/1.1): 512 KiB chunks 1.5-1.8
    # GB/s and 0.51-0.62 CPU-s/GB in the service, against 1.25-1.33 GB/s and
    # 0.71-0.76 for 256 KiB; a channel of two chunks no faster than one (noise);
    # 1 MiB chunks slower (8 downloads at once: 1.29-1.61 against 1.56-1.69 GB/s).
    # HTTP/2 gains as much (``hypercorn_h2``, batches).
    chunk_size: int = 512 * 1024
    channel_capacity: int = 1
    # Archive jobs (producer processes) at once; one more is refused with 503,
    # not queued, unless a slot is reclaimed for a client under its share
    # (web.limits.JobSlots).  A stored archive is bound by I/O rather than CPU,
    # and a job costs well under a megabyte, so the default is not tied to the
    # core count.
    max_jobs: int = 64
    # Bytes per second per download, 0 for no limit (beside `delay`).
    rate_limit: int = 0
    # Seconds in-flight downloads get to finish after SIGTERM/SIGINT (CLI launch;
    # hypercorn.toml's graceful_timeout for the hypercorn launch).
    shutdown_grace: float = 10.0
    # Limits on one client (README, Limits and abuse).  A download is aborted
    # when a write to its client takes longer than this for each 256 KiB it holds
    # (web.limits.STALL_UNIT; 120 s for a 512 KiB chunk): a client slower than
    # ~4 kB/s for a whole minute, or one that stopped reading.  A 50 kB/s link
    # takes 5 s per 256 KiB.
    stall_timeout: float = 60.0
    # Seconds a download may wait on the storage: the response waiting for its
    # next bytes while neither the producer writes any nor a cold file's CRC
    # reading advances (a hard-mounted NFS server gone, a hung FUSE mount).
    # The download then fails (503 before its headers, aborted after them).
    # Not the client's speed (the stall timeout), nor a long cold CRC, which advances.
    storage_timeout: float = 60.0
    # The least fair share of the job slots a client keeps once the service is
    # busy (limits.JobSlots): while more than a quarter of max_jobs is free,
    # a client may hold any number.
    max_jobs_per_client: int = 4
    # An IPv6 client is its network of this many bits for the limits (web.clients.counted_client):
    # a home is given a /64 and may use any of its addresses.  128: each address a client.
    client_ipv6_prefix: int = 64
    # Peers whose X-Forwarded-For names the client (addresses or networks):
    # the proxy in front, e.g. nginx on the same host.  Anyone else's is ignored.
    trusted_proxies: tuple[str, ...] = ("127.0.0.1", "::1")
    # Client connections held at once per process; 0: what the descriptor
    # limit (ulimit -n, systemd's LimitNOFILE) leaves beside max_jobs.
    max_connections: int = 0
    # Signed, expiring links (archiver.web.signing): set, /archive/<name>/ needs
    # ?expires=...&sig=...; empty, the name alone opens the archive.
    link_secret: str = field(default="", repr=False)
    # The CRC index's SQLite file (archiver.archive.crc_store); empty: in memory
    # only, computed again after every start.
    index_path: str = ""
    # FUSE filesystem types (as /proc/self/mountinfo names them: fuse.mergerfs) whose
    # ctime moves with every write.  Files on any other FUSE mount (sshfs, rclone) have
    # their CRCs read for every download, and their archives no ETag (ctime_trust.CtimeTrust).
    trusted_fuse: tuple[str, ...] = ()
    # What the person unpacks (README): the zone the entries' MS-DOS times are
    # written in (an IANA name; the extended timestamp beside them is UTC, and
    # the process's TZ plays no part), modes kept as on disk instead of 0644,
    # and how names that are not UTF-8 on disk are read (FTP uploads from Windows); with cp1251, whether
    # names that only CP866 makes words of are read as CP866 (names.decode_component), an operator's way
    # out where that guess misfires for the names they hold.
    timezone: str = "UTC"
    keep_modes: bool = False
    name_encoding: str = "cp1251"
    oem_names: bool = True
    # The most entries (files, folders, and what is left out) an album may hold: its listing and
    # plan are held in memory (~650 bytes a file while a request is prepared), and the plan
    # cache keeps at least one plan this large, so that the downloads of an album share it.
    max_files: int = 120_000
    # The most files in the plans that the downloads in flight hold, each plan counted once (the
    # downloads of one album share it).  Without it, 64 job slots on 64 albums of max_files files
    # each held ~3.5 GB.  At least max_files (limits.PlannedFiles).
    max_planned_files: int = 0  # 0: PLANNED_FILES, or max_files if more (planned_files_budget)
    # Seconds a file must have been left unchanged (its ctime) before its album is served: until
    # then 503 "Архив обновляется", an upload under way (listing.check_settled).  0: off.
    settle_time: float = 2.0

    def __post_init__(self) -> None:
        # Every folder of the system an album, /etc among them (helper 52).  "//" is a path of its own
        # to abspath (POSIX), and / to Linux (helper 53).  No look at the storage here (a dead mount
        # must not hold the start): a link to / is seen by the start's look (web.storage_root).
        if not os.path.abspath(self.storage_dir).strip("/"):
            raise SettingsError(
                f"storage directory {str(self.storage_dir)!r} is / (each folder in it would be served as an album)"
            )
        # Each check names the setting as the operator gives it (helper 74: "max_jobs" for ARCHIVER_MAX_JOBS;
        # helper 103: "timezone" for ARCHIVER_TIMEZONE).
        # NaN fails every bound: it would never fire as a timeout, nor end a delay.
        self._bound("compression", 0, 9)
        self._bound("delay", 0, MAX_DELAY, "seconds")  # more, and a download would stop for good (helper 36)
        self._bound("port", 0, 65535)
        self._bound("max_jobs", 1)
        self._bound("rate_limit", 0, unit="bytes a second")
        self._bound("shutdown_grace", 0, unit="seconds")  # inf: wait for every download
        # Each download holds up to (channel_capacity + 1) chunks: bounded, so that no setting holds an archive whole.
        self._bound("chunk_size", 1, MAX_CHUNK_SIZE, "bytes")
        self._bound("channel_capacity", 0, MAX_CHANNEL_CAPACITY)
        self._bound("storage_timeout", MIN_STORAGE_TIMEOUT, unit="seconds")  # 1e-300: every request a 503
        self._bound("max_files", 1)
        self._bound("max_planned_files", 0)
        if 0 < self.max_planned_files < self.max_files:  # one album of max_files must fit (helper 57)
            raise SettingsError(
                f"ARCHIVER_MAX_PLANNED_FILES ({self.max_planned_files}) must be at least ARCHIVER_MAX_FILES "
                f"({self.max_files})"
            )
        # NaN too; and a time that rounds to 0 ns turned the rule off unsaid (helper 73: 1e-10).
        if self.settle_time != 0:
            self._bound("settle_time", MIN_SETTLE_TIME, MAX_SETTLE_TIME, "seconds (or 0: off)")
        self._bound("stall_timeout", MIN_STALL_TIMEOUT, unit="seconds")
        self._bound("max_jobs_per_client", 1)
        self._bound("client_ipv6_prefix", 1, 128, "bits")
        self._bound("max_connections", 0)
        try:
            zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise SettingsError(
                f"{setting_name('timezone')}: {self.timezone!r} is not a time zone (e.g. UTC, Europe/Moscow)"
            ) from None
        ascii_bytes = bytes(range(128))
        try:
            # A text encoding (codecs.lookup would also take rot13 or hex) that reads ASCII as ASCII: in
            # EBCDIC (cp037) or UTF-7 a name's bytes could read as "../" (found by helper 35); and that
            # can put U+FFFD for what it cannot read (idna cannot: every such album a 500; helper 36).
            usable = ascii_bytes.decode(self.name_encoding) == ascii_bytes.decode("ascii")
            bytes(range(128, 256)).decode(self.name_encoding, errors="replace")
        except LookupError:
            raise SettingsError(
                f"{setting_name('name_encoding')}: {self.name_encoding!r} is not an encoding (e.g. cp1251)"
            ) from None
        except UnicodeError:  # punycode, undefined
            usable = False
        if not usable:
            raise SettingsError(
                f"{setting_name('name_encoding')}: {self.name_encoding!r} cannot read names "
                "(ASCII as ASCII, others or U+FFFD)"
            )
        if self.link_secret:
            self._check_link_secret()
        for fuse_type in self.trusted_fuse:
            # A type is one of mountinfo's space-separated fields: "fuse.a fuse.b" never matched (helper 149).
            if not fuse_type.isprintable() or any(character.isspace() for character in fuse_type):
                raise SettingsError(
                    f"{setting_name('trusted_fuse')}: {fuse_type!r} is not a filesystem type "
                    "(types are separated by commas: fuse.mergerfs,virtiofs)"
                )
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(
                    f"{setting_name('trusted_proxies')}: {proxy!r} is not an address or network"
                ) from None

    def _bound(self, field: str, low: float, high: float = math.inf, unit: str = "") -> None:
        """SettingsError, naming the setting as it is given, unless ``low <= value <= high`` (NaN is not)."""
        value = getattr(self, field)
        if not low <= value <= high:
            limits = f"at least {_plain(low)}" if high == math.inf else f"{_plain(low)}..{_plain(high)}"
            raise SettingsError(f"{setting_name(field)} must be {limits}{' ' + unit if unit else ''}, not {value}")

    def _check_link_secret(self) -> None:
        # Never the secret in the message: it goes to the journal.
        try:
            # os.environ keeps bytes that are not UTF-8 (an env file saved as cp1251) as surrogates:
            # every signed link was then a 500 (helper 68).
            secret = self.link_secret.encode()
        except UnicodeEncodeError:
            raise SettingsError(
                "ARCHIVER_LINK_SECRET is not UTF-8 text (a file saved in another encoding?): "
                "make one with `openssl rand -base64 32`"
            ) from None
        if len(secret.strip()) < MIN_LINK_SECRET_BYTES:
            raise SettingsError(
                f"ARCHIVER_LINK_SECRET has {len(secret.strip())} bytes besides spaces, fewer than "
                f"{MIN_LINK_SECRET_BYTES}: one signed link would give it away; make one with `openssl rand -base64 32`"
            )

    @property
    def planned_files_budget(self) -> int:
        """The most files in the plans of the downloads in flight (``limits.PlannedFiles``).

        Set, ``max_planned_files``; else PLANNED_FILES, or ``max_files`` if more: an operator who
        raises only ARCHIVER_MAX_FILES still starts (helper 58).
        """
        return self.max_planned_files or max(PLANNED_FILES, self.max_files)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``ARCHIVER_*`` variables; unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, parse in _ENV_PARSERS.items():
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                continue
            try:
                values[_FIELD_OF_ENV.get(name, name)] = parse(raw)
            except ValueError as error:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()}={raw!r}: {error}") from None
        return cls(**values)  # type: ignore[arg-type]


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """The ``ARCHIVER_*`` names in ``environ`` that no setting reads: a misspelt one is otherwise silent (helper 67)."""
    environ = os.environ if environ is None else environ
    known = {ENV_PREFIX + name.upper() for name in _ENV_PARSERS}
    return sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)


def warn_of_unknown_variables(not_read: Mapping[str, str] | None = None) -> None:
    """A WARNING line for each ``ARCHIVER_*`` variable no setting reads (``ARCHIVER_MAX_JOB`` for ``..._JOBS``).

    And for each set variable of ``not_read`` (variable -> what to use
    instead): settings this launch leaves to another (Hypercorn's ``--bind``),
    still parsed and checked by ``from_env``.
    """
    for name in unknown_variables():
        logger.warning("%s is not a setting of this service (misspelt?): ignored", name)
    for name, instead in (not_read or {}).items():
        if os.environ.get(name):
            logger.warning("%s has no effect in this launch (use %s)", name, instead)


# int() and float() also read "1_0" as 10, digits of other scripts ("\uff12" as 2) and spaces of
# other scripts: a typo or a paste is refused, not taken for a setting (helpers 73, 74), for the
# variables and the flags alike.  inf and nan stay words the range checks above judge
# (ARCHIVER_STORAGE_TIMEOUT=inf: never).
_INTEGER = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
_NUMBER = re.compile(
    r"\s*[+-]?(?:(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[+-]?[0-9]+)?|inf|infinity|nan)\s*", re.I | re.ASCII
)


def integer(raw: str) -> int:
    if not _INTEGER.fullmatch(raw):
        raise ValueError("not a whole number in ASCII digits")
    return int(raw)


def number(raw: str) -> float:
    if not _NUMBER.fullmatch(raw):
        raise ValueError("not a number in ASCII digits (2, 0.5, 1e3)")
    value = float(raw)
    # 1e-400 is 0.0 to float, and a settle time of 0 turns its rule off (helper 76).
    if value == 0 and re.search(r"[1-9]", raw.split("e")[0].split("E")[0]):
        raise ValueError("too small to tell from 0")
    return value


def _planned_files(raw: str) -> int:
    """ARCHIVER_MAX_PLANNED_FILES: 0, the field's "unset", set was taken as the default unsaid (helper 171)."""
    if (value := integer(raw)) <= 0:
        raise ValueError(
            f"must be at least ARCHIVER_MAX_FILES; left unset, it is {PLANNED_FILES}, or ARCHIVER_MAX_FILES if more"
        )
    return value


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.split(",") if item.strip())


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


# Environment names follow the CLI's long flags (ARCHIVER_DIR for --dir).
_ENV_PARSERS: dict[str, Callable[[str], object]] = {
    "dir": Path,
    "host": str,
    "port": integer,
    "delay": number,
    "verbose": _parse_bool,
    "compression": integer,
    "chunk_size": integer,
    "channel_capacity": integer,
    "max_jobs": integer,
    "rate_limit": integer,
    "shutdown_grace": number,
    "stall_timeout": number,
    "storage_timeout": number,
    "max_jobs_per_client": integer,
    "client_ipv6_prefix": integer,
    "trusted_proxies": _parse_list,
    "max_connections": integer,
    "link_secret": str,
    "index": str,
    "trusted_fuse": _parse_list,
    "timezone": str,
    "keep_modes": _parse_bool,
    "name_encoding": str,
    "oem_names": _parse_bool,
    "max_files": integer,
    "max_planned_files": _planned_files,
    "settle_time": number,
}
_FIELD_OF_ENV = {"dir": "storage_dir", "index": "index_path"}
_FLAGS = {"storage_dir": "-D/--dir", "port": "-P/--port", "delay": "-d/--delay", "compression": "--compression"}


def _plain(bound: float) -> str:
    """A bound as people write it: 16777216, 0.1."""
    return str(int(bound)) if float(bound).is_integer() else f"{bound:g}"


def setting_name(field: str) -> str:
    """How an operator gives the setting ``field``: its variable, after its flag if it has one.

    "-d/--delay or ARCHIVER_DELAY", "ARCHIVER_MAX_JOBS".
    """
    variable = next((env for env, name in _FIELD_OF_ENV.items() if name == field), field)
    return " or ".join(filter(None, (_FLAGS.get(field), f"ARCHIVER_{variable.upper()}")))
