"""Atomic writes: every file imat writes goes to a temp file beside its target and is renamed;
a folder (an index, a prepared dataset) is written beside its target and swapped in.

A reader (or a run killed mid-write) therefore sees the old file or the new one,
never half of one. Light on purpose: the engine imports it too.

Folder swap (`atomic_dir`, or `dir_lock` + `recover_dir` + `swap_in_dir`), for a target T:

    lock      .T.lock          fcntl.flock, exclusive, held for the write and the swap; holds the pid
    write     .T.tmp-PID-X     the new folder being written (incomplete: a leftover is deleted)
    complete  .T.new-PID-X     renamed from tmp when written (or from a folder built elsewhere)
    swap      T -> .T.old-PID-X, then .T.new-PID-X -> T, then .T.old-PID-X deleted

A crash at any point leaves a state that `recover_dir` repairs, under the lock, the next
time T is written or loaded (`repair_dir`): T missing and a complete .new- present ->
the swap is finished; T missing and only an .old- present -> the old T is put back; every
other leftover (tmp, new or old beside an existing T) is deleted. Each repair is logged.

Two writers of the same T: the second gets `error` (an ImatError chosen by the caller)
at once, naming the holder's pid; it does not wait, because two writers of one output are
a mistake (waiting would let the later one silently replace the earlier one's result).
Readers lock only to repair leftovers (`repair_dir`), and wait a few seconds only when T is missing mid-swap.
A writer that dies releases the lock with its process (flock), so a stale lock file
never blocks anyone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import pathlib
import secrets
import shutil
import tempfile
import time
from typing import Iterator, Sequence

from imat.errors import ImatError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_path(path, *, mode: int = 0o644) -> Iterator[pathlib.Path]:
    """Yield a temp path beside `path`; on success it is renamed onto `path`, on error removed.

    For writers that want a file name (onnx.save_model, savefig, faiss.write_index).
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = pathlib.Path(tmp_name)
    try:
        yield tmp
        _fsync(tmp)  # the data is on disk before the rename makes it visible
        os.chmod(tmp, mode)  # mkstemp creates 0600; outputs are ordinary shareable files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path, data: bytes) -> pathlib.Path:
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(path, text: str) -> pathlib.Path:
    path = pathlib.Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- folders: lock, swap, recovery


def _aside(target: pathlib.Path, kind: str) -> pathlib.Path:
    """A hidden name beside `target` for one stage of a swap (kind: tmp, new, old, lock)."""
    if kind == "lock":
        return target.parent / f".{target.name}.lock"
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_dir(path: pathlib.Path) -> None:
    # Makes the renames inside `path` durable: without it a power cut can undo a finished swap.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _holder_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


@contextlib.contextmanager
def dir_lock(target, *, error: type[ImatError] = ImatError, option: str = "--out",
             timeout_s: float = 0.0) -> Iterator[None]:
    """Hold the exclusive write lock of folder `target` (a `.NAME.lock` file beside it).

    Raises `error` naming the holder's pid when another process holds it for longer than
    `timeout_s` (0: fail at once). The lock file is removed on release; a later locker
    checks it locked the file that is still at the path, so removing it is race-free.
    """
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    path = _aside(target, "lock")
    deadline = time.monotonic() + max(0.0, timeout_s)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            pid = _holder_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            if time.monotonic() >= deadline:
                raise error(f"another imat process is writing {target} (pid {pid}); "
                            f"wait for it or choose another {option}") from None
            time.sleep(0.05)
            continue
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file we locked: lock the one now at the path
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)  # while still locked: a waiter then sees a different inode and retries
        except FileNotFoundError:
            pass
        os.close(fd)


def _leftovers(target: pathlib.Path, legacy_old_prefixes: Sequence[str]) -> dict[str, list[pathlib.Path]]:
    """Swap leftovers beside `target` by kind (tmp, new, old), oldest first."""
    found: dict[str, list[pathlib.Path]] = {"tmp": [], "new": [], "old": []}
    parent = target.parent
    if not parent.is_dir():
        return found
    prefix = f".{target.name}."
    for p in parent.iterdir():
        name = p.name
        kind = None
        if name.startswith(prefix):
            kind = name[len(prefix):].split("-", 1)[0]
        elif any(name.startswith(lp) for lp in legacy_old_prefixes):
            kind = "old"
        if kind in found and p.is_dir() and not p.is_symlink():
            found[kind].append(p)
    for paths in found.values():
        paths.sort(key=_mtime_ns)
    return found


def _mtime_ns(path: pathlib.Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:  # removed meanwhile by the writer that owns it
        return 0


def has_leftovers(target, *, legacy_old_prefixes: Sequence[str] = ()) -> bool:
    """Whether an interrupted or running swap left folders beside `target` (cheap: one listing)."""
    return any(_leftovers(pathlib.Path(target), legacy_old_prefixes).values())


def recover_dir(target, *, legacy_old_prefixes: Sequence[str] = ()) -> None:
    """Repair what an interrupted swap of `target` left (see the module docstring). Hold `dir_lock`.

    `legacy_old_prefixes`: name prefixes of folders an older imat moved `target` aside to.
    """
    target = pathlib.Path(target)
    found = _leftovers(target, legacy_old_prefixes)
    if not os.path.lexists(target):
        if found["new"]:
            src = found["new"].pop()
            os.rename(src, target)
            logger.warning("finished an interrupted swap: moved %s to %s", src, target)
        elif found["old"]:
            src = found["old"].pop()
            os.rename(src, target)
            logger.warning("restored %s from %s (an interrupted swap had moved it aside)", target, src)
        _fsync_dir(target.parent)
    for paths in found.values():
        for p in paths:
            logger.info("removing %s, left by an interrupted write of %s", p, target)
            shutil.rmtree(p, ignore_errors=True)


def repair_dir(target, *, error: type[ImatError] = ImatError, legacy_old_prefixes: Sequence[str] = (),
               wait_s: float = 5.0) -> None:
    """Before reading `target`: repair an interrupted swap, if one left anything (safe for readers).

    Does nothing when there is nothing to repair. When a writer holds the lock: if `target`
    exists it is read as it is; if not, waits up to `wait_s` for the writer to finish its swap.
    A reader without write permission logs a warning and reads what is there.
    """
    target = pathlib.Path(target)
    if not has_leftovers(target, legacy_old_prefixes=legacy_old_prefixes):
        return
    missing = not os.path.lexists(target)
    try:
        with dir_lock(target, error=error, timeout_s=wait_s if missing else 0.0):
            recover_dir(target, legacy_old_prefixes=legacy_old_prefixes)
    except ImatError:
        if missing:
            raise
        logger.debug("%s is being written by another process; reading the current version", target)
    except OSError as e:
        logger.warning("cannot repair %s after an interrupted write (%s); reading what is there", target, e)


def swap_in_dir(built, target) -> pathlib.Path:
    """Replace folder `target` by the complete folder `built` (same file system). Hold `dir_lock`."""
    built, target = pathlib.Path(built), pathlib.Path(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    new = _aside(target, "new")
    os.rename(built, new)  # from here on the new folder counts as complete (recover_dir finishes the swap)
    _fsync_dir(parent)
    old = None
    if os.path.lexists(target):
        old = _aside(target, "old")
        os.rename(target, old)  # readers holding open files keep them (POSIX)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)  # put the previous version back
        shutil.rmtree(new, ignore_errors=True)
        raise
    _fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def remove_stale_dirs(folder, prefix: str) -> None:
    """Delete folders `folder/<prefix><pid>-...` whose writer process is dead (staging of killed runs)."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.name.startswith(prefix) and p.is_dir():
            pid = p.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                logger.info("removing %s, left by an interrupted run (pid %s)", p, pid)
                shutil.rmtree(p, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def atomic_dir(target, *, error: type[ImatError] = ImatError, option: str = "--out",
               mode: int = 0o755) -> Iterator[pathlib.Path]:
    """Lock `target`, repair earlier interrupted swaps, yield an empty temp folder beside it;
    on success the folder is swapped in for `target`, on error it is removed.

    Files written into the folder should be fsynced by the writer (atomic_path does it).
    """
    target = pathlib.Path(target)
    with dir_lock(target, error=error, option=option):
        recover_dir(target)
        tmp = _aside(target, "tmp")
        tmp.mkdir()
        os.chmod(tmp, mode)  # a shared folder, whatever the umask of a temp folder would give
        try:
            yield tmp
            swap_in_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
