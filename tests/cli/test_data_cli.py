"""`imat data ...`: exit codes, output and laziness of the data commands."""

from __future__ import annotations

import json
import pathlib

import pytest
from PIL import Image

from imat.cli.main import main
from imat.data_tools.labels import LabelSpace

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
    pytest.importorskip("imat.data_tools.synthetic")
    out = tmp_path / "synth"
    assert main(["data", "synth", str(out), "--images", "4", "--seed", "3"]) == 0
    printed = capsys.readouterr().out.strip()
    assert pathlib.Path(printed) == out
    assert main(["data", "check", str(out), "--strict"]) == 0
    assert "4 images" in capsys.readouterr().out


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    pytest.importorskip("imat.data_tools.synthetic")
    from imat.data_tools.synthetic import write_synthetic
    return write_synthetic(tmp_path_factory.mktemp("syn") / "ds", num_images=6, seed=1)


def test_stats_writes_report(synth_root, tmp_path, capsys):
    pytest.importorskip("imat.data_tools.eda")
    out = tmp_path / "report"
    assert main(["data", "stats", str(synth_root), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = pathlib.Path(printed.strip().splitlines()[-1].removeprefix("report: "))
    assert report.is_file() and report.parent == out
    assert "shoe" in printed or "categor" in printed  # the summary text precedes the path


def test_prepare_prints_data_dir(synth_root, tmp_path, capsys):
    pytest.importorskip("imat.data_tools.tfds_builder")
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
