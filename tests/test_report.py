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

from skindiff.cli import run as cli
from skindiff.errors import SkindiffError
from skindiff.tracking.report import run_report
from skindiff.tracking.settings import ReportConfig

ENTRY_POINT = "mlflow.project.entryPoint"
TEST_METRICS = {
    "accuracy": "test_accuracy",
    "precision": "test_precision_macro",
    "recall": "test_recall_macro",
    "f1": "test_f1_macro",
}
MODES = ("txt2img/vanilla", "txt2img/ti", "img2img/vanilla", "img2img/ti", "img2img/lora")
MODES += ("img2img/ti+lora",)


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
            name, table = artifact
            path = self.tmp / run_id / name
            path.parent.mkdir(parents=True)
            table.to_csv(path, index=False)
            self.client.log_artifact(run_id, str(path))
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
    ):
        """A main pair run listing one classifier run per (arch, train type), random scores,
        in the order given."""
        rows, scores = [], {}
        for arch in archs:
            for train_type in train_types:
                values = {m: rng.uniform(0.2, 0.9) for m in TEST_METRICS}
                run_id = self.make(
                    {ENTRY_POINT: "train_classifier"},
                    {"arch": arch, "train_type": train_type, "seed": seed},
                    {TEST_METRICS[m]: v for m, v in values.items()} | {"test_accuracy_dark": 0.1},
                )
                rows.append([scenario, seed, arch, train_type, run_id])
                scores[(arch, train_type)] = values
        results = pd.DataFrame(rows, columns=["scenario", "seed", "arch", "train_type", "run_id"])
        self.make(
            {ENTRY_POINT: "main", "skindiff.scenario": scenario},
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
    assert "ddof=1" in (out / "report.md").read_text()
    logged = {a.path for a in MlflowClient().list_artifacts(run_id)}
    assert logged == written
    assert mlflow.get_run(run_id).data.tags[ENTRY_POINT] == "report"

    run_report(ReportConfig(tracking, str(out)))  # by id, into the earlier report's folder
    assert {p.name for p in out.iterdir()} == written


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
