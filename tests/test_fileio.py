"""imat.fileio: atomic files, and the folder swap: lock, recovery of every crash state, stale temporaries."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from imat import fileio
from imat.errors import DataError, ImatError


def make_folder(path, version):
    path.mkdir(parents=True)
    (path / "v.txt").write_text(version)
    return path


def version(path):
    return (path / "v.txt").read_text()


def names(parent, keep="T"):
    return sorted(p.name for p in parent.iterdir() if p.name != keep)


def test_atomic_write_text_replaces_and_leaves_nothing(tmp_path):
    fileio.atomic_write_text(tmp_path / "a.txt", "one")
    fileio.atomic_write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two" and names(tmp_path, keep="a.txt") == []


def test_atomic_dir_writes_replaces_and_leaves_nothing(tmp_path):
    target = tmp_path / "T"
    for v in ("1", "2"):
        with fileio.atomic_dir(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".T.tmp-")
            assert (tmp_path / ".T.lock").read_text().strip() == str(os.getpid())  # the lock names its holder
            (tmp / "v.txt").write_text(v)
            if v == "2":
                assert version(target) == "1"  # readers see the old folder until the swap
        assert version(target) == v and oct(target.stat().st_mode & 0o777) == "0o755"
    assert names(tmp_path) == []


def test_atomic_dir_failure_keeps_the_old_folder(tmp_path):
    target = make_folder(tmp_path / "T", "1")
    with pytest.raises(RuntimeError, match="writer failed"):
        with fileio.atomic_dir(target) as tmp:
            (tmp / "v.txt").write_text("2")
            raise RuntimeError("writer failed")
    assert version(target) == "1" and names(tmp_path) == []


# Each state a writer can die in, reproduced on disk (pid 99999999 is beyond pid_max: never alive).
@pytest.mark.parametrize("state,expected,log", [
    # killed while writing: the temp folder is incomplete, the target untouched
    ({"T": "1", ".T.tmp-99999999-aa": "2"}, "1", "removing"),
    # killed after the temp folder was complete, before the target moved aside: the swap had not begun
    ({"T": "1", ".T.new-99999999-aa": "2"}, "1", "removing"),
    # killed between the two renames: the swap is finished with the complete new folder
    ({".T.old-99999999-aa": "1", ".T.new-99999999-bb": "2"}, "2", "finished an interrupted swap"),
    # first write of T killed between its renames (no old one)
    ({".T.new-99999999-bb": "2"}, "2", "finished an interrupted swap"),
    # killed between the renames while the new folder was incomplete (an older imat's order): put the old back
    ({".T.old-99999999-aa": "1", ".T.tmp-99999999-bb": "2"}, "1", "restored"),
    # killed after the swap, before the old folder was deleted
    ({"T": "2", ".T.old-99999999-aa": "1"}, "2", "removing"),
])
def test_recover_dir_repairs_every_crash_state(tmp_path, caplog, state, expected, log):
    for name, v in state.items():
        make_folder(tmp_path / name, v)
    (tmp_path / ".T.lock").write_text("99999999\n")  # a dead writer's lock file: flock died with it
    with caplog.at_level(logging.INFO, logger="imat.fileio"):
        fileio.repair_dir(tmp_path / "T")
    assert version(tmp_path / "T") == expected
    assert names(tmp_path) == []
    assert any(log in r.getMessage() for r in caplog.records)


def test_the_next_write_repairs_too(tmp_path):
    make_folder(tmp_path / ".T.old-99999999-aa", "1")
    make_folder(tmp_path / ".T.tmp-99999999-bb", "2")
    with fileio.atomic_dir(tmp_path / "T") as tmp:
        assert version(tmp_path / "T") == "1"  # restored before the new version is written
        (tmp / "v.txt").write_text("3")
    assert version(tmp_path / "T") == "3" and names(tmp_path) == []


def test_repair_dir_restores_legacy_leftovers(tmp_path):
    # A prepared dataset moved aside by imat before the shared swap (".imat-old-<name>-<pid>-<hex>").
    make_folder(tmp_path / ".imat-old-1.0.0-99999999-ffffff", "1")
    fileio.repair_dir(tmp_path / "1.0.0", error=DataError, legacy_old_prefixes=(".imat-old-1.0.0-",))
    assert version(tmp_path / "1.0.0") == "1" and names(tmp_path, keep="1.0.0") == []


def test_repair_dir_does_nothing_when_nothing_is_left(tmp_path):
    make_folder(tmp_path / "T", "1")
    make_folder(tmp_path / ".Tother.tmp-99999999-aa", "x")  # another target's name: not ours
    fileio.repair_dir(tmp_path / "T")
    assert names(tmp_path) == [".Tother.tmp-99999999-aa"]


_KILLED = textwrap.dedent("""
    import os, pathlib, signal
    from imat import fileio
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):  # the target is aside, the new folder not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
    os.rename = rename
    with fileio.atomic_dir({target!r}) as tmp:
        (tmp / "v.txt").write_text("2")
""")


def test_a_writer_sigkilled_between_the_renames(tmp_path):
    target = make_folder(tmp_path / "T", "1")
    proc = subprocess.run([sys.executable, "-c", _KILLED.format(target=str(target))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not target.exists() and ".T.lock" in names(tmp_path)  # the window, and the dead writer's lock file
    fileio.repair_dir(target)  # what the next load does
    assert version(target) == "2" and names(tmp_path) == []


_HOLD = textwrap.dedent("""
    import sys
    from imat import fileio
    from imat.errors import DataError
    with fileio.atomic_dir({target!r}, error=DataError) as tmp:
        (tmp / "v.txt").write_text("held")
        print("writing", flush=True)
        sys.stdin.readline()
""")

_SECOND = textwrap.dedent("""
    from imat import fileio
    from imat.errors import DataError
    try:
        with fileio.atomic_dir({target!r}, error=DataError) as tmp:
            (tmp / "v.txt").write_text("second")
    except DataError as e:
        print(e)
        raise SystemExit(3)
""")


def test_two_writers_the_second_gets_a_clear_error(tmp_path):
    target = make_folder(tmp_path / "T", "1")
    first = subprocess.Popen([sys.executable, "-c", _HOLD.format(target=str(target))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "writing"
        second = subprocess.run([sys.executable, "-c", _SECOND.format(target=str(target))],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 3, second.stderr
        assert second.stdout.strip() == (f"another imat process is writing {target} (pid {first.pid}); "
                                         "wait for it or choose another --out")
        assert version(target) == "1"
        assert len([n for n in names(tmp_path) if ".tmp-" in n]) == 1  # only the first writer's
        fileio.repair_dir(target)  # a reader meanwhile: reads, does not touch the live writer's folder
        assert len(names(tmp_path)) == 2
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0 and version(target) == "held" and names(tmp_path) == []


def test_a_reader_waits_for_a_writer_mid_swap_then_errors(tmp_path):
    make_folder(tmp_path / ".T.old-99999999-aa", "1")
    with fileio.dir_lock(tmp_path / "T"):  # a live writer holds it and T is missing
        with pytest.raises(ImatError, match=rf"another imat process is writing {tmp_path / 'T'} \(pid {os.getpid()}\)"):
            fileio.repair_dir(tmp_path / "T", wait_s=0.2)
    fileio.repair_dir(tmp_path / "T")
    assert version(tmp_path / "T") == "1"


def test_lock_is_released_and_its_file_removed(tmp_path):
    with fileio.dir_lock(tmp_path / "T", option="--out-dir"):
        with pytest.raises(ImatError, match="choose another --out-dir"):
            with fileio.dir_lock(tmp_path / "T", option="--out-dir"):
                pass
    assert names(tmp_path) == []
    with fileio.dir_lock(tmp_path / "T"):
        pass


def test_remove_stale_dirs_keeps_live_writers(tmp_path):
    make_folder(tmp_path / ".imat-staging-99999999-ab", "dead")
    make_folder(tmp_path / f".imat-staging-{os.getpid()}-cd", "alive")
    fileio.remove_stale_dirs(tmp_path, ".imat-staging-")
    assert names(tmp_path) == [f".imat-staging-{os.getpid()}-cd"]
