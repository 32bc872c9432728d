"""Near-duplicate images: copies found through re-encoding, resizing, cropping and watermarks,
unrelated images left alone, clusters, `drop`, caps and the cache, on real image files."""

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision import models

from skindiff.core.files import sha256_file
from skindiff.data import image_signatures, near_duplicates
from skindiff.data.config import DuplicateFeatures, NearDuplicates, PrepareConfig
from skindiff.data.demo import default_demo_dataset, draw_lesion_image
from skindiff.data.fitzpatrick import CONDITIONS
from skindiff.data.image_signatures import image_signatures as signatures
from skindiff.data.near_duplicates import DuplicateRule, clusters, find_near_duplicates
from skindiff.data.prepare import prepare_scenario
from skindiff.errors import SkindiffError

THUMBNAILS = DuplicateRule.of(PrepareConfig(near_duplicate_features="thumbnails"))


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def watermark(image: Image.Image) -> Image.Image:
    """A short caption in a corner, 1/16 of the height, semi-transparent: as atlases stamp
    theirs."""
    layer = Image.new("RGBA", image.size, (0, 0, 0, 0))
    font = ImageFont.load_default(size=image.height // 16)
    ImageDraw.Draw(layer).text(
        (4, image.height * 9 // 10), "© atlas", fill=(255, 255, 255, 150), font=font
    )
    return Image.alpha_composite(image.convert("RGBA"), layer).convert("RGB")


def crop(image: Image.Image, share: float, corner: bool) -> Image.Image:
    w, h = image.size
    dx, dy = round(share * w), round(share * h)
    x, y = (dx, dy) if corner else (dx // 2, dy // 2)
    return image.crop((x, y, x + w - dx, y + h - dy))


TRANSFORMS = {
    "JPEG quality 60": lambda image: Image.open(io.BytesIO(jpeg(image, 60))),
    "resized by 0.7": lambda image: image.resize((round(0.7 * image.width),) * 2),
    "cropped by 10%, centred": lambda image: crop(image, 0.1, corner=False),
    "cropped by 10%, at a corner": lambda image: crop(image, 0.1, corner=True),
    "a small watermark": watermark,
}


def image_rows(folder: Path, images: dict[str, Image.Image]) -> pd.DataFrame:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, image in images.items():
        path = folder / f"{name}.jpg"
        path.write_bytes(jpeg(image))
        paths.append(str(path))
    return pd.DataFrame(
        {
            "md5hash": list(images),
            "path": paths,
            "sha256": [sha256_file(p) for p in paths],
            "label": "x",
            "fitzpatrick_scale": 1,
            "split": "train",
        }
    )


def found_pairs(rows: pd.DataFrame, rule: DuplicateRule) -> set[frozenset]:
    hashes, views = signatures(rows, rule.features)
    table = find_near_duplicates(rows, hashes, views, rule).table()
    return {frozenset(pair) for pair in zip(table.md5hash_a, table.md5hash_b, strict=True)}


@pytest.fixture(scope="module")
def originals() -> dict[str, Image.Image]:
    """40 drawn images: every condition on light and dark skin."""
    images = {}
    for k in range(40):
        label, fst = CONDITIONS[k % len(CONDITIONS)], (1, 2, 5, 6)[k % 4]
        rng = np.random.default_rng([7, k])
        images[f"original-{k}"] = draw_lesion_image(label, fst, rng, 160)
    return images


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_copies_are_found_through_each_transform(transform, originals, tmp_path, monkeypatch):
    monkeypatch.setenv("SKINDIFF_CACHE", str(tmp_path / "cache"))
    copies = {
        f"copy-{k}": TRANSFORMS[transform](image) for k, image in enumerate(originals.values())
    }
    pairs = found_pairs(image_rows(tmp_path / "images", originals | copies), THUMBNAILS)
    planted = {frozenset((f"original-{k}", f"copy-{k}")) for k in range(len(originals))}
    assert len(pairs & planted) >= 0.9 * len(planted), transform
    flagged = {name for pair in pairs - planted for name in pair}
    assert len(flagged) < 0.02 * 2 * len(originals), sorted(flagged)


def test_unrelated_images_are_not_paired_and_loosening_the_rule_pairs_them(originals, tmp_path):
    rows = image_rows(tmp_path / "images", originals)
    assert found_pairs(rows, THUMBNAILS) == set()
    # the rule, not the images, decides: a similarity of -1 pairs everything
    loose = DuplicateRule(DuplicateFeatures.THUMBNAILS, -1.0, -1)
    assert len(found_pairs(rows, loose)) == len(rows) * (len(rows) - 1) // 2


def test_demo_prepare_finds_the_planted_copies_and_flags_few_other_images():
    demo = default_demo_dataset()
    planted = pd.read_csv(demo.planted_copies)
    found = prepare_scenario(PrepareConfig(near_duplicate_features="thumbnails")).near_duplicates
    table = found.table()
    pairs = {frozenset(pair) for pair in zip(table.md5hash_a, table.md5hash_b, strict=True)}
    truth = {frozenset(pair) for pair in zip(planted.md5hash, planted.copy_of, strict=True)}
    assert len(pairs & truth) >= 0.9 * len(truth)
    in_planted = set(planted.md5hash) | set(planted.copy_of)
    cohort_planted = in_planted & set(found.rows.md5hash)
    others = {md5 for pair in pairs - truth for md5 in pair} - in_planted
    assert len(others) < 0.02 * (len(found.rows) - len(cohort_planted))
    metrics = found.metrics()
    assert metrics["n_near_duplicate_pairs"] == len(pairs)
    assert metrics["n_near_duplicate_label_conflicts"] >= 1  # the demo plants one of each
    assert metrics["n_near_duplicate_fst_conflicts"] >= 1


def test_clusters_are_connected_components_numbered_by_size():
    pairs = pd.DataFrame({"a": [0, 1, 5, 7], "b": [1, 2, 6, 8]})
    assert clusters(pairs, 10).tolist() == [1, 1, 1, 0, 0, 2, 2, 3, 3, 0]


@pytest.mark.parametrize("seed", [0, 42])
def test_drop_leaves_training_copies_of_test_images_out_and_the_test_split_alone(seed):
    reported = prepare_scenario(PrepareConfig(seed=seed))
    dropped = prepare_scenario(PrepareConfig(seed=seed, near_duplicates="drop"))
    copies = reported.near_duplicates.training_copies
    assert copies  # the demo's planted copies cross scenario i's boundary for these seeds
    assert dropped.splits.test.equals(reported.splits.test)
    for split in ("train", "val"):
        before, after = getattr(reported.splits, split), getattr(dropped.splits, split)
        assert set(before.md5hash) - set(after.md5hash) == set(before.md5hash) & set(copies)
    # what remains in training has no near-duplicate in test
    crossing = reported.near_duplicates.table()
    crossing = crossing[(crossing.split_a == "test") | (crossing.split_b == "test")]
    kept = set(dropped.splits.train.md5hash) | set(dropped.splits.val.md5hash)
    assert not kept & (set(crossing.md5hash_a) | set(crossing.md5hash_b))
    (said,) = dropped.near_duplicates.warnings(dropped=True)
    assert said.endswith(
        f"{len(copies)} training image(s) copy a test image, left out of train "
        "and validation (--near-duplicates drop)"
    )
    assert "kept (--near-duplicates drop" in reported.near_duplicates.warnings()[0]
    off = prepare_scenario(PrepareConfig(seed=seed, near_duplicates=NearDuplicates.OFF))
    assert off.near_duplicates is None and off.splits.train.equals(reported.splits.train)


def test_signatures_are_cached_by_content(originals, tmp_path, monkeypatch):
    monkeypatch.setenv("SKINDIFF_CACHE", str(tmp_path / "cache"))
    rows = image_rows(tmp_path / "images", dict(list(originals.items())[:6]))
    first = signatures(rows, DuplicateFeatures.THUMBNAILS)

    def no_second_decoding(path):
        raise AssertionError(f"{path} decoded again")

    monkeypatch.setattr(image_signatures, "_hash_and_thumbnails", no_second_decoding)
    # the same files under other names and in another order: still all from the cache
    moved = rows.iloc[::-1].assign(md5hash=lambda r: r.md5hash + "-renamed")
    again = signatures(moved, DuplicateFeatures.THUMBNAILS)
    assert np.array_equal(again[0], first[0][::-1]) and np.array_equal(again[1], first[1][::-1])


def test_resnet18_features_come_from_the_weights_file_and_its_absence_is_one_error(
    originals, tmp_path, monkeypatch
):
    monkeypatch.setenv("SKINDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    rows = image_rows(tmp_path / "images", dict(list(originals.items())[:4]))
    with pytest.raises(SkindiffError, match=r"resnet18-f37072fd\.pth is missing") as error:
        signatures(rows, DuplicateFeatures.RESNET18)
    assert "\n" not in str(error.value)
    assert image_signatures.resolve_features(DuplicateFeatures.AUTO) == "thumbnails"
    # random weights in the file's place: the same network, only its numbers differ
    path = image_signatures.resnet18_file()
    path.parent.mkdir(parents=True)
    torch.save(models.resnet18().state_dict(), path)
    assert image_signatures.resolve_features(DuplicateFeatures.AUTO) == "resnet18"
    hashes, views = signatures(rows, DuplicateFeatures.AUTO)
    assert hashes.dtype == np.uint64 and views.shape == (4, 1, 512)
    assert np.isfinite(views).all() and len({v.tobytes() for v in views}) == 4


def test_identical_images_are_counted_in_full_capped_in_the_csv_and_warned_about(
    tmp_path, monkeypatch
):
    """What a dataset of placeholder images gives: one cluster of every pair."""
    monkeypatch.setattr(near_duplicates, "CSV_ROWS", 50)
    image = draw_lesion_image("psoriasis", 5, np.random.default_rng(0), 64)
    rows = image_rows(tmp_path / "images", {f"same-{k}": image for k in range(40)})
    hashes, views = signatures(rows, DuplicateFeatures.THUMBNAILS)
    found = find_near_duplicates(rows, hashes, views, THUMBNAILS)
    assert len(found.pairs) == 40 * 39 // 2 and found.largest_cluster == 40
    assert len(found.table()) == 50
    warnings = found.warnings()
    assert any("780 pairs counted; splits/near_duplicates.csv keeps the 50" in w for w in warnings)
    assert any(
        "most of the cohort is one cluster of near-duplicates (40 of 40 images)" in w
        for w in warnings
    )
    assert len(found.figure().axes) == 2 * near_duplicates.FIGURE_PAIRS


def test_bad_near_duplicate_settings_are_one_line_errors():
    for bad in ({"near_duplicate_similarity": 1.5}, {"near_duplicate_hash_distance": 65}):
        with pytest.raises(SkindiffError, match=next(iter(bad))) as error:
            PrepareConfig(**bad)
        assert "\n" not in str(error.value)
    with pytest.raises(Exception, match="near_duplicates"):
        PrepareConfig(near_duplicates="sometimes")


def test_a_cleaned_subset_of_the_metadata_works_and_too_few_images_is_one_error(tmp_path):
    """A cleaning such as Fitzpatrick17k-C is a subset of the rows, given as metadata_csv."""
    demo = default_demo_dataset()
    rows = pd.read_csv(demo.metadata_csv, keep_default_na=False)
    planted = pd.read_csv(demo.planted_copies)
    cleaned = rows[~rows.md5hash.isin(planted.md5hash)]  # the copies removed
    dark_psoriasis = cleaned[
        (cleaned.label == "psoriasis") & cleaned.fitzpatrick_scale.isin([5, 6])
    ]
    cleaned = cleaned.drop(dark_psoriasis.index[:4])  # 10 of 14 left: still 8 to draw
    subset = tmp_path / "cleaned.csv"
    cleaned.to_csv(subset, index=False)
    config = PrepareConfig(metadata_csv=str(subset), image_dir=str(demo.image_dir))
    prepared = prepare_scenario(config)
    assert (prepared.splits.test.groupby("label").size() == 8).all()
    assert not set(prepared.splits.train.md5hash) & set(planted.md5hash)
    assert prepared.near_duplicates.metrics()["n_near_duplicate_pairs"] == 0

    too_few = cleaned.drop(dark_psoriasis.index[4:9])  # 5 left
    too_few.to_csv(subset, index=False)
    with pytest.raises(SkindiffError) as error:
        prepare_scenario(config)
    message = str(error.value)
    assert str(subset) in message and "'psoriasis' has 5" in message and "\n" not in message
