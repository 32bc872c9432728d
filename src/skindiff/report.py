"""The paper's Tables 2-5 and Fig. 2 rebuilt from per-run scores, beside its published numbers.

Scores come in groups of runs made with the same study settings (`SettingsGroup`); each group
gets its own tables, so runs made with different settings are never averaged together. Input
scores are fractions (0-1), one row per classifier run; tables show percent, the mean and the
sample standard deviation (ddof=1) over seeds. A report folder is marked by the first line of
its report.md, which lists the files the report wrote: only those are ever replaced.
"""

import hashlib
import json
import math
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skindiff import paired
from skindiff.errors import SkindiffError

METRICS = ("accuracy", "precision", "recall", "f1")
METRIC_TITLES = {
    "accuracy": "Accuracy",
    "precision": "Precision (macro)",
    "recall": "Recall (macro)",
    "f1": "F1 (macro)",
}
ARCHS = ("vgg16", "resnet18", "vit_b_16")  # the paper's, in its order; others follow
ARCH_TITLES = {"vgg16": "VGG-16", "resnet18": "ResNet-18", "vit_b_16": "ViT-B-16"}
TRAIN_TYPES = ("real", "syn", "real+syn")
SCENARIO_TABLE = {"i": 2, "ii": 3, "iii": 4}
ABLATION_MODES = (  # Table 5's column order
    "txt2img/vanilla",
    "txt2img/ti",
    "img2img/vanilla",
    "img2img/ti",
    "img2img/lora",
    "img2img/ti+lora",
)
TEST_SETS = ("light", "dark")
STD_NOTE = (
    "Values are percent, mean ± sample standard deviation (ddof=1) over the seeds of each row "
    "(n seeds); a row of one seed shows no std. The paper reports mean ± std over 5 seeds "
    "without saying which std."
)

# Tables 2-4 of the paper, as printed: arch, train type, then accuracy, precision, recall and
# F1 as mean and std (percent). Scenario i = Table 2, ii = Table 3, iii = Table 4.
PAPER_TEXT = {
    "i": """
        vgg16    real     70.24 0.12  72.49 0.37  69.58 0.30  70.48 0.13
        vgg16    syn      75.00 0.64  75.77 0.39  73.17 0.29  72.42 0.61
        vgg16    real+syn 77.98 0.40  81.51 0.25  78.87 0.23  77.45 0.29
        resnet18 real     68.45 0.42  69.42 0.57  69.05 0.42  67.94 0.35
        resnet18 syn      69.05 0.36  69.57 0.82  69.05 0.42  68.02 0.33
        resnet18 real+syn 71.36 0.69  69.02 0.48  68.45 0.40  67.56 0.59
        vit_b_16 real     70.38 0.42  73.72 0.69  70.82 0.39  70.61 0.59
        vit_b_16 syn      74.19 0.37  77.89 1.01  74.04 0.85  73.58 0.53
        vit_b_16 real+syn 78.65 0.53  81.57 0.47  79.17 0.84  78.24 0.64
    """,
    "ii": """
        vgg16    real     58.79 0.10  58.90 0.03  58.26 0.05  56.98 0.04
        vgg16    syn      62.86 0.15  61.49 0.15  63.32 0.13  61.57 0.24
        vgg16    real+syn 63.66 0.11  62.80 0.12  64.08 0.08  62.72 0.18
        resnet18 real     50.31 0.30  50.45 0.44  51.27 0.30  48.23 0.32
        resnet18 syn      56.36 0.16  56.58 0.13  59.78 0.08  55.58 0.10
        resnet18 real+syn 61.33 0.17  59.75 0.12  62.52 0.17  59.94 0.17
        vit_b_16 real     62.03 0.19  63.09 0.13  62.02 0.04  61.05 0.04
        vit_b_16 syn      68.83 0.19  70.07 0.03  68.22 0.25  68.34 0.19
        vit_b_16 real+syn 71.20 0.07  71.61 0.19  71.53 0.01  71.17 0.13
    """,
    "iii": """
        vgg16    real     55.58 0.10  54.60 0.11  51.84 0.29  51.97 0.45
        vgg16    syn      57.62 0.09  56.62 0.15  55.42 0.20  55.36 0.22
        vgg16    real+syn 58.08 0.08  57.36 0.13  55.78 0.17  55.85 0.23
        resnet18 real     49.42 0.36  49.79 0.44  48.30 0.23  47.42 0.30
        resnet18 syn      53.47 0.32  52.39 0.30  53.79 0.30  51.97 0.29
        resnet18 real+syn 56.50 0.15  55.72 0.15  55.10 0.16  54.76 0.18
        vit_b_16 real     57.66 0.35  61.89 0.68  55.45 0.36  55.96 0.51
        vit_b_16 syn      58.94 0.23  62.79 0.20  55.62 0.22  56.53 0.18
        vit_b_16 real+syn 60.96 0.31  64.57 0.01  57.51 0.29  58.92 0.31
    """,
}
# The paper's "Train size": the real training images of each scenario, and 5 synthetic images
# per real one.
PAPER_TRAIN_SIZE = {"i": 1519, "ii": 1284, "iii": 1228}
PAPER_TRAIN_MULTIPLE = {"real": 1, "syn": 5, "real+syn": 6}
PAPER_SEEDS = 5
# Table 5 of the paper: accuracy (percent, no std printed) of a VGG-16 trained on synthetic
# images only, per generation mode, on the light and the dark flexible subsets (scenario i).
PAPER_ABLATION = {
    "light": dict(zip(ABLATION_MODES, (18.80, 35.36, 48.21, 46.43, 52.00, 53.57), strict=True)),
    "dark": dict(zip(ABLATION_MODES, (21.22, 44.64, 69.64, 71.43, 73.21, 79.57), strict=True)),
}


def paper_classifiers() -> pd.DataFrame:
    """Tables 2-4 as rows: scenario, arch, train_type, paper_<metric>_mean, paper_<metric>_std."""
    columns = [f"paper_{m}_{s}" for m in METRICS for s in ("mean", "std")]
    rows = [
        [scenario, *line.split()[:2], *map(float, line.split()[2:])]
        for scenario, text in PAPER_TEXT.items()
        for line in text.strip().splitlines()
    ]
    return pd.DataFrame(rows, columns=["scenario", "arch", "train_type", *columns])


def _mean_std(scores: pd.DataFrame, keys: list[str], columns: Sequence[str]) -> pd.DataFrame:
    """Per group of `keys`: n_seeds, then <column>_mean and <column>_std in percent."""
    grouped = scores.groupby(keys, sort=False)
    table = grouped["seed"].nunique().rename("n_seeds").to_frame()
    for column in columns:
        percent = grouped[column].agg(["mean", "std"]) * 100  # pandas' std is ddof=1
        table[f"{column}_mean"], table[f"{column}_std"] = percent["mean"], percent["std"]
    return table.reset_index()


def _order(values: pd.Series, known: Sequence[str]) -> pd.Series:
    """Sort key: the paper's order first, other values after, alphabetically."""
    return values.map(lambda v: (known.index(v), "") if v in known else (len(known), v))


def classification_table(scores: pd.DataFrame, scenario: str) -> pd.DataFrame:
    """Table 2, 3 or 4 for `scenario` from rows (scenario, seed, arch, train_type, accuracy,
    precision, recall, f1): one row per (arch, train_type) with ours and the paper's numbers."""
    rows = scores[scores["scenario"] == scenario]
    ours = _mean_std(rows, ["arch", "train_type"], METRICS)
    sizes = rows.groupby(["arch", "train_type"], sort=False)["train_size"].mean()
    ours = ours.merge(sizes.reset_index(), on=["arch", "train_type"], how="left")
    paper = paper_classifiers().query("scenario == @scenario").drop(columns="scenario")
    table = ours.merge(paper, on=["arch", "train_type"], how="left")
    table["paper_train_size"] = (
        table["train_type"].map(PAPER_TRAIN_MULTIPLE) * (PAPER_TRAIN_SIZE[scenario])
    )
    table = table.sort_values(
        ["arch", "train_type"],
        key=lambda c: _order(c, ARCHS if c.name == "arch" else TRAIN_TYPES),
    )
    return table.reset_index(drop=True)


def ablation_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Table 5 from rows (seed, mode, test_set, accuracy): one row per mode with light and dark
    accuracy, the light-minus-dark gap (per seed, then mean and std) and the paper's numbers."""
    wide = rows.pivot_table(index=["mode", "seed"], columns="test_set", values="accuracy")
    wide = wide.reindex(columns=list(TEST_SETS)).reset_index()
    wide["gap"] = wide["light"] - wide["dark"]
    table = _mean_std(wide, ["mode"], [*TEST_SETS, "gap"])
    for test_set in TEST_SETS:
        table[f"paper_{test_set}"] = table["mode"].map(PAPER_ABLATION[test_set])
    table["paper_gap"] = table["paper_light"] - table["paper_dark"]
    table = table.sort_values("mode", key=lambda c: _order(c, ABLATION_MODES))
    return table.reset_index(drop=True)


def _cell(mean: float, std: float = np.nan) -> str:
    if pd.isna(mean):
        return "-"
    return f"{mean:.2f}" if pd.isna(std) else f"{mean:.2f} ± {std:.2f}"


def _count(value: float) -> str:
    if pd.isna(value):
        return "-"
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def classification_markdown(table: pd.DataFrame) -> str:
    columns = {"architecture": table["arch"].map(lambda a: ARCH_TITLES.get(a, a))}
    columns["train type"] = table["train_type"]
    columns["n seeds"] = table["n_seeds"]
    columns["train size"] = table["train_size"].map(_count)
    columns["train size (paper)"] = table["paper_train_size"].map(_count)
    for metric in METRICS:
        for source, prefix in (("", ""), (" (paper)", "paper_")):
            columns[METRIC_TITLES[metric] + source] = [
                _cell(mean, std)
                for mean, std in zip(
                    table[f"{prefix}{metric}_mean"], table[f"{prefix}{metric}_std"], strict=True
                )
            ]
    return pd.DataFrame(columns).to_markdown(index=False, disable_numparse=True)


def ablation_markdown(table: pd.DataFrame) -> str:
    columns = {"mode": table["mode"], "n seeds": table["n_seeds"]}
    for name in (*TEST_SETS, "gap"):
        title = "light - dark" if name == "gap" else name
        columns[title] = [
            _cell(m, s) for m, s in zip(table[f"{name}_mean"], table[f"{name}_std"], strict=True)
        ]
        columns[f"{title} (paper)"] = table[f"paper_{name}"].map(_cell)
    return pd.DataFrame(columns).to_markdown(index=False, disable_numparse=True)


# ITA medians (degrees) and shares of synthetic images of one generate run, per (scenario, seed).
SKIN_TONE_COLUMNS = [
    "scenario",
    "seed",
    "real_dark_test_ita",  # median ITA of the real dark-group test images
    "source_light_ita",  # of the real light-group training images, the img2img sources
    "synthetic_ita",  # of the synthetic images
    "on_target",  # share of synthetic images whose ITA fits their target skin type
    "kept",  # share kept for classifier training (all, without skin_tone_filter)
    "filtered",  # whether the generate run used skin_tone_filter
    "generate_run_id",
]
SKIN_TONE_NOTE = (
    "Median ITA in degrees (lighter is higher; Del Bino: brown -30 to 10, dark below -30), the "
    "mean over seeds; shares in percent. A synthetic image is on target when its ITA fits its "
    "target skin type (FST 5-6: at most `dark_ita_max`, 10 by default)."
)


def skin_tone_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per scenario (and filtering): the means over seeds of SKIN_TONE_COLUMNS' measures."""
    measures = ["real_dark_test_ita", "source_light_ita", "synthetic_ita", "on_target", "kept"]
    table = rows.groupby(["scenario", "filtered"])[measures].mean()
    table[["on_target", "kept"]] *= 100
    table["n"] = rows.groupby(["scenario", "filtered"]).size()
    return table.reset_index()


# What each (scenario, seed)'s prepare run found of near-duplicate images.
NEAR_DUPLICATE_COLUMNS = [
    "scenario",
    "seed",
    "near_duplicates",  # report, drop, off; "" for a prepare run older than the option
    "n_test",  # test images (after any drop: the test split keeps its size)
    "n_test_images_with_training_copy",  # found before any drop
    "n_near_duplicate_pairs_across_train_test",
    "n_near_duplicate_pairs",  # in the whole cohort
    "n_near_duplicates_dropped",  # training images left out by `drop`
    "prepare_run_id",
]
NEAR_DUPLICATE_NOTE = (
    "From each pair's prepare run (splits/near_duplicates.csv there lists the pairs, and "
    "near_duplicates.png shows the closest): test images with a near-duplicate among the "
    "training or validation images, the mean over seeds. With `near_duplicates report` those "
    "copies stayed in training, and the scores above may be inflated by them; `drop` left them "
    "out of train and validation."
)


def near_duplicate_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per scenario and near_duplicates mode: the means over seeds of the counts."""
    counts = NEAR_DUPLICATE_COLUMNS[3:-1]
    by = ["scenario", "near_duplicates"]
    table = rows.groupby(by)[counts].mean()
    table["n"] = rows.groupby(by).size()
    return table.reset_index()


def near_duplicate_markdown(table: pd.DataFrame) -> str:
    header = (
        "| scenario | near_duplicates | test images with a training copy | of test images | "
        "pairs across train/test | pairs in the cohort | dropped from training | n seeds |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    lines = []
    for r in table.itertuples():
        looked = r.near_duplicates in ("report", "drop")
        copies = _cell(r.n_test_images_with_training_copy) if looked else "not looked for"
        lines.append(
            f"| {r.scenario} | {r.near_duplicates or 'unknown'} | {copies} | {_cell(r.n_test)} "
            f"| {_cell(r.n_near_duplicate_pairs_across_train_test)} | "
            f"{_cell(r.n_near_duplicate_pairs)} | {_cell(r.n_near_duplicates_dropped)} | {r.n} |"
        )
    return "\n".join([header, *lines])


def skin_tone_markdown(table: pd.DataFrame) -> str:
    header = (
        "| scenario | skin_tone_filter | real dark test ITA | real light sources ITA | "
        "synthetic ITA | on target | kept | n seeds |\n|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"| {r.scenario} | {'on' if r.filtered else 'off'} | {_cell(r.real_dark_test_ita)} | "
        f"{_cell(r.source_light_ita)} | {_cell(r.synthetic_ita)} | {_cell(r.on_target)} | "
        f"{_cell(r.kept)} | {r.n} |"
        for r in table.itertuples()
    ]
    return "\n".join([header, *lines])


# One synthetic_quality run's measures (over all conditions), per (scenario, seed) and set:
# the synthetic images, and the real light-skinned sources they were made from (the baseline).
QUALITY_COLUMNS = [
    "scenario",
    "seed",
    "features",
    "set",
    "n_images",
    "fd",
    "kid",
    "precision",
    "recall",
    "density",
    "coverage",
    "memorized_share",  # synthetic images whose nearest non-source training image is alike
    "run_id",
]
QUALITY_MEASURES = ["fd", "kid", "precision", "recall", "density", "coverage", "memorized_share"]
QUALITY_NOTE = (
    "Each pair's synthetic_quality run against the scenario's real dark-skinned images outside "
    "its test split, in the features named (a lower Fréchet distance and KID, a higher "
    "precision, recall, density and coverage are closer to the real images), the mean over "
    "seeds; `light sources` is the real light-skinned images the synthetic ones were made "
    "from, scored the same way: the baseline synthetic images should beat. Memorized: the "
    "share of synthetic images whose cosine similarity (about the training images' mean) to "
    "a training image other than their source reaches the threshold, in the features, or in "
    "12 x 12 grey thumbnails where the features are a classifier's (its features make a "
    "condition's images alike)."
)


def quality_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per scenario, features and set: the means over seeds of QUALITY_MEASURES, and n seeds."""
    keys = ["scenario", "features", "set"]
    table = rows.groupby(keys, sort=False)[QUALITY_MEASURES].mean()
    table["n_seeds"] = rows.groupby(keys, sort=False)["seed"].nunique()
    table = table.reset_index()
    order = table["scenario"].map(list(SCENARIO_TABLE).index)
    return table.iloc[order.argsort(kind="stable")].reset_index(drop=True)


def quality_markdown(table: pd.DataFrame) -> str:
    def number(value: float, digits: int = 3) -> str:
        return "-" if pd.isna(value) else f"{value:.{digits}f}"

    columns = {
        "scenario": table["scenario"],
        "features": table["features"],
        "images": table["set"].str.replace("_", " "),
        "n seeds": table["n_seeds"],
        "FD": table["fd"].map(lambda v: number(v, 2)),
        "KID": table["kid"].map(lambda v: number(v, 4)),
        **{name: table[name].map(number) for name in ("precision", "recall", "density")},
        "coverage": table["coverage"].map(number),
        "memorized": table["memorized_share"].map(lambda v: number(100 * v, 1)),
    }
    return pd.DataFrame(columns).to_markdown(index=False, disable_numparse=True)


def similarity_figure(similarities: pd.DataFrame, threshold: float) -> Figure:
    """Per scenario, the distribution of each synthetic image's similarity to its nearest
    training image other than its source, pooled over seeds, the threshold marked."""
    scenarios = list(dict.fromkeys(similarities["scenario"]))
    figure = _figure(4 * len(scenarios), 3)
    panels = figure.subplots(1, len(scenarios), sharey=True, squeeze=False)[0]
    for axes, scenario in zip(panels, scenarios, strict=True):
        values = similarities.loc[similarities["scenario"] == scenario, "nearest_similarity"]
        axes.hist(values, bins=40, range=(-1, 1), color="tab:blue")
        axes.axvline(threshold, color="tab:red", label=f"memorized at {threshold}")
        axes.set_title(f"scenario {scenario}")
        axes.set_xlabel("similarity to the nearest non-source training image")
    panels[0].set_ylabel("synthetic images")
    panels[0].legend()
    return figure


def filtering_markdown(table: pd.DataFrame) -> str:
    lines = [
        f"| {r.scenario} | {r.train_type} | {_cell(r.f1_unfiltered)} | {_cell(r.f1_filtered)} |"
        for r in table.itertuples()
    ]
    return "\n".join(
        ["| scenario | train type | unfiltered | filtered |\n|---|---|---|---|", *lines]
    )


def filtering_comparison(groups: Sequence["SettingsGroup"]) -> pd.DataFrame | None:
    """Classifier F1 (mean over archs and seeds, percent) with and without skin_tone_filter,
    per scenario and train type, where the groups' runs include both; else None."""
    parts = []
    for group in groups:
        tones = group.skin_tones
        if tones is None or tones.empty or group.classifier_scores.empty:
            continue
        # One row of `tones` per (scenario, seed), taken from these scores: same keys, same types.
        scores = group.classifier_scores.merge(
            tones[["scenario", "seed", "filtered"]], on=["scenario", "seed"]
        )
        parts.append(scores[scores["train_type"] != "real"])
    if not parts:
        return None
    scores = pd.concat(parts)
    if scores["filtered"].nunique() < 2:
        return None
    table = scores.pivot_table(
        index=["scenario", "train_type"], columns="filtered", values="f1", aggfunc="mean"
    )
    table = (table * 100).rename(columns={False: "f1_unfiltered", True: "f1_filtered"})
    return table.reset_index()


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)  # render with Agg whatever pyplot's backend is
    return figure


def classification_figure(table: pd.DataFrame, title: str) -> Figure:
    """Grouped bars per metric: architectures on the x axis, one bar per train type (std as
    error bars), the paper's means as black marks."""
    archs = list(dict.fromkeys(table["arch"]))
    types = list(dict.fromkeys(table["train_type"]))
    width = 0.8 / len(types)
    figure = _figure(4 * len(METRICS), 3.6)
    figure.suptitle(title)
    for axes, metric in zip(figure.subplots(1, len(METRICS)), METRICS, strict=True):
        for k, train_type in enumerate(types):
            rows = table[table["train_type"] == train_type].set_index("arch").reindex(archs)
            x = np.arange(len(archs)) + (k - (len(types) - 1) / 2) * width
            std = rows[f"{metric}_std"].fillna(0)
            axes.bar(x, rows[f"{metric}_mean"], width, yerr=std, capsize=3, label=train_type)
            axes.scatter(x, rows[f"paper_{metric}_mean"], marker="_", s=200, color="black")
        axes.set_xticks(np.arange(len(archs)), [ARCH_TITLES.get(a, a) for a in archs])
        axes.set_title(METRIC_TITLES[metric])
        axes.set_ylim(0, 100)
        axes.set_ylabel("%")
    axes.scatter([], [], marker="_", s=200, color="black", label="paper (difference of its means)")
    figure.legend(*axes.get_legend_handles_labels(), loc="outside right center")
    return figure


def ablation_figure(table: pd.DataFrame) -> Figure:
    """Light-minus-dark accuracy per generation mode, ours (std over seeds) beside the paper's."""
    x = np.arange(len(table))
    figure = _figure(8, 3.6)
    axes = figure.add_subplot()
    axes.bar(x - 0.2, table["gap_mean"], 0.4, yerr=table["gap_std"].fillna(0), label="ours")
    axes.bar(x + 0.2, table["paper_gap"], 0.4, label="paper", color="gray")
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xticks(x, table["mode"], rotation=20)
    axes.set_ylabel("accuracy light - dark (points)")
    axes.set_title("Table 5: light-vs-dark accuracy gap per generation mode")
    axes.legend()
    return figure


REPORT = "report.md"
MARKER = "<!-- skindiff report; files: "


def previous_report_files(output_dir: Path) -> list[str]:
    """The files an earlier report wrote to `output_dir` ([] for a missing or empty folder);
    refuses any other non-empty folder, so a user's files are never overwritten."""
    if output_dir.exists() and not output_dir.is_dir():
        raise SkindiffError(f"output_dir {output_dir} is a file, not a folder")
    if not output_dir.exists() or not any(output_dir.iterdir()):
        return []
    report = output_dir / REPORT
    first = report.read_text().partition("\n")[0] if report.is_file() else ""
    if not first.startswith(MARKER):
        raise SkindiffError(
            f"output_dir {output_dir} is not empty and holds no skindiff report: "
            "choose an empty or new folder"
        )
    return first.removeprefix(MARKER).removesuffix(" -->").split(", ")


@dataclass(frozen=True)
class SettingsGroup:
    """The runs of one set of study settings: classifier scores (rows of scenario, seed, arch,
    train_type, the METRICS, train_size, n_test, n_test_per_class), ablation rows (seed, mode,
    test_set, accuracy) and a real/synthetic image grid standing for the paper's Fig. 2."""

    digest: str  # settings_digest(settings)
    settings: dict[str, str]
    classifier_scores: pd.DataFrame
    ablation_scores: pd.DataFrame
    figure_2: Path | None
    tuned_from: str | None = None  # where frozen params came from (`main --frozen-params`)
    tune_protocol: str | None = None  # the tune run's, where known: "paper" or "exclude-..."
    skin_tones: pd.DataFrame | None = None  # rows of SKIN_TONE_COLUMNS, per (scenario, seed)
    # Per (scenario, seed) of pairs with frozen settings, rows of TUNING_OVERLAP_COLUMNS: how
    # many of its test images scored the tuning objective (NaN where not known).
    tuning_overlap: pd.DataFrame | None = None
    # Per classifier run that `paired_runs` compares: its test predictions, None where it has
    # none (or no label set), so the report names it.
    predictions: Mapping[str, "RunPredictions | None"] = field(default_factory=dict)
    # The same runs' predictions on light-skinned test images (an evaluate run's), None where
    # they were never scored on any.
    light_predictions: Mapping[str, "RunPredictions | None"] = field(default_factory=dict)
    # Rows of QUALITY_COLUMNS per pair with a synthetic_quality run; its images' nearest
    # training similarities (scenario, seed, nearest_similarity) and the threshold it used.
    quality: pd.DataFrame | None = None
    nearest_similarities: pd.DataFrame | None = None
    memorization_threshold: float | None = None
    near_duplicates: pd.DataFrame | None = None  # rows of NEAR_DUPLICATE_COLUMNS


def settings_digest(settings: Mapping[str, str]) -> str:
    """A short name of a set of settings: the same settings, the same digest, in any order."""
    text = json.dumps(dict(sorted(settings.items())))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def differing_settings(groups: Sequence[SettingsGroup]) -> dict[str, dict[str, str]]:
    """Per group digest: the settings whose value is not the same in all `groups`."""
    names = sorted(set().union(*(group.settings for group in groups)))
    differing = [n for n in names if len({group.settings.get(n) for group in groups}) > 1]
    return {g.digest: {n: g.settings.get(n, "(unset)") for n in differing} for g in groups}


MAX_TITLE_SETTINGS = 6


def group_title(group: SettingsGroup, differing: Mapping[str, str]) -> str:
    """`settings 1a2b3c4d: epochs=20, finetune=full`, marked where the epochs were selected on
    the test split."""
    shown = [f"{name}={value}" for name, value in differing.items()]
    if len(shown) > MAX_TITLE_SETTINGS:
        rest = len(shown) - MAX_TITLE_SETTINGS
        shown = [*shown[:MAX_TITLE_SETTINGS], f"and {rest} more (settings.csv)"]
    title = f"settings {group.digest}" + (f": {', '.join(shown)}" if shown else "")
    if group.settings.get("selection") == "test":
        title += " (selected on test, as the reference code)"
    return title


# The test sizes the paper states (captions of its Tables 2-5): scenario i tests on the
# 56-image dark flexible subset, ii and iii on the 291 non-flexible dark images, the ablation on
# the 56-image light and dark flexible subsets.
PAPER_TEST_SIZE = {"i": 56, "ii": 291, "iii": 291}
PAPER_ABLATION_TEST_SIZE = 56
# A mean printed with 2 decimals is within 0.005 of the true mean; 1e-9 absorbs float error.
PRINTED_MEAN_TOLERANCE = 0.005 + 1e-9


def impossible_means(
    means: Iterable[float], n_test: int, seed_counts: Iterable[int]
) -> list[float]:
    """The `means` (percent, printed with 2 decimals) that are not the mean of m accuracies
    over `n_test` images for any m of `seed_counts`. Such a mean is (sum of the m numbers of
    right answers) / (m * n_test) * 100, so it is possible for m where the nearest multiple of
    100 / (m * n_test) rounds to it."""
    counts = list(seed_counts)

    def possible(mean: float, m: int) -> bool:
        images = m * n_test
        return abs(round(mean * images / 100) * 100 / images - mean) <= PRINTED_MEAN_TOLERANCE

    return [mean for mean in means if not any(possible(mean, m) for m in counts)]


def paper_means_note(table: str, means: Sequence[float], n_test: int) -> str:
    """`table`'s mean accuracies (the paper's) that no 1 to PAPER_SEEDS seeds over `n_test`
    test images give, then those that PAPER_SEEDS seeds do not give, in one sentence."""
    never = impossible_means(means, n_test, range(1, PAPER_SEEDS + 1))
    not_all_seeds = [m for m in impossible_means(means, n_test, [PAPER_SEEDS]) if m not in never]
    return (
        f"{table}: {len(never)} of its {len(means)} mean accuracies{_listed(never)} cannot be "
        f"the mean of 1 to {PAPER_SEEDS} accuracies over {n_test} test images; "
        f"{len(not_all_seeds)} more{_listed(not_all_seeds)} cannot be a {PAPER_SEEDS}-seed mean."
    )


def _listed(values: Sequence[float]) -> str:
    return f" ({', '.join(f'{v:.2f}' for v in values)})" if values else ""


def construction_notes(scores: pd.DataFrame, ablation: bool) -> list[str]:
    """Where the paper's tables cannot be matched by construction: for Tables 2-4, with the
    numbers of these runs' test splits (the paper's tables are compared with its 5 seeds); then
    the paper's mean accuracies that its own stated test sizes cannot give, for the tables of
    the scenarios in `scores`, and for Table 5 with `ablation`."""
    notes = []
    paper = paper_classifiers()
    present = set(scores["scenario"]) if len(scores) else set()
    for scenario, number in SCENARIO_TABLE.items():
        if scenario not in present:
            continue
        rows = scores[scores["scenario"] == scenario]
        n_test = rows["n_test"].dropna()
        if n_test.empty:
            continue
        n = int(n_test.mode().iloc[0])
        published = paper[paper["scenario"] == scenario]
        per_class = rows["n_test_per_class"].dropna()
        if len(per_class) == len(rows):
            differ = int((published["paper_recall_mean"] != published["paper_accuracy_mean"]).sum())
            notes.append(
                f"Scenario {scenario}: the test split holds {int(per_class.iloc[0])} images of "
                f"every class, so macro recall equals accuracy in every row here; the paper's "
                f"Table {number} has recall != accuracy in {differ} of {len(published)} rows."
            )
        smallest = 100 / (n * math.sqrt(PAPER_SEEDS))
        stds = published["paper_accuracy_std"]
        below = int(((stds > 0) & (stds < smallest)).sum())
        notes.append(
            f"Scenario {scenario}: an accuracy over {n} test images moves in steps of "
            f"{100 / n:.2f} points, so the smallest non-zero sample std over {PAPER_SEEDS} seeds "
            f"is {smallest:.2f}; {below} of the {len(stds)} accuracy stds of the paper's Table "
            f"{number} ({stds.min():.2f}-{stds.max():.2f}) are below it."
        )
    for scenario, number in SCENARIO_TABLE.items():
        if scenario in present:
            means = paper[paper["scenario"] == scenario]["paper_accuracy_mean"].tolist()
            notes.append(paper_means_note(f"Table {number}", means, PAPER_TEST_SIZE[scenario]))
    if ablation:
        means = [mean for test_set in TEST_SETS for mean in PAPER_ABLATION[test_set].values()]
        notes.append(paper_means_note("Table 5", means, PAPER_ABLATION_TEST_SIZE))
    return notes


PAPER_TUNE_PROTOCOL = "paper"
TUNING_OVERLAP_COLUMNS = ["scenario", "seed", "tune_seed", "n_test", "n_scored_by_tuning"]


def tuning_note(group: SettingsGroup) -> str | None:
    """What tuned settings mean for the independence of each scenario's test split: per pair,
    how many of its test images scored the tuning objective (`group.tuning_overlap`)."""
    if group.tuned_from is None:
        return None
    protocol = group.tune_protocol or "unknown"
    head = f"Tuned settings frozen from `{group.tuned_from}` (tune protocol: {protocol})"
    if protocol == PAPER_TUNE_PROTOCOL:
        head += (
            ": the tuning objective was scored on scenario i's validation split of the seed "
            "they were tuned on, which holds that seed's test images of scenarios ii and iii"
        )
    elif protocol.startswith("exclude-test-of"):
        head += (
            ": the tuning objective was scored on scenario i's test split of the seed they "
            "were tuned on, so scenario i's results are not independent of it; scenario i's "
            "training and validation splits left out the test images of ii and iii of that "
            "seed only"
        )
    counted = group.tuning_overlap
    if counted is None or counted["n_scored_by_tuning"].isna().all():
        return (
            f"{head}. The seed they were tuned on is unknown (not recorded with these runs), "
            "so how many of each scenario's test images scored the tuning objective is unknown."
        )
    lines = []
    for row in counted.sort_values(["scenario", "seed"]).itertuples():
        where = f"scenario {row.scenario} seed {row.seed}"
        if pd.isna(row.n_scored_by_tuning):
            lines.append(f"- {where}: unknown (the seed its settings were tuned on is unknown)")
        else:
            lines.append(
                f"- {where}: {row.n_scored_by_tuning:.0f} of its {row.n_test:.0f} test images "
                f"scored the tuning objective (settings tuned on seed {row.tune_seed})"
            )
    shared = counted[counted["scenario"].isin(["ii", "iii"])]["n_scored_by_tuning"]
    if len(shared) and (shared == 0).all():
        summary = (
            "Each seed's settings were tuned without its own test images of scenarios ii and "
            "iii, so their results are independent of their test images."
        )
    elif len(shared):
        summary = (
            "Results whose test images scored the tuning objective are not independent of "
            "them (`tune --seeds` tunes each seed without its own)."
        )
    else:
        summary = "Test images that scored the tuning objective, per pair:"
    return f"{head}. {summary}\n\n" + "\n".join(lines)


def write_report(
    groups: Sequence[SettingsGroup],
    output_dir: Path,
    source: str,
    replicates: int = 2000,
    confidence: float = 0.95,
) -> list[Path]:
    """Writes, per group, the tables (Markdown + CSV), the plots, the Fig. 2 grid and the
    paired differences (`replicates` bootstrap replicates and randomization resamples,
    intervals at `confidence`), then report.md, to `output_dir` (replacing only an earlier
    report's files); returns the paths written, report.md last. `source` says in a line where
    the scores come from. With more than one group, file names end in the group's digest."""
    old = previous_report_files(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in old:
        (output_dir / Path(name).name).unlink(missing_ok=True)
    written: list[Path] = []

    def save(name: str, content: str | pd.DataFrame | Figure | Path) -> str:
        path = output_dir / name
        if isinstance(content, pd.DataFrame):
            content.to_csv(path, index=False)
        elif isinstance(content, Figure):
            content.savefig(path, dpi=100)
        elif isinstance(content, Path):
            shutil.copyfile(content, path)
        else:
            path.write_text(content + "\n")
        written.append(path)
        return name

    main = [g for g in groups if len(g.classifier_scores)]
    ablation = [g for g in groups if len(g.ablation_scores)]
    differing = differing_settings(main) | differing_settings(ablation)
    suffix = {g.digest: f"_{g.digest}" if len(groups) > 1 else "" for g in groups}
    sections = []
    for group in groups:
        title = group_title(group, differing[group.digest])
        sections.append(f"## {title}")
        sections.extend(_group_sections(group, suffix[group.digest], save))
        sections.extend(_paired_sections(group, suffix[group.digest], save, replicates, confidence))
    settings = [
        {"settings": g.digest, "name": name, "value": value}
        for g in groups
        for name, value in sorted(g.settings.items())
    ]
    save("settings.csv", pd.DataFrame(settings, columns=["settings", "name", "value"]))
    all_scores = [g.classifier_scores for g in main]
    save("scores_classifiers.csv", pd.concat(all_scores) if all_scores else pd.DataFrame())
    all_rows = [g.ablation_scores.assign(settings=g.digest) for g in ablation]
    save("scores_ablation.csv", pd.concat(all_rows) if all_rows else pd.DataFrame())
    comparison = filtering_comparison(main)
    if comparison is not None:
        save("skin_tone_filtering.csv", comparison)
        sections.append(
            "## Skin-tone filter: classifiers on unfiltered and filtered synthetic images\n\n"
            "F1 (macro, percent), the mean over architectures and seeds.\n\n"
            f"{filtering_markdown(comparison)}"
        )
    names = [path.name for path in written] + [REPORT]
    header = (
        f"{MARKER}{', '.join(names)} -->\n# skindiff report\n\n{source} Each group of "
        f"settings has its own tables; `settings.csv` lists every group's settings.\n\n{STD_NOTE}"
    )
    save(REPORT, "\n\n".join([header, *sections]))
    return written


def _group_sections(
    group: SettingsGroup, suffix: str, save: Callable[[str, object], str]
) -> list[str]:
    """The Markdown sections of one group, saving its files with `save(name, content)`."""
    sections = []
    scores = group.classifier_scores
    present = set(scores["scenario"]) if len(scores) else set()
    for scenario, number in SCENARIO_TABLE.items():
        if scenario not in present:
            continue
        stem = f"table{number}_scenario_{scenario}{suffix}"
        table = classification_table(scores, scenario)
        title = f"Table {number}: scenario {scenario}"
        markdown = classification_markdown(table)
        save(f"{stem}.csv", table)
        save(f"{stem}.md", f"### {title}\n\n{markdown}")
        plot = save(f"{stem}.png", classification_figure(table, title))
        sections.append(f"### {title}\n\n{markdown}\n\n![{title}]({plot})")
    notes = construction_notes(scores, ablation=len(group.ablation_scores) > 0)
    tuned = tuning_note(group)
    if tuned:
        sections.append(f"### Tuned settings\n\n{tuned}")
    if notes:
        listing = "\n".join(f"- {note}" for note in notes)
        sections.append(
            f"### Where the paper's numbers cannot be matched by construction\n\n{listing}"
        )
    if group.figure_2 is not None:
        figure = save(f"figure2{suffix}.png", group.figure_2)
        sections.append(
            "### Fig. 2: real light-skinned images and their synthetic dark-skinned variants\n\n"
            f"Per condition, a real training image (light-skinned where there is one) followed by "
            f"the variants generated from it.\n\n![Fig. 2]({figure})"
        )
    summaries = (
        (
            group.near_duplicates,
            near_duplicate_table,
            near_duplicate_markdown,
            "near_duplicates",
            "Near-duplicates: test images with a copy in training",
            NEAR_DUPLICATE_NOTE,
        ),
        (
            group.skin_tones,
            skin_tone_table,
            skin_tone_markdown,
            "skin_tone",
            "Skin tone of the real and synthetic images (ITA)",
            SKIN_TONE_NOTE,
        ),
    )
    for rows, summarise, markdown, name, title, note in summaries:
        if rows is not None and len(rows):
            table = summarise(rows)
            save(f"{name}{suffix}.csv", table)
            sections.append(f"### {title}\n\n{note}\n\n{markdown(table)}")
    if group.quality is not None and len(group.quality):
        table = quality_summary(group.quality)
        save(f"synthetic_quality{suffix}.csv", table)
        parts = [f"### Synthetic image quality\n\n{QUALITY_NOTE}\n\n{quality_markdown(table)}"]
        if group.nearest_similarities is not None and len(group.nearest_similarities):
            figure = similarity_figure(group.nearest_similarities, group.memorization_threshold)
            plot = save(f"synthetic_quality_similarity{suffix}.png", figure)
            parts.append(f"![nearest training similarity]({plot})")
        sections.append("\n\n".join(parts))
    if len(group.ablation_scores):
        table = ablation_table(group.ablation_scores)
        title = "Table 5: ablation (scenario i, synthetic-only classifier, accuracy)"
        markdown = ablation_markdown(table)
        save(f"table5_ablation{suffix}.csv", table)
        save(f"table5_ablation{suffix}.md", f"### {title}\n\n{markdown}")
        plot = save(f"table5_ablation_gap{suffix}.png", ablation_figure(table))
        sections.append(f"### {title}\n\n{markdown}\n\n![light-vs-dark gap]({plot})")
    return sections


@dataclass(frozen=True)
class RunPredictions:
    """A classifier run's per-image test predictions (columns md5hash, label, predicted) and
    the label set its metrics were scored on (macro F1 averages over all of it)."""

    labels: tuple[str, ...]
    frame: pd.DataFrame


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
PAIRED_FILE = "paired_differences"
MAIN_COMPARISONS = (("real+syn", "real"), ("syn", "real"))  # (candidate, baseline)
# Table 5's classifiers are compared with the paper's best mode, on the dark test set only: its
# predictions are the classifier run's own test predictions (scenario i's test split).
ABLATION_BASELINE = "img2img/ti+lora"
ABLATION_SCENARIO = "ablation"
PAIRED_METRIC_TITLES = {"accuracy": "accuracy", "f1_macro": "macro F1"}
PAIRED_RUN_COLUMNS = [
    "scenario",
    "arch",
    "comparison",
    "seed",
    "baseline_run_id",
    "candidate_run_id",
    "baseline",  # what the run is, for the report: `i/seed-0/vgg16/real`
    "candidate",
]


def paired_runs(group: SettingsGroup) -> pd.DataFrame:
    """The pairs of classifier runs tested on the same images that the report compares, rows
    of PAIRED_RUN_COLUMNS: per (scenario, seed, arch) each of MAIN_COMPARISONS, and per
    ablation seed each generation mode against ABLATION_BASELINE. In the paper's order."""
    rows = []

    def add(runs: pd.DataFrame, candidate: str, baseline: str, where) -> None:
        """A row per index of `runs` (run ids, one column per train type or mode) with both;
        `where(index)` gives (scenario, arch, seed, what the runs are but their column)."""
        if {candidate, baseline} <= set(runs.columns):
            for index, run in runs.dropna(subset=[candidate, baseline]).iterrows():
                scenario, arch, seed, key = where(index)
                comparison = f"{candidate} vs {baseline}"
                rows.append([scenario, arch, comparison, seed, run[baseline], run[candidate]])
                rows[-1] += [f"{key}/{baseline}", f"{key}/{candidate}"]

    scores = group.classifier_scores
    if len(scores):
        index = ["scenario", "arch", "seed"]
        runs = scores.pivot_table(
            index=index, columns="train_type", values="run_id", aggfunc="first"
        )
        for candidate, baseline in MAIN_COMPARISONS:
            add(runs, candidate, baseline, lambda i: (*i, f"{i[0]}/seed-{i[2]}/{i[1]}"))
    ablation = group.ablation_scores
    if len(ablation):
        dark = ablation[ablation["test_set"] == "dark"]
        runs = dark.pivot_table(
            index="seed", columns="mode", values="classifier_run_id", aggfunc="first"
        )
        arch = group.settings.get("arch", "")
        modes = pd.Series(sorted(set(runs.columns) - {ABLATION_BASELINE}), dtype=object)

        def where(seed: int) -> tuple:
            return ABLATION_SCENARIO, arch, seed, f"{ABLATION_SCENARIO}/seed-{seed}"

        for mode in modes.sort_values(key=lambda c: _order(c, ABLATION_MODES)):
            add(runs, mode, ABLATION_BASELINE, where)
    table = pd.DataFrame(rows, columns=PAIRED_RUN_COLUMNS)
    order = {"scenario": [*SCENARIO_TABLE, ABLATION_SCENARIO], "arch": ARCHS}
    table = table.sort_values(
        ["scenario", "arch"], key=lambda c: _order(c, order[c.name]), kind="stable"
    )
    return table.reset_index(drop=True)


def _seed_pair(
    pair, predictions: Mapping[str, RunPredictions], what: str = "tested"
) -> paired.SeedPredictions:
    """One seed's two runs' predictions, image by image (matched by md5hash); refuses runs
    `what` (tested, scored on light images) on different images or on different label sets."""
    baseline = predictions[pair.baseline_run_id]
    candidate = predictions[pair.candidate_run_id]
    runs = (
        f"classifier runs {pair.baseline_run_id} ({pair.baseline}) and "
        f"{pair.candidate_run_id} ({pair.candidate})"
    )
    first = baseline.frame.set_index("md5hash")
    second = candidate.frame.set_index("md5hash")
    same = (
        first.index.is_unique and second.index.is_unique and set(first.index) == set(second.index)
    )
    if not same:
        common = len(set(first.index) & set(second.index))
        raise SkindiffError(
            f"{runs} were {what} on different images ({len(first)} and {len(second)} "
            f"predictions, {common} images in common): they cannot be compared image by image"
        )
    second = second.loc[first.index]
    if baseline.labels != candidate.labels or (first["label"] != second["label"]).any():
        raise SkindiffError(f"{runs} disagree on the test images' labels or label set")
    return paired.SeedPredictions.from_labels(
        first["label"].tolist(),
        first["predicted"].tolist(),
        second["predicted"].tolist(),
        baseline.labels,
    )


def _paper_difference(scenario: str, arch: str, comparison: str, metric: str) -> float:
    """The paper's candidate mean minus its baseline mean (Tables 2-5), NaN where it has none:
    its tables have macro F1 for Tables 2-4 only."""
    candidate, baseline = comparison.split(" vs ")
    if scenario == ABLATION_SCENARIO:
        dark = PAPER_ABLATION["dark"]
        if metric != "accuracy" or candidate not in dark or arch != "vgg16":
            return float("nan")
        return dark[candidate] - dark[baseline]
    column = {"accuracy": "paper_accuracy_mean", "f1_macro": "paper_f1_mean"}[metric]
    paper = paper_classifiers().set_index(["scenario", "arch", "train_type"])[column]
    if (scenario, arch, candidate) not in paper.index:
        return float("nan")
    return paper[(scenario, arch, candidate)] - paper[(scenario, arch, baseline)]


def paired_differences(
    group: SettingsGroup, replicates: int, confidence: float
) -> tuple[pd.DataFrame, list[str]]:
    """Rows of PAIRED_COLUMNS for the group's `paired_runs`, from the seeds where both runs
    have predictions, Holm-corrected per table (a scenario, or the ablation); and the runs
    without predictions, as `run id (what it is)`."""
    pairs = paired_runs(group)
    missing = {}
    for run_id, name in [
        *zip(pairs["baseline_run_id"], pairs["baseline"], strict=True),
        *zip(pairs["candidate_run_id"], pairs["candidate"], strict=True),
    ]:
        if group.predictions.get(run_id) is None:
            missing[run_id] = name
    usable = pairs[
        ~pairs["baseline_run_id"].isin(missing) & ~pairs["candidate_run_id"].isin(missing)
    ]
    rows = []
    for (scenario, arch, comparison), seeds in usable.groupby(
        ["scenario", "arch", "comparison"], sort=False
    ):
        seed_pairs = [_seed_pair(pair, group.predictions) for pair in seeds.itertuples()]
        for metric in paired.METRICS:
            result = paired.paired_difference(seed_pairs, metric, replicates, confidence)
            values = {
                name: getattr(result, name) for name in PAIRED_COLUMNS if hasattr(result, name)
            }
            paper_diff = _paper_difference(scenario, arch, comparison, metric)
            rows.append(
                values
                | {
                    "group": group.digest,
                    "scenario": scenario,
                    "arch": arch,
                    "comparison": comparison,
                    "paper_diff": paper_diff,
                }
            )
    table = pd.DataFrame(rows, columns=PAIRED_COLUMNS)
    for _, rows_of_table in table.groupby("scenario", sort=False):
        table.loc[rows_of_table.index, "p_holm"] = paired.holm(rows_of_table["p_value"].tolist())
    listed = [f"{run_id} ({name})" for run_id, name in sorted(missing.items(), key=lambda i: i[1])]
    return table, listed


FAIRNESS_FILE = "fairness_gap"
FAIRNESS_COLUMNS = [
    "group",
    "scenario",
    "arch",
    "comparison",
    *(f.name for f in fields(paired.FairnessGap)),
]


def fairness_gaps(group: SettingsGroup, replicates: int, confidence: float) -> pd.DataFrame:
    """Rows of FAIRNESS_COLUMNS: per comparison of `paired_runs`, from the seeds where both
    runs have test predictions (dark-skinned in every scenario) and light predictions, the
    light-minus-dark macro-F1 gap of each and how much the candidate narrowed it."""
    pairs = paired_runs(group)
    ids = ["baseline_run_id", "candidate_run_id"]
    both = [group.predictions, group.light_predictions]
    usable = pairs[
        pairs[ids].map(lambda run: all(p.get(run) is not None for p in both)).all(axis=1)
    ]
    rows = []
    for (scenario, arch, comparison), seeds in usable.groupby(
        ["scenario", "arch", "comparison"], sort=False
    ):
        seed_groups = [
            paired.SeedGroups(
                _seed_pair(pair, group.light_predictions, "scored on light images"),
                _seed_pair(pair, group.predictions),
            )
            for pair in seeds.itertuples()
        ]
        result = paired.fairness_gap(seed_groups, replicates, confidence)
        key = {"group": group.digest, "scenario": scenario, "arch": arch}
        rows.append(key | {"comparison": comparison} | asdict(result))
    return pd.DataFrame(rows, columns=FAIRNESS_COLUMNS)


def _interval(value: float, low: float, high: float) -> str:
    return f"{_signed(value)} [{_signed(low)}, {_signed(high)}]"


def fairness_markdown(table: pd.DataFrame) -> str:
    columns = {
        "scenario": table["scenario"],
        "architecture": table["arch"].map(lambda a: ARCH_TITLES.get(a, a)),
        "comparison": table["comparison"],
        "n seeds": table["n_seeds"],
        "light / dark images": [
            f"{r.n_light_images} / {r.n_dark_images}" for r in table.itertuples()
        ],
        "baseline gap": [
            _interval(r.baseline_gap, r.baseline_ci_low, r.baseline_ci_high)
            for r in table.itertuples()
        ],
        "candidate gap": [
            _interval(r.candidate_gap, r.candidate_ci_low, r.candidate_ci_high)
            for r in table.itertuples()
        ],
        "narrowing": [
            _interval(r.narrowing, r.narrowing_ci_low, r.narrowing_ci_high)
            for r in table.itertuples()
        ],
        "seeds narrowed": [f"{r.seeds_narrowed} of {r.n_seeds}" for r in table.itertuples()],
        "verdict": table["verdict"],
    }
    return pd.DataFrame(columns).to_markdown(index=False, disable_numparse=True)


def _fairness_section(
    group: SettingsGroup,
    suffix: str,
    save: Callable[[str, object], str],
    replicates: int,
    confidence: float,
) -> str | None:
    """The light-minus-dark gap subsection, saving its CSV; None without light predictions."""
    table = fairness_gaps(group, replicates, confidence)
    if table.empty:
        return None
    save(f"{FAIRNESS_FILE}{suffix}.csv", table)
    return "\n\n".join(
        [
            "### Light-minus-dark gap: did synthetic data narrow it?",
            "Macro F1 on light-skinned test images (each classifier's evaluate run on them: "
            "`main`'s and `ablation`'s on the seed's light flexible subset, which no scenario "
            "trains on) minus macro F1 on its dark-skinned test split, in points, the mean over "
            "seeds, for the baseline and the candidate of each comparison above. Narrowing: "
            "|baseline gap| - |candidate gap|, positive where the candidate's gap is closer to "
            f"0. Intervals: {confidence:.0%} percentile bootstrap with {replicates} replicates "
            "that resample each seed's light and dark images on their own, both classifiers "
            "scored on the same draw. Verdict: `narrowed` or `widened` where the narrowing's "
            "interval lies above or below 0.",
            fairness_markdown(table),
        ]
    )


def _signed(value: float) -> str:
    return "-" if pd.isna(value) else f"{value:+.2f}"


def _p(value: float) -> str:
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def paired_markdown(table: pd.DataFrame) -> str:
    columns = {
        "scenario": table["scenario"],
        "architecture": table["arch"].map(lambda a: ARCH_TITLES.get(a, a)),
        "comparison": table["comparison"],
        "metric": table["metric"].map(PAIRED_METRIC_TITLES),
        "n seeds": table["n_seeds"],
        "test images": table["n_test_images"],
        "difference [interval]": [
            _interval(r.mean_diff, r.ci_low, r.ci_high) for r in table.itertuples()
        ],
        "p (Holm)": table["p_holm"].map(_p),
        "p": table["p_value"].map(_p),
        "same sign": [f"{r.seeds_same_sign} of {r.n_seeds}" for r in table.itertuples()],
        "verdict": table["verdict"],
        "paper": table["paper_diff"].map(_signed),
    }
    return pd.DataFrame(columns).to_markdown(index=False, disable_numparse=True)


def detectable_differences(table: pd.DataFrame) -> str:
    """Per scenario and metric, the median half-width of the rows' intervals, in one line."""
    half = (table["ci_high"] - table["ci_low"]) / 2
    medians = half.groupby([table["scenario"], table["metric"]], sort=False).median()
    return "; ".join(
        f"{scenario} {PAIRED_METRIC_TITLES[metric]} ±{value:.2f}"
        for (scenario, metric), value in medians.items()
    )


def paired_figure(table: pd.DataFrame) -> Figure:
    """Forest plot, one panel per metric, one line per comparison: the mean difference over
    seeds with its interval, the paper's difference of means as a second mark, 0 marked."""
    keys = list(
        dict.fromkeys(zip(table["scenario"], table["arch"], table["comparison"], strict=True))
    )
    names = [f"{s} · {ARCH_TITLES.get(a, a)} · {c}" for s, a, c in keys]
    y = np.arange(len(keys))[::-1]
    position = dict(zip(keys, y, strict=True))
    figure = _figure(11, 1.2 + 0.32 * len(keys))
    panels = figure.subplots(1, len(paired.METRICS), sharey=True, squeeze=False)[0]
    for axes, metric in zip(panels, paired.METRICS, strict=True):
        rows = table[table["metric"] == metric]
        at = [
            position[k]
            for k in zip(rows["scenario"], rows["arch"], rows["comparison"], strict=True)
        ]
        axes.hlines(at, rows["ci_low"], rows["ci_high"], color="tab:blue")
        axes.scatter(
            rows["mean_diff"],
            at,
            color="tab:blue",
            zorder=3,
            label="mean over seeds, with its interval",
        )
        axes.scatter(
            rows["paper_diff"],
            at,
            marker="x",
            color="black",
            zorder=3,
            label="paper (difference of its means)",
        )
        axes.axvline(0, color="gray", linewidth=0.8)
        axes.set_title(f"{PAIRED_METRIC_TITLES[metric]}: candidate - baseline")
        axes.set_xlabel("points")
    panels[0].set_yticks(y, names)
    panels[0].set_ylim(-0.7, len(keys) - 0.3)
    figure.legend(*panels[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    return figure


def _paired_sections(
    group: SettingsGroup,
    suffix: str,
    save: Callable[[str, object], str],
    replicates: int,
    confidence: float,
) -> list[str]:
    """The group's "Is the difference real?" section, saving its CSV and forest plot; none
    where the group has no runs to compare."""
    if paired_runs(group).empty:
        return []
    table, missing = paired_differences(group, replicates, confidence)
    save(f"{PAIRED_FILE}{suffix}.csv", table)
    parts = [
        "### Is the difference real?",
        "Paired differences, candidate minus baseline, in points: per seed the difference of "
        "two classifiers tested on the same images (matched by md5hash), then the mean over "
        "seeds. Both come from the runs' per-image test predictions. Interval: "
        f"{confidence:.0%} percentile bootstrap with {replicates} replicates, resampling the "
        "test images within each seed, both classifiers scored on the same resample; "
        "percentile rather than BCa because the metrics are discrete (an accuracy moves in "
        "steps of 100/n points) and BCa is undefined when two classifiers agree everywhere. "
        "p: a paired randomization test (each image's two predictions swapped with "
        f"probability 1/2, within its seed; {replicates} resamples, or every swap where there "
        "are fewer), Holm-corrected over the rows of one table (`p (Holm)`; a table is one "
        "scenario, or the ablation), the uncorrected p beside it. The verdict comes from the "
        "row's interval alone: `better` or `worse` where it lies above or below 0, else "
        "`not distinguishable`. Same sign: the seeds whose difference has the mean's sign. "
        "Paper: the difference of the paper's published means (Tables 2-4; Table 5's dark "
        "accuracy for VGG-16), `-` where it published none. Rows of `ablation` compare Table "
        "5's classifiers on the dark test set (scenario i's test split), each generation "
        f"mode against {ABLATION_BASELINE}.",
    ]
    if len(table):
        parts.append(
            "The smallest difference these test splits could detect, the median half-width of "
            f"the rows' intervals (points): {detectable_differences(table)}. A difference "
            "well inside it cannot be told from the draw of the test images and seeds."
        )
        parts.append(paired_markdown(table))
        plot = save(f"{PAIRED_FILE}{suffix}.png", paired_figure(table))
        parts.append(f"![paired differences]({plot})")
    fairness = _fairness_section(group, suffix, save, replicates, confidence)
    if fairness:
        parts.append(fairness)
    if missing:
        parts.append(
            "Runs without per-image test predictions (or the label set they were scored on), "
            f"left out of these comparisons: {', '.join(missing)}."
        )
    return ["\n\n".join(parts)]
