"""Fetching the images of a Fitzpatrick17k-format CSV (`md5hash`, `url`) into a folder.

The images are not redistributed with the metadata, so every user fetches them; this does it
politely and keeps only what is really an image:
- a bounded pool of connections, and requests to one host spaced by a rate limit;
- timeouts, and a deadline for each try at a file as a whole (the try runs in a thread of its
  own, left behind when the deadline passes), so that a server sending a byte now and then
  cannot hold it; a body over `max_bytes`, announced or counted as it arrives, is cut off;
- retries with doubling backoff on connection errors, timeouts, deadlines, 5xx and 429
  (waiting as long as Retry-After says), none on other 4xx such as 404;
- redirects followed by hand, only to http(s), at most MAX_REDIRECTS;
- a body is kept only when it is as long as announced and decodes as an image (an HTML error
  page served with status 200 is refused), written atomically as `<md5hash>.jpg`;
- each kept file is recorded in the folder's DOWNLOAD_LOG (JSON lines, appended as files
  arrive), so a second call, or one after a kill, fetches only what is missing and re-checks
  nothing it already verified; a file found without a record is decoded once and recorded,
  and one that does not decode is reported and left alone (a partial download is never
  there: files are written whole or not at all), so nothing of the user's is overwritten;
- the connections are daemon threads that the caller's thread only waits for: when it stops
  (SIGTERM or Ctrl-C raise in it), no request starts any more, the ones under way are
  abandoned and do not hold the process, and the files left to fetch are logged.
The MD5 of each file's bytes is compared with its `md5hash`: a mismatch is reported, not
fatal, as the published hashes may have been made from other bytes.
"""

import hashlib
import io
import json
import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pandas as pd
import requests
import urllib3
from PIL import Image
from tqdm.auto import tqdm

from skindiff import __version__
from skindiff.core.files import write_atomic
from skindiff.core.labels import slug
from skindiff.data.cohort import select_cohort
from skindiff.data.config import CohortSpec, DownloadConfig
from skindiff.data.metadata import read_metadata
from skindiff.errors import DataValidationError

logger = logging.getLogger(__name__)

DOWNLOAD_LOG = ".skindiff-download.jsonl"
REPORT_COLUMNS = (
    "md5hash",
    "url",
    "status",  # downloaded, already there, failed
    "reason",  # why it failed
    "http_status",
    "bytes",
    "sha256",
    "md5_match",  # whether the MD5 of the file's bytes is its md5hash
)
MAX_REDIRECTS = 5
MAX_RETRY_AFTER = 120.0  # seconds: a longer Retry-After counts as a failure
USER_AGENT = (
    f"skindiff/{__version__} (research image downloader; +https://pypi.org/project/skindiff)"
)
_RETRIED_STATUS = {429, 500, 502, 503, 504}
PIECE = 64 * 1024  # most bytes read at once: a read returns what has arrived, up to this
DEADLINE = "deadline passed"
TOO_LARGE = "larger than max_bytes"
STOPPED = "stopped"


@dataclass(frozen=True)
class Fetched:
    """What one URL gave: the bytes of an image, or why not."""

    data: bytes | None
    http_status: int | None
    reason: str = ""


def rows_to_download(config: DownloadConfig) -> pd.DataFrame:
    """The CSV's rows to fetch (`md5hash`, `url`): the cohort, or all with --all."""
    metadata = read_metadata(Path(config.metadata_csv).expanduser())
    if "url" not in metadata.columns:
        raise DataValidationError(f"{config.metadata_csv}: no url column to download from")
    if not config.all:
        metadata = select_cohort(metadata, CohortSpec(conditions=config.conditions))
    return metadata[["md5hash", "url"]].reset_index(drop=True)


class HostRateLimiter:
    """Spaces the requests to each host by 1 / `per_second` seconds, across threads."""

    def __init__(self, per_second: float):
        self.interval = 1.0 / per_second
        self._next: dict[str, float] = {}
        self._lock = threading.Lock()

    def wait(self, url: str) -> None:
        host = urlsplit(url).netloc
        with self._lock:
            now = time.monotonic()
            slot = max(now, self._next.get(host, now))
            self._next[host] = slot + self.interval
        time.sleep(slot - now)


def retry_after(response: requests.Response) -> float | None:
    """Seconds a Retry-After header asks for (delta seconds or an HTTP date), if any."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def image_problem(data: bytes) -> str | None:
    """Why `data` is not an image file (None when it decodes)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        start = data[:200].lstrip().lower()
        if start.startswith((b"<!doctype html", b"<html")):
            return "not an image (an HTML page)"
        return "not an image (does not decode)"
    return None


class GaveUp(Exception):
    """A body given up on while it arrives (its reason: DEADLINE, TOO_LARGE or STOPPED)."""


class Fetcher:
    """Gets URLs with one `requests` session, the rate limit, retries, redirect rules and
    limits; once `stop` is set, no request starts and the ones under way end at their next
    piece of body."""

    def __init__(self, config: DownloadConfig):
        self.config = config
        self.stop = threading.Event()
        self.limiter = HostRateLimiter(config.requests_per_second)
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=config.connections)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def fetch(self, url: str) -> Fetched:
        if urlsplit(url).scheme not in ("http", "https"):
            return Fetched(None, None, f"not an http(s) url: {url[:80]}")
        retries, delay = self.config.retries, self.config.backoff
        for attempt in range(retries + 1):
            result, wait = self._try_in_time(url)
            if wait is None or retries == 0:
                return result
            if attempt == retries:
                break
            pause = wait or delay
            if pause > MAX_RETRY_AFTER:
                return Fetched(None, result.http_status, f"{result.reason}: Retry-After too long")
            self.stop.wait(pause)
            delay *= 2
        return Fetched(None, result.http_status, f"{result.reason} (after {retries} retries)")

    def _try_in_time(self, url: str) -> tuple[Fetched, float | None]:
        """`_try` in a daemon thread of its own, waited for `deadline` seconds at most (the
        rate limit's waits included): each read of a server that sends a byte now and then
        ends within `timeout`, so only this bounds a file, whether the bytes are its headers
        or its body. The thread left behind ends at its next piece of body (past `until`),
        at a `timeout` or with its connection: until then, one more connection is open."""
        until = time.monotonic() + self.config.deadline
        tried: queue.SimpleQueue[tuple[Fetched, float | None] | Exception] = queue.SimpleQueue()

        def attempt() -> None:
            try:
                tried.put(self._try(url, until))
            except Exception as err:  # a bug: raised in the caller's thread, not lost here
                tried.put(err)

        threading.Thread(target=attempt, name="skindiff-download-try", daemon=True).start()
        try:
            outcome = tried.get(timeout=self.config.deadline)
        except queue.Empty:
            return Fetched(None, None, DEADLINE), 0
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _try(self, url: str, until: float) -> tuple[Fetched, float | None]:
        """One try, redirects included: (result, None) when final, else (result, seconds to
        wait before the next try; 0: the backoff's)."""
        for _ in range(MAX_REDIRECTS + 1):
            self.limiter.wait(url)
            if self.stop.is_set():
                return Fetched(None, None, STOPPED), None
            try:
                response = self.session.get(
                    url, timeout=self.config.timeout, allow_redirects=False, stream=True
                )
                with response:
                    if response.is_redirect:
                        target = urljoin(url, response.headers.get("Location", ""))
                        if urlsplit(target).scheme not in ("http", "https"):
                            scheme = urlsplit(target).scheme or "no scheme"
                            reason = f"redirect to a {scheme}: url refused"
                            return Fetched(None, response.status_code, reason), None
                        url = target
                        continue
                    status = response.status_code
                    if status in _RETRIED_STATUS:
                        wait = retry_after(response) if status in (429, 503) else None
                        return Fetched(None, status, f"HTTP {status}"), wait or 0
                    if status != 200:
                        reason = "not found (404)" if status == 404 else f"HTTP {status}"
                        return Fetched(None, status, reason), None
                    data = self._body(response, until)
            except GaveUp as gave_up:
                # A deadline may be met next time; a body too large is as large again.
                reason = str(gave_up)
                return Fetched(None, status, reason), 0 if reason == DEADLINE else None
            except (requests.Timeout, urllib3.exceptions.ReadTimeoutError):
                return Fetched(None, None, "timeout"), 0
            except urllib3.exceptions.ProtocolError:  # also a body shorter than announced
                return Fetched(None, None, "connection dropped mid-body"), 0
            except requests.ConnectionError:  # refused, reset, or a host name that does not resolve
                return Fetched(None, None, "connection failed"), 0
            except (requests.RequestException, urllib3.exceptions.HTTPError) as err:
                return Fetched(None, None, f"request failed: {type(err).__name__}"), None
            problem = image_problem(data)
            if problem:
                return Fetched(None, status, problem), None
            return Fetched(data, status), None
        return Fetched(None, None, f"more than {MAX_REDIRECTS} redirects"), None

    def _body(self, response: requests.Response, until: float) -> bytes:
        """The body, read piece by piece as it arrives (GaveUp: over `max_bytes`, past
        `until` or stopped)."""
        announced = response.headers.get("Content-Length", "")
        if announced.isdigit() and int(announced) > self.config.max_bytes:
            raise GaveUp(TOO_LARGE)
        body = bytearray()
        while piece := response.raw.read1(PIECE, decode_content=True):
            body += piece
            if len(body) > self.config.max_bytes:
                raise GaveUp(TOO_LARGE)
            if time.monotonic() > until:
                raise GaveUp(DEADLINE)
            if self.stop.is_set():
                raise GaveUp(STOPPED)
        return bytes(body)


@dataclass(frozen=True)
class DownloadSummary:
    report: pd.DataFrame  # REPORT_COLUMNS, one row per image
    downloaded: int
    already_there: int
    failed: dict[str, int]  # reason -> images

    def line(self) -> str:
        failed = sum(self.failed.values())
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.failed.items()))
        return (
            f"downloaded {self.downloaded}, already there {self.already_there}, failed {failed}"
            + (f" ({reasons})" if reasons else "")
        )


def _record(md5hash: str, data: bytes) -> dict:
    """What the log and the report keep of a verified file."""
    return {
        "md5hash": md5hash,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "md5_match": hashlib.md5(data).hexdigest() == md5hash.lower(),
    }


class DownloadLog:
    """The files of a folder already verified (DOWNLOAD_LOG), appended to as files arrive; a
    line cut short by a kill is ignored."""

    def __init__(self, image_dir: Path):
        self.path = image_dir / DOWNLOAD_LOG
        self.entries: dict[str, dict] = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["md5hash"]] = entry
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue
        self._lock = threading.Lock()

    def verified(self, file: Path, md5hash: str) -> dict | None:
        """The record of `file` if it is there as recorded (same size)."""
        entry = self.entries.get(md5hash)
        if entry and file.is_file() and file.stat().st_size == entry["bytes"]:
            return entry
        return None

    def add(self, entry: dict) -> None:
        with self._lock:
            self.entries[entry["md5hash"]] = entry
            with self.path.open("a") as log:
                log.write(json.dumps(entry) + "\n")


def download_images(
    rows: pd.DataFrame, image_dir: Path, config: DownloadConfig, progress: bool = True
) -> DownloadSummary:
    """Fetches each row's `url` into `image_dir/<md5hash>.jpg` (see the module doc); rows
    sharing a URL fetch it once."""
    image_dir = Path(image_dir).expanduser()
    image_dir.mkdir(parents=True, exist_ok=True)
    log = DownloadLog(image_dir)
    results: dict[str, dict] = {}
    todo: dict[str, list[str]] = {}  # url -> md5hashes
    for md5hash, url in zip(rows["md5hash"], rows["url"], strict=True):
        file = image_dir / f"{md5hash}.jpg"
        entry = log.verified(file, md5hash)
        if entry is None and file.is_file():  # a file of the user's: checked once, kept
            data = file.read_bytes()
            if image_problem(data) is not None:
                reason = "a file there does not decode (left as it is; delete it to fetch)"
                results[md5hash] = {"url": url, "status": "failed", "reason": reason}
                continue
            entry = _record(md5hash, data)
            log.add(entry)
        if entry is not None:
            results[md5hash] = {"url": url, "status": "already there"} | entry
        elif not str(url).strip():
            results[md5hash] = {"url": url, "status": "failed", "reason": "no url"}
        else:
            todo.setdefault(str(url).strip(), []).append(md5hash)

    fetched_urls = _fetch_in_threads(list(todo), Fetcher(config))
    done: set[str] = set()
    try:
        with tqdm(
            total=sum(map(len, todo.values())), desc="downloading", unit="img", disable=not progress
        ) as bar:
            for url, fetched in fetched_urls:
                for md5hash in todo[url]:
                    row = {"url": url, "http_status": fetched.http_status}
                    if fetched.data is None:
                        results[md5hash] = row | {"status": "failed", "reason": fetched.reason}
                    else:
                        write_atomic(image_dir / f"{md5hash}.jpg", fetched.data)
                        entry = _record(md5hash, fetched.data)
                        log.add(entry)
                        results[md5hash] = row | {"status": "downloaded"} | entry
                    bar.update()
                done.add(url)
    finally:
        fetched_urls.close()  # stops the threads, also when a signal ends this loop
        left = [f"{md5hash}.jpg" for url in todo if url not in done for md5hash in todo[url]]
        if left:
            names = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
            logger.warning(
                "download stopped: %d of %d images not fetched (a rerun fetches only what is "
                "missing): %s",
                len(left),
                len(rows),
                names,
            )

    report = pd.DataFrame(
        [{"md5hash": md5hash} | results[md5hash] for md5hash in rows["md5hash"]],
        columns=list(REPORT_COLUMNS),
    )
    statuses = report["status"].value_counts()
    failed = report.loc[report["status"] == "failed", "reason"].value_counts()
    return DownloadSummary(
        report,
        int(statuses.get("downloaded", 0)),
        int(statuses.get("already there", 0)),
        {str(reason): int(n) for reason, n in failed.items()},
    )


def _fetch_in_threads(urls: list[str], fetcher: Fetcher) -> Iterator[tuple[str, Fetched]]:
    """(url, what it gave) as each arrives, fetched by `connections` daemon threads. Closing the
    iterator sets `fetcher.stop`: threads still waiting on a server are left behind, and being
    daemons, they do not keep the process alive (a ThreadPoolExecutor's threads would, joined
    at exit)."""
    todo: queue.SimpleQueue[str] = queue.SimpleQueue()
    for url in urls:
        todo.put(url)
    arrived: queue.SimpleQueue[tuple[str, Fetched | Exception]] = queue.SimpleQueue()

    def work() -> None:
        while not fetcher.stop.is_set():
            try:
                url = todo.get_nowait()
            except queue.Empty:
                return
            try:
                arrived.put((url, fetcher.fetch(url)))
            except Exception as err:  # a bug: raised in the caller's thread, not lost here
                arrived.put((url, err))

    for _ in range(min(fetcher.config.connections, len(urls))):
        threading.Thread(target=work, name="skindiff-download", daemon=True).start()
    try:
        for _ in urls:
            url, fetched = arrived.get()
            if isinstance(fetched, Exception):
                raise fetched
            yield url, fetched
    finally:
        fetcher.stop.set()


def summary_metrics(summary: DownloadSummary) -> dict[str, float]:
    """`n_images`, `n_downloaded`, `n_already_there`, `n_failed` and per reason
    (`n_failed_not_found_404`, ...), `md5_match_fraction` of the files there."""
    report = summary.report
    kept = report[report["status"] != "failed"]
    metrics = {
        "n_images": len(report),
        "n_downloaded": summary.downloaded,
        "n_already_there": summary.already_there,
        "n_failed": sum(summary.failed.values()),
    }
    if len(kept):
        metrics["md5_match_fraction"] = kept["md5_match"].astype(bool).mean()
    for reason, n in summary.failed.items():
        metrics[f"n_failed_{slug(reason)}"] = n
    return {name: float(value) for name, value in metrics.items()}
