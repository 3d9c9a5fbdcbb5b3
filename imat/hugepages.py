"""Transparent huge pages for glibc's large allocations, which XLA:CPU's per-step buffers are.

XLA:CPU allocates a jitted step's temporaries afresh on every call, through malloc; glibc serves
every allocation of 32 MiB or more with a new ``mmap``, so each train step first page-faults its
activations in 4 KiB pages (slow on virtual machines: a jitted 64 MiB ``x * 2`` took 25 ms,
12.6 ms with the tunable below; the rest is DRAM bandwidth). glibc >= 2.35 has a tunable that makes malloc ask for
transparent huge pages on those regions (``madvise`` mode, the common kernel default, is
enough): 512x fewer faults. It is read at process start only, so the ``imat`` command re-executes
itself once with it set (``reexec_with_hugepages``) before it imports anything heavy.
Measured (benchmarks/RESULTS.md, issue 17): CPU train steps 1.18-1.44x faster; PyTorch unchanged.
``IMAT_HUGEPAGES=0`` turns it off.
"""

from __future__ import annotations

import os
import pathlib
import platform
import sys

TUNABLE_KEY = "glibc.malloc.hugetlb"
TUNABLE = f"{TUNABLE_KEY}=1"
OPT_OUT = "IMAT_HUGEPAGES"
THP_SETTING = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_at_least(version: str, minimum=(2, 35)) -> bool:
    try:
        return tuple(int(p) for p in version.split(".")[:2]) >= minimum
    except ValueError:
        return False


def _thp_available(setting: pathlib.Path = THP_SETTING) -> bool:
    """The kernel's THP mode is "always" or "madvise" (the selected one is in brackets)."""
    try:
        text = setting.read_text()
    except OSError:
        return False
    return "[never]" not in text and "[" in text


def hugepages_env(environ, *, libc=None, thp_available=None) -> dict | None:
    """The environment to re-execute with (``environ`` + the tunable), or None when nothing to do:
    not Linux/glibc >= 2.35, THP off in the kernel, opted out, or the tunable already set."""
    if environ.get(OPT_OUT, "1") == "0" or TUNABLE_KEY in environ.get("GLIBC_TUNABLES", ""):
        return None
    name, version = libc if libc is not None else platform.libc_ver()
    if sys.platform != "linux" or name != "glibc" or not _glibc_at_least(version):
        return None
    if not (thp_available if thp_available is not None else _thp_available()):
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [environ.get("GLIBC_TUNABLES", ""), TUNABLE]))
    return env


def reexec_with_hugepages(python_args: list[str]) -> None:
    """Replace this process by ``python *python_args`` (e.g. ``["-m", "imat.cli.main", ...]``) with
    the tunable set, when it applies; returns (doing nothing) otherwise. Call before threads or
    heavy imports exist."""
    env = hugepages_env(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *python_args], env)


def hugepages_status(environ=None) -> str:
    """One line for the logs: whether this process runs with the tunable, and how to change it."""
    environ = os.environ if environ is None else environ
    if TUNABLE_KEY in environ.get("GLIBC_TUNABLES", ""):
        return f"malloc huge pages on (GLIBC_TUNABLES={environ['GLIBC_TUNABLES']}; {OPT_OUT}=0 turns them off)"
    if environ.get(OPT_OUT) == "0":
        return f"malloc huge pages off ({OPT_OUT}=0)"
    return ("malloc huge pages off (not started by the imat command, or no glibc >= 2.35 with THP; "
            f"start with GLIBC_TUNABLES={TUNABLE} for faster CPU steps)")
