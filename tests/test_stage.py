"""The stage protocol: keys scoped to the code a stage runs; find-or-run with one resolve, and
with a process already at work on the key, wait for its run."""

import logging
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest

from conftest import fast_configs, runs_by_stage
from skindiff.classify.config import ClassifierConfig
from skindiff.tracking import runs as tracking_runs
from skindiff.tracking.names import (
    HOST_TAG,
    PARENT_RUN_TAG,
    PID_TAG,
    RUN_KEY_TAG,
    SUPERSEDED_BY_TAG,
    Stage,
    upstream_tag,
)
from skindiff.tracking.prepare import run_prepare
from skindiff.tracking.stage import (
    PACKAGE_ROOT,
    STAGE_CODE,
    StageCall,
    StageInputs,
    _standard_tags,
    code_version,
    duration_text,
    process_tags,
    run_stage,
    stage_key,
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
    # synthetic_quality's features may be a classifier's
    assert changed == {Stage.TRAIN_CLASSIFIER, Stage.EVALUATE, Stage.SYNTHETIC_QUALITY}

    quality_edit = versions(edited_copy(tmp_path / "e", "quality/measures.py"))
    changed = {stage for stage in installed if quality_edit[stage] != installed[stage]}
    assert changed == {Stage.SYNTHETIC_QUALITY}

    ground_floor_edit = versions(edited_copy(tmp_path / "c", "core/files.py"))
    assert all(ground_floor_edit[stage] != installed[stage] for stage in installed)

    cli_edit = versions(edited_copy(tmp_path / "d", "cli.py"))
    assert cli_edit == installed


def test_a_stage_tags_the_upstream_runs_it_declares_and_no_other() -> None:
    inputs = StageInputs(prepare_run_id="p", upstream={Stage.TEXTUAL_INVERSION: None})
    assert _standard_tags(Stage.LORA, "k", inputs) == {
        RUN_KEY_TAG: "k",
        upstream_tag(Stage.PREPARE): "p",
        upstream_tag(Stage.TEXTUAL_INVERSION): "",  # declared, and this mode used none
    }
    with pytest.raises(ValueError, match=r"^textual_inversion declares no upstream lora$"):
        _standard_tags(Stage.TEXTUAL_INVERSION, "k", StageInputs("p", upstream={Stage.LORA: "x"}))


def test_no_module_but_the_stage_protocol_searches_runs_or_reads_their_links() -> None:
    owners = {PACKAGE_ROOT / "tracking" / "stage.py", PACKAGE_ROOT / "tracking" / "names.py"}
    for path in sorted(set(PACKAGE_ROOT.rglob("*.py")) - owners):
        text = path.read_text()
        for lookup in ("search_runs", "PARENT_RUN_TAG", "RUN_KEY_TAG", "upstream_tag("):
            assert lookup not in text, f"{path.relative_to(PACKAGE_ROOT)} uses {lookup}"


@pytest.mark.parametrize(
    ("stage", "run_name", "label"),
    [
        (Stage.LORA, "ii/seed-42/lora", "[ii/seed-42] lora"),
        (Stage.TRAIN_CLASSIFIER, "i/seed-0/tiny/real", "[i/seed-0] train_classifier tiny/real"),
        (Stage.GENERATE, "i/seed-0/generate/txt2img/ti", "[i/seed-0] generate txt2img/ti"),
        (Stage.EVALUATE, "evaluate/test", "evaluate test"),
    ],
)
def test_the_console_names_a_stage_by_its_pair(stage: Stage, run_name: str, label: str) -> None:
    assert StageCall(stage, run_name, {}).console_label() == label


def test_durations_read_as_a_person_says_them() -> None:
    assert [duration_text(s) for s in (0.4, 38, 252, 3725)] == [
        "0 s",
        "38 s",
        "4 min 12 s",
        "1 h 02 min",
    ]


def test_reuse_resolves_once_and_finds_the_finished_run(
    tracking: str, caplog: pytest.LogCaptureFixture
) -> None:
    data = fast_configs()[0]
    with caplog.at_level(logging.INFO, logger="skindiff.progress"):
        first = run_prepare(data, reuse=True)
        assert run_prepare(data, reuse=True) == first  # found, not run again
    label = f"[{data.scenario}/seed-{data.seed}] prepare"
    started, done, reused = [
        r.getMessage() for r in caplog.records if r.name == "skindiff.progress"
    ]
    assert started == f"{label}: running..."
    assert re.fullmatch(rf"{re.escape(label)}: done in [0-9]+ s, run {first}", done), done
    assert reused == f"{label}: re-used run {first}"
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


# A stage run nested under a command's run, whose work says "working" and then SIGKILLs its
# process while it holds the key's work folder.
STAGE_PROCESS = """
import os, signal
from skindiff.tracking.names import Stage
from skindiff.tracking.stage import StageCall, StageInputs, open_stage_run, run_stage

def work(inputs, key):
    print("working", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

with open_stage_run(Stage.MAIN, "command", {}):
    call = StageCall(Stage.PREPARE, "worker", {"seed": "0"})
    run_stage(call, lambda: StageInputs(digests={"source": "x"}), work, reuse=True)
"""


@pytest.mark.slow  # a subprocess, killed
def test_a_rerun_ends_the_runs_of_a_dead_process_of_its_key_and_no_other(tracking: str) -> None:
    call = StageCall(Stage.PREPARE, "worker", {"seed": "0"})
    inputs = StageInputs(digests={"source": "x"})
    process = subprocess.Popen(
        [sys.executable, "-c", STAGE_PROCESS], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "working\n"
    assert process.wait(timeout=60) == -signal.SIGKILL
    (dead,) = runs_by_stage(tracking)["prepare"]
    key = stage_key(call, inputs)
    client = mlflow.MlflowClient()
    # A live process at work on the key (here: this one), and one of another machine with the
    # dead process's pid: either may be at work, so neither may be ended.
    live = client.create_run(tracking, tags={RUN_KEY_TAG: key, **process_tags()})
    elsewhere = client.create_run(
        tracking,
        tags={RUN_KEY_TAG: key, HOST_TAG: "another-machine", PID_TAG: str(process.pid)},
    )

    rerun = run_stage(call, lambda: inputs, lambda inputs, key: None, reuse=True)

    status = {run.info.run_id: run for run in mlflow.search_runs([tracking], output_format="list")}
    assert status[rerun].info.status == "FINISHED"
    for run in (dead, status[dead.data.tags[PARENT_RUN_TAG]]):
        ended = status[run.info.run_id]
        assert ended.info.status == "FAILED"
        assert ended.data.tags[SUPERSEDED_BY_TAG] == rerun
    for run in (live, elsewhere):
        left = status[run.info.run_id]
        assert left.info.status == "RUNNING" and SUPERSEDED_BY_TAG not in left.data.tags


# A pipeline's stage run that says "working" and then holds its key's work folder until its
# stdin is closed.
WORKING_PROCESS = """
import sys
from skindiff.tracking.names import Stage
from skindiff.tracking.stage import StageCall, StageInputs, run_stage

def work(inputs, key):
    print("working", flush=True)
    sys.stdin.read()

call = StageCall(Stage.PREPARE, "first", {"seed": "1"})
run_stage(call, lambda: StageInputs(digests={"source": "x"}), work, reuse=True)
"""


class OnRecord(logging.Handler):
    """Calls `action` for every record it is given."""

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__()
        self.action = action

    def emit(self, record: logging.LogRecord) -> None:
        self.action()


@pytest.mark.slow  # a subprocess
def test_a_stage_at_work_in_another_process_is_waited_for_and_its_run_used(tracking: str) -> None:
    first = subprocess.Popen(
        [sys.executable, "-c", WORKING_PROCESS],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert first.stdout.readline() == "working\n"
    # The first process finishes once this one says it waits for the work folder.
    release = OnRecord(first.stdin.close)
    logging.getLogger("skindiff.core.files").addHandler(release)
    worked = []
    try:
        call = StageCall(Stage.PREPARE, "second", {"seed": "1"})
        inputs = StageInputs(digests={"source": "x"})
        found = run_stage(call, lambda: inputs, lambda inputs, key: worked.append(key), reuse=True)
    finally:
        logging.getLogger("skindiff.core.files").removeHandler(release)
        first.stdin.close()
    assert first.wait(timeout=60) == 0
    (run,) = runs_by_stage(tracking)["prepare"]
    assert (run.info.run_name, run.info.status) == ("first", "FINISHED")
    assert found == run.info.run_id and worked == []
