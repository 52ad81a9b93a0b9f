"""Masked entries have no say: non-finite keys, values, edges or table rows that a query does not attend (JAX).

Dimension legend as in ``attention.py``: B T S N H R.

Every path multiplies probabilities by values (and, in the backward, logit gradients by keys,
edges and table rows), and 0 * NaN is NaN: a NaN in a masked key would spread to every query
row, as it does in ``jax.nn.dot_product_attention``. So ``relative_attention`` runs its path on
finite stand-ins (``finite_inputs``: every non-finite element of k, v, rel_k, rel_v replaced by
0, which a masked entry multiplies by an exact 0) and then sets to NaN each query row that does
attend an entry holding a non-finite value (``poison_rows``), as the equations give it. A masked
entry thus changes no output and no gradient, whatever it holds; finite inputs pass through
unchanged, bit for bit. Non-finite queries are left alone: a query's own NaN is its row's NaN,
and a row that sees no key is 0 whatever its query holds.

Cost: eager on CPU, one finiteness reduction over the inputs, and nothing else when they are
finite. Traced (under ``jit``), the stand-ins are one select per input, and the rows are found
under ``lax.cond``, so the boolean pass over [B, N, T, S] (fused by XLA, not stored) runs only
when some input holds a non-finite value.
"""

from __future__ import annotations

from dataclasses import replace

import jax
import jax.numpy as jnp

from .einsum import AttentionArgs
from .masks import causal_mask, combine_masks
from .positions import relative_position_ids


def finite_inputs(k: jax.Array, v: jax.Array, args: AttentionArgs):
    """k, v and args with every non-finite element of k, v, rel_k, rel_v, rel_q, rel_bias replaced by 0.

    Returns:
        (k, v, args, found): ``found`` is False when every input is known to be finite (the
        inputs are returned as they are), True otherwise.
    """
    named = (k, v, args.rel_k, args.rel_v, args.rel_q, args.rel_bias)
    if not any(isinstance(t, jax.core.Tracer) for t in named) and jax.default_backend() == "cpu":
        with jax.ensure_compile_time_eval():  # concrete inputs inside a jit are checked now too
            if all(t is None or bool(jnp.isfinite(t).all()) for t in named):
                return k, v, args, False
    k, v, rel_k, rel_v, rel_q, rel_bias = (None if t is None else jnp.where(jnp.isfinite(t), t, 0).astype(t.dtype)
                                           for t in named)
    return k, v, replace(args, rel_k=rel_k, rel_v=rel_v, rel_q=rel_q, rel_bias=rel_bias), True


def poison_rows(out: jax.Array, k: jax.Array, v: jax.Array, args: AttentionArgs) -> jax.Array:
    """out [B, T, N, H] with NaN in every query row (per head) that attends a non-finite entry.

    ``k``, ``v`` and ``args`` are the original inputs (before ``finite_inputs``). An entry (i, j)
    holds a non-finite value when k_j, v_j, the dense edges a_ij or the table rows of r_ij do.
    """
    B, T, N, _ = out.shape
    tables = [t for t in (args.rel_k, args.rel_v, args.rel_q, args.rel_bias) if t is not None]
    any_bad = ~(jnp.isfinite(k).all() & jnp.isfinite(v).all())
    for t in tables:
        any_bad = any_bad | ~jnp.isfinite(t).all()
    rows_bad = jax.lax.cond(any_bad, lambda: _rows(k, v, args, B, T, N), lambda: jnp.zeros((B, N, T), bool))
    return jnp.where(jnp.moveaxis(rows_bad, 1, 2)[..., None], jnp.nan, out).astype(out.dtype)


def _rows(k, v, args: AttentionArgs, B, T, N) -> jax.Array:
    """[B, N, T]: whether the row attends an entry holding a non-finite value."""
    S = k.shape[1]
    bad_key = ~(jnp.isfinite(k).all(-1) & jnp.isfinite(v).all(-1))  # [B, S, N_kv]
    bad_key = jnp.repeat(jnp.moveaxis(bad_key, 2, 1), N // max(1, k.shape[2]), axis=1)  # [B, N, S]
    bad = bad_key[:, :, None, :] | _bad_relations(args, T, S)  # broadcasts to [B, N, T, S]
    visible = combine_masks(args.mask, causal_mask(T, S) if args.is_causal else None)
    seen = bad if visible is None else bad & visible
    return jnp.broadcast_to(seen.any(-1), (B, N, T))


def _bad_relations(args: AttentionArgs, T, S) -> jax.Array:
    """Whether a_ij is non-finite, broadcastable to [B, N, T, S]."""
    bad = jnp.zeros((), bool)
    if args.max_distance is None and args.rel_ids is None and args.scheme is None:  # dense edges (or none)
        for edges in (args.rel_k, args.rel_v):
            if edges is not None:
                flags = ~jnp.isfinite(edges).all(-1)  # [T, S], [T, S, N] or [B, T, S, N]
                bad = bad | (jnp.moveaxis(flags, -1, -3) if flags.ndim >= 3 else flags)
        return bad
    if args.max_distance is not None:
        ids = relative_position_ids(T, S, args.max_distance, q_offset=args.q_offset)
    elif args.scheme is not None:
        ids = args.scheme.ids(T, S, args.q_offset)
    else:
        ids = args.rel_ids
    ids = ids[..., None, :, :]  # [1, T, S] or [B, 1, T, S]
    for table in (args.rel_k, args.rel_v, args.rel_q, args.rel_bias):
        if table is not None:
            finite = jnp.isfinite(table) if table is args.rel_bias else jnp.isfinite(table).all(-1)
            bad_row = ~finite  # [R] or [R, N]
            bad_row = bad_row[None] if bad_row.ndim == 1 else bad_row.T  # [1 or N, R]
            taken = bad_row[:, jnp.clip(ids, 0, bad_row.shape[1] - 1)]  # [1 or N, (B,) 1, T, S]
            taken = taken[..., 0, :, :]  # [1 or N, (B,) T, S]
            bad = bad | (taken if ids.ndim == 3 else jnp.moveaxis(taken, 0, 1))
    return bad
