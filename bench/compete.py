"""Competing load for a benchmark group: ``with competitors(n): ...`` keeps n busy processes.

Each competitor is a single-threaded NumPy matrix-multiply loop (about what another training
job or a test run does to the cores), started before the group's process and killed after it,
so the ratios show how each contestant holds up when it does not have the cores to itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

_LOOP = "import numpy as np\na = np.random.rand(384, 384)\nwhile True:\n    a = (a @ a) / 384.0\n"
_ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


@contextlib.contextmanager
def competitors(n: int):
    """Run n busy single-threaded processes for the duration of the block (none for n = 0)."""
    procs = [subprocess.Popen([sys.executable, "-c", _LOOP], env={**os.environ, **_ONE_THREAD},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
             for _ in range(max(0, n))]
    try:
        if procs:
            time.sleep(0.5)  # let them reach their loops
            dead = [p.returncode for p in procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"a competing process exited at once (codes {dead})")
        yield
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
