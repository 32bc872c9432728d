"""The tracking server as the network sees it: telling a server that is gone (connection
refused, timed out, unknown host) from other errors, ending runs once it is gone, and its
address as shown to the user (without a password).

MLflow retries each request for minutes by default (docs/reuse.md). A request that has spent its
retries says the server is gone; the runs a command still has open are then ended with one try
each (`single_tries`), so that the command does not wait as long again for every run it ends."""

import os
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import mlflow
import requests
from mlflow.environment_variables import (
    MLFLOW_HTTP_REQUEST_MAX_RETRIES,
    MLFLOW_HTTP_REQUEST_TIMEOUT,
)
from mlflow.exceptions import MlflowException

# Seconds to wait for an answer from a server already met gone, or suspected gone.
ANSWER_TIMEOUT_S = 5
LOST = (requests.ConnectionError, requests.Timeout)


def unreachable_server(err: BaseException) -> str | None:
    """A one-line message if `err` is MLflow failing to reach its tracking server (refused,
    timed out, unknown host, once its retries are spent), or an error raised on such a failure
    (a stage's "run not found"); else None. An MLflow error that kept no cause (the summary of
    failed artifact downloads) counts when the server does not answer now."""
    chain = list(_chain(err))
    met_by_mlflow = next((i for i, c in enumerate(chain) if isinstance(c, MlflowException)), None)
    if met_by_mlflow is None and isinstance(err, requests.RequestException):
        met_by_mlflow = 0  # a request MLflow made whose error it let through
    if met_by_mlflow is None:
        return None
    # A lost connection counts below MLflow's error only: a model hub's is no tracking server's.
    if not any(isinstance(cause, LOST) for cause in chain[met_by_mlflow:]):
        failure = chain[met_by_mlflow]
        # A server that answered gave its own code; only an error without one may be a loss.
        if getattr(failure, "error_code", "INTERNAL_ERROR") != "INTERNAL_ERROR":
            return None
        silence = _silence(mlflow.get_tracking_uri())
        if silence is None:
            return None
        chain = list(_chain(silence))
    # The socket's own words ("[Errno 111] Connection refused"), not urllib3's retry story.
    sockets = [
        c for c in chain if isinstance(c, OSError) and not isinstance(c, requests.RequestException)
    ]
    reason = str(sockets[0] if sockets else err).splitlines()[0]
    return f"tracking server {without_password(mlflow.get_tracking_uri())} unreachable: {reason}"


def _silence(uri: str) -> requests.RequestException | None:
    """The error of one plain request to an HTTP tracking server that does not answer; None if
    it answers (whatever it says) or is no HTTP server."""
    if urlsplit(uri).scheme not in ("http", "https"):
        return None
    try:
        requests.head(uri, timeout=ANSWER_TIMEOUT_S, allow_redirects=False).close()
    except LOST as err:
        return err
    return None


def _chain(err: BaseException | None) -> Iterator[BaseException]:
    """`err` and what it was raised from or while handling, down to the first cause."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


@contextmanager
def single_tries() -> Iterator[None]:
    """While the block runs, MLflow makes each request once and waits at most ANSWER_TIMEOUT_S
    for its answer: for telling a server met gone that the runs have ended."""
    saved = {
        variable.name: os.environ.get(variable.name)
        for variable in (MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT)
    }
    MLFLOW_HTTP_REQUEST_MAX_RETRIES.set(0)
    MLFLOW_HTTP_REQUEST_TIMEOUT.set(min(MLFLOW_HTTP_REQUEST_TIMEOUT.get(), ANSWER_TIMEOUT_S))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def without_password(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
