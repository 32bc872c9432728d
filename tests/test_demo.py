"""The demo dataset: format, determinism, visual content and safe writing, on real files."""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skindiff.data import demo
from skindiff.data.demo import (
    DemoSpec,
    default_demo_dataset,
    draw_lesion_image,
    write_demo_dataset,
)
from skindiff.data.fitzpatrick import (
    CONDITIONS,
    DARK_FST,
    FITZPATRICK17K_COLUMNS,
    LIGHT_FST,
    PARTITIONS,
)
from skindiff.errors import SkindiffError

SMALL = DemoSpec(per_condition=((1, 2), (6, 2)), image_size=64)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_demo_dataset(tmp_path_factory.mktemp("demo") / "seed0", seed=0)


@pytest.fixture(scope="module")
def all_rows(dataset):
    return pd.read_csv(dataset.metadata_csv, keep_default_na=False)


@pytest.fixture(scope="module")
def planted(dataset):
    return pd.read_csv(dataset.planted_copies)


@pytest.fixture(scope="module")
def metadata(all_rows, planted):
    """The drawn images: the metadata less the planted copies."""
    return all_rows[~all_rows.md5hash.isin(planted.md5hash)]


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _load(dataset, md5: str) -> np.ndarray:
    return np.asarray(Image.open(dataset.image_dir / f"{md5}.jpg"), dtype=np.float32)


def test_same_seed_gives_identical_files(dataset, tmp_path):
    again = write_demo_dataset(tmp_path / "again", seed=0)
    assert _files(again.metadata_csv.parent) == _files(dataset.metadata_csv.parent)


def test_different_seeds_give_different_images(tmp_path):
    hashes = [
        set(pd.read_csv(write_demo_dataset(tmp_path / str(s), s, SMALL).metadata_csv).md5hash)
        for s in (0, 1)
    ]
    assert not hashes[0] & hashes[1]


def test_metadata_matches_fitzpatrick17k_format_and_images(dataset, all_rows, planted):
    metadata = all_rows
    assert list(metadata.columns) == list(FITZPATRICK17K_COLUMNS)
    assert (metadata.fitzpatrick_centaur == metadata.fitzpatrick_scale).all()
    assert (metadata[["qc", "url", "url_alphanum"]] == "").all().all()
    for row in metadata.itertuples():
        expected = PARTITIONS.get(row.label, ("inflammatory", "non-neoplastic"))
        assert (row.nine_partition_label, row.three_partition_label) == expected
    files = sorted(dataset.image_dir.iterdir())
    assert sorted(p.stem for p in files) == sorted(metadata.md5hash)
    for path in files:
        assert hashlib.md5(path.read_bytes()).hexdigest() == path.stem
        with Image.open(path) as image:
            assert (image.format, image.mode) == ("JPEG", "RGB")
            if path.stem in set(planted.md5hash):  # cropped by 3-8%, resized to 70-85%
                assert 0.7 * 0.92 * 128 - 1 <= image.width == image.height <= 0.85 * 0.97 * 128
            else:
                assert image.size == (128, 128)


def test_planted_copies_repeat_an_image_transformed_under_another_md5hash(
    dataset, all_rows, planted
):
    spec = DemoSpec()
    assert len(planted) == len(CONDITIONS) * len(spec.copied_fst)
    rows = all_rows.set_index("md5hash")
    assert set(planted.md5hash) <= set(rows.index) and set(planted.copy_of) <= set(rows.index)
    assert not set(planted.md5hash) & set(planted.copy_of)
    copies, originals = rows.loc[planted.md5hash], rows.loc[planted.copy_of]
    same_label = copies.label.to_numpy() == originals.label.to_numpy()
    same_fst = copies.fitzpatrick_scale.to_numpy() == originals.fitzpatrick_scale.to_numpy()
    # one copy carries another skin type, one another condition, as atlases' copies may
    assert (~same_label).sum() == 1 and (~same_fst).sum() == 1
    drawn = [md5 for md5 in rows.index if md5 not in set(planted.md5hash)]
    small = {md5: _grey(dataset, md5) for md5 in drawn}
    for copy, original in zip(planted.md5hash, planted.copy_of, strict=True):
        # the same picture: its original is the nearest of all drawn images
        distance = {md5: np.abs(_grey(dataset, copy) - grey).mean() for md5, grey in small.items()}
        assert min(distance, key=distance.get) == original


def _grey(dataset, md5: str) -> np.ndarray:
    image = Image.open(dataset.image_dir / f"{md5}.jpg").convert("L").resize((32, 32))
    return np.asarray(image, np.float32)


def test_counts_follow_the_spec_with_distractors(metadata):
    counts = metadata.groupby(["label", "fitzpatrick_scale"]).size().to_dict()
    expected = {}
    for label in CONDITIONS:
        expected |= {(label, fst): n for fst, n in DemoSpec().per_condition}
        expected |= {(label, fst): 1 for fst in (3, 4, -1)}
    expected |= {("eczema", fst): 1 for fst in LIGHT_FST + DARK_FST}
    assert counts == expected


def test_skin_tone_follows_fitzpatrick_type(dataset, metadata):
    border = np.ones((128, 128), bool)
    border[12:-12, 12:-12] = False
    for label in CONDITIONS:
        rows = metadata[metadata.label == label]
        brightness = {
            fst: [_load(dataset, md5)[border].mean() for md5 in group.md5hash]
            for fst, group in rows.groupby("fitzpatrick_scale")
        }
        light = [b for fst in LIGHT_FST for b in brightness[fst]]
        dark = [b for fst in DARK_FST for b in brightness[fst]]
        # Every light image, not just the average, is brighter than every dark one.
        assert min(light) > max(dark), label


def _appearance(image: np.ndarray) -> np.ndarray:
    """Position-free features of a lesion: colour and edge histograms relative to the skin."""
    relative = np.log(image + 8) - np.median(np.log(image + 8).reshape(-1, 3), axis=0)
    luminance = relative.mean(-1)
    channels = [luminance, relative[..., 0] - relative[..., 2], relative[..., 1] - luminance]
    histograms = [np.histogram(c, bins=12, range=(-1.2, 1.2))[0] for c in channels]
    edges = np.hypot(np.diff(luminance, axis=0)[:, :-1], np.diff(luminance, axis=1)[:-1])
    histograms.append(np.histogram(edges, bins=10, range=(0, 0.5))[0])
    return np.sqrt(np.concatenate(histograms) / luminance.size)


def test_conditions_are_visually_distinct(dataset, metadata):
    cohort = metadata[metadata.label.isin(CONDITIONS)]
    cohort = cohort[cohort.fitzpatrick_scale.isin(LIGHT_FST + DARK_FST)]
    features = np.stack([_appearance(_load(dataset, md5)) for md5 in cohort.md5hash])
    # Alternate images of each (condition, FST) group, so both halves have every group.
    train = (cohort.groupby(["label", "fitzpatrick_scale"]).cumcount() % 2 == 0).to_numpy()
    features = (features - features[train].mean(0)) / (features[train].std(0) + 1e-6)
    # Lesions look different on light and dark skin, so each condition gets a centroid per group.
    groups = list(zip(cohort.label, cohort.fitzpatrick_scale.isin(DARK_FST), strict=True))
    keys = sorted(set(groups))
    centroids = np.stack(
        [features[train & np.array([g == key for g in groups])].mean(0) for key in keys]
    )
    distances = ((features[~train, None, :] - centroids[None]) ** 2).sum(-1)
    predicted = np.array([label for label, _ in keys])[distances.argmin(1)]
    accuracy = (predicted == cohort.label.to_numpy()[~train]).mean()
    # Chance is 1/7; these drawings give about 0.9 to 0.97 for seeds 0 to 5.
    assert accuracy > 0.7, f"nearest-centroid accuracy {accuracy:.2f}"


def test_unknown_fst_is_rejected():
    with pytest.raises(ValueError, match="skin type"):
        draw_lesion_image("psoriasis", 7, np.random.default_rng(0), 64)


def test_refuses_an_existing_folder_and_leaves_it_alone(tmp_path):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("precious")
    with pytest.raises(SkindiffError, match="mine"):
        write_demo_dataset(out_dir, spec=SMALL)
    assert _files(out_dir) == {"notes.txt": b"precious"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    drawn = []

    def draw_then_die(*args):
        if len(drawn) == 5:
            raise KeyboardInterrupt
        drawn.append(args)
        return draw_lesion_image(*args)

    monkeypatch.setattr(demo, "draw_lesion_image", draw_then_die)
    with pytest.raises(KeyboardInterrupt):
        write_demo_dataset(tmp_path / "out", spec=SMALL)
    assert list(tmp_path.iterdir()) == []


def test_losing_a_race_keeps_the_winners_copy(tmp_path, monkeypatch):
    out_dir = tmp_path / "out"
    write_into = demo._write_into

    def another_process_finishes_first(folder, seed, spec, progress):
        write_into(folder, seed, spec, progress)
        monkeypatch.setattr(demo, "_write_into", write_into)
        write_demo_dataset(out_dir, seed=seed, spec=spec)
        (out_dir / "winner").touch()

    monkeypatch.setattr(demo, "_write_into", another_process_finishes_first)
    with pytest.raises(SkindiffError, match="already exists"):
        write_demo_dataset(out_dir, spec=SMALL)
    assert (out_dir / "winner").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_default_dataset_is_generated_once_and_reused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SKINDIFF_CACHE", str(tmp_path))
    first = default_demo_dataset(seed=3)
    assert first.metadata_csv.parent == tmp_path / f"demo-v{demo.DEMO_VERSION}-seed3"
    assert "demo images" in capsys.readouterr().err
    before = {p: p.stat().st_mtime_ns for p in first.metadata_csv.parent.rglob("*")}
    second = default_demo_dataset(seed=3)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in first.metadata_csv.parent.rglob("*")} == before
    assert "demo images" not in capsys.readouterr().err
    assert len(pd.read_csv(first.metadata_csv)) == len(list(first.image_dir.iterdir()))


def test_default_dataset_uses_the_copy_of_a_process_that_won_the_race(tmp_path, monkeypatch):
    monkeypatch.setenv("SKINDIFF_CACHE", str(tmp_path))
    write_into = demo._write_into

    def another_process_finishes_first(folder, seed, spec, progress):
        write_into(folder, seed, spec, progress)
        monkeypatch.setattr(demo, "_write_into", write_into)
        out_dir = tmp_path / f"demo-v{demo.DEMO_VERSION}-seed{seed}"
        write_demo_dataset(out_dir, seed=seed, spec=SMALL)

    monkeypatch.setattr(demo, "_write_into", another_process_finishes_first)
    dataset = default_demo_dataset(seed=0)
    # The small winner's copy is used, and the loser's temporary folder is gone.
    copies = len(CONDITIONS) * len(set(SMALL.copied_fst) & {fst for fst, _ in SMALL.per_condition})
    assert len(pd.read_csv(dataset.metadata_csv)) == len(list(demo._rows(SMALL))) + copies
    assert [p.name for p in tmp_path.iterdir()] == [dataset.metadata_csv.parent.name]
