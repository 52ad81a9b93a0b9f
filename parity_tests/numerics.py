"""Error measures shared by the tests (max abs error, relative to the reference's scale)."""

from __future__ import annotations

import numpy as np


def relative_error(got, ref) -> float:
    """max |got - ref| / max |ref| (in float64)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-300))


def assert_close(out, ref, rel=1e-12):
    """Same shape and max abs error <= rel * max(1, max |ref|)."""
    err = np.abs(np.asarray(out, np.float64) - ref).max()
    assert out.shape == ref.shape
    assert err <= rel * max(1.0, np.abs(ref).max()), f"max abs error {err:.3e}"
