"""Labels as keys: every MLflow key and file name made from a label is its slug; labels that
cannot give one are refused at prepare, in one line, before anything trains."""

import re
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.utils.validation import (
    _validate_metric_name,
    _validate_param_name,
    _validate_tag_name,
    path_not_unique,
)

from conftest import FAST, cohort_rows, runs_by_stage, write_dataset
from skindiff.cli import run
from skindiff.core.labels import SLUG_MAX_BYTES, slug
from skindiff.data.fitzpatrick import CONDITIONS
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.diffusion.adapters import token_file_name
from skindiff.diffusion.config import TextualInversionConfig
from skindiff.diffusion.prompts import placeholder_token
from skindiff.errors import DataValidationError, SkindiffError

ODD_LABELS = (
    "psoríasis ✓",
    "../evil psoriasis",
    "a/b/../c",
    " Lichen  Planus (LP) ",
    "İmpetigo",
    "ψωρίαση",
    "银屑病",
    "건선",
    "ﬁbroma²",
    "tab\tand\nnewline",
    "x" * 90,
)


@pytest.mark.parametrize("label", [*CONDITIONS, "Basal-Cell_Carcinoma", "a  b", "7 x"])
def test_ascii_labels_keep_the_keys_and_tokens_they_had(label: str) -> None:
    # The slug and token of before, so existing runs and reports still match.
    assert slug(label) == re.sub(r"[^0-9a-zA-Z]+", "_", label).strip("_").lower()
    old_token = "<" + re.sub(r"[^0-9a-z]+", "-", label.lower()).strip("-") + ">"
    assert placeholder_token(label) == old_token


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("psoríasis ✓", "psoriasis"),
        ("../evil psoriasis", "evil_psoriasis"),
        ("İmpetigo", "impetigo"),
        ("ψωρίαση", "ψωριαση"),
        ("건선", "건선"),
        ("ﬁbroma²", "fibroma2"),
    ],
)
def test_accents_go_and_letters_of_any_script_stay(label: str, expected: str) -> None:
    assert slug(label) == expected


@pytest.mark.parametrize("label", [*CONDITIONS, *ODD_LABELS])
def test_every_slug_is_a_valid_mlflow_key_and_a_plain_file_name(label: str) -> None:
    name = slug(label)
    assert name and slug(name) == name
    assert not path_not_unique(name) and "/" not in name and "." not in name
    for key in (f"n_test_fst5_{name}", f"loss/{name}", f"test_precision_{name}"):
        _validate_metric_name(key)
        _validate_param_name(key)
    _validate_tag_name(f"skindiff.token.{name}")
    token = placeholder_token(label)
    assert token == f"<{name.replace('_', '-')}>" and not re.search(r"\s", token)
    assert len(token_file_name(token).encode()) <= 255


def config_for(csv: Path, images: Path, conditions: tuple[str, ...]) -> PrepareConfig:
    return PrepareConfig(
        metadata_csv=str(csv),
        image_dir=str(images),
        conditions=conditions,
        flexible_per_condition=4,
    )


@pytest.mark.parametrize(
    ("conditions", "message"),
    [
        # cohort_rows writes 40 rows per condition: the second's first row is CSV line 42.
        (
            ("basal cell carcinoma", "Basal-Cell Carcinoma"),
            r"labels 'basal cell carcinoma' "
            r"\(line 2\) and 'Basal-Cell Carcinoma' \(line 42\) both become 'basal_cell_carcinoma'",
        ),
        (("a", "✓✓"), r"label '✓✓' \(line 42\) has no letter or digit"),
        (("../", "b"), r"label '\.\./' \(line 2\) has no letter or digit"),
        (("a", "y" * (SLUG_MAX_BYTES + 1)), r"\(line 42\) is too long .* at most 100"),
        (("a", "Macro"), r"label 'Macro' \(line 42\) would give metrics the names"),
    ],
    ids=["clash", "no letters", "path", "too long", "taken"],
)
def test_prepare_refuses_labels_that_cannot_be_keys(
    tmp_path: Path, conditions: tuple[str, ...], message: str
) -> None:
    rows = cohort_rows(conditions=conditions)
    csv, images = write_dataset(
        tmp_path, [row | {"md5hash": f"m{i}"} for i, row in enumerate(rows)]
    )
    with pytest.raises(DataValidationError, match=message) as refused:
        prepare_scenario(config_for(csv, images, conditions))
    assert str(refused.value).startswith(f"{csv}: ") and "\n" not in str(refused.value)


def test_prepare_checks_only_the_cohorts_labels(tmp_path: Path) -> None:
    # A label outside the cohort never names anything: it is no reason to stop.
    outside = {"md5hash": "other", "fitzpatrick_scale": 1, "label": "✓✓"}
    rows = [*cohort_rows(conditions=("a", "b")), outside]
    csv, images = write_dataset(tmp_path, rows)
    assert len(prepare_scenario(config_for(csv, images, ("a", "b"))).splits.train)


@pytest.mark.parametrize(
    ("conditions", "message"),
    [
        (("psoriasis", "Psoriasis!"), r"conditions: labels 'psoriasis' and 'Psoriasis!' both"),
        (("psoriasis", "✓"), r"conditions: label '✓' has no letter or digit"),
    ],
)
def test_textual_inversion_refuses_conditions_without_a_token(
    conditions: tuple[str, ...], message: str
) -> None:
    with pytest.raises(SkindiffError, match=message):
        TextualInversionConfig(conditions=conditions)


def test_odd_labels_run_prepare_textual_inversion_and_generate(
    tracking: str, demo_dataset, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    relabel = {"psoriasis": "psoríasis ✓", "folliculitis": "../evil psoriasis"}
    metadata = pd.read_csv(demo_dataset.metadata_csv, dtype=str, keep_default_na=False)
    metadata["label"] = metadata["label"].replace(relabel)
    csv = tmp_path / "metadata.csv"
    metadata.to_csv(csv, index=False)
    options = FAST | {"conditions": ",".join(relabel.values()), "num_per_image": "1"}
    argv = ["generate", "--metadata-csv", str(csv), "--image-dir", str(demo_dataset.image_dir)]
    argv += [arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", value)]
    with pytest.raises(SystemExit) as done:
        run(argv)
    console = capfd.readouterr()
    assert done.value.code == 0, console.err[-3000:]
    assert "Traceback" not in console.out + console.err

    stages = {stage: runs for stage, runs in runs_by_stage(tracking).items() if stage}
    assert sorted(stages) == ["generate", "lora", "prepare", "textual_inversion"]
    assert {run.info.status for runs in stages.values() for run in runs} == {"FINISHED"}
    slugs = ("psoriasis", "evil_psoriasis")
    prepare = stages["prepare"][0].data.metrics
    assert all(prepare[f"n_train_{name}"] > 0 for name in slugs)
    ti_run = stages["textual_inversion"][0]
    tokens = {
        "skindiff.token.psoriasis": "<psoriasis>",
        "skindiff.token.evil_psoriasis": "<evil-psoriasis>",
    }
    assert tokens.items() <= ti_run.data.tags.items()
    assert all(f"loss/{name}" in ti_run.data.metrics for name in slugs)
    embeddings = mlflow.MlflowClient().list_artifacts(ti_run.info.run_id, "embeddings")
    assert sorted(Path(f.path).name for f in embeddings) == [
        "evil-psoriasis.safetensors",
        "psoriasis.safetensors",
    ]
    # The readable labels stay in the values.
    generated = mlflow.artifacts.download_artifacts(
        run_id=stages["generate"][0].info.run_id,
        artifact_path="synthetic/manifest.csv",
        dst_path=str(tmp_path / "gen"),
    )
    assert set(pd.read_csv(generated, keep_default_na=False)["label"]) == set(relabel.values())
