"""The Shaw-form cases and helpers shared by ``test_fast_paths.py`` and ``test_shaw_internals.py``.

Sizes B, N, H = 2, 3, 4 and a fixed scale; ``small_blocks`` (an autouse fixture where imported)
lowers the block sizes so that small inputs still cross several blocks; ``check_path`` compares a
path's output with the oracle and its gradients with the same framework's einsum path.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import numpy as np
import pytest

from . import oracle
from .numerics import allowed_error

FRAMEWORKS = ["torch", "jax"]
B, N, H = 2, 3, 4
SCALE = 0.37


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 3 query rows, so T = 7 spans three band blocks and three long-sequence blocks.

    The torch Shaw path's chunks shrink to 3 rows (backward) / 6 rows (forward) for B N H = 2 3 4;
    the jax Shaw path's key blocks (for the tail sums of ``reduce``) to at most 3 keys, so S = 9 and
    S = 6 have three and two blocks, S = 4 two blocks of 2, and S = 7 or 5 blocks of one key.
    """
    if importlib.util.find_spec("torch") is not None:  # each framework alone runs its own cases
        import relattn_torch.blockwise
        import relattn_torch.shaw

        monkeypatch.setattr(relattn_torch.shaw, "_BAND_BLOCK", 3)
        monkeypatch.setattr(relattn_torch.shaw, "_CHUNK_ELEMENTS", 3 * B * N * H)
        monkeypatch.setattr(relattn_torch.blockwise, "BLOCK_ROWS", 3)
    if importlib.util.find_spec("jax") is not None:
        import relattn_jax.blockwise
        import relattn_jax.shaw

        monkeypatch.setattr(relattn_jax.blockwise, "BLOCK_ROWS", 3)
        monkeypatch.setattr(relattn_jax.shaw, "_KEY_BLOCK", 3)


def shaw_inputs(seed, T, S, K, shared=True, keys=True, values=True):
    rng = np.random.default_rng(seed)
    table = (2 * K + 1, H) if shared else (2 * K + 1, N, H)
    return {
        "q": rng.normal(size=(B, T, N, H)),
        "k": rng.normal(size=(B, S, N, H)),
        "v": rng.normal(size=(B, S, N, H)),
        "rel_k": rng.normal(size=table) if keys else None,
        "rel_v": rng.normal(size=table) if values else None,
    }


def oracle_shaw(x, K, q_offset, T, S, **kw):
    ids = oracle.shaw_ids(T, S, K, q_offset)
    return oracle.relative_attention(x["q"], x["k"], x["v"], x["rel_k"], x["rel_v"], rel_ids=ids, scale=SCALE, **kw)


def check_path(be, x, cot, ref, impl, **kw):
    """``impl``'s output equals the oracle's ``ref``; its gradients (of sum(out * cot)) are finite and
    equal the same framework's einsum path's. Returns the output."""
    out, grads = be.attention_grads(x, cot, implementation=impl, **kw)
    assert np.abs(out - ref).max() <= allowed_error(ref)
    _, ref_grads = be.attention_grads(x, cot, implementation="einsum", **kw)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name
        assert np.abs(g - ref_grads[name]).max() <= allowed_error(ref_grads[name]), name
    return out


@dataclass(frozen=True)
class ShawCase:
    """One Shaw-form input: sizes, max_distance K, q_offset (None: S - T), causal, table forms."""

    T: int
    S: int
    K: int
    q_offset: int | None = None
    causal: bool = False
    shared: bool = True  # tables [R, H] shared by the heads, else [R, N, H]
    keys: bool = True  # a key table
    values: bool = True  # a value table

    @property
    def id(self) -> str:
        """E.g. ``T7-S7-K2-causal-keys+values``; the offset when given, ``per-head`` tables."""
        parts = [f"T{self.T}", f"S{self.S}", f"K{self.K}"]
        parts += [] if self.q_offset is None else [f"off{self.q_offset}"]
        parts += ["causal"] if self.causal else []
        parts += [] if self.shared else ["per-head"]
        parts.append("+".join(n for n, on in (("keys", self.keys), ("values", self.values)) if on))
        return "-".join(parts)

    @property
    def offset(self) -> int:
        return self.S - self.T if self.q_offset is None else self.q_offset

    def inputs(self, seed):
        return shaw_inputs(seed, self.T, self.S, self.K, self.shared, self.keys, self.values)


SHAW_CASES = [
    ShawCase(7, 7, 2),
    ShawCase(7, 7, 2, causal=True, shared=False),
    ShawCase(5, 9, 3, causal=True),  # T != S, queries at the end (cache layout)
    ShawCase(9, 5, 2, 0, values=False),  # keys only
    ShawCase(6, 6, 1, 0, shared=False, keys=False),  # values only, per-head tables
    ShawCase(1, 6, 2, causal=True),  # T = 1 (one decode step)
    ShawCase(6, 1, 2, 0),  # S = 1
    ShawCase(5, 5, 8, 0, shared=False),  # max_distance >= sequence length: all band
    ShawCase(5, 5, 0, 0),  # max_distance = 0: one shared row
    ShawCase(4, 7, 2, -3),  # negative offset
    ShawCase(7, 4, 2, 5, causal=True),  # causal with T > S: first rows see no key
]
