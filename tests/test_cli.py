"""The MLproject file and the CLI agree: same entry points, parameters and defaults."""

import os
import subprocess
import sys

import pytest
import yaml
from typer.main import get_command

from conftest import REPO
from skindiff.cli import ENTRY_POINTS, app, render_mlproject
from skindiff.diffusion.config import GenerationMode
from skindiff.errors import SkindiffError
from skindiff.options import (
    DEMO_PLAN,
    DEMO_STUDY,
    DRY_RUN,
    GENERATE,
    MAIN_STUDY,
    RUNS,
    STUDY,
    TEXTUAL_INVERSION,
    TRACKING,
)


def test_mlproject_is_rendered_from_the_cli() -> None:
    assert (REPO / "MLproject").read_text() == render_mlproject(), (
        "MLproject is stale: run `skindiff mlproject > MLproject`"
    )


def test_every_entry_point_has_a_script_and_all_options() -> None:
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    assert tuple(spec["entry_points"]) == ENTRY_POINTS
    commands = get_command(app).commands
    # `mlflow run` chooses the experiment itself (its --experiment-name): no parameter.
    tracking = {option.name for option in TRACKING.options()}
    dry_run = {option.name for option in DRY_RUN.options()}
    for name, entry in spec["entry_points"].items():
        assert (REPO / "entrypoints" / f"{name}.py").is_file(), name
        params = {p.name: p for p in commands[name].params}
        assert params["experiment_name"].default == "skindiff", name
        assert params["experiment_name"].envvar == "MLFLOW_EXPERIMENT_NAME", name
        # nor for a dry run, which `mlflow run` would open a run for
        assert ("dry_run" in params) == (name in ("main", "demo", "tune", "ablation")), name
        options = set(params) - {"help"} - tracking - dry_run
        assert set(entry["parameters"]) == options, name
        for param in options:
            assert f"--{param.replace('_', '-')} {{{param}}}" in entry["command"], (name, param)


def test_every_option_is_explained() -> None:
    for name, command in get_command(app).commands.items():
        assert (command.help or "").strip(), name
        for param in command.params:
            if param.name != "help":
                assert (getattr(param, "help", None) or "").strip(), (name, param.name)


@pytest.mark.slow  # a fresh interpreter, to see what importing the CLI loads
def test_the_cli_loads_no_torch_diffusers_or_mlflow_until_a_command_runs() -> None:
    probe = (
        "import os, sys; environ = dict(os.environ); "
        "import skindiff.options; "
        "tracking = sorted(m for m in sys.modules if m.startswith('skindiff.tracking')); "
        "import skindiff.cli; "
        "heavy = {'torch', 'diffusers', 'mlflow', 'optuna', 'pandas'} & set(sys.modules); "
        "print(sorted(heavy), tracking, dict(os.environ) == environ)"
    )
    environ = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, env=environ
    )
    assert done.returncode == 0, done.stderr
    heavy, tracking, same_environ = done.stdout.strip().rsplit(" ", 2)
    assert (heavy, tracking) == ("[]", "[]"), done.stdout  # options.py needs no MLflow glue
    # Importing changes nothing: the thread policy is chosen where a command starts.
    assert same_environ == "True"


def test_the_experiment_is_the_option_given_else_mlflows_variable_else_skindiff(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prepare = get_command(app).commands["prepare"]

    def experiment_name(*args: str) -> str:
        return prepare.make_context("prepare", list(args)).params["experiment_name"]

    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert experiment_name() == "skindiff"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "alice")
    assert experiment_name() == "alice"
    assert experiment_name("--experiment-name", "bob") == "bob"
    with pytest.raises(SkindiffError, match=r"^experiment_name is empty$"):
        TRACKING.build({"experiment_name": " "})


def test_the_demo_is_main_with_the_demo_preset_and_every_option_still_open() -> None:
    commands = get_command(app).commands
    demo = {p.name: p.default for p in commands["demo"].params}
    main = {p.name: p.default for p in commands["main"].params}
    assert demo.keys() == main.keys()  # every option of main can be given to the demo
    changed = {name for name in demo if demo[name] != main[name]}
    assert changed == {
        "seeds",
        "archs",
        "ti_max_train_steps",
        "ti_per_token",
        "lora_max_train_steps",
        "lora_learning_rate",
        "num_inference_steps",
        "finetune",
        "epochs",
        "batch_size",
        "image_size",
    }
    assert (demo["seeds"], demo["archs"], demo["epochs"]) == ("0", "tiny", 20)
    # Built from no option, the preset; an option given replaces its value.
    configs = DEMO_STUDY.build({"epochs": "3"})
    assert configs.textual_inversion.max_train_steps == 100
    assert configs.classifier.epochs == 3
    assert configs.data == MAIN_STUDY.build({}).data  # the same data as the paper's study
    assert DEMO_PLAN.build({}).seeds == (0,) and STUDY.build({}).seeds != (0,)


def test_text_options_become_typed_configs_with_one_line_errors() -> None:
    configs = {"ti_config": TEXTUAL_INVERSION, "config": GENERATE}
    values = {"mode": "img2img/ti", "target_fst": "6", "ti_max_train_steps": "7", "seed": "3"}
    built = {name: group.build(values) for name, group in configs.items()}
    assert built["config"].mode is GenerationMode.IMG2IMG_TI
    assert built["config"].target_fst == (6,)
    assert built["config"].seed == built["ti_config"].seed == 3  # one shared option
    assert built["ti_config"].max_train_steps == 7
    assert GENERATE.values(built["config"])["mode"] == "img2img/ti"  # the MLflow param
    with pytest.raises(SkindiffError, match=r"^mode must be one of img2img/ti\+lora, .*got 'x'$"):
        GENERATE.build({"mode": "x"})
    with pytest.raises(SkindiffError, match=r"^ti_max_train_steps must be an int, got 'many'$"):
        TEXTUAL_INVERSION.build({"ti_max_train_steps": "many"})
    with pytest.raises(SkindiffError, match="give generator_uri or ti_run_id/lora_run_id"):
        RUNS.build({"generator_uri": "models:/g@champion", "ti_run_id": "abc"})
    assert RUNS.build({"prepare_run_id": ""}).prepare_run_id is None
