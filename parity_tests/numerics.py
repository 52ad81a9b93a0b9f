"""Error measures shared by the tests (max abs error, relative to the reference's scale)."""

from __future__ import annotations

import numpy as np

from . import oracle


def relative_error(got, ref) -> float:
    """max |got - ref| / max |ref| (in float64)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-300))


def allowed_error(ref, rel: float = 1e-12) -> float:
    """The tolerance rule of the suite: a max abs error of rel * max(1, max |ref|).

    Absolute up to unit scale, relative beyond it (one number per tensor, never elementwise).
    ``ref`` is an array (empty: unit scale) or its max |entry| as a number.
    """
    scale = float(np.abs(np.asarray(ref, np.float64)).max()) if np.size(ref) else 1.0
    return rel * max(1.0, scale)


def assert_close(out, ref, rel=1e-12):
    """Same shape and max abs error <= ``allowed_error(ref, rel)``."""
    err = np.abs(np.asarray(out, np.float64) - ref).max()
    assert out.shape == ref.shape
    assert err <= allowed_error(ref, rel), f"max abs error {err:.3e}"


def assert_grads_match_finite_differences(bk, inputs, rng, implementation=None, nonzero=False, **kw):
    """The framework's gradients equal directional derivatives of the float64 oracle (central
    differences, eps = 1e-6, within ``allowed_error(.., 1e-7)``) for every array input; ``nonzero``:
    and none of them is all zero."""
    cot = rng.standard_normal(np.shape(oracle.relative_attention(**inputs, **kw)))
    if implementation is not None:
        kw_run = {**kw, "implementation": implementation}
    else:
        kw_run = kw
    _, grads = bk.attention_grads(inputs, cot, **kw_run)
    assert set(grads) == {n for n, x in inputs.items() if x is not None}
    eps = 1e-6
    for name, g in grads.items():
        d = rng.standard_normal(inputs[name].shape)
        plus = oracle.relative_attention(**{**inputs, name: inputs[name] + eps * d}, **kw)
        minus = oracle.relative_attention(**{**inputs, name: inputs[name] - eps * d}, **kw)
        numeric = ((plus - minus) * cot).sum() / (2 * eps)
        assert abs(numeric - (g * d).sum()) <= allowed_error(numeric, 1e-7), name
        if nonzero:
            assert np.abs(g).max() > 0, name
