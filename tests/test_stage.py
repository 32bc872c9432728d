"""The stage protocol: keys scoped to the code a stage runs; find-or-run with one resolve."""

import shutil
from pathlib import Path

import mlflow
import pytest

from conftest import fast_configs, runs_by_stage
from skindiff.classify.config import ClassifierConfig
from skindiff.tracking import runs as tracking_runs
from skindiff.tracking.names import RUN_KEY_TAG, Stage, upstream_tag
from skindiff.tracking.prepare import run_prepare
from skindiff.tracking.stage import (
    PACKAGE_ROOT,
    STAGE_CODE,
    StageCall,
    StageInputs,
    code_version,
    run_stage,
)
from skindiff.tracking.train_classifier import run_train_classifier


def edited_copy(tmp_path: Path, relative: str) -> Path:
    """A copy of the installed package with one source file changed (a comment added)."""
    root = tmp_path / "skindiff"
    shutil.copytree(PACKAGE_ROOT, root, ignore=shutil.ignore_patterns("__pycache__"))
    with (root / relative).open("a") as source:
        source.write("\n# an edit\n")
    return root


def versions(root: Path) -> dict[Stage, str]:
    return {stage: code_version(packages, root) for stage, packages in STAGE_CODE.items()}


def test_a_code_edit_changes_the_keys_of_the_stages_that_run_that_code(tmp_path: Path) -> None:
    installed = versions(PACKAGE_ROOT)
    generator_edit = versions(edited_copy(tmp_path / "a", "diffusion/generate.py"))
    changed = {stage for stage in installed if generator_edit[stage] != installed[stage]}
    # A classifier trained on real images does not depend on the generator's code.
    assert changed == {Stage.TEXTUAL_INVERSION, Stage.LORA, Stage.GENERATE}

    classifier_edit = versions(edited_copy(tmp_path / "b", "classify/train.py"))
    changed = {stage for stage in installed if classifier_edit[stage] != installed[stage]}
    assert changed == {Stage.TRAIN_CLASSIFIER, Stage.EVALUATE}

    ground_floor_edit = versions(edited_copy(tmp_path / "c", "core/files.py"))
    assert all(ground_floor_edit[stage] != installed[stage] for stage in installed)

    cli_edit = versions(edited_copy(tmp_path / "d", "cli.py"))
    assert cli_edit == installed


def test_reuse_resolves_once_and_finds_the_finished_run(tracking: str) -> None:
    data = fast_configs()[0]
    first = run_prepare(data, reuse=True)
    assert run_prepare(data, reuse=True) == first  # found, not run again
    assert len(runs_by_stage(tracking)["prepare"]) == 1
    assert run_prepare(data) != first  # a command always opens its run

    downloads = []
    download = tracking_runs.download_run_dir
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            tracking_runs,
            "download_run_dir",
            lambda run_id, path, dst: downloads.append(path) or download(run_id, path, dst),
        )
        config = ClassifierConfig(epochs=1, batch_size=16, image_size=32)
        _, ti, lora, generate = fast_configs()
        classifier = run_train_classifier(data, config, ti, lora, generate, first, reuse=True)
        # The splits are read once for the key and the training alike.
        assert sorted(downloads) == ["splits/test.csv", "splits/train.csv", "splits/val.csv"]
        downloads.clear()
        again = run_train_classifier(data, config, ti, lora, generate, first, reuse=True)
    assert again == classifier
    assert sorted(downloads) == ["splits/test.csv", "splits/train.csv", "splits/val.csv"]
    tags = mlflow.get_run(classifier).data.tags
    assert tags[upstream_tag(Stage.PREPARE)] == first
    assert tags[upstream_tag(Stage.GENERATE)] == ""  # real images only
    assert len(tags[RUN_KEY_TAG]) == 24


def test_a_failing_stage_run_ends_failed_with_its_key(tracking: str) -> None:
    call = StageCall(Stage.PREPARE, "broken", {"seed": "0"})

    def work(inputs: StageInputs, key: str) -> None:
        raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run_stage(call, lambda: StageInputs(digests={"source": "x"}), work, reuse=True)
    (failed,) = runs_by_stage(tracking)["prepare"]
    assert failed.info.status == "FAILED"
    assert failed.data.params == {"seed": "0"}
    # A failed run is never re-used: the same call runs the work again.
    with pytest.raises(RuntimeError):
        run_stage(call, lambda: StageInputs(digests={"source": "x"}), work, reuse=True)
    assert len(runs_by_stage(tracking)["prepare"]) == 2
