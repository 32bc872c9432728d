"""Access to a tracking server that asks who you are: MLflow's basic-auth app (or an
authenticating proxy in front of `mlflow server`) answers 401 to a request without valid
credentials, and 403 to one the user may not make (writing to an experiment where the user has
only READ, such as another user's or the Default one).

Without a check, a stage command would meet the 401 at its first request and end in a traceback.
`require_tracking_access` asks the server before the command does anything; `refused_access`
turns a refusal met later (the 403 of opening a run) into one line."""

from urllib.parse import urlparse

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import read_mlflow_creds

from skindiff.errors import SkindiffError
from skindiff.tracking.server import without_password

CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def require_tracking_access() -> None:
    """Raises a one-line SkindiffError unless the tracking server accepts the user's credentials
    (a cheap authenticated request); a local store has none to check."""
    if urlparse(mlflow.get_tracking_uri()).scheme not in ("http", "https"):
        return
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except MlflowException as err:
        refusal = refused_access(err)
        if refusal is None:
            raise
        raise SkindiffError(refusal) from None


def refused_access(err: BaseException) -> str | None:
    """A one-line message if `err` is the tracking server refusing the user (HTTP 401 or 403):
    whose credentials, and what to do; else None."""
    if not isinstance(err, MlflowException):
        return None
    status = err.get_http_status_code()
    server = f"tracking server {without_password(mlflow.get_tracking_uri())}"
    user = read_mlflow_creds().username  # the environment, else ~/.mlflow/credentials
    if status == 401 and not user:
        return f"{server} needs credentials: set {CREDENTIALS}"
    if status == 401:
        return f"{server} refused the credentials of user {user!r} ({CREDENTIALS})"
    if status == 403:
        return (
            f"{server} denied user {user!r} permission: log to an experiment of your own "
            "(--experiment-name NAME creates it) or ask the server's admin for EDIT on this one"
        )
    return None
