"""A team's tracking server: MLflow's basic-auth app. A stage runs with the credentials of the
environment; without valid ones, or without permission on the experiment, it stops in one line
before any work."""

import secrets
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.server import get_app_client

from conftest import cohort_rows, write_dataset
from servers import logging_to, mlflow_server
from skindiff.cli import run
from skindiff.errors import SkindiffError
from skindiff.tracking.access import require_tracking_access

pytestmark = pytest.mark.slow  # a tracking server of its own

USER, PASSWORD = "alice", "alice-password-1"  # the app wants 12 characters or more
CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server --app-name basic-auth` on loopback, its users in a database of their own,
    with one user, made by the admin."""
    root = tmp_path_factory.mktemp("auth-server")
    admin_password = secrets.token_urlsafe(16)
    config = root / "basic_auth.ini"
    config.write_text(
        "[mlflow]\n"
        "default_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\n"
        "admin_username = admin\n"
        f"admin_password = {admin_password}\n"
        # One password hash (~0.5 s) per user and minute, not per request.
        "auth_cache_ttl_seconds = 60\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    store = f"sqlite:///{root / 'mlflow.db'}"
    with mlflow_server(root, store, "--app-name", "basic-auth", env=env) as uri:
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            patch.setenv("MLFLOW_TRACKING_PASSWORD", admin_password)
            get_app_client("basic-auth", tracking_uri=uri).create_user(USER, PASSWORD)
        yield uri


@pytest.fixture()
def as_user(auth_server: str, monkeypatch: pytest.MonkeyPatch, request) -> Iterator[str]:
    """The user's credentials in the environment, and an experiment of theirs (its creator may
    write to it; the others only read it)."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    with logging_to(auth_server, request.node.name) as experiment_id:
        yield experiment_id


def prepare_argv(tmp_path: Path) -> list[str]:
    csv, images = write_dataset(tmp_path / "data", cohort_rows())
    return [
        *("prepare", "--conditions", "a,b", "--flexible-per-condition", "4"),
        *("--metadata-csv", str(csv), "--image-dir", str(images)),
    ]


def run_command(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as done:
        run(argv)
    return done.value.code


def test_a_stage_runs_with_credentials_from_the_environment(as_user: str, tmp_path: Path) -> None:
    require_tracking_access()
    assert run_command(prepare_argv(tmp_path)) == 0
    (prepare,) = mlflow.search_runs([as_user], output_format="list")
    assert prepare.info.status == "FINISHED"
    assert prepare.data.tags["mlflow.project.entryPoint"] == "prepare"


@pytest.mark.parametrize(
    ("password", "refusal"),
    [
        (None, f"needs credentials: set {CREDENTIALS}"),
        ("not-the-password", f"refused the credentials of user '{USER}' ({CREDENTIALS})"),
    ],
    ids=["missing", "wrong-password"],
)
def test_without_valid_credentials_a_stage_stops_before_any_work(
    as_user: str,
    auth_server: str,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys,
    password: str | None,
    refusal: str,
) -> None:
    argv = prepare_argv(tmp_path)
    data = {path: path.stat().st_mtime_ns for path in (tmp_path / "data").rglob("*")}
    if password is None:
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    message = f"tracking server {auth_server} {refusal}"
    with pytest.raises(SkindiffError) as refused:
        require_tracking_access()
    assert str(refused.value) == message

    assert run_command(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "data").rglob("*")} == data
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    assert mlflow.search_runs([as_user], output_format="list") == []


def test_a_user_without_permission_on_the_experiment_stops_in_one_line(
    as_user: str, auth_server: str, tmp_path: Path, capsys
) -> None:
    # The Default experiment is the admin's: other users may read it, not write to it.
    mlflow.set_experiment(experiment_id="0")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_EXPERIMENT_ID", "0")
        assert run_command(prepare_argv(tmp_path)) == 2
    assert capsys.readouterr().err == (
        f"error: tracking server {auth_server} denied user '{USER}' permission: log to an "
        "experiment of your own (--experiment-name NAME creates it) or ask the server's admin "
        "for EDIT on this one\n"
    )
    assert mlflow.search_runs(["0"], output_format="list") == []
