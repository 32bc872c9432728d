"""`report` on runs made here on the real tracking server: the tables' means and sample stds
are the ones computed independently below, and every file is written and logged."""

import random
import statistics
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from PIL import Image

from skindiff.cli import run as cli
from skindiff.errors import SkindiffError
from skindiff.plans import ReportConfig
from skindiff.report import (
    TUNING_OVERLAP_COLUMNS,
    SettingsGroup,
    impossible_means,
    settings_digest,
    tuning_note,
)
from skindiff.tracking.report import run_report

ENTRY_POINT = "mlflow.project.entryPoint"
TEST_METRICS = {
    "accuracy": "test_accuracy",
    "precision": "test_precision_macro",
    "recall": "test_recall_macro",
    "f1": "test_f1_macro",
}
MODES = ("txt2img/vanilla", "txt2img/ti", "img2img/vanilla", "img2img/ti", "img2img/lora")
MODES += ("img2img/ti+lora",)
CONDITIONS = ("acne", "psoriasis", "lupus erythematosus")


class Runs:
    """Makes finished runs with increasing start times (the report keeps the newest)."""

    def __init__(self, experiment_id: str, tmp_path: Path) -> None:
        self.client, self.experiment_id, self.tmp = MlflowClient(), experiment_id, tmp_path
        self.clock = int(time.time() * 1000)

    def make(self, tags: dict, params: dict, metrics: dict, artifact=None, status="FINISHED"):
        self.clock += 1000
        run = self.client.create_run(self.experiment_id, start_time=self.clock, tags=tags)
        run_id = run.info.run_id
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, self.clock, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        if artifact is not None:
            name, content = artifact  # a CSV table, or an image under a folder
            path = self.tmp / run_id / name
            path.parent.mkdir(parents=True)
            if isinstance(content, pd.DataFrame):
                content.to_csv(path, index=False)
            else:
                content.save(path)
            folder = str(Path(name).parent)
            self.client.log_artifact(run_id, str(path), None if folder == "." else folder)
        self.client.set_terminated(run_id, status, end_time=self.clock + 500)
        return run_id

    def main_pair(
        self,
        scenario: str,
        seed: int,
        archs,
        rng: random.Random,
        status="FINISHED",
        train_types=("real", "syn", "real+syn"),
        parent: str | None = None,
        classifier_tags: dict | None = None,
        classifier_metrics: dict | None = None,
    ):
        """A main pair run (under the `main` run `parent`) listing one classifier run per
        (arch, train type), random scores, in the order given."""
        rows, scores = [], {}
        for arch in archs:
            for train_type in train_types:
                values = {m: rng.uniform(0.2, 0.9) for m in TEST_METRICS}
                run_id = self.make(
                    {ENTRY_POINT: "train_classifier"} | (classifier_tags or {}),
                    {"arch": arch, "train_type": train_type, "seed": seed}
                    | {"conditions": ",".join(CONDITIONS)},
                    {TEST_METRICS[m]: v for m, v in values.items()}
                    | {"test_accuracy_dark": 0.1}
                    | (classifier_metrics or {}).get(train_type, {}),
                )
                rows.append([scenario, seed, arch, train_type, run_id])
                scores[(arch, train_type)] = values
        results = pd.DataFrame(rows, columns=["scenario", "seed", "arch", "train_type", "run_id"])
        parent_tag = {"mlflow.parentRunId": parent} if parent else {}
        self.make(
            {ENTRY_POINT: "main", "skindiff.scenario": scenario} | parent_tag,
            {"scenario": scenario, "seed": seed},
            {},
            ("results.csv", results),
            status,
        )
        return scores


def mean_std(values: list[float]) -> tuple[float, float]:
    percent = [100 * v for v in values]
    std = statistics.stdev(percent) if len(percent) > 1 else float("nan")
    return statistics.fmean(percent), std


def assert_close(actual: float, expected: float) -> None:
    assert actual == pytest.approx(expected, nan_ok=True, abs=1e-9)


@pytest.fixture()
def study(tracking: str, tmp_path: Path) -> dict:
    """Scenario i with 3 seeds and scenario iii with 1, two archs; a superseded, a failed and a
    resultless pair run; two ablation runs, the newer one re-running seed 1. The classifier
    runs are listed in the reverse of the paper's order (archs and train types), so only the
    report's own sorting can put its tables in the paper's order."""
    rng = random.Random(7)
    runs = Runs(tracking, tmp_path / "made")
    archs, train_types = ["tiny", "vgg16"], ("real+syn", "syn", "real")

    def pair(scenario: str, seed: int, status: str = "FINISHED") -> dict:
        return runs.main_pair(scenario, seed, archs, rng, status, train_types)

    pair("i", 0)  # superseded by the newer seed-0 run below
    kept = {("i", s): pair("i", s) for s in (0, 1, 2)}
    kept[("iii", 5)] = pair("iii", 5)
    pair("i", 1, status="FAILED")
    pair_tags = {ENTRY_POINT: "main", "skindiff.scenario": "ii"}
    runs.make(pair_tags, {"scenario": "ii", "seed": 0}, {})  # no results.csv: skipped

    def ablation_rows(seeds) -> pd.DataFrame:
        rows = [
            [seed, mode, test_set, rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), "x"]
            for seed in seeds
            for mode in MODES
            for test_set in ("light", "dark")
        ]
        columns = ["seed", "mode", "test_set", "accuracy", "f1_macro", "classifier_run_id"]
        return pd.DataFrame(rows, columns=columns)

    old, new = ablation_rows([0, 1]), ablation_rows([1, 2])
    for table in (old, new):
        runs.make({ENTRY_POINT: "ablation"}, {"seeds": "x"}, {}, ("ablation.csv", table))
    ablation = pd.concat([old[old["seed"] == 0], new])
    return {"classifiers": kept, "ablation": ablation}


def test_report_tables_are_means_and_sample_stds_over_seeds(
    tracking: str, study: dict, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    run_id = run_report(ReportConfig(mlflow.get_experiment(tracking).name, str(out)))

    for scenario, number, seeds in (("i", 2, (0, 1, 2)), ("iii", 4, (5,))):
        table = pd.read_csv(out / f"table{number}_scenario_{scenario}.csv")
        assert len(table) == 6 and set(table["n_seeds"]) == {len(seeds)}
        for row in table.itertuples():
            for metric in TEST_METRICS:
                values = [
                    study["classifiers"][(scenario, s)][(row.arch, row.train_type)] for s in seeds
                ]
                mean, std = mean_std([v[metric] for v in values])
                assert_close(getattr(row, f"{metric}_mean"), mean)
                assert_close(getattr(row, f"{metric}_std"), std)
        markdown = (out / f"table{number}_scenario_{scenario}.md").read_text()
        first = table.iloc[0]
        ours = f"{first['accuracy_mean']:.2f}"
        assert (f"{ours} ± {first['accuracy_std']:.2f}" in markdown) == (len(seeds) > 1)
        # The paper's order: its archs first (vgg16 before tiny), train types real, syn,
        # real+syn, although the runs were listed the other way round.
        assert list(zip(table["arch"], table["train_type"], strict=True)) == [
            (arch, train_type)
            for arch in ("vgg16", "tiny")
            for train_type in ("real", "syn", "real+syn")
        ]
        assert table["paper_accuracy_mean"][:3].notna().all()  # vgg16 has published numbers
        assert table["paper_accuracy_mean"][3:].isna().all()  # tiny has none
    paper = pd.read_csv(out / "table2_scenario_i.csv").set_index(["arch", "train_type"])
    assert paper.loc[("vgg16", "real+syn"), "paper_f1_mean"] == 77.45
    assert not (out / "table3_scenario_ii.csv").exists()

    table5 = pd.read_csv(out / "table5_ablation.csv").set_index("mode")
    ablation = study["ablation"]
    assert list(table5.index) == list(MODES)
    for mode in MODES:
        rows = ablation[ablation["mode"] == mode].set_index(["seed", "test_set"])["accuracy"]
        for test_set in ("light", "dark"):
            mean, std = mean_std(list(rows.xs(test_set, level="test_set")))
            assert_close(table5.loc[mode, f"{test_set}_mean"], mean)
            assert_close(table5.loc[mode, f"{test_set}_std"], std)
        gaps = [rows[(s, "light")] - rows[(s, "dark")] for s in (0, 1, 2)]
        assert_close(table5.loc[mode, "gap_mean"], mean_std(gaps)[0])
        assert table5.loc[mode, "n_seeds"] == 3

    written = {p.name for p in out.iterdir()}
    assert {"table2_scenario_i.png", "table4_scenario_iii.png", "table5_ablation_gap.png"} < written
    report = (out / "report.md").read_text()
    assert "ddof=1" in report
    # The paper's own means, over the test sizes it states, for the tables reported here only.
    notes = report.partition("### Where the paper's numbers cannot be matched by construction")[2]
    assert (
        "- Table 5: 4 of its 12 mean accuracies (18.80, 52.00, 21.22, 79.57) cannot be the mean "
        "of 1 to 5 accuracies over 56 test images; 0 more cannot be a 5-seed mean.\n" in notes
    )
    assert "- Table 2: 4 of its 9 mean accuracies (71.36, 70.38, 74.19, 78.65)" in notes
    assert "4 more (70.24, 77.98, 68.45, 69.05) cannot be a 5-seed mean." in notes
    assert "- Table 4: 2 of its 9 mean accuracies (56.50, 58.94)" in notes
    assert "over 291 test images; 2 more (55.58, 57.62) cannot be a 5-seed mean." in notes
    assert "Table 3:" not in notes  # no scenario ii runs
    logged = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert logged == written
    assert mlflow.get_run(run_id).data.tags[ENTRY_POINT] == "report"

    run_report(ReportConfig(tracking, str(out)))  # by id, into the earlier report's folder
    assert {p.name for p in out.iterdir()} == written


def test_impossible_means():
    """A mean of m accuracies over n images is k / (m * n) * 100 for an integer k, printed with
    2 decimals."""
    assert impossible_means([50.00, 48.21, 35.36], 56, [1]) == [35.36]  # 28/56, 27/56
    assert impossible_means([35.36], 56, [5]) == []  # 99/280 = 35.357
    assert impossible_means([70.24], 56, [1, 2, 4, 5]) == [70.24]
    assert impossible_means([70.24], 56, range(1, 6)) == []  # 118/168 = 70.238, 3 seeds
    table5 = [18.80, 21.22, 52.00, 79.57]
    assert impossible_means(table5, 56, range(1, 6)) == table5
    # 493/4000 = 12.325: both roundings are possible, 12.31 is not (12.30 is the next step down).
    assert impossible_means([12.31, 12.32, 12.33], 4000, [1]) == [12.31]


def test_report_refuses_a_users_folder_and_explains_bad_input(
    tracking: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(SkindiffError, match="not empty"):
        run_report(ReportConfig(tracking, str(mine)))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(SkindiffError, match="nothing to report"):
        run_report(ReportConfig(None, str(tmp_path / "new")))  # the current experiment: empty
    with pytest.raises(SystemExit) as exit_info:
        cli(["report", "--experiment", "no-such-experiment", "--output-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: experiment 'no-such-experiment' not found")
    assert "\n" not in error
    assert not mlflow.search_runs([tracking], output_format="list")  # no report run left behind


def test_runs_made_with_different_settings_are_reported_apart(tracking: str, tmp_path: Path):
    """Two `main` calls with different epochs (and a third repeating the first's settings with
    another seed list) give two groups: each table averages its own group's runs only, is
    titled with the setting that differs, and gains the train size, the construction notes
    (from the prepare run's test counts) and the Fig. 2 grid of a generate run."""
    runs, rng = Runs(tracking, tmp_path / "made"), random.Random(11)
    per_class = {f"n_test_{c.replace(' ', '_')}": 8.0 for c in CONDITIONS}
    prepare = runs.make({ENTRY_POINT: "prepare"}, {}, {"n_test": 24.0} | per_class)
    grid = Image.new("RGB", (24, 8), (200, 30, 30))
    generate = runs.make({ENTRY_POINT: "generate"}, {}, {}, ("synthetic/grid.png", grid))
    upstream = {"skindiff.prepare_run_id": prepare, "skindiff.generate_run_id": generate}
    sizes = {
        "real": {"n_train_real": 100.0, "n_train_synthetic": 0.0},
        "syn": {"n_train_real": 0.0, "n_train_synthetic": 500.0},
        "real+syn": {"n_train_real": 100.0, "n_train_synthetic": 500.0},
    }

    protocol = {"skindiff.tune_protocol": "exclude-test-of-ii,iii"}
    tune = runs.make({ENTRY_POINT: "tune"} | protocol, {}, {})

    def main_call(epochs: str, seeds: list[int]) -> dict:
        plan = {"seeds": ",".join(map(str, seeds)), "scenarios": "i", "archs": "tiny"}
        selection = "test" if epochs == "20" else "val"
        settings = {"epochs": epochs, "finetune": "full", "selection": selection}
        # The epochs=20 call's settings came from a tune run of the default protocol.
        frozen = {"skindiff.frozen_params": tune} if epochs == "20" else {}
        parent = runs.make({ENTRY_POINT: "main"} | frozen, plan | settings, {})
        return {
            seed: runs.main_pair(
                "i",
                seed,
                ["tiny"],
                rng,
                "FINISHED",
                ("real", "syn", "real+syn"),
                parent,
                upstream,
                sizes,
            )
            for seed in seeds
        }

    long = main_call("30", [0, 1])
    short = main_call("20", [0, 1])
    long |= main_call("30", [2])  # the same settings, another call: the same group

    out = tmp_path / "report"
    run_report(ReportConfig(tracking, str(out)))
    settings = pd.read_csv(out / "settings.csv")
    digests = {
        row.value: row.settings for row in settings[settings["name"] == "epochs"].itertuples()
    }
    assert set(digests) == {"20", "30"}
    assert set(settings["name"]) == {"epochs", "finetune", "selection"}  # no seeds, archs, ...

    for epochs, made in (("30", long), ("20", short)):
        table = pd.read_csv(out / f"table2_scenario_i_{digests[epochs]}.csv")
        assert list(table["n_seeds"]) == [len(made)] * 3
        for row in table.itertuples():
            values = [made[seed][(row.arch, row.train_type)]["f1"] for seed in made]
            assert_close(row.f1_mean, mean_std(values)[0])
        assert dict(zip(table["train_type"], table["train_size"], strict=True)) == {
            "real": 100,
            "syn": 500,
            "real+syn": 600,
        }
        # The paper's sizes: scenario i's 1,519 real images, 5 synthetic per real one.
        assert list(table["paper_train_size"]) == [1519, 1519 * 5, 1519 * 6]

    report = (out / "report.md").read_text()
    marked = " (selected on test, as the reference code)"
    assert f"## settings {digests['20']}: epochs=20, selection=test{marked}\n" in report
    assert f"## settings {digests['30']}: epochs=30, selection=val\n" in report
    assert "Recall (macro)" in report and "train size (paper)" in report
    assert "8 images of every class, so macro recall equals accuracy" in report
    assert "recall != accuracy in 8 of 9 rows" in report  # counted from the paper's Table 2
    # 24 test images, 5 seeds: 100 / (24 * sqrt(5)) = 1.86 points, above all of Table 2's stds.
    assert "smallest non-zero sample std over 5 seeds is 1.86; 9 of the 9" in report
    tuned = f"frozen from `{tune}` (tune protocol: exclude-test-of-ii,iii)"
    assert report.count(tuned) == 1
    assert report.index(tuned) > report.index(f"## settings {digests['20']}")
    assert "scenario i's results are not independent of it" in report
    figure = Image.open(out / f"figure2_{digests['20']}.png")
    assert figure.size == grid.size and figure.getpixel((0, 0)) == (200, 30, 30)


def test_skin_tone_section_and_filtered_against_unfiltered(tracking: str, tmp_path: Path):
    """Each group's report shows the skin tones its generate runs logged (real dark test
    images, light sources, synthetic images, shares on target and kept, means over seeds); with
    runs of both, a table sets the F1 of classifiers on filtered and unfiltered images side by
    side."""
    runs, rng = Runs(tracking, tmp_path / "made"), random.Random(5)
    prepare = runs.make({ENTRY_POINT: "prepare"}, {}, {"ita_median_test_dark": -38.5})
    made = {}
    for filtered, on_target in ((False, [0.7, 0.8]), (True, [0.9, 1.0])):
        parent = runs.make(
            {ENTRY_POINT: "main"},
            {"seeds": "0,1", "scenarios": "i", "skin_tone_filter": str(filtered).lower()},
            {},
        )
        for seed, share in enumerate(on_target):
            generate = runs.make(
                {ENTRY_POINT: "generate", "skindiff.prepare_run_id": prepare},
                {"skin_tone_filter": str(filtered).lower()},
                {
                    "ita_median_source_light": 60.0 + seed,
                    "ita_median_synthetic": -20.0 - 10 * seed,
                    "on_target_fraction": share,
                    "kept_fraction": share if filtered else 1.0,
                },
            )
            upstream = {"skindiff.prepare_run_id": prepare, "skindiff.generate_run_id": generate}
            made[(filtered, seed)] = runs.main_pair(
                "i", seed, ["tiny"], rng, parent=parent, classifier_tags=upstream
            )

    out = tmp_path / "report"
    run_report(ReportConfig(tracking, str(out)))
    settings = pd.read_csv(out / "settings.csv")
    digest = {
        str(row.value).lower() == "true": row.settings
        for row in settings[settings["name"] == "skin_tone_filter"].itertuples()
    }
    for filtered, on_target in ((False, [0.7, 0.8]), (True, [0.9, 1.0])):
        (row,) = pd.read_csv(out / f"skin_tone_{digest[filtered]}.csv").itertuples()
        assert row.filtered == filtered and row.n == 2
        assert_close(row.real_dark_test_ita, -38.5)
        assert_close(row.source_light_ita, 60.5)
        assert_close(row.synthetic_ita, -25.0)
        assert_close(row.on_target, 100 * statistics.fmean(on_target))
        assert_close(row.kept, 100 * statistics.fmean(on_target) if filtered else 100.0)

    comparison = pd.read_csv(out / "skin_tone_filtering.csv").set_index("train_type")
    for train_type in ("syn", "real+syn"):
        for filtered, column in ((False, "f1_unfiltered"), (True, "f1_filtered")):
            f1 = [made[(filtered, seed)][("tiny", train_type)]["f1"] for seed in (0, 1)]
            assert_close(comparison.loc[train_type, column], mean_std(f1)[0])
    report = (out / "report.md").read_text()
    assert "### Skin tone of the real and synthetic images (ITA)" in report
    assert "## Skin-tone filter: classifiers on unfiltered and filtered synthetic images" in report


def tuned_group(overlap: pd.DataFrame | None, protocol: str | None) -> SettingsGroup:
    empty = pd.DataFrame()
    return SettingsGroup("d", {}, empty, empty, None, "tune-run", protocol, None, overlap)


def test_tuning_note_states_per_pair_how_many_test_images_scored_the_objective():
    """One tune seed for all: other seeds' test images scored the objective, and the note says
    how many per pair; tuned per seed: none, and the note says so; a YAML: unknown."""
    one_seed = pd.DataFrame(
        [["ii", 0, "0", 291, 0.0], ["ii", 42, "0", 291, 46.0], ["iii", 42, "0", 291, 46.0]],
        columns=TUNING_OVERLAP_COLUMNS,
    )
    note = tuning_note(tuned_group(one_seed, "exclude-test-of-ii,iii"))
    assert note.startswith("Tuned settings frozen from `tune-run` (tune protocol: ")
    assert "scenario i's results are not independent of it" in note
    lines = note.splitlines()
    assert lines[-3:] == [
        "- scenario ii seed 0: 0 of its 291 test images scored the tuning objective (settings "
        "tuned on seed 0)",
        "- scenario ii seed 42: 46 of its 291 test images scored the tuning objective "
        "(settings tuned on seed 0)",
        "- scenario iii seed 42: 46 of its 291 test images scored the tuning objective "
        "(settings tuned on seed 0)",
    ]
    assert "are not independent of them (`tune --seeds`" in note
    assert "independent of their test images" not in note

    per_seed = one_seed.assign(tune_seed=["0", "42", "42"], n_scored_by_tuning=0.0)
    note = tuning_note(tuned_group(per_seed, "exclude-test-of-ii,iii"))
    assert "Each seed's settings were tuned without its own test images of scenarios ii" in note
    assert "scenario ii seed 42: 0 of its 291 test images" in note

    unknown = one_seed.assign(tune_seed="unknown", n_scored_by_tuning=float("nan"))
    for overlap in (unknown, None):
        note = tuning_note(tuned_group(overlap, None))
        assert "(tune protocol: unknown)" in note and "test images scored" in note
        assert note.endswith(
            "how many of each scenario's test images scored the tuning objective is unknown."
        )
    mixed = pd.concat([one_seed.iloc[:1], unknown.iloc[1:2]])
    assert tuning_note(tuned_group(mixed, "paper")).splitlines()[-1] == (
        "- scenario ii seed 42: unknown (the seed its settings were tuned on is unknown)"
    )
    untuned = SettingsGroup("d", {}, pd.DataFrame(), pd.DataFrame(), None)
    assert tuning_note(untuned) is None


PAIRED_COLUMNS = [
    "group",
    "scenario",
    "arch",
    "comparison",
    "metric",
    "n_seeds",
    "n_test_images",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "seeds_same_sign",
    "verdict",
    "paper_diff",
]
PAIRED_METRICS = {"accuracy": "test_accuracy", "f1_macro": "test_f1_macro"}


def predictions_of(truth: list[str], rng: random.Random, right: float) -> list[str]:
    """Predicted labels, each right with probability `right`, else another label."""
    return [
        label if rng.random() < right else rng.choice([c for c in CONDITIONS if c != label])
        for label in truth
    ]


def classifier_with_predictions(runs: Runs, params: dict, images, predicted) -> str:
    """A classifier run whose test metrics are scored from its logged test predictions by the
    classifiers' own scoring, over the sorted conditions as `train_classifier` does
    (`predicted` None: a run that logged no predictions)."""
    from skindiff.classify.metrics import classification_metrics

    frame = images.assign(predicted=predicted if predicted is not None else images["label"])
    metrics = classification_metrics(frame, sorted(CONDITIONS), "test")
    artifact = ("predictions/test.csv", frame) if predicted is not None else None
    tags = {ENTRY_POINT: "train_classifier"}
    return runs.make(tags, params | {"conditions": ",".join(CONDITIONS)}, metrics, artifact)


def test_paired_differences_come_from_per_image_predictions(tracking: str, tmp_path: Path):
    """Two seeds of scenario i: `syn` predicts as `real` does on every image (difference 0,
    p = 1), `real+syn` is right where `real` is mostly wrong (interval above 0); the paired
    means are the means over seeds of the runs' logged metric differences. A third seed's
    `real+syn` run logged no predictions and is named; the ablation's modes are compared on
    the dark test set. Then a pair tested on different images is refused, naming both runs."""
    runs, rng = Runs(tracking, tmp_path / "made"), random.Random(3)
    logged: dict[tuple, dict] = {}

    def test_images(seed: int, n: int = 30) -> pd.DataFrame:
        labels = [CONDITIONS[k % len(CONDITIONS)] for k in range(n)]
        return pd.DataFrame(
            {"md5hash": [f"s{seed}-{k:03d}" for k in range(n)], "label": labels}
        ).assign(fitzpatrick_scale=5, group="dark")

    def pair(seed: int, images: pd.DataFrame, without_predictions=()) -> dict[str, str]:
        real = predictions_of(images["label"].tolist(), rng, 0.4)
        predicted = {
            "real": real,
            "syn": real,
            "real+syn": predictions_of(images["label"].tolist(), rng, 0.95),
        }
        made = {}
        for train_type, values in predicted.items():
            params = {"arch": "vgg16", "train_type": train_type, "seed": seed}
            shown = None if train_type in without_predictions else values
            made[train_type] = classifier_with_predictions(runs, params, images, shown)
            logged[(seed, train_type)] = mlflow.get_run(made[train_type]).data.metrics
        results = pd.DataFrame(
            [["i", seed, "vgg16", t, run_id] for t, run_id in made.items()],
            columns=["scenario", "seed", "arch", "train_type", "run_id"],
        )
        runs.make(
            {ENTRY_POINT: "main", "skindiff.scenario": "i"},
            {"scenario": "i", "seed": seed},
            {},
            ("results.csv", results),
        )
        return made

    pair(0, test_images(0))
    pair(1, test_images(1))
    unlogged = pair(2, test_images(2), without_predictions=("real+syn",))["real+syn"]

    ablation_rows, modes = [], ("img2img/lora", "img2img/ti+lora")
    for seed in (0, 1):
        images = test_images(seed)
        for mode, right in zip(modes, (0.5, 0.6), strict=True):
            params = {"arch": "vgg16", "train_type": "syn", "seed": seed}
            predicted = predictions_of(images["label"].tolist(), rng, right)
            run_id = classifier_with_predictions(runs, params, images, predicted)
            logged[(seed, mode)] = mlflow.get_run(run_id).data.metrics
            for test_set in ("light", "dark"):
                scores = [logged[(seed, mode)][name] for name in PAIRED_METRICS.values()]
                ablation_rows.append([seed, mode, test_set, *scores, run_id])
    columns = ["seed", "mode", "test_set", "accuracy", "f1_macro", "classifier_run_id"]
    table = pd.DataFrame(ablation_rows, columns=columns)
    runs.make({ENTRY_POINT: "ablation"}, {"arch": "vgg16"}, {}, ("ablation.csv", table))

    out = tmp_path / "report"
    report_run = run_report(ReportConfig(tracking, str(out)))
    # Two groups: the main pairs' settings (none here) and the ablation's; files and metric
    # names carry the group's digest.
    main, ablation = settings_digest({}), settings_digest({"arch": "vgg16"})
    paired = pd.concat(
        pd.read_csv(out / f"paired_differences_{digest}.csv", dtype={"group": str})
        for digest in (main, ablation)
    )
    assert list(paired.columns) == PAIRED_COLUMNS
    assert list(paired["group"]) == [main] * 4 + [ablation] * 2
    found = zip(paired["scenario"], paired["comparison"], paired["metric"], strict=True)
    assert list(found) == [
        ("i", "real+syn vs real", "accuracy"),
        ("i", "real+syn vs real", "f1_macro"),
        ("i", "syn vs real", "accuracy"),
        ("i", "syn vs real", "f1_macro"),
        ("ablation", "img2img/lora vs img2img/ti+lora", "accuracy"),
        ("ablation", "img2img/lora vs img2img/ti+lora", "f1_macro"),
    ]
    for row in paired.itertuples():
        candidate, baseline = row.comparison.split(" vs ")
        seeds = (0, 1) if candidate != "syn" else (0, 1, 2)  # seed 2's real+syn: none logged
        name = PAIRED_METRICS[row.metric]
        differences = [
            100 * (logged[(s, candidate)][name] - logged[(s, baseline)][name]) for s in seeds
        ]
        assert row.n_seeds == len(seeds) and row.n_test_images == 30
        assert row.mean_diff == pytest.approx(statistics.fmean(differences), abs=1e-6)
        assert row.ci_low <= row.mean_diff <= row.ci_high
        assert 0 <= row.p_value <= row.p_holm <= 1
    rows = paired.set_index(["comparison", "metric"])
    assert rows.loc[("syn vs real", "accuracy"), "mean_diff"] == 0
    assert rows.loc[("syn vs real", "accuracy"), "p_value"] == 1
    assert set(rows.loc["syn vs real", "verdict"]) == {"not distinguishable"}
    assert set(rows.loc["real+syn vs real", "verdict"]) == {"better"}
    assert rows.loc["real+syn vs real", "ci_low"].min() > 0
    assert rows.loc[("real+syn vs real", "accuracy"), "seeds_same_sign"] == 2
    # The paper's difference of its published means: Table 2 (VGG-16), Table 5 (dark).
    assert rows.loc[("real+syn vs real", "accuracy"), "paper_diff"] == pytest.approx(7.74)
    assert rows.loc[("real+syn vs real", "f1_macro"), "paper_diff"] == pytest.approx(6.97)
    lora = "img2img/lora vs img2img/ti+lora"
    assert rows.loc[(lora, "accuracy"), "paper_diff"] == pytest.approx(73.21 - 79.57)
    assert pd.isna(rows.loc[(lora, "f1_macro"), "paper_diff"])

    report = (out / "report.md").read_text()
    section = report.partition("### Is the difference real?")[2]
    assert "percentile bootstrap with 2000 replicates" in section
    assert f"![paired differences](paired_differences_{main}.png)" in section
    assert f"left out of these comparisons: {unlogged} (i/seed-2/vgg16/real+syn)." in section
    assert report.count("### Is the difference real?") == 2
    metrics = mlflow.get_run(report_run).data.metrics
    first = paired.iloc[0]
    name = f"paired.{main}.i.vgg16.real_syn_vs_real.accuracy"
    assert metrics[f"{name}.mean_diff"] == first["mean_diff"]
    assert metrics[f"{name}.ci_low"] == first["ci_low"]
    name = f"paired.{ablation}.ablation.vgg16.img2img_lora_vs_img2img_ti_lora.f1_macro"
    assert metrics[f"{name}.ci_high"] == paired.iloc[-1]["ci_high"]
    logged_files = {a.path for a in MlflowClient().list_artifacts(report_run)}
    for digest in (main, ablation):
        plot = f"paired_differences_{digest}.png"
        assert Image.open(out / plot).size[1] > 100
        assert {f"paired_differences_{digest}.csv", plot} < logged_files

    made = pair(3, test_images(3).iloc[:20])
    moved = test_images(3).iloc[10:]
    images = {"arch": "vgg16", "train_type": "real+syn", "seed": 3}
    other = classifier_with_predictions(runs, images, moved, moved["label"].tolist())
    results = pd.DataFrame(
        [["i", 3, "vgg16", "real", made["real"]], ["i", 3, "vgg16", "real+syn", other]],
        columns=["scenario", "seed", "arch", "train_type", "run_id"],
    )
    runs.make(
        {ENTRY_POINT: "main", "skindiff.scenario": "i"},
        {"scenario": "i", "seed": 3},
        {},
        ("results.csv", results),
    )
    with pytest.raises(SkindiffError, match=f"{made['real']} .*and {other} .*different images"):
        run_report(ReportConfig(tracking, str(out)))


def test_report_options_are_checked():
    with pytest.raises(SkindiffError, match="bootstrap_replicates must be at least 100, got 10"):
        ReportConfig(bootstrap_replicates=10)
    with pytest.raises(SkindiffError, match=r"confidence must lie between 0 and 1, got 1\.0"):
        ReportConfig(confidence=1.0)
