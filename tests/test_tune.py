"""`tune`: workers sharing an Optuna study, heartbeat recovery, pruning, the frozen params,
the protocols (scenario ii's and iii's test images left out by default, or the paper's)."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import pytest
import yaml
from optuna.trial import TrialState

from conftest import CONDITIONS, FAST, REPO, fast_configs
from skindiff.classify.train import ClassifierConfig
from skindiff.cli import COMMAND_OPTIONS
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.errors import SkindiffError
from skindiff.options import GENERATE, LORA, TEXTUAL_INVERSION, StudyConfigs, as_text
from skindiff.plans import StudyPlan
from skindiff.search_space import load_search_space
from skindiff.tracking.names import TUNE_PROTOCOL_TAG, Stage, split_artifact, upstream_tag
from skindiff.tracking.pipeline import load_frozen_params, load_frozen_source, run_main
from skindiff.tracking.tune import (
    CLASSIFIER_RUN_ATTR,
    INFEASIBLE_ATTR,
    PRUNER_STARTUP_TRIALS,
    TRIAL_RUN_ATTR,
    TRIAL_TAG,
    TuneConfig,
    run_tune,
    seed_study_name,
)

# Every tuned option of the built-in space, with ranges of a few steps.
TINY_SPACE = {
    "ti_learning_rate": {"low": 1e-4, "high": 1e-3, "log": True},
    "ti_max_train_steps": {"low": 1, "high": 2},
    "lora_rank": {"choices": [2, 4]},
    "lora_learning_rate": {"low": 1e-6, "high": 1e-4, "log": True},
    "lora_max_train_steps": {"low": 1, "high": 2},
    "strength": {"low": 0.3, "high": 0.7},
    "guidance_scale": {"low": 1.0, "high": 3.0},
    "num_inference_steps": {"low": 4, "high": 6},  # >= 1 denoising step at strength 0.3
}
SMALL = FAST | {"num_per_image": "1", "epochs": "2", "batch_size": "32", "image_size": "32"}


@pytest.fixture()
def warm_cache(demo_dataset) -> None:
    """The demo data and tiny model made once here, not by every worker at the same time."""
    from skindiff.diffusion.base_model import resolve_base_model

    resolve_base_model("tiny")


def write_space(folder: Path, space: dict) -> str:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def start_worker(tmp_path: Path, storage: str, **options: str) -> subprocess.Popen:
    """`python entrypoints/tune.py ...` as MLproject runs it, logging to the test's server."""
    args = [sys.executable, str(REPO / "entrypoints" / "tune.py")]
    settings = SMALL | {"storage": storage, "n_trials": "1"} | options
    for name, value in settings.items():
        args += [f"--{name.replace('_', '-')}", value]
    return subprocess.Popen(
        args, cwd=tmp_path, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def in_process_configs() -> StudyConfigs:
    data, ti, lora, generate = fast_configs()
    classifier = ClassifierConfig(epochs=2, batch_size=32, image_size=32)
    return StudyConfigs(data, ti, lora, replace(generate, num_per_image=1), classifier)


def runs_of(experiment_id: str) -> list:
    return mlflow.search_runs([experiment_id], output_format="list")


def logged_split(prepare_run_id: str, split: str, dst: Path) -> set[str]:
    """The md5hashes of a split a prepare run logged."""
    path = mlflow.artifacts.download_artifacts(
        run_id=prepare_run_id, artifact_path=split_artifact(split), dst_path=str(dst)
    )
    return set(pd.read_csv(path, dtype={"md5hash": str})["md5hash"])


def test_tune_alone_leaves_out_test_images_by_default() -> None:
    defaults = {name: {o.name: o.default for o in opts} for name, opts in COMMAND_OPTIONS.items()}
    assert as_text(defaults["tune"]["exclude_test_of"]) == "ii,iii"
    assert as_text(defaults["prepare"]["exclude_test_of"]) == ""
    assert "exclude_test_of" not in defaults["main"] | defaults["ablation"]


def test_a_study_is_scored_by_one_protocol(tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="skindiff-tune", storage=storage, direction="maximize")
    study.add_trial(  # a trial of a worker older than exclude_test_of: the paper's protocol
        optuna.trial.create_trial(
            params={"strength": 0.5},
            distributions={"strength": optuna.distributions.FloatDistribution(0.4, 0.6)},
            value=0.5,
        )
    )
    configs = in_process_configs()
    excluding = replace(configs, data=replace(configs.data, exclude_test_of=("ii", "iii")))
    config = TuneConfig(n_trials=1, storage=storage, registered_model="")
    with pytest.raises(SkindiffError, match="by protocol paper, this worker by exclude-test-of"):
        run_tune(excluding, config)
    assert len(study.trials) == 1


def test_two_workers_share_one_study(tracking: str, warm_cache, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = write_space(tmp_path, TINY_SPACE)
    workers = [
        start_worker(tmp_path, storage, search_space=space, registered_model="") for _ in range(2)
    ]
    for worker in workers:
        output = worker.communicate(timeout=300)[0].decode()
        assert worker.returncode == 0, output[-3000:]

    study = optuna.load_study(study_name="skindiff-tune", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    runs = runs_of(tracking)
    tune_runs = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "tune"]
    worker_runs = {r.info.run_id: r for r in tune_runs if TRIAL_TAG not in r.data.tags}
    assert len(worker_runs) == 2
    assert {r.info.status for r in worker_runs.values()} == {"FINISHED"}
    for run in worker_runs.values():  # the CLI's default protocol
        assert run.data.tags[TUNE_PROTOCOL_TAG] == "exclude-test-of-ii,iii"
        assert run.data.params["exclude_test_of"] == "ii,iii"
        assert run.data.params["objective"] == "test_f1_macro"
    paper = {
        s: prepare_scenario(PrepareConfig(scenario=s, conditions=CONDITIONS)).splits
        for s in ("i", "ii")
    }
    test_of_ii = set(paper["ii"].test["md5hash"])
    for trial in study.trials:
        run = mlflow.get_run(trial.user_attrs[TRIAL_RUN_ATTR])
        assert run.data.tags[TRIAL_TAG] == str(trial.number)
        assert run.data.params == {name: as_text(v) for name, v in trial.params.items()}
        assert run.data.metrics == {"test_f1_macro": pytest.approx(trial.value)}
        classifier = mlflow.get_run(trial.user_attrs[CLASSIFIER_RUN_ATTR])
        assert classifier.data.metrics["test_f1_macro"] == pytest.approx(trial.value)
        # Its prepare run: none of scenario ii's test images trained or validated on.
        prepare = classifier.data.tags[upstream_tag(Stage.PREPARE)]
        dst = tmp_path / "splits" / str(trial.number)
        trained = logged_split(prepare, "train", dst) | logged_split(prepare, "val", dst)
        assert trained and test_of_ii and not trained & test_of_ii
        assert logged_split(prepare, "test", dst) == set(paper["i"].test["md5hash"])
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
        stages = {r.data.tags["mlflow.project.entryPoint"] for r in children}
        assert {"textual_inversion", "lora", "generate", "train_classifier"} <= stages
    # One trial each: the two trials are nested under the two workers.
    parents = {
        mlflow.get_run(t.user_attrs[TRIAL_RUN_ATTR]).data.tags["mlflow.parentRunId"]
        for t in study.trials
    }
    assert parents == set(worker_runs)

    for run in worker_runs.values():
        # A worker freezes the best trial it saw when it ended.
        seen = study.trials[int(run.data.tags["skindiff.best_trial"])]
        local = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id,
            artifact_path="frozen_params.yaml",
            dst_path=str(tmp_path / run.info.run_id),
        )
        frozen = yaml.safe_load(Path(local).read_text())
        assert frozen == {name: as_text(v) for name, v in seen.params.items()}
        assert {
            f"skindiff.frozen.{n}": v for n, v in frozen.items()
        }.items() <= run.data.tags.items()
    last = max(worker_runs.values(), key=lambda r: r.info.end_time)
    assert last.data.tags["skindiff.best_trial"] == str(study.best_trial.number)

    # Scenario ii takes the frozen params of the tune run unchanged: its stage runs log them.
    plan = StudyPlan(["ii"], [0], ["tiny"], ["syn"], last.info.run_id)
    runs = run_main(plan, in_process_configs())
    ids = runs[("ii", 0)]
    used = {}
    for run_id in (ids.textual_inversion, ids.lora, ids.generate):
        used |= mlflow.get_run(run_id).data.params
    assert {name: used[name] for name in study.best_params} == {
        name: as_text(value) for name, value in study.best_params.items()
    }


def test_a_killed_workers_trial_is_failed_and_retried(
    tracking: str, warm_cache, tmp_path: Path
) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = write_space(tmp_path, TINY_SPACE)
    heartbeat = {"heartbeat_interval": 1, "grace_period": 2}
    # Made here, so that polling it never races the worker creating it.
    study = optuna.create_study(study_name="skindiff-tune", storage=storage, direction="maximize")
    worker = start_worker(  # the paper's protocol, as in_process_configs
        tmp_path,
        storage,
        search_space=space,
        registered_model="",
        exclude_test_of="",
        **{k: str(v) for k, v in heartbeat.items()},
    )
    deadline = time.monotonic() + 120
    while True:  # kill it once its trial has an MLflow run, that is mid-trial
        assert worker.poll() is None, worker.communicate()[0].decode()[-3000:]
        assert time.monotonic() < deadline
        trials = study.trials
        if trials and TRIAL_RUN_ATTR in trials[0].user_attrs:
            break
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    dead = trials[0]
    assert dead.state == TrialState.RUNNING
    time.sleep(heartbeat["grace_period"] + 1)

    model = f"tune-test-{time.time_ns()}"  # the best generator is registered here
    config = TuneConfig(
        n_trials=1, storage=storage, search_space=space, registered_model=model, **heartbeat
    )
    result = run_tune(in_process_configs(), config)

    failed, retried = study.trials
    assert failed.state == TrialState.FAIL
    assert retried.state == TrialState.COMPLETE and retried.params == dead.params
    assert retried.system_attrs["failed_trial"] == dead.number
    assert result.best_trial == retried.number
    dead_run = mlflow.get_run(dead.user_attrs[TRIAL_RUN_ATTR])
    assert dead_run.info.status == "FAILED"
    assert mlflow.get_run(dead_run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"
    assert [r.info.run_name for r in runs_of(tracking) if r.info.status == "RUNNING"] == []
    champion = mlflow.MlflowClient().get_model_version_by_alias(model, "champion")
    assert champion.version == result.registered_version and result.champion
    assert float(champion.tags["value"]) == pytest.approx(retried.value)
    # The paper's protocol is scored on validation, and says so.
    assert result.objective == champion.tags["objective"] == "val_f1_macro"
    assert mlflow.get_run(result.run_id).data.tags[TUNE_PROTOCOL_TAG] == "paper"
    for run_id in (retried.user_attrs[TRIAL_RUN_ATTR], retried.user_attrs[CLASSIFIER_RUN_ATTR]):
        assert mlflow.get_run(run_id).data.metrics["val_f1_macro"] == pytest.approx(retried.value)
    # `main --frozen-params models:/<name>@champion` reads what the tune run froze.
    assert load_frozen_params(f"models:/{model}@champion") == result.frozen_params
    assert load_frozen_params(result.run_id) == result.frozen_params
    # ... and the data seed it was tuned on: the version's tag, the run that logged the model.
    tuned = load_frozen_source(f"models:/{model}@champion").shared
    assert champion.tags["tune_seed"] == "0" == str(tuned.seed)
    assert tuned.tune_run.info.run_id == result.run_id


def test_a_trial_below_the_median_is_pruned(tracking: str, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = {"strength": {"low": 0.4, "high": 0.6}}
    study = optuna.create_study(study_name="skindiff-tune", storage=storage, direction="maximize")
    for _ in range(PRUNER_STARTUP_TRIALS):
        # Earlier trials better than any real one can be (F1 <= 1): the next is pruned at epoch 1.
        study.add_trial(
            optuna.trial.create_trial(
                params={"strength": 0.5},
                distributions={"strength": optuna.distributions.FloatDistribution(0.4, 0.6)},
                value=2.0,
                intermediate_values={1: 2.0, 2: 2.0},
            )
        )
    config = TuneConfig(
        n_trials=1, storage=storage, search_space=write_space(tmp_path, space), registered_model=""
    )
    result = run_tune(in_process_configs(), config)

    pruned = study.trials[-1]
    assert pruned.state == TrialState.PRUNED and list(pruned.intermediate_values) == [1]
    trial_run = mlflow.get_run(pruned.user_attrs[TRIAL_RUN_ATTR])
    assert trial_run.info.status == "KILLED"
    children = [
        r
        for r in runs_of(tracking)
        if r.data.tags.get("mlflow.parentRunId") == trial_run.info.run_id
    ]
    statuses = {r.data.tags["mlflow.project.entryPoint"]: r.info.status for r in children}
    assert statuses["train_classifier"] == "KILLED" and statuses["generate"] == "FINISHED"
    assert mlflow.get_run(result.run_id).info.status == "FINISHED"
    assert result.frozen_params == {"strength": "0.5"}


def test_an_infeasible_trial_fails_and_the_study_goes_on(tracking: str, tmp_path: Path) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = write_space(tmp_path, {"strength": {"low": 0.01, "high": 0.02}})  # x 4 steps < 1
    config = TuneConfig(n_trials=2, storage=storage, search_space=space, registered_model="")
    with pytest.raises(SkindiffError, match="has no completed trial"):
        run_tune(in_process_configs(), config)
    trials = optuna.load_study(study_name="skindiff-tune", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.FAIL] * 2
    assert "denoising step" in trials[0].user_attrs[INFEASIBLE_ATTR]
    (worker,) = runs_of(tracking)
    assert worker.info.status == "FAILED"


def test_builtin_space_is_centred_on_the_reference_values() -> None:
    space = load_search_space("")
    assert {d.name for d in space} >= set(TINY_SPACE)
    defaults = {o.name: o.default for g in (TEXTUAL_INVERSION, LORA, GENERATE) for o in g.options()}
    for dimension in space:
        reference = defaults[dimension.name]
        if dimension.choices:
            assert reference in dimension.choices, dimension.name
        else:
            assert dimension.low < reference < dimension.high, dimension.name


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"ti_learnin_rate": {"low": 1, "high": 2}}, "ti_learnin_rate: not a tunable option"),
        ({"strength": {"low": 0.7, "high": 0.3}}, "strength: low must be below high"),
        (
            {"lora_learning_rate": {"low": 0, "high": 1e-4, "log": True}},
            "a log range needs low > 0",
        ),
        ({"lora_rank": {"low": 2.5, "high": 8}}, "lora_rank: low must be an integer"),
        ({"guidance_scale": {"min": 1, "max": 3}}, "guidance_scale: unknown key 'max'"),
        ({"lora_rank": {"choices": []}}, "lora_rank: choices must be a non-empty list"),
    ],
)
def test_a_bad_search_space_names_the_file_and_key(
    tmp_path: Path, entry: dict, message: str
) -> None:
    path = write_space(tmp_path, entry)
    with pytest.raises(SkindiffError, match=f"search_space {path}: .*") as error:
        load_search_space(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_seeds_are_one_study_each_and_unset_by_default(tmp_path: Path) -> None:
    """`tune` alone tunes on --seed as before; --seeds lists distinct seeds, and a worker
    (run_tune) is one study: a config with seeds goes to run_tune_seeds."""
    defaults = {o.name: o.default for o in COMMAND_OPTIONS["tune"]}
    assert defaults["seeds"] == () and defaults["seed"] == 0
    with pytest.raises(SkindiffError, match="seeds: listed twice in 0,42,0"):
        TuneConfig(seeds=(0, 42, 0))
    config = TuneConfig(seeds=(0, 42), storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    with pytest.raises(SkindiffError, match="use run_tune_seeds"):
        run_tune(in_process_configs(), config)
    assert seed_study_name(config, 42) == "skindiff-tune-seed-42"
    assert not (tmp_path / "optuna.db").exists()
