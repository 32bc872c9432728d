"""Bad input: each problem is one clear error that names the file, line or parameter."""

import os
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from PIL import Image

from conftest import cohort_rows, write_dataset
from skindiff.cli import run
from skindiff.data.images import check_images, load_rgb, resolve_image_path
from skindiff.data.metadata import read_metadata
from skindiff.data.prepare import PrepareConfig, prepare_scenario
from skindiff.diffusion.config import GenerateConfig
from skindiff.diffusion.generate import plan_generation
from skindiff.errors import DataValidationError, SkindiffError


def config_for(csv: Path, images: Path, **overrides) -> PrepareConfig:
    defaults = {"conditions": ("a", "b"), "flexible_per_condition": 4}
    return PrepareConfig(metadata_csv=str(csv), image_dir=str(images), **(defaults | overrides))


def test_valid_dataset_passes(tmp_path: Path) -> None:
    rows = cohort_rows()
    csv, images = write_dataset(tmp_path, rows)
    prepared = prepare_scenario(config_for(csv, images))
    assert prepared.dropped.empty
    # Scenario i places every cohort row in exactly one split.
    s = prepared.splits
    placed = pd.concat([s.train, s.val, s.test, s.flexible_light])
    assert sorted(placed["md5hash"]) == sorted(row["md5hash"] for row in rows)


def test_missing_column_is_named(tmp_path: Path) -> None:
    rows = [{k: v for k, v in row.items() if k != "label"} for row in cohort_rows()]
    csv, _ = write_dataset(tmp_path, rows)
    with pytest.raises(
        DataValidationError, match=r"metadata\.csv: missing required column\(s\) label"
    ):
        read_metadata(csv)


def test_unknown_fst_names_line_and_value(tmp_path: Path) -> None:
    rows = cohort_rows()
    rows[3]["fitzpatrick_scale"] = 7
    rows[5]["fitzpatrick_scale"] = "V"
    csv, _ = write_dataset(tmp_path, rows)
    with pytest.raises(DataValidationError) as err:
        read_metadata(csv)
    message = str(err.value)
    assert "fitzpatrick_scale" in message and "2 row(s)" in message
    # data row 3 is CSV line 5 (header is line 1)
    assert "line 5 ('7')" in message and "line 7 ('V')" in message


@pytest.mark.parametrize("column", ["label", "md5hash"])
def test_empty_values_are_refused(tmp_path: Path, column: str) -> None:
    rows = cohort_rows()
    rows[0][column] = "  "
    csv, _ = write_dataset(tmp_path, rows) if column == "label" else (None, None)
    if column == "md5hash":
        csv = tmp_path / "metadata.csv"
        pd.DataFrame(rows).to_csv(csv, index=False)
    with pytest.raises(DataValidationError, match=rf"empty {column} on 1 row\(s\): line 2"):
        read_metadata(csv)


def test_duplicate_md5hash_names_both_lines(tmp_path: Path) -> None:
    rows = cohort_rows()
    rows[9]["md5hash"] = rows[2]["md5hash"]
    csv = tmp_path / "metadata.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    with pytest.raises(DataValidationError, match=r"md5hash must be unique.*line 4, line 11"):
        read_metadata(csv)


@pytest.mark.parametrize(
    "bad", ["sub/abc123", "..", "a/../b", "/etc/passwd", "c:x", "a b", "a.jpg", "\u00e9t\u00e9"]
)
def test_md5hash_that_cannot_name_a_file_is_refused_by_prepare_and_generate(
    tmp_path: Path, bad: str
) -> None:
    rows = cohort_rows()
    rows[3]["md5hash"] = bad
    csv = tmp_path / "metadata.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    with pytest.raises(DataValidationError) as err:
        read_metadata(csv)
    # data row 3 is CSV line 5 (header is line 1)
    assert str(err.value).startswith(f"{csv}: md5hash must be")
    assert f"line 5 ({bad!r})" in str(err.value)
    # generate names its images after md5hash: the same rule refuses the same values there.
    train = pd.DataFrame([rows[0] | {"md5hash": bad, "group": "light", "path": "x.jpg"}])
    with pytest.raises(SkindiffError) as at_generate:
        plan_generation(GenerateConfig(), train)
    assert f"md5hash {bad!r}" in str(at_generate.value)


def test_missing_metadata_file(tmp_path: Path) -> None:
    with pytest.raises(DataValidationError, match=r"metadata CSV not found: .*nope\.csv"):
        read_metadata(tmp_path / "nope.csv")


def test_missing_and_corrupt_images_reported_together(tmp_path: Path) -> None:
    rows = cohort_rows()
    csv, images = write_dataset(tmp_path, rows)
    for row in rows[:3]:
        (images / f"{row['md5hash']}.jpg").unlink()
    truncated = images / f"{rows[10]['md5hash']}.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (images / f"{rows[11]['md5hash']}.jpg").write_bytes(b"not an image at all")
    with pytest.raises(DataValidationError) as err:
        prepare_scenario(config_for(csv, images))
    message = str(err.value)
    assert "\n" not in message
    assert f"5 of {len(rows)} images cannot be used" in message
    assert "3 missing" in message and f"{rows[0]['md5hash']}.jpg" in message
    assert "2 unreadable" in message and f"{rows[10]['md5hash']}.jpg" in message
    assert f"{rows[11]['md5hash']}.jpg" in message
    assert "--skip-missing" in message


def test_skip_missing_drops_and_lists(tmp_path: Path, caplog) -> None:
    rows = cohort_rows()
    csv, images = write_dataset(tmp_path, rows)
    gone = rows[0]["md5hash"]
    (images / f"{gone}.jpg").unlink()
    (images / f"{rows[1]['md5hash']}.jpg").write_bytes(b"\xff\xd8\xff garbage")
    before = sorted(p.name for p in images.iterdir())
    prepared = prepare_scenario(config_for(csv, images, skip_missing=True))
    assert f"dropped 2 of {len(rows)} rows" in caplog.text
    assert set(prepared.dropped["md5hash"]) == {gone, rows[1]["md5hash"]}
    used = pd.concat([prepared.splits.manifest(s) for s in ("train", "val", "test")])
    assert gone not in set(used["md5hash"])
    assert sorted(p.name for p in images.iterdir()) == before  # nothing of the user's touched


@pytest.mark.parametrize("bad_path", ["../outside.jpg", "sub/../../outside.jpg", "/etc/passwd"])
def test_path_escaping_image_folder_is_refused(tmp_path: Path, bad_path: str) -> None:
    rows = cohort_rows()
    for row in rows:
        row["path"] = f"{row['md5hash']}.jpg"
    rows[4]["path"] = bad_path
    csv, images = write_dataset(tmp_path / "data", rows)
    (tmp_path / "data" / "outside.jpg").write_bytes((images / rows[0]["path"]).read_bytes())
    with pytest.raises(DataValidationError) as err:
        prepare_scenario(config_for(csv, images, skip_missing=True))
    assert "metadata line 6" in str(err.value) and "escapes the image folder" in str(err.value)
    assert repr(bad_path) in str(err.value)


def test_path_column_inside_folder_is_used(tmp_path: Path) -> None:
    rows = cohort_rows()
    csv, images = write_dataset(tmp_path, rows)
    (images / "nested").mkdir()
    for row in rows:
        os.replace(images / f"{row['md5hash']}.jpg", images / "nested" / f"{row['md5hash']}.jpg")
        row["path"] = f"nested/./{row['md5hash']}.jpg"
    pd.DataFrame(rows).to_csv(csv, index=False)
    prepared = prepare_scenario(config_for(csv, images))
    assert all("/nested/" in p for p in prepared.splits.train["path"])


def test_resolve_keeps_names_with_dots(tmp_path: Path) -> None:
    assert resolve_image_path(tmp_path, "a..b.jpg") == tmp_path / "a..b.jpg"


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "I;16"])
def test_any_image_mode_loads_as_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    Image.new(mode, (8, 6)).save(path)
    image = load_rgb(path)
    assert image.mode == "RGB" and image.size == (8, 6)


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    path = tmp_path / "x.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert load_rgb(path).getpixel((0, 0)) == (255, 255, 255)


def test_unknown_condition_suggests_closest(tmp_path: Path) -> None:
    csv, images = write_dataset(tmp_path, cohort_rows(conditions=("psoriasis", "b")))
    with pytest.raises(DataValidationError, match=r"'psoriaiss' has no rows.*'psoriasis'"):
        prepare_scenario(config_for(csv, images, conditions=("psoriaiss", "b")))


def test_too_few_images_for_flexible_subset(tmp_path: Path) -> None:
    csv, images = write_dataset(tmp_path, cohort_rows(per_cell=2))
    with pytest.raises(DataValidationError, match=r"dark flexible subset needs 8 .*'a' has 4"):
        prepare_scenario(config_for(csv, images, flexible_per_condition=8))


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_val_fraction_out_of_range(tmp_path: Path, fraction: float) -> None:
    csv, images = write_dataset(tmp_path, cohort_rows())
    with pytest.raises(DataValidationError, match=r"val_fraction must be in"):
        prepare_scenario(config_for(csv, images, val_fraction=fraction))


def test_only_one_of_csv_and_image_dir(tmp_path: Path) -> None:
    csv, _ = write_dataset(tmp_path, cohort_rows())
    with pytest.raises(DataValidationError, match="image_dir is empty"):
        prepare_scenario(PrepareConfig(metadata_csv=str(csv)))


def test_cli_prints_one_line_not_a_traceback(tmp_path: Path, capsys, tracking: str) -> None:
    rows = cohort_rows()
    rows[0]["fitzpatrick_scale"] = 9
    csv, images = write_dataset(tmp_path, rows)
    with pytest.raises(SystemExit) as exit_info:
        run(["prepare", "--metadata-csv", str(csv), "--image-dir", str(images)])
    assert exit_info.value.code == 2
    started, err = capsys.readouterr().err.strip().split("\n")  # the stage's line, its error
    assert started == "[i/seed-0] prepare: running..."
    assert err.startswith("error: ") and "line 2 ('9')" in err
    assert "Traceback" not in err
    (failed,) = mlflow.search_runs([tracking], output_format="list")
    assert failed.info.status == "FAILED"
    assert failed.data.tags["mlflow.project.entryPoint"] == "prepare"


def test_check_images_refuses_missing_folder(tmp_path: Path) -> None:
    frame = read_metadata(write_dataset(tmp_path, cohort_rows())[0])
    with pytest.raises(DataValidationError, match=r"image folder not found: .*absent"):
        check_images(frame, tmp_path / "absent")
