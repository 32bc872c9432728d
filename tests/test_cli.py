"""The MLproject file and the CLI agree: same entry points, parameters and defaults."""

import yaml
from typer.main import get_command

from conftest import REPO
from skindiff.cli import ENTRY_POINTS, app, render_mlproject


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
        for param in command.params:
            if param.name != "help" and getattr(param, "help", None) is not None:
                assert param.help.strip(), (name, param.name)
