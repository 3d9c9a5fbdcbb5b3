"""`imat data ...`: exit codes, output and laziness of the data commands."""

from __future__ import annotations

import json
import pathlib

import pytest
from PIL import Image

from imat.cli.main import main
from imat.data_tools.labels import LabelSpace
from imat.data_tools.synthetic import write_synthetic

HEADER = "ImageId,EncodedPixels,Height,Width,ClassId,AttributesIds"


def make_folder(root: pathlib.Path, rows: list[str]) -> pathlib.Path:
    root.mkdir(parents=True)
    (root / "label_descriptions.json").write_text(json.dumps(LabelSpace.default().to_json_dict()))
    (root / "train.csv").write_text("\n".join([HEADER, *rows]) + "\n")
    (root / "train").mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (3, 4), (9, 9, 9)).save(root / "train" / f"{name}.jpg")
    return root


GOOD = ["a,1 3,4,3,1,", "b,2 2,4,3,33,\"115\""]


def test_check_good_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "good", GOOD)
    assert main(["data", "check", str(root), "--strict"]) == 0
    out = capsys.readouterr().out
    assert "2 images and 2 mask rows read" in out and "no problems" in out


def test_check_bad_folder(tmp_path, capsys):
    root = make_folder(tmp_path / "bad", [*GOOD, "a,1 3,4,3,77,", "ghost,1 1,4,3,1,"])
    assert main(["data", "check", str(root)]) == 0  # lenient: report and go on
    out = capsys.readouterr().out
    assert "unknown ClassId: 1" in out and "missing image file: 1" in out
    assert "dropped 2 rows and 1 images" in out
    assert main(["data", "check", str(root), "--strict"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("imat: error: ") and f"{root / 'train.csv'}:4: unknown ClassId" in err
    assert "Traceback" not in err
    # --no-images: the missing image is not a problem any more
    assert main(["data", "check", str(root), "--no-images"]) == 0
    assert "missing image file" not in capsys.readouterr().out


def test_check_errors_and_usage(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "nowhere")]) == 1
    assert "nowhere" in capsys.readouterr().err
    assert main(["data", "check"]) == 2  # missing ROOT
    assert main(["data", "check", str(tmp_path), "--bogus"]) == 2
    assert main(["data", "prepare", str(tmp_path), "--out", str(tmp_path / "o"), "--resize-mode", "squash"]) == 2
    assert main(["data", "prepare", str(tmp_path)]) == 2  # --out is required
    capsys.readouterr()


def test_data_help_lists_subcommands_without_heavy_imports(cli_in_fresh_process):
    proc, heavy = cli_in_fresh_process(["data", "--help"])
    for name in ("check", "synth", "stats", "prepare"):
        assert name in proc.stdout
    assert heavy == []


def test_synth_then_check(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--images", "4", "--seed", "3"]) == 0
    printed = capsys.readouterr().out.strip()
    assert pathlib.Path(printed) == out
    assert main(["data", "check", str(out), "--strict"]) == 0
    assert "4 images and " in capsys.readouterr().out


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    return write_synthetic(tmp_path_factory.mktemp("syn") / "ds", num_images=6, seed=1)


def test_stats_writes_report(synth_root, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["data", "stats", str(synth_root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = pathlib.Path(printed.strip().splitlines()[-1].removeprefix("report: "))
    assert report.is_file() and report.parent == out
    # The summary precedes the path, with the counts of stats.json.
    stats = json.loads((out / "stats.json").read_text())
    assert printed.startswith(f"dataset: {synth_root}\n  6 labelled images, {stats['mask_rows']} mask rows ")
    assert "note: image-level" not in printed


def test_prepare_prints_data_dir(synth_root, tmp_path, capsys):
    out = tmp_path / "prepared"
    rc = main(["data", "prepare", str(synth_root), "--out", str(out), "--image-size", "32",
               "--resize-mode", "letterbox", "--workers", "1", "--seed", "2", "--val-fraction", "0.5"])
    assert rc == 0
    data_dir = pathlib.Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert data_dir.is_dir() and out in data_dir.parents
    # the options reached the builder: the prepared split has the requested size and split fraction
    from imat.data_tools.pipelines import PreparedSplit
    train = PreparedSplit.open(data_dir, "train", cache=False)
    val = PreparedSplit.open(data_dir, "validation", cache=False)
    assert train.image_size == 32 and train.num_examples + val.num_examples == 6 and val.num_examples == 3


# ---- image-level folders -------------------------------------------------------------------------------

def make_image_level(root: pathlib.Path, lines: list[str], images) -> pathlib.Path:
    (root / "images").mkdir(parents=True)
    (root / "labels.csv").write_text("\n".join(["ImageId,ClassIds", *lines]) + "\n")
    for name in images:
        Image.new("RGB", (30, 40), (90, 9, 9)).save(root / "images" / f"{name}.jpg")
    return root


def test_check_image_level_folder(tmp_path, capsys):
    root = make_image_level(tmp_path / "il", ["p1,0 23", "p2,", "p3,99", "p1,4", "p4,1"], ["p1", "p2", "p3"])
    assert main(["data", "check", str(root)]) == 0
    out = capsys.readouterr().out
    csv = root / "labels.csv"
    assert out.splitlines() == [
        f"{root}: 2 images read (of 4 images, 5 rows in labels.csv); 1 without labels "
        "(kept out of train/validation, for self-supervision)",
        "dropped 3 rows; 3 problems by reason:",
        f"  duplicate ImageId: 1 (first: {csv}:5: duplicate ImageId: p1 is already labelled at line 2; "
        "give each photo one row)",
        f"  missing image file: 1 (first: {csv}:6: missing image file: {root / 'images' / 'p4.jpg'} not found; "
        "row dropped)",
        f"  unknown ClassId: 1 (first: {csv}:4: unknown ClassId: 99 is not an iMaterialist category id (0..45))",
    ]
    assert main(["data", "check", str(root), "--strict"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"imat: error: {csv}:4: unknown ClassId") and "Traceback" not in err


def test_check_folder_of_neither_kind(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"imat: error: {tmp_path}: neither train.csv nor labels.csv found")


def test_stats_of_image_level_folder(tmp_path, capsys):
    root = make_image_level(tmp_path / "il", ["p1,0 23", "p2,", "p3,23"], ["p1", "p2", "p3"])
    out = tmp_path / "report"
    assert main(["data", "stats", str(root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"dataset: {root} (image-level labels: no masks, no attributes)\n"
                              "  3 images, 1 without labels (3 images / 3 rows in labels.csv; 0 problems)\n")
    assert "note: image-level source (no masks, no attributes)" in printed
    assert printed.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    stats = json.loads((out / "stats.json").read_text())
    by_id = {c["id"]: c["images"] for c in stats["categories"]}
    assert (by_id[0], by_id[23], by_id[1]) == (1, 2, 0)
    assert stats["image_sizes"]["width"]["max"] == 30 and stats["image_sizes"]["height"]["min"] == 40
    written = {p.name for p in out.glob("*.png")}
    assert written == {"category_frequency.png", "categories_per_image.png", "image_sizes.png", "cooccurrence.png"}
    assert "No attribute or mask-example plots" in (out / "report.html").read_text()


def test_prepare_several_sources(synth_root, tmp_path, capsys):
    extra = make_image_level(tmp_path / "il", ["p1,0 23", "p2,", "p3,23", "p4,5"], ["p1", "p2", "p3", "p4"])
    rc = main(["data", "prepare", str(synth_root), str(extra), "--out", str(tmp_path / "out"), "--image-size", "16",
               "--workers", "1", "--val-fraction", "0.25"])
    assert rc == 0
    data_dir = pathlib.Path(capsys.readouterr().out.strip().splitlines()[-1])
    manifest = json.loads((data_dir / "imat_manifest.json").read_text())
    # Each source is split on its own: 6 labelled synthetic photos -> 2 held out, 3 labelled image-level -> 1.
    assert manifest["splits"] == {"train": 6, "validation": 3, "unlabelled": 1}
    assert [e["kind"] for e in manifest["sources"]] == sorted(
        ["kaggle", "image-level"], key=lambda k: str(synth_root if k == "kaggle" else extra.resolve()))
