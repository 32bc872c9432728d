"""Bad paths and seeds on the command line: one line naming the option (and the path), exit
code 2, before any work: no tracking store touched, nothing written in the user's folders."""

import os
from pathlib import Path

import pytest

from conftest import cohort_rows, write_dataset
from skindiff.cli import run
from skindiff.data.config import PrepareConfig
from skindiff.data.prepare import DatasetSource, prepare_scenario, source_fingerprint
from skindiff.errors import DataValidationError


@pytest.fixture()
def user_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A real dataset in the working folder, where a run opened by mistake would create its
    tracking store."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return write_dataset(tmp_path / "data", cohort_rows(per_cell=2))


def refused(args: list[str], folder: Path, capsys: pytest.CaptureFixture) -> str:
    """The one-line error of `skindiff <args>`, checking exit code 2 and that nothing under
    `folder` changed."""
    before = sorted(folder.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        run(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert sorted(folder.rglob("*")) == before
    return err


@pytest.mark.parametrize(
    ("option", "where", "problem"),
    [
        ("image_dir", "absent", "no such folder"),
        ("metadata_csv", "absent.csv", "no such file"),
        ("image_dir", "data/metadata.csv", "is not a folder"),
        ("metadata_csv", "data/images", "is not a file"),
    ],
)
def test_missing_or_wrong_path_is_one_line(
    user_data: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    option: str,
    where: str,
    problem: str,
) -> None:
    csv, images = user_data
    paths = {"metadata_csv": str(csv), "image_dir": str(images), option: str(tmp_path / where)}
    args = ["prepare"] + [f"--{name.replace('_', '-')}={path}" for name, path in paths.items()]
    err = refused(args, tmp_path, capsys)
    assert err == f"error: {option}: {problem}: {tmp_path / where}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
@pytest.mark.parametrize("option", ["metadata_csv", "image_dir"])
def test_unreadable_path_is_one_line(
    user_data: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, option: str
) -> None:
    csv, images = user_data
    locked = csv if option == "metadata_csv" else images
    locked.chmod(0)
    try:
        err = refused(
            ["prepare", f"--metadata-csv={csv}", f"--image-dir={images}"], tmp_path, capsys
        )
    finally:
        locked.chmod(0o755)
    assert err == f"error: {option}: cannot be read: {locked}"


def test_a_pipe_is_not_a_metadata_file(tmp_path: Path) -> None:
    # Reading a named pipe would wait forever for a writer.
    pipe = tmp_path / "metadata.csv"
    os.mkfifo(pipe)
    with pytest.raises(DataValidationError, match=rf"^metadata_csv: is not a file: {pipe}$"):
        PrepareConfig(metadata_csv=str(pipe), image_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prepare", "--seed=-1"], "seed must be an integer from 0 to 4294967295, got -1"),
        # The flexible subsets are drawn with pandas' random_state: seeds below 2**32.
        (["prepare", "--seed=4294967296"], "from 0 to 4294967295, got 4294967296"),
        (["train_classifier", "--seed=4294967296"], "from 0 to 4294967295, got 4294967296"),
        (["main", "--seeds=0,-1"], "seeds must be an integer from 0 to 4294967295, got -1"),
        (["main", "--seeds=0,4294967296"], "seeds must be an integer from 0 to 4294967295"),
        (["pretrain-base", "--seed=18446744073709551616"], "from 0 to 4294967295"),
    ],
)
def test_out_of_range_seed_is_refused_before_any_work(
    user_data: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    args: list[str],
    message: str,
) -> None:
    assert message in refused(args, tmp_path, capsys)


def test_dangling_link_in_image_folder_is_a_missing_image(tmp_path: Path) -> None:
    rows = cohort_rows(per_cell=2)
    csv, images = write_dataset(tmp_path, rows)
    moved = tmp_path / "elsewhere.jpg"
    linked = images / f"{rows[0]['md5hash']}.jpg"
    linked.rename(moved)
    linked.symlink_to(tmp_path / "gone.jpg")
    source = DatasetSource(csv, images, is_demo=False)
    dangling = source_fingerprint(source)
    (tmp_path / "gone.jpg").write_bytes(moved.read_bytes())
    assert source_fingerprint(source) != dangling  # the link is followed once it resolves
    (tmp_path / "gone.jpg").unlink()
    config = PrepareConfig(
        metadata_csv=str(csv),
        image_dir=str(images),
        conditions=("a", "b"),
        flexible_per_condition=1,
    )
    with pytest.raises(DataValidationError, match=r"1 missing \(gone\.jpg; line 2\)"):
        prepare_scenario(config)
