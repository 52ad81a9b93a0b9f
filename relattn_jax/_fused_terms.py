"""The relation terms of the fused kernels (JAX): a scheme in Shaw form and the logit tables.

Twin of ``relattn_torch/_fused_terms.py``; ``fused.py`` calls these around its custom_vjp, so jax
differentiates them. Dimension legend as in ``fused.py``: B T S N H R, N_kv key/value heads; Tp, Sp,
Rp the padded T, S, R of the kernels' tiles.

- ``shaw_form``: any bucket scheme as the Shaw clip K = shaw_width with tables table[shaw_rows] of
  2K + 1 rows (exact);
- ``row_terms``: QA = c q . A^K + b [B, N, Tp, Rp], gathered by row in the kernel;
- ``column_terms``: KA = c k . A^Q [B, N, Rp, Sp] per query head (transposed), gathered by column.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import buckets

_HIGHEST = jax.lax.Precision.HIGHEST


def shaw_form(scheme, max_distance, tables, d, q_offset):
    """The Shaw clip K and the tables in Shaw form: as given for ``max_distance`` (K = max_distance),
    else K = shaw_width (the saturation with an array q_offset) and each table[shaw_rows(scheme, K)]."""
    if scheme is None:
        return max_distance, tables
    K = buckets.shaw_width(scheme, d.T, d.S, q_offset)
    rows = buckets.shaw_rows(scheme, K)  # [2K + 1]
    return K, {name: None if t is None else t[rows] for name, t in tables.items()}


def layout(table) -> str:
    return "RH" if table.ndim == 2 else "RNH"


def row_terms(q, rel_k, rel_bias, scale, Tp, Rp):
    """qa = c q . A^K + b as float32 [B, N, Tp, Rp], or None without both (jax differentiates it)."""
    if rel_k is None and rel_bias is None:
        return None
    B, T, N, _ = q.shape
    qa = jnp.zeros((B, N, T, 1), jnp.float32)
    if rel_k is not None:
        qa = jnp.einsum(f"BTNH,{layout(rel_k)}->BNTR", q.astype(jnp.float32), rel_k.astype(jnp.float32),
                        precision=_HIGHEST) * scale  # [B, N, T, R]
    if rel_bias is not None:
        qa = qa + jnp.transpose(rel_bias.astype(jnp.float32))[None, :, None, :]  # b [R, N] -> [1, N, 1, R]
    return jnp.pad(qa, ((0, 0), (0, 0), (0, Tp - T), (0, Rp - qa.shape[3])))


def column_terms(k, rel_q, scale, N, Sp, Rp):
    """ka = c k . A^Q per query head as float32 [B, N, Rp, Sp] (transposed: a key tile's terms are a
    [R, BLOCK_S] slice), or None; query head n takes key head n // G."""
    if rel_q is None:
        return None
    B, S, N_kv, H = k.shape
    k32, aq = k.astype(jnp.float32), rel_q.astype(jnp.float32)
    if rel_q.ndim == 2:
        ka = jnp.repeat(jnp.einsum("BSNH,RH->BNRS", k32, aq, precision=_HIGHEST), N // N_kv, axis=1)
    else:
        aq = aq.reshape(aq.shape[0], N_kv, N // N_kv, H)  # [R, N_kv, G, H]: head n = (n // G, n % G)
        ka = jnp.einsum("BSKH,RKGH->BKGRS", k32, aq, precision=_HIGHEST).reshape(B, N, -1, S)
    ka = ka * scale  # [B, N, R, S]
    return jnp.pad(ka, ((0, 0), (0, 0), (0, Rp - ka.shape[2]), (0, Sp - S)))
