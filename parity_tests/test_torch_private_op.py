"""relattn_torch without torch's private fused CPU kernel (``aten._scaled_dot_product_flash_attention_for_cpu``).

The banded Shaw path runs that private op; a torch without it, or with another signature, must still
import relattn_torch, "auto" must fall back to another exact path with the reason, and
``implementation="shaw"`` must fail with an error that names the op. The op is hidden from
``torch.ops.aten`` in a subprocess (the import itself is under test), and its absence is simulated in
process for the rule table.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import relattn_torch  # noqa: E402
from relattn_torch import _flash_op, choice  # noqa: E402
from relattn_torch.einsum import AttentionArgs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OP = "_scaled_dot_product_flash_attention_for_cpu"

HIDE_OP_THEN_RUN = f"""
import json, torch
namespace = torch.ops.aten
getattr_ = type(namespace).__getattr__
def hidden(self, name):
    if name.startswith({OP!r}):
        raise AttributeError(f"no op {{name}}")
    return getattr_(self, name)
type(namespace).__getattr__ = hidden
for name in ({OP!r}, {OP + "_backward"!r}):
    namespace.__dict__.pop(name, None)
assert not hasattr(torch.ops.aten, {OP!r})

import relattn_torch
from relattn_torch import _flash_op

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 6, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
table = torch.randn(5, 4, generator=g, dtype=torch.float64)
kw = dict(max_distance=2, is_causal=True)
auto = relattn_torch.relative_attention(q, k, v, table, table, **kw)
einsum = relattn_torch.relative_attention(q, k, v, table, table, implementation="einsum", **kw)
try:
    relattn_torch.relative_attention(q, k, v, table, table, implementation="shaw", **kw)
    forced = None
except ValueError as e:
    forced = str(e)
print(json.dumps(dict(missing=_flash_op.MISSING, diff=float((auto - einsum).abs().max()), forced=forced)))
"""


def test_import_and_auto_work_without_the_private_op():
    run = subprocess.run([sys.executable, "-c", HIDE_OP_THEN_RUN], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["missing"] and OP in got["missing"]
    assert got["diff"] == 0.0  # "auto" ran the einsum path itself (small inputs), not an approximation
    assert got["forced"].startswith("implementation='shaw' needs torch's private op") and OP in got["forced"]


def _shaw_case(T=6, S=6):
    q = torch.zeros(1, T, 2, 4)
    k = v = torch.zeros(1, S, 2, 4)
    return q, k, v, AttentionArgs(rel_k=torch.zeros(5, 4), rel_v=torch.zeros(5, 4), max_distance=2, q_offset=S - T)


def test_auto_takes_the_banded_path_when_the_op_is_there():
    assert _flash_op.MISSING is None, _flash_op.MISSING  # torch 2.13 has the op: this test suite runs the path
    # T = S = 2048 (B * N = 2): above the crossover (choice._SHAW_MIN_LOGITS) where "auto" prefers the banded path
    assert relattn_torch.choose_implementation(*_shaw_case(2048, 2048)).name == "shaw"


def test_auto_falls_back_with_a_reason_when_the_op_is_missing(monkeypatch):
    monkeypatch.setattr(_flash_op, "MISSING", "needs torch's private op aten.X")
    got = relattn_torch.choose_implementation(*_shaw_case())
    assert got.name == "einsum" and "LONG_SEQUENCE_THRESHOLD" in got.reason
    with pytest.raises(ValueError, match=r"implementation='shaw' needs torch's private op aten\.X; use 'auto'"):
        relattn_torch.choose_implementation(*_shaw_case(), implementation="shaw")
    q, k, _, args = _shaw_case()
    long = dataclasses.replace(choice._case(q, k, args), T=2**14, S=2**14)
    assert choice._choose(long).name == "blockwise"  # long sequences still keep memory linear


def test_an_op_with_another_signature_counts_as_missing(monkeypatch):
    assert _flash_op.private_op(OP) is not None
    monkeypatch.setitem(_flash_op.POSITIONAL, OP, ("query", "key", "value", "is_causal", "dropout_p"))
    assert _flash_op.private_op(OP) is None
    monkeypatch.setitem(_flash_op.POSITIONAL, OP + "_backward", ("grad_out", "q"))
    assert _flash_op.private_op(OP + "_backward") is None

