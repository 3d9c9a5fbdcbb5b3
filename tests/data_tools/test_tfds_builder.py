"""prepare(): Kaggle folder -> TFDS array_record (no TensorFlow), read back and compared with the sources."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import subprocess
import time
import sys

import numpy as np
import pytest

from imat.data_tools import tfds_builder
from imat.data_tools.images import decode_image, read_image_size
from imat.data_tools.kaggle import read_kaggle
from imat.data_tools.pipelines import PreparedSplit
from imat.data_tools.synthetic import write_synthetic
from imat.errors import ConfigError, DataError

SIZE = 32


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory) -> pathlib.Path:
    return write_synthetic(tmp_path_factory.mktemp("syn") / "kaggle", 40, seed=0, min_side=96,
                           max_side=256, large_fraction=0.0)


@pytest.fixture(scope="module")
def prepared(synthetic_root, tmp_path_factory) -> pathlib.Path:
    return tfds_builder.prepare(synthetic_root, tmp_path_factory.mktemp("prep"), image_size=SIZE, workers=2)


def _check_against_sources(data_dir: pathlib.Path, root: pathlib.Path, size: int, mode: str = "stretch"):
    ds = read_kaggle(root)
    by_id = {r.image_id: i for i, r in enumerate(ds.records)}
    cats, attrs = ds.category_matrix(), ds.attribute_matrix()
    seen = []
    for split in ("train", "validation"):
        sp = PreparedSplit.open(data_dir, split, cache=True)
        lazy = PreparedSplit.open(data_dir, split, cache=False)
        assert sp.image_ids == lazy.image_ids and sp.image_size == size and sp.resize_mode == mode
        assert sp.categories.dtype == np.float32 and sp.categories.shape == (sp.num_examples, 46)
        assert sp.attributes.shape == (sp.num_examples, 294)
        all_images = sp.images(np.arange(sp.num_examples))
        assert np.array_equal(all_images, lazy.images(np.arange(sp.num_examples)))
        for i, image_id in enumerate(sp.image_ids):
            rec = ds.records[by_id[image_id]]
            np.testing.assert_array_equal(sp.categories[i], cats[by_id[image_id]])
            np.testing.assert_array_equal(sp.attributes[i], attrs[by_id[image_id]])
            assert (sp.heights[i], sp.widths[i]) == (rec.height, rec.width)
            np.testing.assert_array_equal(all_images[i], decode_image(rec.path, size, mode))
        seen.append(sp.image_ids)
    return seen


def test_synthetic_round_trip(prepared, synthetic_root):
    train, val = _check_against_sources(prepared, synthetic_root, SIZE)
    assert (len(train), len(val)) == (32, 8)
    assert not set(train) & set(val)
    ids = [r.image_id for r in read_kaggle(synthetic_root).records]
    assert sorted(train + val) == sorted(ids)
    assert (sorted(train), sorted(val)) == tfds_builder.split_ids(ids, 0, 0.2)
    assert "tensorflow" not in sys.modules, "prepare and reading must work without TensorFlow"
    manifest = json.loads((prepared / tfds_builder.MANIFEST_NAME).read_text())
    assert manifest["splits"] == {"train": 32, "validation": 8}
    assert manifest["image_size"] == SIZE and manifest["resize_mode"] == "stretch" and manifest["seed"] == 0
    assert manifest["source_root"] == str(synthetic_root.resolve()) and manifest["num_problems"] == 0
    assert json.loads((prepared / "label_descriptions.json").read_text())["categories"][0]["id"] == 0
    assert prepared.parts[-3:] == ("imaterialist_fashion2020", f"s{SIZE}_stretch", "1.0.0")


def test_plain_tfds_reads_it(prepared):
    import tensorflow_datasets as tfds

    sources = tfds.builder_from_directory(str(prepared)).as_data_source()
    ex = sources["validation"][0]
    assert ex["image"].shape == (SIZE, SIZE, 3) and ex["image"].dtype == np.uint8
    assert ex["categories"].shape == (46,) and ex["attributes"].shape == (294,)


def test_split_ids_deterministic_and_seeded():
    ids = [f"{i:04d}" for i in range(50)]
    a = tfds_builder.split_ids(ids, 3, 0.2)
    assert a == tfds_builder.split_ids(list(reversed(ids)), 3, 0.2)   # order of train.csv is irrelevant
    assert (len(a[0]), len(a[1])) == (40, 10)
    assert a[1] != tfds_builder.split_ids(ids, 4, 0.2)[1]


def test_second_prepare_is_noop_and_new_seed_rebuilds(synthetic_root, tmp_path):
    out = tmp_path / "out"
    d = tfds_builder.prepare(synthetic_root, out, image_size=SIZE, workers=1, seed=0)
    files = sorted(p for p in d.iterdir() if "array_record" in p.name)
    stamps = [p.stat().st_mtime_ns for p in files]
    assert tfds_builder.prepare(synthetic_root, out, image_size=SIZE, workers=1, seed=0) == d
    assert [p.stat().st_mtime_ns for p in files] == stamps, "a second prepare with the same options rewrote files"
    val0 = PreparedSplit.open(d, "validation").image_ids

    assert tfds_builder.prepare(synthetic_root, out, image_size=SIZE, workers=1, seed=1) == d
    val1 = PreparedSplit.open(d, "validation").image_ids
    assert len(val1) == len(val0) and set(val1) != set(val0)
    ids = [r.image_id for r in read_kaggle(synthetic_root).records]
    assert sorted(val1) == tfds_builder.split_ids(ids, 1, 0.2)[1]
    assert json.loads((d / tfds_builder.MANIFEST_NAME).read_text())["seed"] == 1
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "staging folders left behind"


def _corrupt_copy(src: pathlib.Path, dst: pathlib.Path) -> tuple[pathlib.Path, list[str]]:
    shutil.copytree(src, dst)
    images = sorted((dst / "train").iterdir())
    garbage, truncated = images[3], images[7]
    garbage.write_bytes(b"this is not a jpeg at all")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    return dst, [garbage.stem, truncated.stem]


def test_corrupt_images_are_reported_and_skipped(synthetic_root, tmp_path, caplog):
    root, bad = _corrupt_copy(synthetic_root, tmp_path / "kaggle")
    with caplog.at_level(logging.WARNING, logger="imat.data_tools.tfds_builder"):
        d = tfds_builder.prepare(root, tmp_path / "out", image_size=SIZE, workers=2)
    manifest = json.loads((d / tfds_builder.MANIFEST_NAME).read_text())
    assert manifest["num_problems"] == 2 and manifest["problem_counts"] == {"corrupt image": 2}
    assert all(any(b in p for p in manifest["problems"]) for b in bad)
    assert sum(b in caplog.text for b in bad) == 2
    ids = PreparedSplit.open(d, "train").image_ids + PreparedSplit.open(d, "validation").image_ids
    assert len(ids) == 38 and not set(bad) & set(ids)


def test_failed_prepare_keeps_the_earlier_dataset(synthetic_root, tmp_path):
    root, bad = _corrupt_copy(synthetic_root, tmp_path / "kaggle")
    out = tmp_path / "out"
    d = tfds_builder.prepare(root, out, image_size=SIZE, workers=1, seed=0)
    before = PreparedSplit.open(d, "train")
    with pytest.raises(DataError, match="corrupt image"):
        tfds_builder.prepare(root, out, image_size=SIZE, workers=1, seed=5, strict=True)
    after = PreparedSplit.open(d, "train")
    assert after.image_ids == before.image_ids
    assert np.array_equal(after.images(np.arange(len(after))), before.images(np.arange(len(before))))
    assert json.loads((d / tfds_builder.MANIFEST_NAME).read_text())["seed"] == 0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_leftovers_of_a_killed_prepare_are_recovered(synthetic_root, tmp_path):
    out = tmp_path / "out"
    d = tfds_builder.prepare(synthetic_root, out, image_size=SIZE, workers=1)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = out / f".imat-staging-{dead}-abcd"
    (stale / "junk").mkdir(parents=True)
    # A swap killed between its two renames: the dataset sits aside under the ".imat-old-" name.
    aside = d.with_name(f".imat-old-{d.name}-{dead}-ffffff")
    os.rename(d, aside)
    assert tfds_builder.prepare(synthetic_root, out, image_size=SIZE, workers=1) == d
    assert not stale.exists() and not aside.exists()
    assert PreparedSplit.open(d, "validation").num_examples == 8


def test_test_split_of_unlabelled_images(synthetic_root, tmp_path):
    root = tmp_path / "kaggle"
    shutil.copytree(synthetic_root, root)
    (root / "test").mkdir()
    sources = sorted((root / "train").iterdir())[:3]
    for i, p in enumerate(sources):
        shutil.copy(p, root / "test" / f"query{i}.jpg")
    (root / "test" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    d = tfds_builder.prepare(root, tmp_path / "out", image_size=SIZE, workers=2)
    test = PreparedSplit.open(d, "test")
    assert test.image_ids == ["query0", "query1", "query2"]
    assert not test.categories.any() and not test.attributes.any()
    for i, p in enumerate(sources):
        w, h = read_image_size(p)
        assert (test.heights[i], test.widths[i]) == (h, w)
        np.testing.assert_array_equal(test.images([i])[0], decode_image(p, SIZE))
    manifest = json.loads((d / tfds_builder.MANIFEST_NAME).read_text())
    assert manifest["splits"]["test"] == 3 and "broken" in " ".join(manifest["problems"])


def test_real_smoke(real_smoke, tmp_path):
    d = tfds_builder.prepare(real_smoke, tmp_path / "out", image_size=SIZE, resize_mode="letterbox", workers=2)
    train, val = _check_against_sources(d, real_smoke, SIZE, "letterbox")
    n = len(read_kaggle(real_smoke).records)
    assert len(train) + len(val) == n and len(val) == round(0.2 * n)


@pytest.mark.parametrize("kwargs,match", [
    ({"image_size": 0}, "image_size"),
    ({"resize_mode": "squash"}, "resize_mode"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"workers": 0}, "workers"),
    ({"seed": -1}, "seed"),
])
def test_bad_options(synthetic_root, tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tfds_builder.prepare(synthetic_root, tmp_path / "out", **kwargs)


def test_missing_root_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="not a folder"):
        tfds_builder.prepare(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="label_descriptions.json"):
        tfds_builder.prepare(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_default_options_use_the_predefined_config(synthetic_root, tmp_path):
    d = tfds_builder.prepare(synthetic_root, tmp_path / "out", workers=2)   # 128, stretch: a BUILDER_CONFIG
    assert d.parts[-2] == "s128_stretch"
    val = PreparedSplit.open(d, "validation")
    records = {r.image_id: r for r in read_kaggle(synthetic_root).records}
    for i in (0, len(val) - 1):
        np.testing.assert_array_equal(val.images([i])[0], decode_image(records[val.image_ids[i]].path, 128, "stretch"))


def test_killed_prepare_leaves_the_earlier_dataset_readable(real_smoke, tmp_path):
    out = tmp_path / "out"
    d = tfds_builder.prepare(real_smoke, out, image_size=SIZE, workers=1, seed=0)
    before = PreparedSplit.open(d, "train")
    code = ("from imat.data_tools.tfds_builder import prepare; "
            f"prepare({str(real_smoke)!r}, {str(out)!r}, image_size={SIZE}, workers=1, seed=1)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Kill it as soon as TFDS has started writing into its staging folder.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            if any(out.glob(".imat-staging-*/imaterialist_fashion2020/*/*incomplete*")):
                break
            time.sleep(0.01)
        killed = child.poll() is None
        child.kill()
    finally:
        child.wait()
    after = PreparedSplit.open(d, "train")
    if killed:
        assert after.image_ids == before.image_ids
        assert json.loads((d / tfds_builder.MANIFEST_NAME).read_text())["seed"] == 0
        assert any(out.glob(".imat-staging-*")), "the killed run should have left its staging folder"
    # The next prepare cleans up after the dead one and does its job.
    assert tfds_builder.prepare(real_smoke, out, image_size=SIZE, workers=1, seed=1) == d
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    assert json.loads((d / tfds_builder.MANIFEST_NAME).read_text())["seed"] == 1
    assert killed, "prepare finished before it could be killed; the kill was not exercised"


def test_decode_pool_uses_processes_unless_jax_is_loaded():
    import concurrent.futures

    pool = tfds_builder._make_executor(2)
    try:
        expected = (concurrent.futures.ThreadPoolExecutor if "jax" in sys.modules
                    else concurrent.futures.ProcessPoolExecutor)
        assert isinstance(pool, expected)
        task = tfds_builder._Task("x", "/nonexistent.jpg", 8, "stretch", need_size=False)
        image, hw, error = pool.submit(tfds_builder._decode_task, task).result()
        assert image is None and "not found" in error   # bad files are reported, never raised
    finally:
        pool.shutdown()


# ---- decode workers die with their parent ------------------------------------------------------------

def _children(pid: int) -> set[int]:
    """Live (non-zombie) processes whose parent is pid, by a scan of /proc."""
    out = set()
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


needs_proc = pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="needs Linux /proc")


@needs_proc
def test_sigkilled_prepare_leaves_no_worker_alive(tmp_path):
    root = write_synthetic(tmp_path / "syn", 150, seed=0, min_side=96, max_side=256, large_fraction=0.0)
    code = "import sys; from imat.cli.main import main; sys.exit(main(sys.argv[1:]))"
    argv = ["data", "prepare", str(root), "--out", str(tmp_path / "out"), "--workers", "2", "--image-size", "32"]
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and len(workers) < 2:
            workers = _children(proc.pid)
            time.sleep(0.01)
        assert len(workers) >= 2, f"the prepare never had its 2 decode workers (exit code {proc.poll()})"
        proc.kill()
        proc.wait()
        survivors = _wait_gone(workers, 5.0)
        assert survivors == [], f"decode workers {survivors} outlived their SIGKILLed parent {proc.pid}"
    finally:
        proc.kill()
        proc.wait()
        for pid in workers:        # never leak a worker, even when the test fails
            if _alive(pid):
                os.kill(pid, 9)


@needs_proc
def test_parent_watch_fallback_without_prctl():
    """Where prctl is unavailable, the worker's watcher thread notices the reparenting and exits."""
    code = (
        "import os, sys, time\n"
        "from imat.data_tools.tfds_builder import _die_with_parent\n"
        "parent = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    _die_with_parent(parent, use_prctl=False)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(0.3)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    child = int(out.stdout.split()[0])
    try:
        assert _wait_gone([child], 5.0) == [], "the worker outlived its parent without prctl"
    finally:
        if _alive(child):
            os.kill(child, 9)
