"""The MLproject file and the CLI agree: same entry points, parameters and defaults."""

import subprocess
import sys

import pytest
import yaml
from typer.main import get_command

from conftest import REPO
from skindiff.cli import ENTRY_POINTS, app, render_mlproject
from skindiff.diffusion.config import GenerationMode
from skindiff.errors import SkindiffError
from skindiff.options import GENERATE, RUNS, TEXTUAL_INVERSION


def test_mlproject_is_rendered_from_the_cli() -> None:
    assert (REPO / "MLproject").read_text() == render_mlproject(), (
        "MLproject is stale: run `skindiff mlproject > MLproject`"
    )


def test_every_entry_point_has_a_script_and_all_options() -> None:
    spec = yaml.safe_load((REPO / "MLproject").read_text())
    assert tuple(spec["entry_points"]) == ENTRY_POINTS
    commands = get_command(app).commands
    for name, entry in spec["entry_points"].items():
        assert (REPO / "entrypoints" / f"{name}.py").is_file(), name
        options = {p.name for p in commands[name].params} - {"help"}
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
        "import sys, skindiff.cli; "
        "print(sorted({'torch', 'diffusers', 'mlflow', 'optuna', 'pandas'} & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


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
