"""Classifier: metrics, training-set assembly and leakage guard, sampler, models, training loop."""

from collections import Counter
from dataclasses import replace
from pathlib import Path

import huggingface_hub
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from matplotlib.figure import Figure
from PIL import ImageOps
from safetensors.torch import save_file
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from torch import nn
from torchvision.models import resnet18

from skindiff.classify import data as classify_data
from skindiff.classify import train as train_module
from skindiff.classify.config import BUILTIN_ARCHS
from skindiff.classify.data import IMAGENET_MEAN, IMAGENET_STD, build_training_set, weighted_sampler
from skindiff.classify.metrics import classification_metrics, confusion_matrix_figure
from skindiff.classify.models import build_classifier, require_imagenet_files
from skindiff.classify.train import ClassifierConfig, predict, train_classifier
from skindiff.core.labels import slug
from skindiff.data.fitzpatrick import CONDITIONS
from skindiff.data.images import load_rgb
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.errors import SkindiffError
from skindiff.plans import StudyPlan

LABELS = tuple(sorted(CONDITIONS))
# Small and quick: a few seconds per run on two CPU cores.
QUICK = ClassifierConfig(arch="tiny", finetune="full", epochs=4, batch_size=16, image_size=64)


@pytest.fixture(scope="module")
def splits(demo_dataset):
    return prepare_scenario(PrepareConfig(scenario="i", seed=0)).splits


def synthetic_from(sources: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """A generator-style manifest: one mirrored copy of each source image, on dark skin."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for row in sources.itertuples():
        path = folder / f"{row.md5hash}-0.png"
        ImageOps.mirror(load_rgb(Path(row.path))).save(path)
        rows.append(
            {
                "md5hash": row.md5hash,
                "index": 0,
                "label": row.label,
                "fitzpatrick_scale": 6,
                "group": "dark",
                "path": str(path),
                "source_path": row.path,
            }
        )
    return pd.DataFrame(rows)


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    truth = rng.choice(LABELS, 300)
    # Mostly right, otherwise a random class: a realistic mix of hits and confusions.
    predicted = np.where(rng.random(300) < 0.6, truth, rng.choice(LABELS, 300))
    fst = rng.choice([1, 2, 5, 6], 300)
    frame = pd.DataFrame(
        {"md5hash": [f"m{i}" for i in range(300)], "label": truth, "predicted": predicted}
    ).assign(fitzpatrick_scale=fst)

    metrics = classification_metrics(frame, LABELS, "test")

    assert metrics["test_accuracy"] == pytest.approx(accuracy_score(truth, predicted))
    for average in ("macro", "weighted"):
        expected = precision_recall_fscore_support(
            truth, predicted, labels=list(LABELS), average=average, zero_division=0
        )
        for name, value in zip(("precision", "recall", "f1"), expected[:3], strict=True):
            assert metrics[f"test_{name}_{average}"] == pytest.approx(value)
    per_class = precision_recall_fscore_support(
        truth, predicted, labels=list(LABELS), zero_division=0
    )
    for k, label in enumerate(LABELS):
        assert metrics[f"test_precision_{slug(label)}"] == pytest.approx(per_class[0][k])
        assert metrics[f"test_recall_{slug(label)}"] == pytest.approx(per_class[1][k])
        assert metrics[f"test_f1_{slug(label)}"] == pytest.approx(per_class[2][k])
    for k in (1, 2, 5, 6):
        subset = fst == k
        assert metrics[f"test_accuracy_fst{k}"] == pytest.approx(
            accuracy_score(truth[subset], predicted[subset])
        )
    light = np.isin(fst, [1, 2])
    assert metrics["test_accuracy_light"] == pytest.approx(
        accuracy_score(truth[light], predicted[light])
    )


def hand_made() -> pd.DataFrame:
    """Classes a/b/c with 8/1/1 images: every a right, b taken for a, c right.

    light: 5 a (FST 1, 2) and c (FST 2), all right; dark: 3 a (FST 5) right, b (FST 6) wrong.
    """
    rows = [("a", "a", 1)] * 3 + [("a", "a", 2)] * 2 + [("a", "a", 5)] * 3
    rows += [("b", "a", 6), ("c", "c", 2)]
    frame = pd.DataFrame(rows, columns=["label", "predicted", "fitzpatrick_scale"])
    frame.insert(0, "md5hash", [f"m{i}" for i in range(len(frame))])
    return frame


@pytest.mark.parametrize("with_group_column", [True, False])
def test_macro_and_weighted_averages_differ_on_an_imbalanced_set(with_group_column):
    frame = hand_made()
    if with_group_column:
        frame["group"] = np.where(frame["fitzpatrick_scale"] <= 2, "light", "dark")
    metrics = classification_metrics(frame, ("a", "b", "c"), "test")

    # Per class: a P=8/9 R=1 F1=16/17 (support 8), b all 0 (support 1), c all 1 (support 1).
    assert metrics["test_accuracy"] == pytest.approx(9 / 10)
    assert metrics["test_precision_a"] == pytest.approx(8 / 9)
    assert metrics["test_f1_a"] == pytest.approx(16 / 17)
    assert metrics["test_f1_b"] == 0.0
    assert metrics["test_precision_macro"] == pytest.approx((8 / 9 + 0 + 1) / 3)
    assert metrics["test_recall_macro"] == pytest.approx((1 + 0 + 1) / 3)
    assert metrics["test_f1_macro"] == pytest.approx((16 / 17 + 0 + 1) / 3)
    assert metrics["test_precision_weighted"] == pytest.approx((8 * 8 / 9 + 0 + 1) / 10)
    assert metrics["test_recall_weighted"] == pytest.approx((8 + 0 + 1) / 10)
    assert metrics["test_f1_weighted"] == pytest.approx((8 * 16 / 17 + 0 + 1) / 10)
    assert metrics["test_f1_weighted"] - metrics["test_f1_macro"] > 0.2

    # Groups: light 6/6 right; dark 3/4, macro F1 over its classes a (F1 6/7) and b (0).
    assert metrics["test_accuracy_light"] == 1.0
    assert metrics["test_accuracy_dark"] == pytest.approx(3 / 4)
    assert metrics["test_accuracy_gap"] == pytest.approx(1 / 4)
    assert metrics["test_f1_macro_light"] == 1.0
    assert metrics["test_f1_macro_dark"] == pytest.approx((6 / 7 + 0) / 2)
    assert metrics["test_f1_macro_gap"] == pytest.approx(1 - 3 / 7)
    assert metrics["test_accuracy_fst5"] == 1.0
    assert metrics["test_accuracy_fst6"] == 0.0
    assert "test_accuracy_fst3" not in metrics


def test_no_gap_without_both_groups():
    metrics = classification_metrics(hand_made().query("fitzpatrick_scale >= 5"), "abc", "val")
    assert "val_accuracy_dark" in metrics
    assert "val_accuracy_light" not in metrics
    assert "val_accuracy_gap" not in metrics


def test_confusion_matrix_figure_shows_counts_and_names(tmp_path):
    figure = confusion_matrix_figure(hand_made(), ("a", "b", "c"))
    assert isinstance(figure, Figure)
    axes = figure.axes[0]
    texts = [t.get_text() for t in axes.texts]
    assert texts == ["8", "0", "0", "1", "0", "0", "0", "0", "1"]  # row = true, column = predicted
    assert [t.get_text() for t in axes.get_xticklabels()] == ["a", "b", "c"]
    figure.savefig(tmp_path / "confusion.png")
    assert (tmp_path / "confusion.png").stat().st_size > 0


def test_metrics_refuse_bad_predictions():
    with pytest.raises(SkindiffError, match="predicted"):
        classification_metrics(hand_made().drop(columns="predicted"), "abc", "test")
    with pytest.raises(SkindiffError, match="empty"):
        classification_metrics(hand_made().iloc[:0], "abc", "test")


# --- training set, leakage guard, sampler ---------------------------------------------------


@pytest.mark.parametrize("split", ["val", "test"])
def test_synthetic_children_of_held_out_images_are_refused(splits, tmp_path, split):
    held_out = getattr(splits, split)
    synthetic = synthetic_from(pd.concat([splits.train.head(3), held_out.head(1)]), tmp_path)
    for train_type in ("syn", "real+syn"):
        with pytest.raises(SkindiffError, match="1 of 4 rows") as error:
            build_training_set(splits.train, synthetic, train_type)
        assert held_out["md5hash"].iloc[0] in str(error.value)


def test_training_set_of_each_type(splits, tmp_path):
    synthetic = synthetic_from(splits.train.head(5), tmp_path)
    real = build_training_set(splits.train, synthetic, "real")
    syn = build_training_set(splits.train, synthetic, "syn")
    both = build_training_set(splits.train, synthetic, "real+syn")
    assert set(real["source"]) == {"real"} and len(real) == len(splits.train)
    assert set(syn["source"]) == {"synthetic"} and len(syn) == 5
    assert len(both) == len(splits.train) + 5
    assert list(both["source"].value_counts().sort_index()) == [len(splits.train), 5]
    assert both["path"].map(lambda p: Path(p).is_file()).all()


def test_training_set_refusals(splits):
    for train_type in ("syn", "real+syn"):
        with pytest.raises(SkindiffError, match="needs a synthetic manifest"):
            build_training_set(splits.train, None, train_type)
    with pytest.raises(SkindiffError, match="train_type must be one of"):
        build_training_set(splits.train, None, "synthetic")
    with pytest.raises(SkindiffError, match="synthetic lacks the column"):
        build_training_set(splits.train, splits.train.drop(columns="path"), "syn")


def test_weighted_sampler_balances_classes():
    rows = pd.DataFrame({"label": ["a"] * 90 + ["b"] * 9 + ["c"] * 1})
    sampler = weighted_sampler(rows, ("a", "b", "c"), seed=0)
    draws = [i for _ in range(300) for i in sampler]  # 100 draws per epoch
    counts = Counter(rows["label"].iloc[draws])
    assert len(draws) == 30_000
    for label in "abc":
        assert counts[label] / len(draws) == pytest.approx(1 / 3, abs=0.05)
    assert list(weighted_sampler(rows, "abc", seed=0)) == list(weighted_sampler(rows, "abc", 0))
    assert list(weighted_sampler(rows, "abc", seed=0)) != list(weighted_sampler(rows, "abc", 1))


# --- models -----------------------------------------------------------------------------------


ARCH_CASES = [
    ("tiny", 64, "full"),
    ("resnet18", 64, "full"),
    ("vgg16", 64, "head"),
    ("vit_b_16", 224, "head"),
    # timm's test models: small, random weights
    ("timm:test_resnet", 64, "head"),
    ("timm:test_efficientnet", 64, "full"),
    ("timm:test_vit", 160, "head"),
]


# The module each architecture's new head replaces (a timm model's goes after its pooled
# features), and that module's input width.
LAST_LAYER = {"tiny": "fc", "resnet18": "fc", "vgg16": "classifier.6", "vit_b_16": "heads.head"}
LAST_LAYER |= {arch: "head" for arch, _, _ in ARCH_CASES if arch.startswith("timm:")}
HEAD_INPUT = {"tiny": 128, "resnet18": 512, "vgg16": 4096, "vit_b_16": 768}
HEAD_INPUT |= {"timm:test_resnet": 96, "timm:test_efficientnet": 256, "timm:test_vit": 64}


@pytest.mark.parametrize(("arch", "size", "finetune"), ARCH_CASES)
def test_every_architecture_trains(arch, size, finetune):
    torch.manual_seed(0)
    model = build_classifier(arch, 7, finetune=finetune)
    # The reference head: Linear(in, 256)-ReLU-Dropout(0.4)-Linear(256, 7).
    head = model.get_submodule(LAST_LAYER[arch])
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (head[0].in_features, head[0].out_features) == (HEAD_INPUT[arch], 256)
    assert head[2].p == 0.4
    assert (head[3].in_features, head[3].out_features) == (256, 7)
    batch = 1 if arch == "vit_b_16" else 2
    logits = model(torch.randn(batch, 3, size, size))
    assert logits.shape == (batch, 7)
    torch.nn.functional.cross_entropy(logits, torch.zeros(batch, dtype=torch.long)).backward()
    # Exactly the head (finetune=head) or everything (full) learns.
    trained = {
        name
        for name, p in model.named_parameters()
        if p.grad is not None and p.grad.abs().sum() > 0
    }
    head_names = {f"{LAST_LAYER[arch]}.{name}" for name, _ in head.named_parameters()}
    everything = {name for name, _ in model.named_parameters()}
    assert trained == (everything if finetune == "full" else head_names)


def test_all_architectures_are_covered():
    builtin = [arch for arch, _, _ in ARCH_CASES if not arch.startswith("timm:")]
    assert sorted(builtin) == sorted(BUILTIN_ARCHS)


def test_timm_models_see_their_own_normalisation():
    """Images come ImageNet-normalised; test_vit's weights expect mean = std = 0.5."""
    assert timm.models.get_pretrained_cfg("test_vit").mean == (0.5, 0.5, 0.5)
    torch.manual_seed(0)
    model = build_classifier("timm:test_vit", 7).eval()
    pixels = torch.rand(2, 3, 160, 160)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    with torch.no_grad():
        logits = model((pixels - mean) / std)
        expected = model.head(model.backbone((pixels - 0.5) / 0.5))
    torch.testing.assert_close(logits, expected)
    assert set(model.state_dict()) == {
        *(f"backbone.{k}" for k in model.backbone.state_dict()),
        *(f"head.{k}" for k in model.head.state_dict()),
    }


@pytest.fixture()
def empty_caches(tmp_path, monkeypatch) -> Path:
    """Empty torch hub and Hugging Face hub caches (the hub client is offline in tests)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def cache_hub_weights(hub: Path, repo: str, state: dict[str, torch.Tensor]) -> Path:
    """Puts `state` into the Hugging Face hub cache `hub` as repo `repo`'s model.safetensors,
    laid out as the hub client leaves a download."""
    folder = hub / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0123abcd")
    save_file({k: v.contiguous() for k, v in state.items()}, snapshot / "model.safetensors")
    return snapshot / "model.safetensors"


@pytest.mark.parametrize("weights", ["imagenet", "auto"])
def test_timm_weights_come_only_from_timms_local_cache(empty_caches, weights):
    with pytest.raises(SkindiffError) as error:
        build_classifier("timm:test_resnet", 7, weights=weights)
    message = str(error.value)
    assert "\n" not in message
    assert f"models--timm--test_resnet.r160_in1k in {empty_caches}" in message
    assert "timm.create_model('test_resnet', pretrained=True)" in message

    torch.manual_seed(1)
    cached = timm.create_model("test_resnet").state_dict()
    cache_hub_weights(empty_caches, "timm/test_resnet.r160_in1k", cached)
    model = build_classifier("timm:test_resnet", 7, weights=weights)
    backbone = model.backbone.state_dict()
    assert backbone.keys() == {k for k in cached if not k.startswith("fc.")}
    for name, value in backbone.items():
        assert torch.equal(value, cached[name]), name


def test_missing_timm_and_torchvision_weights_in_one_error(empty_caches):
    with pytest.raises(SkindiffError) as error:
        require_imagenet_files(["timm:test_resnet", "vgg16", "tiny", "timm:coatnet_0_224"], "auto")
    message = str(error.value)
    assert "\n" not in message
    assert "vgg16-397923af.pth (vgg16)" in message
    assert "models--timm--test_resnet.r160_in1k" in message
    assert "timm:coatnet_0_224 (timm has no pretrained weights for it)" in message
    assert message.endswith("or use --weights none")
    require_imagenet_files(["timm:test_resnet", "timm:coatnet_0_224"], "none")


def test_timm_local_checkpoints_load(tmp_path):
    """A state_dict of the model as timm builds it, or of a classifier built here."""
    torch.manual_seed(2)
    plain = timm.create_model("test_resnet").state_dict()
    torch.save(plain, tmp_path / "plain.pt")
    model = build_classifier("timm:test_resnet", 7, weights=str(tmp_path / "plain.pt"))
    for name, value in model.backbone.state_dict().items():
        assert torch.equal(value, plain[name]), name

    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "c.safetensors"
    )
    again = build_classifier("timm:test_resnet", 7, weights=str(tmp_path / "c.safetensors"))
    for name, value in again.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name

    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "other.pt")
    with pytest.raises(SkindiffError, match=r"other\.pt does not fit timm:test_resnet: .*Missing"):
        build_classifier("timm:test_resnet", 7, weights=str(tmp_path / "other.pt"))


@pytest.mark.parametrize("weights", ["imagenet", "auto"])
def test_imagenet_weights_come_only_from_the_local_cache(tmp_path, monkeypatch, weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(SkindiffError, match=r"resnet18-f37072fd\.pth") as error:
        build_classifier("resnet18", 7, weights=weights)
    assert str(tmp_path / "hub" / "checkpoints") in str(error.value)
    with pytest.raises(SkindiffError, match="no ImageNet weights"):
        build_classifier("tiny", 7, weights="imagenet")

    torch.manual_seed(1)
    cached = resnet18().state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(cached, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_classifier("resnet18", 7, weights=weights)
    assert torch.equal(model.conv1.weight, cached["conv1.weight"])
    assert model.fc[-1].out_features == 7


def test_auto_weights_are_random_for_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: no file is needed
    torch.manual_seed(3)
    auto = build_classifier("tiny", 7, weights="auto")
    torch.manual_seed(3)
    random = build_classifier("tiny", 7, weights="none")
    for name, value in auto.state_dict().items():
        assert torch.equal(value, random.state_dict()[name]), name


def test_missing_imagenet_files_are_listed_in_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    with pytest.raises(SkindiffError) as error:
        require_imagenet_files(["vgg16", "tiny", "resnet18", "vgg16"], "auto")
    message = str(error.value)
    assert "\n" not in message
    assert message.count("vgg16-397923af.pth") == 2  # its name, then its URL
    assert message.count("resnet18-f37072fd.pth") == 2
    assert str(folder) in message and "vit_b_16" not in message
    assert "torchvision.models.vgg16(weights='IMAGENET1K_V1')" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message

    require_imagenet_files(["vgg16", "resnet18"], "none")  # nothing to read
    require_imagenet_files(["tiny"], "auto")
    folder.mkdir(parents=True)
    (folder / "vgg16-397923af.pth").touch()
    with pytest.raises(
        SkindiffError, match=r"checkpoints: resnet18-f37072fd\.pth \(resnet18\)\."
    ) as error:
        require_imagenet_files(["vgg16", "resnet18"], "imagenet")
    assert "vgg16-397923af.pth" not in str(error.value)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_local_checkpoints_load(tmp_path, suffix):
    torch.manual_seed(2)
    trained = build_classifier("tiny", 7, finetune="full")
    path = tmp_path / f"classifier{suffix}"
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    loaded = build_classifier("tiny", 7, weights=str(path))
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_bad_checkpoints_are_refused(tmp_path):
    with pytest.raises(SkindiffError, match="checkpoint file not found"):
        build_classifier("tiny", 7, weights=str(tmp_path / "absent.pt"))
    torch.save(build_classifier("tiny", 5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(SkindiffError, match=r"fits neither tiny .*shape mismatch"):
        build_classifier("tiny", 7, weights=str(tmp_path / "five.pt"))
    with pytest.raises(SkindiffError, match="fits neither resnet18"):
        build_classifier("resnet18", 7, weights=str(tmp_path / "five.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SkindiffError, match="cannot read"):
        build_classifier("tiny", 7, weights=str(tmp_path / "junk.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(SkindiffError, match="holds no state_dict"):
        build_classifier("tiny", 7, weights=str(tmp_path / "list.pt"))


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"arch": "alexnet"}, "arch must be one of vgg16, .* or timm:<model name>, got 'alexnet'$"),
        (
            {"arch": "timm:convnxt_tiny"},
            r"^arch must be one of .*: timm has no model 'convnxt_tiny' \(close: convnext_tiny",
        ),
        (
            {"arch": "timm:resnet10t.nope"},
            r"^arch .*: timm has no pretrained tag 'nope' for resnet10t \(its tags: c3_in1k\)$",
        ),
        (
            {"arch": "timm:test_vit", "image_size": 64},
            "image_size must be 160 for arch timm:test_vit",
        ),
        ({"finetune": "partial"}, "finetune must be one of"),
        ({"weights": "/nowhere/model.pt"}, "checkpoint file not found"),
        ({"train_type": "both"}, "train_type must be one of"),
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"image_size": 16}, "image_size must be at least 32"),
        ({"arch": "vit_b_16", "image_size": 64}, "image_size must be 224 for arch vit_b_16"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"seed": -1}, "seed must be an integer from 0"),
        ({"selection": "best"}, "selection must be one of val, last, test"),
    ],
)
def test_bad_config_values_are_refused(splits, change, message):
    with pytest.raises(SkindiffError, match=message):
        train_classifier(
            replace(QUICK, **change), splits.train, splits.val, splits.test, LABELS, False
        )


def test_study_archs_take_timm_names():
    plan = StudyPlan(archs="vgg16, timm:test_resnet")
    assert plan.archs == ("vgg16", "timm:test_resnet")
    assert plan.archs[1].timm_name == "test_resnet"
    with pytest.raises(SkindiffError, match=r"^archs must be one of .*: timm has no model 'nope'"):
        StudyPlan(archs="tiny,timm:nope")


def test_a_timm_classifier_trains_and_evaluates(splits):
    """A frozen timm backbone with random weights: only the reference head learns."""
    config = replace(QUICK, arch="timm:test_resnet", weights="none", finetune="head", epochs=2)
    result = train_classifier(config, splits.train, splits.val, splits.test, LABELS, False)

    assert list(result.history["epoch"]) == [1, 2]
    assert result.history["train_loss"].notna().all()
    torch.manual_seed(config.seed)  # as train_classifier starts: the same initial weights
    initial = build_classifier(config.arch, len(LABELS), "none", "head").state_dict()
    trained = result.model.state_dict()
    for name, _ in result.model.named_parameters():
        assert torch.equal(trained[name], initial[name]) == name.startswith("backbone."), name
    again = predict(result.model, splits.test, LABELS, image_size=64, batch_size=16)
    pd.testing.assert_frame_equal(again, result.test_predictions)
    assert set(result.test_predictions["predicted"]) <= set(LABELS)


def test_bad_data_is_refused(splits):
    refused = r"but val is empty: .*--val-fraction > 0, or use --selection last \(or test\)$"
    with pytest.raises(SkindiffError, match=refused):
        train_classifier(QUICK, splits.train, splits.val.iloc[:0], splits.test, LABELS, False)
    with pytest.raises(SkindiffError, match=r"train: label.*'eczema'"):
        train = splits.train.assign(label="eczema")
        train_classifier(QUICK, train, splits.val, splits.test, LABELS, False)
    with pytest.raises(SkindiffError, match="test: 1 of 56 image file"):
        test = splits.test.assign(path=[*splits.test["path"][:-1], "/nowhere/x.jpg"])
        train_classifier(QUICK, splits.train, splits.val, test, LABELS, False)


@pytest.fixture(scope="module")
def quick_run(splits):
    return train_classifier(QUICK, splits.train, splits.val, splits.test, LABELS, progress=False)


def scored_columns(split: str) -> list[str]:
    """The history's columns of a split scored every epoch."""
    return [f"{split}_loss", f"{split}_accuracy", f"{split}_f1_macro"]


def test_result_shape(quick_run, splits):
    history = quick_run.history
    assert list(history.columns) == ["epoch", "train_loss", *scored_columns("val"), "lr"]
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert list(history["lr"]) == pytest.approx([1e-3, 1e-4, 1e-5, 1e-6])  # StepLR(4 // 3 = 1)
    assert quick_run.labels == LABELS
    assert not quick_run.model.training
    assert next(quick_run.model.parameters()).device.type == "cpu"
    test = quick_run.test_predictions
    assert list(test["md5hash"]) == list(splits.test["md5hash"])
    assert set(test["predicted"]) <= set(LABELS)
    probabilities = test[[f"prob_{slug(label)}" for label in LABELS]].sum(axis=1)
    assert np.allclose(probabilities, 1.0, atol=1e-5)
    # The best epoch is the first with the highest validation macro-F1, and its predictions
    # are the ones kept.
    assert quick_run.best_epoch == int(history.loc[history["val_f1_macro"].idxmax(), "epoch"])
    best_f1 = classification_metrics(quick_run.val_predictions, LABELS, "val")["val_f1_macro"]
    assert best_f1 == pytest.approx(history["val_f1_macro"].max())
    # predict() with the returned model gives the stored test predictions again.
    again = predict(quick_run.model, splits.test, LABELS, image_size=64, batch_size=16)
    pd.testing.assert_frame_equal(again, test)


def test_same_seed_same_run(quick_run, splits):
    again = train_classifier(QUICK, splits.train, splits.val, splits.test, LABELS, False)
    pd.testing.assert_frame_equal(again.history, quick_run.history)
    pd.testing.assert_frame_equal(again.test_predictions, quick_run.test_predictions)
    assert again.best_epoch == quick_run.best_epoch


def inferred_sizes(monkeypatch) -> list[int]:
    """The number of images of every split the classifier predicts, in order, from now on."""
    inferred = []
    logits = train_module._logits

    def recording(model, loader, device):
        inferred.append(len(loader.dataset))
        return logits(model, loader, device)

    monkeypatch.setattr(train_module, "_logits", recording)
    return inferred


def test_model_selection_never_looks_at_the_test_labels(quick_run, splits, monkeypatch):
    """Changing the test labels changes nothing but those labels, and the test split is
    predicted once, after training, with the best epoch's weights."""
    inferred = inferred_sizes(monkeypatch)
    permuted = splits.test.assign(
        label=splits.test["label"].sample(frac=1, random_state=3).to_numpy()
    )
    assert (permuted["label"] != splits.test["label"]).any()
    other = train_classifier(QUICK, splits.train, splits.val, permuted, LABELS, False)

    assert inferred == [len(splits.val)] * QUICK.epochs + [len(splits.test)]
    assert other.best_epoch == quick_run.best_epoch
    pd.testing.assert_frame_equal(other.history, quick_run.history)
    pd.testing.assert_frame_equal(other.val_predictions, quick_run.val_predictions)
    assert list(other.test_predictions["predicted"]) == list(
        quick_run.test_predictions["predicted"]
    )
    assert list(other.test_predictions["label"]) == list(permuted["label"])


def test_trains_on_real_and_synthetic_images(splits, tmp_path, monkeypatch):
    synthetic = synthetic_from(splits.train.head(10), tmp_path)
    train = build_training_set(splits.train, synthetic, "real+syn")
    loaded, load = [], classify_data.load_rgb
    monkeypatch.setattr(
        classify_data, "load_rgb", lambda path: loaded.append(str(path)) or load(path)
    )
    config = replace(QUICK, epochs=1, train_type="real+syn")
    result = train_classifier(config, train, splits.val, splits.test, LABELS, progress=False)
    assert len(result.test_predictions) == len(splits.test)
    assert set(loaded) & set(synthetic["path"]), "no synthetic image was trained on"
    assert set(loaded) & set(splits.train["path"]), "no real image was trained on"


@pytest.mark.parametrize("seed", [0, 1])
def test_learns_the_demo_data(demo_dataset, seed):
    """The demo's conditions are learnable: clearly above chance (1/7) on the dark test set."""
    splits = prepare_scenario(PrepareConfig(scenario="i", seed=seed)).splits
    config = replace(QUICK, epochs=12, seed=seed)
    result = train_classifier(config, splits.train, splits.val, splits.test, LABELS, False)
    metrics = classification_metrics(result.test_predictions, LABELS, "test")
    # Seeds 0-3, 42 and 123 scored 0.50-0.77.
    assert metrics["test_accuracy"] > 0.35


def test_selection_last_keeps_the_last_epoch(quick_run, splits):
    """Same training as with selection val (the selection changes nothing else); the last
    epoch's weights and validation predictions are kept."""
    last = train_classifier(
        replace(QUICK, selection="last"), splits.train, splits.val, splits.test, LABELS, False
    )
    pd.testing.assert_frame_equal(last.history, quick_run.history)
    assert last.best_epoch == QUICK.epochs
    f1 = classification_metrics(last.val_predictions, LABELS, "val")["val_f1_macro"]
    assert f1 == pytest.approx(last.history["val_f1_macro"].iloc[-1])
    again = predict(last.model, splits.test, LABELS, image_size=64, batch_size=16)
    pd.testing.assert_frame_equal(again, last.test_predictions)


def test_selection_last_needs_no_validation_split(splits):
    config = replace(QUICK, epochs=2, selection="last")
    reported = []
    result = train_classifier(
        config,
        splits.train,
        splits.val.iloc[:0],
        splits.test,
        LABELS,
        False,
        on_epoch=lambda *args: reported.append(args),
    )
    assert list(result.history.columns) == ["epoch", "train_loss", "lr"]
    assert result.val_predictions is None and reported == []
    assert result.best_epoch == 2
    assert len(result.test_predictions) == len(splits.test)


@pytest.mark.parametrize(
    ("losses", "kept"),
    [
        # After epoch 11 (loss 2.0): the lowest loss below it, the earlier on ties.
        ([5.0] * 10 + [2.0, 1.9, 1.5, 1.7, 1.5], 13),
        # Epochs up to 11 are never kept, however low their loss.
        ([0.1] * 10 + [2.0, 1.9, 2.5], 12),
        ([5.0] * 10 + [2.0, 2.0, 2.0], 0),  # equal to epoch 11's loss is not below it
        ([5.0] * 10 + [2.0, 2.5, 3.0], 0),  # nothing below epoch 11's loss
        ([3.0 - 0.1 * k for k in range(11)], 0),  # 11 epochs: none after epoch 11
        ([], 0),
    ],
)
def test_reference_test_epoch(losses, kept):
    assert train_module.reference_test_epoch(losses) == kept


def test_selection_test_keeps_the_initial_weights_when_no_epoch_after_11_improves(
    splits, monkeypatch
):
    """With fewer than 12 epochs the reference rule keeps no epoch: the untrained weights are
    returned, with their validation and test predictions, and the history has every epoch, the
    test split scored after each."""
    inferred = inferred_sizes(monkeypatch)
    config = replace(QUICK, selection="test")
    result = train_classifier(config, splits.train, splits.val, splits.test, LABELS, False)

    history = result.history
    columns = ["epoch", "train_loss", *scored_columns("val"), *scored_columns("test"), "lr"]
    assert list(history.columns) == columns
    assert list(history["epoch"]) == [1, 2, 3, 4]
    sizes = [len(splits.val), len(splits.test)]
    assert inferred == sizes * QUICK.epochs + sizes  # the kept weights' val, then test
    assert result.best_epoch == 0
    torch.manual_seed(QUICK.seed)  # as train_classifier does before building its model
    untrained = build_classifier("tiny", len(LABELS), "none", "full")
    for name, value in untrained.state_dict().items():
        assert torch.equal(result.model.state_dict()[name], value), name
    for rows, kept in (
        (splits.test, result.test_predictions),
        (splits.val, result.val_predictions),
    ):
        expected = predict(untrained, rows, LABELS, image_size=64, batch_size=16)
        pd.testing.assert_frame_equal(kept, expected, check_exact=False)


def test_selection_test_keeps_the_lowest_test_loss_after_epoch_11(splits):
    """A learning rate at which the test loss still falls after epoch 11 (2.31, 2.20, 2.13 in
    epochs 11-13): the epoch the reference rule names is kept, and the test predictions are its
    weights' (their loss is that epoch's). Small splits and images: about a second."""
    train = splits.train.groupby("label").head(4)
    test = splits.test.groupby("label").head(2)
    config = replace(QUICK, selection="test", epochs=13, image_size=32, learning_rate=1e-2)
    result = train_classifier(config, train, splits.val.iloc[:0], test, LABELS, False)

    losses = list(result.history["test_loss"])
    assert result.best_epoch == train_module.reference_test_epoch(losses) > 0
    kept = result.test_predictions
    probabilities = kept[[f"prob_{slug(label)}" for label in LABELS]].to_numpy()
    of_the_label = probabilities[np.arange(len(kept)), [LABELS.index(x) for x in kept["label"]]]
    assert -np.log(of_the_label).mean() == pytest.approx(losses[result.best_epoch - 1], rel=1e-4)
