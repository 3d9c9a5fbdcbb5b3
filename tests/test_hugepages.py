"""imat.hugepages: when the imat command re-executes itself with glibc's huge-page tunable, and
that the re-execution really happens (a real child process reads its own environment)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from imat.hugepages import OPT_OUT, TUNABLE, hugepages_env, hugepages_status

GLIBC = ("glibc", "2.36")


def test_env_gets_the_tunable_on_linux_glibc_with_thp():
    env = hugepages_env({"PATH": "/bin"}, libc=GLIBC, thp_available=True)
    if sys.platform != "linux":
        assert env is None
        return
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    # Other tunables the user set are kept, ours appended.
    env = hugepages_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, libc=GLIBC, thp_available=True)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"


@pytest.mark.parametrize("environ,libc,thp", [
    ({"GLIBC_TUNABLES": TUNABLE}, GLIBC, True),               # already set: no loop
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC, True),  # the user's own choice wins
    ({OPT_OUT: "0"}, GLIBC, True),                              # opted out
    ({}, ("glibc", "2.31"), True),                              # glibc without the tunable
    ({}, ("", ""), True),                                       # musl, macOS, Windows
    ({}, GLIBC, False),                                         # THP "never" in the kernel
])
def test_env_unchanged_when_it_does_not_apply(environ, libc, thp):
    assert hugepages_env(environ, libc=libc, thp_available=thp) is None


def test_status_line_names_the_state_and_the_switch():
    assert "on" in hugepages_status({"GLIBC_TUNABLES": TUNABLE}) and OPT_OUT in hugepages_status({"GLIBC_TUNABLES": TUNABLE})
    assert "off" in hugepages_status({OPT_OUT: "0"})
    assert TUNABLE in hugepages_status({})


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    env.update(extra)
    return env


def test_reexec_replaces_the_process_with_the_tunable_set():
    probe = ("from imat.hugepages import reexec_with_hugepages; "
             "reexec_with_hugepages(['-c', 'import os; print(\"child\", os.environ.get(\"GLIBC_TUNABLES\"))']); "
             "print('not re-executed')")
    out = subprocess.run([sys.executable, "-c", probe], env=_clean_env(), capture_output=True, text=True, check=True)
    if hugepages_env(_clean_env()) is None:
        assert out.stdout.strip() == "not re-executed"
    else:
        assert out.stdout.strip() == f"child {TUNABLE}"
    out = subprocess.run([sys.executable, "-c", probe], env=_clean_env(**{OPT_OUT: "0"}), capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "not re-executed"


def test_imat_command_runs_through_the_reexec():
    imat = shutil.which("imat", path=os.path.dirname(sys.executable)) or shutil.which("imat")
    if imat is None:
        pytest.skip("the imat console script is not installed next to this Python")
    out = subprocess.run([imat, "--version"], env=_clean_env(), capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("imat, version")
