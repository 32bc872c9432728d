"""`download` against a real HTTP server on a loopback port that serves demo images and every
kind of failure a public image host gives: no internet is used."""

import contextlib
import hashlib
import io
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from conftest import REAL_METADATA
from skindiff.data.cohort import select_cohort
from skindiff.data.config import CohortSpec, DownloadConfig, PrepareConfig
from skindiff.data.download import (
    DOWNLOAD_LOG,
    download_images,
    rows_to_download,
)
from skindiff.data.metadata import read_metadata
from skindiff.data.prepare import prepare_scenario
from skindiff.errors import SkindiffError
from skindiff.tracking.download import run_download

HTML = b"<!DOCTYPE html><html><body>Sorry, this image is gone.</body></html>"


def image_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 18), (seed * 37 % 256, 120, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


class Host:
    """A loopback HTTP server: `/img/<k>` is image k; other first path parts misbehave (see
    `respond`). It records every request's path and time."""

    def __init__(self, slow_seconds: float = 1.5):
        self.requests: list[tuple[float, str]] = []
        self.slow_seconds = slow_seconds
        self.drip_seconds = 2.5  # between the bytes of /drip/<k>
        self.fast = False  # True: every path is /img/<k>, as a host back to normal
        self.closed = threading.Event()
        self.served: dict[str, bytes] = {}  # name -> bytes of /file/<name>
        self.lock = threading.Lock()
        host = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                # The client may give up first (a timeout under test).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    host.respond(self)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def seen(self, path: str) -> int:
        return sum(1 for _, p in self.requests if p == path)

    def respond(self, request: BaseHTTPRequestHandler) -> None:
        with self.lock:
            self.requests.append((time.monotonic(), request.path))
            calls = self.seen(request.path)
        kind, _, name = request.path.strip("/").partition("/")
        kind = "img" if self.fast else kind
        image = image_bytes(int(name)) if name.isdigit() else b""
        if kind == "file":  # a file of `served`, or 404
            image = self.served.get(name, b"")
            if not image:
                return request.send_error(404)
        if kind == "missing":
            return request.send_error(404)
        if kind == "flaky" and calls == 1:
            return request.send_error(500)
        if kind == "busy" and calls == 1:
            request.send_response(429)
            request.send_header("Retry-After", "1")
            request.send_header("Content-Length", "0")
            return request.end_headers()
        if kind == "slow":
            time.sleep(self.slow_seconds)
        if kind == "to-file":
            return redirect(request, "file:///etc/passwd")
        if kind == "to-img":
            return redirect(request, f"/img/{name}")
        if kind in ("drip", "drip-headers", "endless", "huge"):
            return trickle(request, kind, self)
        body = HTML if kind == "html" else image
        request.send_response(200)
        request.send_header("Content-Type", "text/html" if kind == "html" else "image/jpeg")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if kind == "drop":  # half the body, then the connection goes
            request.wfile.write(body[: len(body) // 2])
            request.wfile.flush()
            request.close_connection = True
            return
        request.wfile.write(body)

    def close(self) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()


def trickle(request: BaseHTTPRequestHandler, kind: str, host: Host) -> None:
    """drip: 100,000 bytes announced, one sent every `host.drip_seconds`; drip-headers: a
    header's bytes at that pace; endless: no length announced, 64 KiB pieces for ever; huge:
    10**9 bytes announced, 64 KiB pieces. Each goes on until the client goes or the host
    closes."""
    request.send_response(200)
    request.send_header("Content-Type", "image/jpeg")
    if kind in ("drip", "huge"):
        request.send_header("Content-Length", str(10**9 if kind == "huge" else 100_000))
    if kind == "drip-headers":
        request.flush_headers()
        request.wfile.write(b"X-Wait: ")
    else:
        request.end_headers()
    slow = kind.startswith("drip")
    piece, pause = (b"z", host.drip_seconds) if slow else (bytes(65536), 0.001)
    while not host.closed.wait(pause):
        request.wfile.write(piece)
        request.wfile.flush()


def redirect(request: BaseHTTPRequestHandler, location: str) -> None:
    request.send_response(302)
    request.send_header("Location", location)
    request.send_header("Content-Length", "0")
    request.end_headers()


@pytest.fixture
def host():
    server = Host()
    yield server
    server.close()


def metadata(host: Host, paths: list[str], md5s: list[str] | None = None) -> pd.DataFrame:
    """Fitzpatrick17k-format rows of the cohort (psoriasis, FST 2), one per path; md5hash is
    the MD5 of the image the path names, else of the path."""
    rows = []
    for k, path in enumerate(paths):
        name = path.rpartition("/")[2]
        data = image_bytes(int(name)) if name.isdigit() else path.encode()
        md5 = md5s[k] if md5s else hashlib.md5(data).hexdigest()
        rows.append(
            {"md5hash": md5, "fitzpatrick_scale": 2, "label": "psoriasis", "url": host.url + path}
        )
    return pd.DataFrame(rows)


def config(csv: Path, folder: Path, **changes) -> DownloadConfig:
    settings = {"timeout": 0.5, "retries": 2, "backoff": 0.05, "requests_per_second": 100.0}
    return DownloadConfig(str(csv), str(folder), **settings | changes)


CASES = {  # path -> (status, reason, the HTTP status of the last response) in the report
    "/img/1": ("downloaded", "", 200),
    "/missing/2": ("failed", "not found (404)", 404),
    "/flaky/3": ("downloaded", "", 200),
    "/busy/4": ("downloaded", "", 200),
    "/slow/5": ("failed", "timeout (after 2 retries)", None),
    "/drop/6": ("failed", "connection dropped mid-body (after 2 retries)", None),
    "/html/7": ("failed", "not an image (an HTML page)", 200),
    "/to-file/8": ("failed", "redirect to a file: url refused", 302),
    "/to-img/9": ("downloaded", "", 200),
}


def test_every_good_image_arrives_and_every_bad_one_is_refused_with_its_reason(host, tmp_path):
    rows = metadata(host, list(CASES))
    rows = pd.concat([rows, rows.iloc[[0]].assign(md5hash="f" * 32)])  # the same URL again
    csv, folder = tmp_path / "meta.csv", tmp_path / "images"
    rows.to_csv(csv, index=False)
    summary = download_images(rows, folder, config(csv, folder), progress=False)
    report = summary.report.set_index("md5hash")

    for md5, path in zip(rows["md5hash"], [*CASES, "/img/1"], strict=True):
        status, reason, http_status = CASES[path]
        got = report.loc[md5]
        assert (got["status"], got["reason"] if status == "failed" else "") == (status, reason)
        assert (None if pd.isna(got["http_status"]) else got["http_status"]) == http_status
        file = folder / f"{md5}.jpg"
        if status == "downloaded":
            name = int(path.rpartition("/")[2])
            assert file.read_bytes() == image_bytes(name)
            assert got["sha256"] == hashlib.sha256(image_bytes(name)).hexdigest()
            assert got["bytes"] == len(image_bytes(name))
        else:
            assert not file.exists()
    # The MD5 is checked, not trusted: the second row of /img/1 names other bytes.
    assert report.loc["f" * 32, "md5_match"] == False  # noqa: E712 - a numpy bool
    assert report.loc[rows["md5hash"].iloc[0], "md5_match"] == True  # noqa: E712
    assert host.seen("/img/1") == 1  # a duplicate URL is fetched once
    # Retries: 500 and 429 once each, then the image; a 404 and a redirect never again.
    assert [host.seen(p) for p in ("/flaky/3", "/busy/4", "/missing/2", "/to-file/8")] == [
        2,
        2,
        1,
        1,
    ]
    assert host.seen("/slow/5") == host.seen("/drop/6") == 3
    busy = [t for t, p in host.requests if p == "/busy/4"]
    assert busy[1] - busy[0] >= 0.95  # Retry-After: 1
    assert summary.line() == (
        "downloaded 5, already there 0, failed 5 (connection dropped mid-body (after 2 "
        "retries): 1, not an image (an HTML page): 1, not found (404): 1, redirect to a file: "
        "url refused: 1, timeout (after 2 retries): 1)"
    )

    # Again: only what failed is asked for; nothing verified is fetched or read again.
    before = Counter(p for _, p in host.requests)
    again = download_images(rows, folder, config(csv, folder), progress=False)
    asked = Counter(p for _, p in host.requests) - before
    assert set(asked) == {p for p, (status, *_) in CASES.items() if status == "failed"}
    assert again.already_there == summary.downloaded == 5 and again.downloaded == 0


def test_a_trickle_fails_at_the_deadline_and_an_endless_body_at_max_bytes(host, tmp_path):
    """The issue's drip: 100,000 bytes announced, a byte every 2.5 s, each within --timeout;
    --deadline bounds the file, its headers coming a byte at a time too."""
    paths = ["/drip/1", "/drip-headers/2", "/endless/3", "/huge/4", "/img/5"]
    rows = metadata(host, paths)
    csv, folder = tmp_path / "meta.csv", tmp_path / "images"
    rows.to_csv(csv, index=False)
    settings = config(csv, folder, timeout=5.0, deadline=3.0, retries=0, max_bytes=100_000)
    start = time.monotonic()
    summary = download_images(rows, folder, settings, progress=False)
    elapsed = time.monotonic() - start
    assert 2.9 < elapsed < 4.5, f"{elapsed:.1f} s"  # the next bytes would come at 5 s
    assert list(summary.report["reason"].fillna("")) == [
        "deadline passed",
        "deadline passed",
        "larger than max_bytes",  # counted as it came
        "larger than max_bytes",  # announced: refused before its body
        "",
    ]
    assert [host.seen(path) for path in paths] == [1, 1, 1, 1, 1]
    kept = [f"{rows['md5hash'][4]}.jpg", DOWNLOAD_LOG]
    assert sorted(f.name for f in folder.iterdir()) == sorted(kept)

    # A deadline is retried like a timeout; a body too large is not: it would be again.
    settings = config(csv, folder, timeout=5.0, deadline=1.0, retries=1, max_bytes=100_000)
    again = download_images(rows, folder, settings, progress=False).report
    assert list(again["reason"].fillna(""))[:3] == [
        "deadline passed (after 1 retries)",
        "deadline passed (after 1 retries)",
        "larger than max_bytes",
    ]
    assert [host.seen(path) for path in paths] == [3, 3, 2, 2, 1]
    assert sorted(f.name for f in folder.iterdir()) == sorted(kept)
    with pytest.raises(SkindiffError, match=r"^deadline must be at least 1, got 0\.5$"):
        config(csv, folder, deadline=0.5)
    with pytest.raises(SkindiffError, match=r"^max_bytes must be at least 1, got 0$"):
        config(csv, folder, max_bytes=0)


def test_requests_to_one_host_keep_to_the_rate_limit(host, tmp_path):
    rows = metadata(host, [f"/img/{k}" for k in range(12)])
    csv, folder = tmp_path / "meta.csv", tmp_path / "images"
    rows.to_csv(csv, index=False)
    settings = config(csv, folder, requests_per_second=5.0, connections=8)
    download_images(rows, folder, settings, progress=False)
    times = sorted(t for t, _ in host.requests)
    assert len(times) == 12
    rate = (len(times) - 1) / (times[-1] - times[0])
    assert 3.5 < rate <= 5.2, f"{rate:.2f} requests per second"


KILLED = """
import sys
from pathlib import Path
import pandas as pd
from skindiff.data.download import DownloadConfig, download_images
rows = pd.read_csv(sys.argv[1], dtype=str)
download_images(rows, Path(sys.argv[2]), DownloadConfig(sys.argv[1], sys.argv[2],
                requests_per_second=4.0), progress=False)
"""


@pytest.mark.slow  # a subprocess, killed
def test_a_download_killed_midway_leaves_no_partial_file_and_resumes(host, tmp_path):
    paths = [f"/img/{k}" for k in range(16)]
    rows = metadata(host, paths)
    csv, folder = tmp_path / "meta.csv", tmp_path / "images"
    rows.to_csv(csv, index=False)
    process = subprocess.Popen([sys.executable, "-c", KILLED, str(csv), str(folder)])
    deadline = time.monotonic() + 60
    while len(list(folder.glob("*.jpg"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    there = sorted(folder.glob("*.jpg"))
    assert 4 <= len(there) < len(rows)
    for file in folder.iterdir():  # whole images only, no temporary files under the name
        if file.suffix == ".jpg":
            with Image.open(file) as image:
                image.load()
    before = Counter(p for _, p in host.requests)
    summary = download_images(rows, folder, config(csv, folder), progress=False)
    assert summary.downloaded + summary.already_there == len(rows) and not summary.failed
    assert summary.already_there >= len(there)
    asked = Counter(p for _, p in host.requests) - before
    fetched_before = {f.stem for f in there}
    refetched = {p for p, md5 in zip(paths, rows["md5hash"], strict=True) if md5 in fetched_before}
    assert not refetched & set(asked)
    assert [f.name for f in folder.iterdir() if not f.name.endswith(".jpg")] == [DOWNLOAD_LOG]


@pytest.mark.slow  # a subprocess, signalled
def test_sigterm_stops_a_download_at_once_and_a_rerun_fetches_the_rest(host, tracking, tmp_path):
    """`skindiff download` with 4 connections on 4 images, then 36 trickles; SIGTERM while 4
    trickles are under way."""
    paths = [f"/img/{k}" for k in range(4)] + [f"/drip/{k}" for k in range(4, 40)]
    rows = metadata(host, paths)
    csv, folder = tmp_path / "meta.csv", tmp_path / "images"
    rows.to_csv(csv, index=False)
    command = ["--metadata-csv", str(csv), "--image-dir", str(folder), "--all", "true"]
    command += ["--connections", "4", "--requests-per-second", "100"]
    process = subprocess.Popen(
        [sys.executable, "-c", "from skindiff.cli import run; run()", "download", *command],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until = time.monotonic() + 60
    while len(host.requests) < 8 and time.monotonic() < wait_until:
        time.sleep(0.05)
    assert len(host.requests) == 8  # the images, and 4 trickles coming
    process.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    try:
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()  # if it did not stop
    assert time.monotonic() - signalled < 5
    assert process.returncode == 128 + signal.SIGTERM
    assert len(host.requests) == 8  # none started after the signal
    assert "Traceback" not in err
    assert "download stopped: 36 of 40 images not fetched" in err
    (run,) = mlflow.search_runs([tracking], output_format="list")
    assert run.info.status == "KILLED" and f"runs ended KILLED: {run.info.run_id}" in err
    fetched = {f"{md5}.jpg" for md5 in rows["md5hash"][:4]}
    assert {f.name for f in folder.iterdir()} == fetched | {DOWNLOAD_LOG}  # nothing partial

    host.fast = True
    before = Counter(p for _, p in host.requests)
    summary = download_images(rows, folder, config(csv, folder), progress=False)
    assert (summary.downloaded, summary.already_there, summary.failed) == (36, 4, {})
    assert Counter(p for _, p in host.requests) - before == Counter(paths[4:])


def test_the_cohort_by_default_and_every_row_with_all(tmp_path):
    rows = [
        {"md5hash": "a" * 32, "fitzpatrick_scale": 2, "label": "psoriasis", "url": "http://x/1"},
        {"md5hash": "b" * 32, "fitzpatrick_scale": 3, "label": "psoriasis", "url": "http://x/2"},
        {"md5hash": "c" * 32, "fitzpatrick_scale": 6, "label": "eczema", "url": "http://x/3"},
        {"md5hash": "d" * 32, "fitzpatrick_scale": 5, "label": "folliculitis", "url": ""},
    ]
    csv = tmp_path / "meta.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    # A file of the user's that does not decode is reported and left as it is.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / f"{'a' * 32}.jpg").write_bytes(b"my notes")
    two = ("psoriasis", "folliculitis")
    cohort = rows_to_download(config(csv, tmp_path, conditions=two))
    assert list(cohort["md5hash"]) == ["a" * 32, "d" * 32]
    assert len(rows_to_download(config(csv, tmp_path, all=True))) == 4
    summary = download_images(cohort, tmp_path / "images", config(csv, tmp_path), False)
    assert summary.failed == {
        "no url": 1,
        "a file there does not decode (left as it is; delete it to fetch)": 1,
    }
    assert (tmp_path / "images" / f"{'a' * 32}.jpg").read_bytes() == b"my notes"
    with pytest.raises(SkindiffError, match="metadata_csv: no such file"):
        config(tmp_path / "absent.csv", tmp_path)
    with pytest.raises(SkindiffError, match="image_dir: is not a folder"):
        config(csv, csv)
    pd.DataFrame(rows).drop(columns="url").to_csv(csv, index=False)
    with pytest.raises(SkindiffError, match="no url column"):
        rows_to_download(config(csv, tmp_path, conditions=two))


def test_download_is_an_mlflow_run_with_the_report_and_counts(host, tracking, tmp_path):
    rows = metadata(host, ["/img/1", "/missing/2", "/html/3"])
    csv = tmp_path / "meta.csv"
    rows.to_csv(csv, index=False)
    run_id, summary = run_download(config(csv, tmp_path / "images", all=True), progress=False)
    run = mlflow.get_run(run_id)
    assert run.data.tags["mlflow.project.entryPoint"] == "download"
    assert run.data.params["requests_per_second"] == "100.0"
    metrics = run.data.metrics
    assert metrics["n_downloaded"] == 1 and metrics["n_failed"] == 2
    assert metrics["n_failed_not_found_404"] == 1 and metrics["md5_match_fraction"] == 1
    local = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="download_report.csv", dst_path=str(tmp_path / "art")
    )
    logged = pd.read_csv(local, keep_default_na=False)
    assert list(logged["status"]) == list(summary.report["status"])


@pytest.mark.skipif(
    not REAL_METADATA.is_file(), reason="the real Fitzpatrick17k metadata is absent"
)
def test_the_real_metadata_gives_table_1s_cohort_with_a_url_each(tmp_path):
    rows = rows_to_download(DownloadConfig(str(REAL_METADATA), str(tmp_path)))
    assert len(rows) == 1631  # the paper's Table 1
    assert rows["url"].str.startswith("http").all()
    every = rows_to_download(DownloadConfig(str(REAL_METADATA), str(tmp_path), all=True))
    assert len(every) > 16000 and (every["url"].str.strip() == "").sum() > 0


def test_prepare_works_on_what_arrived(host, demo_dataset, tmp_path):
    """The README's sequence: download, then prepare --skip-missing true; the images the host
    did not have are the rows prepare drops."""
    demo = pd.read_csv(demo_dataset.metadata_csv, dtype=str, keep_default_na=False)
    gone = set(demo["md5hash"].iloc[::9])
    host.served = {
        f"{md5}.jpg": (demo_dataset.image_dir / f"{md5}.jpg").read_bytes()
        for md5 in demo["md5hash"]
        if md5 not in gone
    }
    csv, folder = tmp_path / "meta.csv", tmp_path / "images"
    demo.assign(url=[f"{host.url}/file/{md5}.jpg" for md5 in demo["md5hash"]]).to_csv(
        csv, index=False
    )
    download = config(csv, folder, all=True)
    summary = download_images(rows_to_download(download), folder, download, progress=False)
    assert summary.failed == {"not found (404)": len(gone)}
    arrived = summary.report[summary.report["status"] == "downloaded"]
    assert arrived["md5_match"].all()  # the demo names its files by their MD5

    prepared = prepare_scenario(
        PrepareConfig(metadata_csv=str(csv), image_dir=str(folder), skip_missing=True)
    )
    cohort = select_cohort(read_metadata(csv), CohortSpec())
    assert set(prepared.dropped["md5hash"]) == gone & set(cohort["md5hash"])
    used = pd.concat([prepared.splits.train, prepared.splits.val, prepared.splits.test])
    assert not gone & set(used["md5hash"])
