"""Shaw-style clipped relative-position ids (other bucket schemes through ``scheme=``, see ``buckets.py``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import _spec
from .buckets import _Scheme


def relative_position_ids(
    q_len: int, k_len: int, max_distance: int | None = None, *, q_offset: int | jax.Array = 0, scheme=None
) -> jax.Array:
    """Relation ids for relative positions, clipped at +-max_distance.

    Entry [i, j] is clip(j - (i + q_offset), -max_distance, max_distance) + max_distance,
    an int32 array [q_len, k_len] with values in [0, 2 * max_distance]. The
    tensor2tensor convention (key minus query). ``q_offset`` may be traced. For
    q_len = k_len = 3, max_distance = 1::

        [[1, 2, 2],
         [0, 1, 2],
         [0, 0, 1]]

    Args:
        q_len: T, the number of queries.
        k_len: S, the number of keys.
        max_distance: K >= 0, the clipping distance; the ids take R = 2K + 1 values.
        q_offset: position of query 0 among the keys (int or 0-d integer array, may be traced).
        scheme: instead of ``max_distance``, a bucket scheme from ``buckets.py``
            (``ShawBuckets``, ``T5Buckets``, ``DebertaBuckets``, ``BertBuckets``): returns
            ``scheme.ids(q_len, k_len, q_offset)``, ids in [0, scheme.num_ids).

    Returns:
        int32 array [T, S] of ids in [0, 2K].
    """
    if scheme is not None or max_distance is None:
        return _scheme_ids(q_len, k_len, max_distance, scheme, q_offset, {})
    _spec.check_positions(q_len, k_len, max_distance)
    i = jnp.arange(q_len, dtype=jnp.int32)[:, None] + jnp.asarray(q_offset, jnp.int32)
    j = jnp.arange(k_len, dtype=jnp.int32)[None, :]
    return jnp.clip(j - i, -max_distance, max_distance) + max_distance


def _scheme_ids(q_len, k_len, max_distance, scheme, q_offset, kw):
    if (scheme is None) == (max_distance is None):
        raise ValueError("pass either max_distance (Shaw ids) or scheme= (a bucket scheme), not "
                         f"{'both' if scheme is not None else 'neither'}")
    if not isinstance(scheme, _Scheme):
        raise TypeError("scheme must be ShawBuckets, T5Buckets, DebertaBuckets or BertBuckets, "
                        f"got {type(scheme).__name__}")
    return scheme.ids(q_len, k_len, q_offset, **kw)
