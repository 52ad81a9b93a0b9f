"""``python -m bench.device --smoke``: the accelerator check runs end to end on CPU.

The GPU machine runs ``python -m bench.device`` once with no chance to debug it, so CI runs its
smoke mode (a tiny grid through the kernels' interpreters) and reads what it wrote: parity of the
fused kernels against the einsum path for both frameworks, and a timing row per contestant.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("jax")

pytestmark = pytest.mark.fused
ROOT = Path(__file__).resolve().parents[1]
GRADS = ("out", "dq", "dk", "dv", "d_rel_k", "d_rel_v")


def test_device_check_smoke_writes_parity_and_timings(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", RELATTN_PALLAS_INTERPRET="1")
    done = subprocess.run([sys.executable, "-m", "bench.device", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads((tmp_path / "device.json").read_text())
    assert (tmp_path / "device.md").read_text() in done.stdout
    parts = {p["framework"]: p for p in report["parts"]}
    assert set(parts) == {"torch", "jax"} and report["smoke"] is True
    for fw, part in parts.items():
        assert "error" not in part, part.get("error")
        by_dtype = {p["dtype"]: p["max_rel_err"] for p in part["parity"]}
        assert set(by_dtype["float32"]) == set(GRADS)
        assert max(by_dtype["float32"].values()) < 2e-5, (fw, by_dtype["float32"])
        half = "float16" if fw == "torch" else "bfloat16"  # Triton's interpreter has no bf16 arithmetic
        assert 0 < max(by_dtype[half].values()) < 3e-2, (fw, by_dtype[half])
        (row,) = part["timing"]
        for name in ("fused", "floor", "einsum"):
            assert row[name]["fwd_ms"] > 0 and row[name]["fwdbwd_ms"] > 0, (fw, name, row[name])
