"""Runs crash-prone native code (int8 kernels, MindSpore CPU kernels) in a child interpreter, so that a segfault
fails the one test that met it instead of killing the whole pytest run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_isolated(code: str, *args: str, timeout: float = 300, threads: int | None = None) -> str:
    """The stdout of `python -c code args...`; any non-zero exit, a signal above all, fails with the child's stderr."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=REPO_ROOT)
    if done.returncode < 0:
        name = signal.Signals(-done.returncode).name
        raise AssertionError(f"the child crashed with {name}\n{done.stderr[-3000:]}")
    assert done.returncode == 0, f"the child exited {done.returncode}\n{done.stderr[-3000:]}"
    return done.stdout
