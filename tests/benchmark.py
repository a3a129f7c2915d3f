"""The benchmark: the service against its baselines, all measured in one run.

    python -m tests.benchmark [--repeat 5] [--zip64] [--ab PYTHON]      (or: make bench)

Baselines: zipstream-ng's ``zipserver`` over the same albums (the peer: pure
Python, one process, ZIPs streamed from the same files) and nginx serving
the service's own archive as a static file (what the client can take).  The
service is launched as an operator would (``python -m archiver``), and curl
is the client.  Machine CPU counts the server, its producers (reaped
children) and the clients.  Every figure is the median of ``--repeat`` runs.
``--ab PYTHON`` measures the service a second time with another checkout's
interpreter (its virtual environment's python: the code before a change),
in the same run.  Nothing here asserts a target: it prints figures and
ratios.  But no download counts unless it is what was asked for: each
server's archive is checked once against the album's files (``verified_archive``),
every timed download must end with curl's exit status 0, HTTP 200 and that
archive's length, and each shape of timed run is followed by an untimed one
whose bytes are hashed (``verify_concurrent``); the ranges' downloads are
compared with the archive byte for byte.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from archiver.archive.ctime_trust import RACY_NS
from tests.conftest import free_port, launcher_processes, producer_processes
from tests.test_deploy import site_config

PROJECT = Path(__file__).resolve().parent.parent
BENCH_STORAGE = PROJECT / "bench-data"
TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Dataset:
    name: str
    files: int
    file_size: int
    nested: bool = False

    @property
    def directory(self) -> Path:
        return BENCH_STORAGE / self.name


PHOTOS = Dataset("photos-200x2500KB", 200, 2_500_000)
SMALL_FILES = Dataset("nested-20000x8KB", 20_000, 8_192, nested=True)
HUGE = Dataset("zip64-2x2500MB", 2, 2_500_000_000)
# Downloaded first by a fresh service before a cold-index download is measured: a cold index,
# not a cold process (imports, threads, the CRC store's first write are not the album's cost).
WARM_UP = Dataset("warm-up-3x1KB", 3, 1024)


def generate(dataset: Dataset) -> None:
    """Write the dataset once: incompressible, deterministic bytes (seeded by the dataset's name)."""
    marker = dataset.directory / ".complete"
    if marker.exists():
        return
    shutil.rmtree(dataset.directory, ignore_errors=True)
    rng = random.Random(dataset.name)
    print(f"generating {dataset.name} ...", flush=True)
    for index in range(dataset.files):
        folder = dataset.directory / (f"d{index // 500:02d}/e{index // 50 % 10}" if dataset.nested else "")
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"photo-{index:05d}.jpg", "wb") as file:
            remaining = dataset.file_size
            while remaining:
                block = min(remaining, 64 * 1024 * 1024)
                file.write(rng.randbytes(block))
                remaining -= block
    marker.write_text("")


def wait_for_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextmanager
def service(
    storage: Path, extra_env: dict[str, str] | None = None, python: str = sys.executable, workers: int = 0
) -> Iterator[tuple[str, int]]:
    """The service (``python -m archiver``, by default this checkout's) on a free port; yields its base URL and pid.

    ``workers`` > 0: the Hypercorn launch with that many worker processes
    (``hypercorn --config hypercorn.toml --workers N``; the pid is Hypercorn's master).
    """
    port = free_port()
    # Every curl comes from 127.0.0.1: one client to the per-client job cap,
    # which would refuse the concurrent runs past 4.
    # ARCHIVER_SETTLE_TIME=0: the cold runs move every file's ctime a moment before they download (a
    # 503 "album changing" otherwise, which curl -sS takes as done).
    # None of the caller's own settings (ARCHIVER_COMPRESSION would deflate, ARCHIVER_INDEX would
    # keep the CRCs a "fresh process" must not have): the service measured is the defaults' and these.
    inherited = {name: value for name, value in os.environ.items() if not name.startswith("ARCHIVER_")}
    env = {
        **inherited,
        "ARCHIVER_MAX_JOBS": "64",
        "ARCHIVER_MAX_JOBS_PER_CLIENT": "64",
        "ARCHIVER_SETTLE_TIME": "0",
        **(extra_env or {}),
    }
    command = [python, "-m", "archiver", "-H", "127.0.0.1", "-P", str(port), "-D", str(storage)]
    if workers:
        env["ARCHIVER_DIR"] = str(storage)
        hypercorn = str(Path(python).parent / "hypercorn")
        config = str(PROJECT / "hypercorn.toml")
        command = [hypercorn, "--config", config, "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]
        command.append("archiver.asgi:app")
    log = BENCH_STORAGE / "service.log"
    with open(log, "ab") as log_file:
        # Not from a checkout: ``python -m`` must import the package installed for ``python``.
        # Hypercorn's access log goes to stdout (hypercorn.toml): written, and dropped.
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=log_file, cwd=tempfile.gettempdir()
        )
    try:
        try:
            wait_for_port(port)
        except RuntimeError:
            raise RuntimeError(f"the service did not start; see {log}") from None
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def nginx_serving(file: Path) -> Iterator[tuple[str, str, int]]:
    """nginx on loopback serving ``file``; yields the HTTP/1.1 and h2c base URLs and the worker's pid."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port, h2_port = free_port(), free_port()
    with tempfile.TemporaryDirectory() as prefix:
        config = Path(prefix, "nginx.conf")
        config.write_text(f"""
daemon off; worker_processes 1; pid {prefix}/nginx.pid; error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off; sendfile on; tcp_nopush on;
    client_body_temp_path {prefix}; proxy_temp_path {prefix}; fastcgi_temp_path {prefix};
    uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
    server {{ listen 127.0.0.1:{port}; root {file.parent}; }}
    server {{ listen 127.0.0.1:{h2_port} http2; root {file.parent}; }}
}}
""")
        process = subprocess.Popen([nginx, "-c", str(config), "-p", prefix])
        try:
            wait_for_port(port)
            wait_for_port(h2_port)
            worker = int(
                subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()[0]
            )
            yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{h2_port}", worker
        finally:
            process.terminate()
            process.wait(30)


@contextmanager
def nginx_in_front_of(bases: Sequence[str]) -> Iterator[str]:
    """nginx (a worker a core) on loopback running deploy/nginx.conf as shipped before ``bases``; its base URL."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    port = free_port()
    with tempfile.TemporaryDirectory() as prefix:
        site = Path(prefix, "site.conf")
        site.write_text(site_config([base.removeprefix("http://") for base in bases], port))
        config = Path(prefix, "nginx.conf")
        config.write_text(f"""
daemon off; worker_processes auto; pid {prefix}/nginx.pid; error_log {prefix}/error.log;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {prefix}; proxy_temp_path {prefix}; fastcgi_temp_path {prefix};
    uwsgi_temp_path {prefix}; scgi_temp_path {prefix};
    include {site};
}}
""")
        process = subprocess.Popen([nginx, "-c", str(config), "-p", prefix])
        try:
            wait_for_port(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            process.wait(30)


CURL_FORMAT = "%{time_starttransfer} %{time_total} %{size_download} %{http_code}\\n"


def curl(urls: Sequence[str], http2: bool, post: str | None = None, *, length: int) -> list[tuple[float, float, int]]:
    """Download ``urls`` in parallel with curl; (first byte s, total s, bytes) for each; all must be complete.

    Complete: curl's exit status 0, HTTP status 200 and ``length`` bytes received, the length of
    the server's archive as ``verified_archive`` checked it (an error page, a 503, a cut transfer
    or another archive is not a fast download).  The bytes themselves are not looked at here (the
    clients write to /dev/null, which costs no CPU): ``verify_concurrent`` checks them, untimed.
    """
    flags = ["--http2-prior-knowledge"] if http2 else ["--http1.1"]
    if post is not None:
        flags += ["--data", post]
    processes = [
        subprocess.Popen(["curl", "-sS", *flags, "-o", "/dev/null", "-w", CURL_FORMAT, url], stdout=subprocess.PIPE)
        for url in urls
    ]
    results = []
    for url, process in zip(urls, processes, strict=True):
        output, _ = process.communicate()
        if process.returncode != 0:
            raise RuntimeError(f"curl failed with exit status {process.returncode}")
        first_byte, total, size, status = output.split()
        if status != b"200":
            raise RuntimeError(f"HTTP status {status.decode()}")
        if int(size) != length:
            raise RuntimeError(f"{url}: {int(size)} bytes received, {length} expected")
        results.append((float(first_byte), float(total), int(size)))
    return results


def dataset_files(dataset: Dataset) -> dict[str, Path]:
    """The album's files by their path in it (the generator's marker too: both servers send it)."""
    return {
        path.relative_to(dataset.directory).as_posix(): path for path in dataset.directory.rglob("*") if path.is_file()
    }


def check_archive(archive: Path, dataset: Dataset) -> None:
    """RuntimeError unless ``archive`` is a stored ZIP of exactly the album's files, each with its bytes.

    The peer names its members ``<album>/...``, the service ``...``.  Each member's CRC-32 in the
    central directory must be the source file's, and ``testzip`` reads every member's data against it.
    """
    files = dataset_files(dataset)
    with zipfile.ZipFile(archive) as zipped:
        members = {info.filename.removeprefix(f"{dataset.name}/"): info for info in zipped.infolist()}
        members = {name: info for name, info in members.items() if not info.is_dir()}
        if members.keys() != files.keys():
            raise RuntimeError(f"{archive}: {len(members)} members, not the album's {len(files)} files")
        for name, info in members.items():
            if info.compress_type != zipfile.ZIP_STORED:
                raise RuntimeError(f"{archive}: {name} is not stored (the service and the peer must both store)")
            crc, length = 0, 0
            with open(files[name], "rb") as source:  # in blocks: the ZIP64 album's files are 2.5 GB
                while block := source.read(1 << 24):
                    crc, length = zlib.crc32(block, crc), length + len(block)
            if (length, crc) != (info.file_size, info.CRC):
                raise RuntimeError(f"{archive}: {name} is not the album's file")
        if (bad := zipped.testzip()) is not None:
            raise RuntimeError(f"{archive}: {bad}'s data does not match its CRC")


@dataclass(frozen=True)
class Expected:
    """A server's archive of an album, as checked once: what each of its downloads must be."""

    length: int
    sha256: str


def file_sha256(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def verified_archive(
    url: str, dataset: Dataset, http2: bool = False, post: str | None = None, keep: Path | None = None
) -> Expected:
    """Download ``url``'s archive (untimed), check it is the album (``check_archive``): its length and digest.

    ``keep``: where to leave the archive (it is removed otherwise).
    """
    flags = ["--http2-prior-knowledge"] if http2 else ["--http1.1"]
    if post is not None:
        flags += ["--data", post]
    with tempfile.TemporaryDirectory(dir=BENCH_STORAGE) as scratch:
        target = keep or Path(scratch, "archive.zip")
        command = ["curl", "-sS", "--fail", *flags, "-o", str(target), "-w", "%{http_code}", url]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or result.stdout != "200":
            raise RuntimeError(f"{url}: curl exit status {result.returncode}, HTTP status {result.stdout}")
        check_archive(target, dataset)
        return Expected(target.stat().st_size, file_sha256(target))


def verify_concurrent(urls: Sequence[str], http2: bool, post: str | None, expected: Expected) -> None:
    """Download ``urls`` at once (untimed), hashing each as it comes: RuntimeError unless each is ``expected``.

    Run after the timed runs of the same shape, outside their CPU accounting (these clients pipe
    their bytes to this process, which hashes them): the timed clients write to /dev/null.
    """
    flags = ["--http2-prior-knowledge"] if http2 else ["--http1.1"]
    if post is not None:
        flags += ["--data", post]
    processes = [
        subprocess.Popen(["curl", "-sS", "--fail", *flags, "-o", "-", url], stdout=subprocess.PIPE) for url in urls
    ]

    def digest(process: subprocess.Popen[bytes]) -> tuple[int, str, int]:
        assert process.stdout is not None
        hasher, length = hashlib.sha256(), 0
        while block := process.stdout.read(1 << 20):
            hasher.update(block)
            length += len(block)
        return process.wait(), hasher.hexdigest(), length

    with ThreadPoolExecutor(len(processes)) as pool:
        outcomes = list(pool.map(digest, processes))
    for url, (status, sha256, length) in zip(urls, outcomes, strict=True):
        if status != 0 or Expected(length, sha256) != expected:
            raise RuntimeError(f"{url}: curl exit status {status}, {length} bytes not the verified archive's")


def parallel_downloads(
    url: str,
    parallel: int,
    runs: int,
    expected: Expected,
    pid: int,
    http2: bool = False,
    names: tuple[str, str] = ("producers", "service"),
    post: str | None = None,
) -> tuple[float, str]:
    """Median aggregate rate (bytes/s) of ``runs`` runs of ``parallel`` downloads at once, and machine CPU per GB.

    Then one more run of the same shape, untimed, whose bytes are checked (``verify_concurrent``).
    """
    rates: list[float] = []
    size = expected.length

    def run() -> None:
        for _ in range(runs):
            results = curl([url] * parallel, http2, post, length=size)
            rates.append(parallel * size / max(total for _, total, _ in results))

    cpu = machine_cpu_per_gb(runs * parallel * size / 1e9, run, pid, names)
    verify_concurrent([url] * parallel, http2, post, expected)
    return statistics.median(rates), cpu


def median_of(repeat: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeat))


def cpu_ticks(pid: int) -> list[int]:
    """utime, stime, cutime, cstime of ``pid`` from /proc/<pid>/stat, in clock ticks."""
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return [int(field) for field in fields[11:15]]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of ``pid`` itself (reaped children's time is counted apart)."""
    user, system, _, _ = cpu_ticks(pid)
    return user / TICKS_PER_SECOND, system / TICKS_PER_SECOND


def children_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``'s producers and their launchers: its reaped children's, its launchers' and theirs."""
    ticks = sum(cpu_ticks(pid)[2:])
    for started_by in launcher_processes(pid):
        with contextlib.suppress(OSError):  # ended meanwhile: counted in its parent's children now
            ticks += sum(cpu_ticks(started_by.pid))
    return ticks / TICKS_PER_SECOND


def own_children_cpu_seconds() -> float:
    """CPU time of this process's reaped children (the clients)."""
    times = os.times()
    return times.children_user + times.children_system


def machine_cpu_per_gb(
    gigabytes: float,
    run: Callable[[], object],
    pid: int | None = None,
    names: tuple[str, str] = ("producers", "service"),
) -> str:
    """Every process's CPU per GB while ``run`` moves ``gigabytes``: with a server, split three ways.

    On a machine where the producers, the server and the clients share the
    cores, the aggregate throughput cannot pass cores / (this figure).
    """
    clients_before = own_children_cpu_seconds()
    service_before = children_before = 0.0
    if pid is not None:
        service_before, children_before = sum(cpu_seconds(pid)), children_cpu_seconds(pid)
    run()
    clients = (own_children_cpu_seconds() - clients_before) / gigabytes
    if pid is None:
        return f"{clients:.2f} s/GB"
    service = (sum(cpu_seconds(pid)) - service_before) / gigabytes
    children = (children_cpu_seconds(pid) - children_before) / gigabytes
    total = children + service + clients
    return f"{total:.2f} s/GB ({names[1]} {service:.2f} + {names[0]} {children:.2f} + curl {clients:.2f})"


def cpu_per_gb(pid: int, gigabytes: float, run: Callable[[], object]) -> str:
    """ "user + sys s/GB" that ``pid`` spends while ``run`` moves ``gigabytes``."""
    user_before, sys_before = cpu_seconds(pid)
    run()
    user_after, sys_after = cpu_seconds(pid)
    user, system = (user_after - user_before) / gigabytes, (sys_after - sys_before) / gigabytes
    return f"{user + system:.2f} s/GB ({user:.2f} user + {system:.2f} sys)"


def status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field}")


def producer_children(pid: int) -> list[int]:
    return [child.pid for child in producer_processes(pid)]


def disconnect_to_producer_gone(url: str, pid: int) -> float:
    """Seconds from SIGKILL of a downloading curl to the service's producer being gone."""
    client = subprocess.Popen(["curl", "-sS", "--limit-rate", "1M", "-o", "/dev/null", url])
    deadline = time.monotonic() + 10
    while not producer_children(pid):
        if time.monotonic() > deadline:
            raise RuntimeError("the producer never started")
        time.sleep(0.005)
    time.sleep(0.2)
    client.send_signal(signal.SIGKILL)
    killed = time.perf_counter()
    client.wait()
    while producer_children(pid):
        time.sleep(0.001)
    return time.perf_counter() - killed


def rss_per_download(url: str, pid: int, count: int = 32) -> tuple[float, float]:
    """Idle RSS (MB) and RSS growth per in-flight download (MB) with ``count`` slow clients."""
    idle = status_kib(pid, "VmRSS")
    clients = [subprocess.Popen(["curl", "-sS", "--limit-rate", "200k", "-o", "/dev/null", url]) for _ in range(count)]
    deadline = time.monotonic() + 10
    while len(producer_children(pid)) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1)
    loaded = status_kib(pid, "VmRSS")
    for client in clients:
        client.kill()
        client.wait()
    return idle / 1024, (loaded - idle) / 1024 / count


def report(rows: list[tuple[str, str, str]]) -> None:
    width = max(len(row[0]) for row in rows)
    for name, value, ratio in rows:
        print(f"{name:<{width}}  {value:>14}  {ratio}")


def head_length(url: str) -> int:
    result = subprocess.run(["curl", "-sS", "-I", url], capture_output=True, text=True, check=True)
    for line in result.stdout.splitlines():
        name, _, value = line.partition(":")
        if name.lower() == "content-length":
            return int(value)
    raise RuntimeError(f"no Content-Length for {url}")


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def imported_package(python: str) -> Path:
    """The archiver package that ``python`` runs as ``service`` launches it (its environment and working directory).

    Not necessarily this checkout's: a PYTHONPATH in the environment comes first, and an
    interpreter's editable install names the checkout it was made in.
    """
    command = [python, "-c", "import archiver; print(archiver.__file__)"]
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tempfile.gettempdir())
    return Path(result.stdout.strip()).resolve().parent


def checked_code(pythons: list[tuple[str, str]]) -> None:
    """Print which code each service runs; SystemExit if the service is not this checkout's or the A/B is it too."""
    packages = [imported_package(python) for _, python in pythons]
    for (label, python), package in zip(pythons, packages, strict=True):
        revision = subprocess.run(
            ["git", "-C", str(package.parent), "describe", "--always", "--dirty"], capture_output=True, text=True
        ).stdout.strip()
        print(f"{label}: {python} runs {package} ({revision or 'no git'})")
    if packages[0] != (PROJECT / "archiver").resolve():
        where = f"see PYTHONPATH, or the checkout {pythons[0][1]}'s editable install names"
        raise SystemExit(f"the service would not run this checkout's code but {packages[0]}: {where}")
    if packages[1:] and packages[1] == packages[0]:
        raise SystemExit(f"--ab {pythons[1][1]} runs this checkout's code ({packages[1]}), not its own: see PYTHONPATH")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure (the median is shown)")
    parser.add_argument("--zip64", action="store_true", help="also a 5 GB album (ZIP64), one run each")
    parser.add_argument("--ab", metavar="PYTHON", help="also measure the service run by this interpreter (A/B)")
    parser.add_argument("--ranges-only", action="store_true", help="only what ranges and the CRC index cost")
    parser.add_argument(
        "--only",
        metavar="ALBUM",
        action="append",
        help=f"only this album ({PHOTOS.name}, {SMALL_FILES.name}); repeatable",
    )
    args = parser.parse_args(argv)
    datasets = [PHOTOS, SMALL_FILES] + ([HUGE] if args.zip64 else [])
    if args.only:
        datasets = [dataset for dataset in datasets if dataset.name in args.only]
    for dataset in (*datasets, WARM_UP):
        generate(dataset)
    print(f"machine: {os.cpu_count()} cores, {os.uname().machine}, Python {sys.version.split()[0]}")
    pythons = [("service", sys.executable)] + ([("service before (A/B)", args.ab)] if args.ab else [])
    checked_code(pythons)
    for dataset in datasets:
        repeat = 1 if dataset is HUGE else args.repeat
        if not args.ranges_only:
            run_dataset(dataset, repeat, pythons)
        for label, python in pythons:
            range_costs(dataset, repeat, label, python)


def run_dataset(dataset: Dataset, repeat: int, pythons: list[tuple[str, str]]) -> None:
    with service(BENCH_STORAGE) as (base, _):
        size = head_length(f"{base}/archive/{dataset.name}/")
    concurrent_repeat = max(1, repeat // 2)
    # The concurrent rows are fewer runs: at --repeat 3 one run (no median), at 5 two (a mean).
    runs_said = f"medians of {repeat} (8 and 32 at once: {concurrent_repeat} run{'s' * (concurrent_repeat > 1)})"
    print(f"\n== {dataset.name}: archive {size / 1e6:.0f} MB, {runs_said} ==")
    rows: list[tuple[str, str, str]] = []
    peer: dict[int, float] = {}
    with zipserver(BENCH_STORAGE) as (url, pid):
        post = f"files={dataset.name}"
        # Checked once (an album of the same files, stored), and a warm-up, as the service gets one.
        peer_expected = verified_archive(url, dataset, post=post)
        for parallel in (1, 8):
            runs = repeat if parallel == 1 else concurrent_repeat
            names = ("children", "zipserver")
            peer[parallel], cpu = parallel_downloads(url, parallel, runs, peer_expected, pid, names=names, post=post)
            # http.server answers HTTP/1.0 (and closes) to curl's HTTP/1.1 request.
            label = f"peer: zipserver, {parallel} at once, HTTP/1.1 (answered as 1.0)"
            rows.append((label, f"{peer[parallel] / 1e6:.0f} MB/s", "1.00"))
            rows.append((f"machine CPU, zipserver, {parallel} at once", cpu, ""))
    with tempfile.TemporaryDirectory(dir=BENCH_STORAGE) as static:
        os.chmod(static, 0o755)  # nginx's workers run as an unprivileged user
        prebuilt = Path(static, "album.zip")
        with service(BENCH_STORAGE) as (base, _):
            built = verified_archive(f"{base}/archive/{dataset.name}/", dataset, keep=prebuilt)
        with nginx_serving(prebuilt) as (url, h2c_url, _):
            for label, base, http2 in (("HTTP/1.1", url, False), ("h2c", h2c_url, True)):
                rate = median_of(repeat, lambda u=base, h=http2: size / curl([f"{u}/album.zip"], h, length=size)[0][1])
                verify_concurrent([f"{base}/album.zip"], http2, None, built)
                rows.append((f"nginx static file, {label}", f"{rate / 1e6:.0f} MB/s", f"{rate / peer[1]:.2f} of peer"))
    for name, python in pythons:
        with service(BENCH_STORAGE, python=python) as (base, pid):
            url = f"{base}/archive/{dataset.name}/"
            for label, http2 in (("HTTP/1.1", False), ("HTTP/2", True)):
                expected = verified_archive(url, dataset, http2)  # and a warm-up (and the CRC index)
                for parallel in (1, 8, 32):
                    runs = repeat if parallel == 1 else concurrent_repeat
                    rate, cpu = parallel_downloads(url, parallel, runs, expected, pid, http2)
                    versus = f"{rate / peer[parallel]:.2f} of peer" if parallel in peer else ""
                    rows.append((f"{name}, {parallel} at once, {label}", f"{rate / 1e6:.0f} MB/s", versus))
                    rows.append((f"machine CPU, {name}, {parallel} at once, {label}", cpu, ""))
                length = expected.length
                own = cpu_per_gb(
                    pid,
                    repeat * length / 1e9,
                    lambda u=url, h=http2, n=length: [curl([u], h, length=n) for _ in range(repeat)],
                )
                rows.append((f"{name} process alone, 1 at once, {label}", own, ""))
            firsts = [curl([url], False, length=expected.length)[0][0] * 1000 for _ in range(max(20, 4 * repeat))]
            p50, p95 = percentile(firsts, 0.5), percentile(firsts, 0.95)
            rows.append((f"{name}, first byte, HTTP/1.1 (p50 / p95)", f"{p50:.1f} / {p95:.1f} ms", ""))
            rows.append((f"{name} peak RSS after all the above", f"{status_kib(pid, 'VmHWM') / 1024:.0f} MB", ""))
            if python == sys.executable:
                gone_ms = median_of(repeat, lambda u=url, p=pid: disconnect_to_producer_gone(u, p)) * 1000
                rows.append(("client disconnect -> producer gone", f"{gone_ms:.1f} ms", ""))
    rows += paired_rounds(dataset, max(PAIRED_ROUNDS, repeat), pythons)
    # A fresh process: memory freed by the runs above would hide what a download costs.
    with service(BENCH_STORAGE) as (base, pid):
        url = f"{base}/archive/{dataset.name}/"
        verified_archive(url, dataset)  # warm up: imports, lazily made objects
        idle_mb, per_download_mb = rss_per_download(url, pid)
        rows.append(("fresh service RSS idle", f"{idle_mb:.0f} MB", ""))
        rows.append(("RSS growth per in-flight download (32 slow clients)", f"{per_download_mb:.2f} MB", ""))
    report(rows)


# Rounds of the paired 8-at-once comparison: one of 8 downloads is ~3 s of a noisy machine.
PAIRED_ROUNDS = 7
# The paired comparison also runs the service as one process per core would (README, Deploying):
# one event loop moves every byte of a process's downloads, and tops out at one core.
WORKERS = os.cpu_count() or 1


def paired_rounds(dataset: Dataset, rounds: int, pythons: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """8 downloads at once over HTTP/1.1, the peer and each service in turn, round after round: each round's ratio.

    The medians above compare the peer's runs with the service's minutes
    later; on a shared machine the two drift apart (another tenant, the
    clock).  Here every server is up at once (an idle one costs nothing),
    each round runs them back to back (their order turning every round),
    and a round's ratio compares neighbours.  Shown: the median ratio and
    its range over ``rounds``.  Also measured: this checkout's service as
    Hypercorn workers, one a core, and as instances, one a core, behind nginx
    (deploy/nginx.conf).
    """
    post = f"files={dataset.name}"
    with contextlib.ExitStack() as servers:
        peer_url, _ = servers.enter_context(zipserver(BENCH_STORAGE))
        launches = [(name, python, 0) for name, python in pythons]
        launches.append((f"{pythons[0][0]}, {WORKERS} Hypercorn workers", pythons[0][1], WORKERS))
        bases = [
            (name, servers.enter_context(service(BENCH_STORAGE, python=python, workers=workers))[0])
            for name, python, workers in launches
        ]
        # The shape Deploying ships: an instance a core, nginx in front (its own copy of every byte).
        instances = [servers.enter_context(service(BENCH_STORAGE, python=pythons[0][1]))[0] for _ in range(WORKERS)]
        bases.append(
            (f"{pythons[0][0]}, {WORKERS} instances behind nginx", servers.enter_context(nginx_in_front_of(instances)))
        )
        urls = [(name, f"{base}/archive/{dataset.name}/", None) for name, base in bases]
        contenders = [("peer", peer_url, post), *urls]
        expected = {name: verified_archive(url, dataset, post=data) for name, url, data in contenders}
        for name, url, data in contenders:
            for _ in range(2):
                curl([url] * 8, False, data, length=expected[name].length)  # warm up (and every worker's CRC index)
            verify_concurrent([url] * 8, False, data, expected[name])
        ratios: dict[str, list[float]] = {name: [] for name, _ in bases}
        for round_number in range(rounds):
            rates: dict[str, float] = {}
            turn = contenders if round_number % 2 == 0 else contenders[::-1]
            for name, url, data in turn:
                results = curl([url] * 8, False, data, length=expected[name].length)
                rates[name] = 8 * expected[name].length / max(total for _, total, _ in results)
            for name in ratios:
                ratios[name].append(rates[name] / rates["peer"])
    return [
        (
            f"{name}, 8 at once, HTTP/1.1, paired with the peer's rounds",
            f"{statistics.median(values):.2f} of peer",
            f"range {min(values):.2f}-{max(values):.2f}, {len(values)} rounds",
        )
        for name, values in ratios.items()
    ]


RACY_MARGIN_NS = 50_000_000  # past the racy window, with room for the clock reads


def touch_every_file(directory: Path) -> None:
    """Move every file's ctime (its times kept): to the CRC index, each is a file it has not seen."""
    for path in directory.rglob("*"):
        if path.is_file():
            status = path.stat()
            os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))
    touched_ns = time.time_ns()
    # A file whose ctime is within RACY_NS of its CRC read is "racy": its CRC is not kept, and the
    # producer reads the file again to check it, a second read of every byte. Wait it out, as an
    # upload minutes before a download would. (A sleep of 0.5 s here, under the 1 s window of
    # 30cf7c5, measured that second read as the cold download's cost: 2.5-3.2x, not ~1.2x.)
    time.sleep(max(0.0, (touched_ns + RACY_NS + RACY_MARGIN_NS - time.time_ns()) / 1e9))


def service_and_producer_cpu(pid: int) -> float:
    """CPU seconds of the service and of its reaped producers so far."""
    return sum(cpu_seconds(pid)) + children_cpu_seconds(pid)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds of each live thread of ``pid``, to the nanosecond (/proc/<pid>/task/<tid>/schedstat)."""
    threads: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            threads[int(task.name)] = int((task / "schedstat").read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return threads


def timed_command(command: Sequence[str], pid: int, check: Callable[[], None]) -> tuple[float, float]:
    """Run ``command`` (a client); the seconds it took and the service's + producers' CPU seconds meanwhile.

    ``check`` is called after (untimed): it raises unless the client received what it asked for
    (curl runs with ``--fail``: an error page is a failure, not a fast answer).

    The service's threads are measured to the nanosecond (a ranged request
    costs one or two 10 ms clock ticks); the reaped producers, and the
    service if one of its threads ended meanwhile (its time is then gone
    from the threads' sum), in ticks.
    """
    threads, service, producers = thread_cpu_seconds(pid), cpu_seconds(pid), children_cpu_seconds(pid)
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    threads_now, service_now = thread_cpu_seconds(pid), cpu_seconds(pid)
    if threads.keys() <= threads_now.keys():  # new threads' whole time is this command's
        spent = sum(threads_now.values()) - sum(threads.values())
    else:
        spent = sum(service_now) - sum(service)
    spent += children_cpu_seconds(pid) - producers
    check()
    return seconds, spent


RANGE_RUNS = 9


def range_costs(dataset: Dataset, repeat: int, label: str = "service", python: str = sys.executable) -> None:
    """What ranges and the CRC index cost: cold and warm downloads, a resume at 90 %, the last byte, aria2c -x8.

    "Cold index": a running service meets files it has not seen (an album
    uploaded since its last download): every file's ctime is moved before
    each run, so each CRC is read again, in the process that has served the
    warm downloads.  "Fresh process": the same in a new service each time.

    Figures are wall seconds (median) and the CPU seconds of the service and
    its producers (mean: the producers' CPU comes in 10 ms ticks, which a
    median of a few runs would round), and the CPU as a ratio to one warm
    full download.  The warm cases run at least RANGE_RUNS times.
    """
    rows: list[tuple[str, str, str]] = []
    # In bench-data/, not /tmp (a tmpfs on many systems): three archives of the album at a time.
    with tempfile.TemporaryDirectory(dir=BENCH_STORAGE) as scratch:
        target, reference = Path(scratch, "out.zip"), Path(scratch, "reference.zip")

        def holds(path: Path, start: int = 0) -> Callable[[], None]:
            """A check: ``path`` holds the reference archive's bytes from ``start`` to its end."""

            def check() -> None:
                with open(path, "rb") as got, open(reference, "rb") as want:
                    want.seek(start)
                    while block := want.read(1 << 20):
                        if got.read(len(block)) != block:
                            raise RuntimeError(f"{path}: not the archive's bytes from {start}")
                    if got.read(1):
                        raise RuntimeError(f"{path}: longer than the archive's bytes from {start}")

            return check

        # Cold, fresh process: a new service, an empty CRC index (in memory), each time; warmed up on a
        # tiny album only, so its first large download's own costs count here too (shown for that).
        cold: list[tuple[float, float]] = []
        with service(BENCH_STORAGE, python=python) as (base, pid):
            # The reference: this service's archive, checked to be the album's files (untimed).
            verified_archive(f"{base}/archive/{dataset.name}/", dataset, keep=reference)
        for _ in range(repeat):
            with service(BENCH_STORAGE, python=python) as (base, pid):
                warm_up = f"{base}/archive/{WARM_UP.name}/"
                subprocess.run(["curl", "-sS", "--fail", "-o", str(target), warm_up], check=True)
                command = ["curl", "-sS", "--fail", "-o", str(target), f"{base}/archive/{dataset.name}/"]
                cold.append(timed_command(command, pid, holds(target)))
        with service(BENCH_STORAGE, python=python) as (base, pid):
            url = f"{base}/archive/{dataset.name}/"
            size = head_length(url)
            subprocess.run(["curl", "-sS", "--fail", "-o", str(target), url], check=True)  # warms the index
            holds(target)()
            cases: dict[str, tuple[list[str], Callable[[], None]]] = {
                "full download, warm index": (["curl", "-sS", "--fail", "-o", str(target), url], holds(target)),
                "resume at 90 %": (
                    ["curl", "-sS", "--fail", "-r", f"{size * 9 // 10}-", "-o", str(target), url],
                    holds(target, size * 9 // 10),
                ),
                "Range: bytes=-1": (
                    ["curl", "-sS", "--fail", "-r", "-1", "-o", str(target), url],
                    holds(target, size - 1),
                ),
            }
            if shutil.which("aria2c"):
                aria = ["aria2c", "-q", "-x8", "-s8", "-k1M", "--allow-overwrite=true", "-d", scratch, "-o", "a.zip"]
                cases["aria2c -x8 -s8"] = ([*aria, url], holds(Path(scratch, "a.zip")))
            runs = max(repeat, RANGE_RUNS)
            measured = {
                name: [timed_command(command, pid, check) for _ in range(runs)]
                for name, (command, check) in cases.items()
            }
            # The same last byte as curl times it, from its connect to the last byte: without the 8-10 ms
            # of a curl process's own start and exit that the wall times above include.
            on_the_wire = [curl_time_total(*cases["Range: bytes=-1"]) for _ in range(runs)]
            cold_warm_process: list[tuple[float, float]] = []
            for _ in range(runs):
                touch_every_file(dataset.directory)
                full, full_check = cases["full download, warm index"]
                cold_warm_process.append(timed_command(full, pid, full_check))
    print(
        f"\n== ranges, {label}, {dataset.name}: archive {size / 1e6:.0f} MB, "
        f"medians of {repeat} (the warm cases and the cold index in it: {max(repeat, RANGE_RUNS)}) =="
    )
    warm_cpu = statistics.mean(cpu for _, cpu in measured["full download, warm index"])
    cold_cases = [("full download, cold index, fresh process", cold), ("full download, cold index", cold_warm_process)]
    for name, timings in (*cold_cases, *measured.items()):
        seconds = statistics.median(wall for wall, _ in timings)
        cpu = statistics.mean(cpu for _, cpu in timings)
        rows.append((f"{name}: time", f"{seconds * 1000:.0f} ms", ""))
        rows.append((f"{name}: CPU", f"{cpu:.2f} s", f"{cpu / warm_cpu:.2f} of a warm full download"))
        if name == "Range: bytes=-1":
            wire = statistics.median(on_the_wire)
            rows.append(
                (
                    f"{name}: curl's time_total",
                    f"{wire * 1000:.1f} ms",
                    "its request to the last byte, no process start",
                )
            )
    report(rows)


def curl_time_total(command: Sequence[str], check: Callable[[], None]) -> float:
    """Seconds curl reports for ``command`` (a curl command line) from its start to the last byte: ``time_total``."""
    result = subprocess.run([*command, "-w", "%{time_total}"], check=True, capture_output=True, text=True)
    check()
    return float(result.stdout)


@contextmanager
def zipserver(directory: Path) -> Iterator[tuple[str, int]]:
    """zipstream-ng's zipserver over ``directory``: POST files=<name> answers a ZIP of that folder."""
    command = shutil.which("zipserver", path=str(Path(sys.executable).parent)) or "zipserver"
    port = free_port()
    process = subprocess.Popen(
        [command, "--bind", "127.0.0.1", "--directory", str(directory), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}/", process.pid
    finally:
        process.terminate()
        process.wait(30)


if __name__ == "__main__":
    main()
