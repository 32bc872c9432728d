"""The paper's Tables 2-5 rebuilt from per-run scores, beside its published numbers, with plots.

Input scores are fractions (0-1), one row per classifier run; tables show percent, the mean
and the sample standard deviation (ddof=1) over seeds. A report folder is marked by the first
line of its report.md, which lists the files the report wrote: only those are ever replaced.
"""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skindiff.errors import SkindiffError

METRICS = ("accuracy", "precision", "recall", "f1")
METRIC_TITLES = {"accuracy": "Accuracy", "precision": "Precision", "recall": "Recall", "f1": "F1"}
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
    ours = _mean_std(scores[scores["scenario"] == scenario], ["arch", "train_type"], METRICS)
    paper = paper_classifiers().query("scenario == @scenario").drop(columns="scenario")
    table = ours.merge(paper, on=["arch", "train_type"], how="left")
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


def classification_markdown(table: pd.DataFrame) -> str:
    columns = {"architecture": table["arch"].map(lambda a: ARCH_TITLES.get(a, a))}
    columns["train type"] = table["train_type"]
    columns["n seeds"] = table["n_seeds"]
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
    axes.scatter([], [], marker="_", s=200, color="black", label="paper")
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


def write_report(
    classifier_scores: pd.DataFrame, ablation_scores: pd.DataFrame, output_dir: Path, source: str
) -> list[Path]:
    """Writes the tables (Markdown + CSV), the plots and report.md to `output_dir` (replacing
    only an earlier report's files); returns the paths written, report.md last. `source`
    says in a line where the scores come from."""
    old = previous_report_files(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in old:
        (output_dir / Path(name).name).unlink(missing_ok=True)
    sections, written = [], []

    def save(name: str, content: str | pd.DataFrame | Figure) -> str:
        path = output_dir / name
        if isinstance(content, pd.DataFrame):
            content.to_csv(path, index=False)
        elif isinstance(content, Figure):
            content.savefig(path, dpi=100)
        else:
            path.write_text(content + "\n")
        written.append(path)
        return name

    present = set(classifier_scores.get("scenario", ()))
    for scenario, number in SCENARIO_TABLE.items():
        if scenario not in present:
            continue
        stem = f"table{number}_scenario_{scenario}"
        table = classification_table(classifier_scores, scenario)
        title = f"Table {number}: scenario {scenario}"
        markdown = classification_markdown(table)
        save(f"{stem}.csv", table)
        save(f"{stem}.md", f"## {title}\n\n{markdown}")
        plot = save(f"{stem}.png", classification_figure(table, title))
        sections.append(f"## {title}\n\n{markdown}\n\n![{title}]({plot})")
    if len(ablation_scores):
        table = ablation_table(ablation_scores)
        title = "Table 5: ablation (scenario i, synthetic-only classifier, accuracy)"
        markdown = ablation_markdown(table)
        save("table5_ablation.csv", table)
        save("table5_ablation.md", f"## {title}\n\n{markdown}")
        plot = save("table5_ablation_gap.png", ablation_figure(table))
        sections.append(f"## {title}\n\n{markdown}\n\n![light-vs-dark gap]({plot})")
    save("scores_classifiers.csv", classifier_scores)
    save("scores_ablation.csv", ablation_scores)
    names = [path.name for path in written] + [REPORT]
    header = f"{MARKER}{', '.join(names)} -->\n# skindiff report\n\n{source}\n\n{STD_NOTE}"
    save(REPORT, "\n\n".join([header, *sections]))
    return written
