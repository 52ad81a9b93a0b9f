"""The dense-edge terms of relation-aware attention, reading each edge tensor in place (JAX).

Why this twin differs: the torch twin computes the same functions with the same block-diagonal
GEMMs, but its value term reads the diagonal of one [T, B * N, N * H] product, its heads form
groups that bound the wasted flops, and its backward is a custom autograd function that writes
each edge gradient once into a NumPy-allocated buffer. Here XLA fuses the value term's
multiply-reduce and differentiates both terms itself (a custom VJP written with these forms was
slower).

Dimension legend as in ``attention.py``: B T S N H; inside this file C is the flattened (N, H)
axis and M a second head axis (the block-diagonal copy's columns).

For edges with a head axis, [T, S, N, H] or [B, T, S, N, H], every edge element meets only B (or
one) query rows, so the work is bound by reading the edges once. XLA on CPU lowers an einsum
batched over (T, N) to a transpose of the whole edge tensor plus many small products; the forms
below read the edges in place instead:
    key term   q_i . a_ij: one GEMM per query row between the edges viewed as [S, N*H] and a
               block-diagonal [N*H, B*N] copy of the queries (N times the flops, but one
               well-shaped GEMM).
    value term sum_j p_ij a_ij: one fused multiply-reduce over S.
Their automatic derivatives are GEMMs and fused loops of the same kind, and forward-mode
differentiation keeps working. The measured times are on the Performance page of the docs.
Shared edges [T, S, H] and [B, T, S, H] keep the plain einsum, which needs no transpose.
Like any GEMM form, an inf in the edges turns into NaN through the zero blocks (0 * inf).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def edge_key_term(q: jax.Array, edges: jax.Array, letters: str) -> jax.Array:
    """q_i . a^K_ij for dense edges.

    Args:
        q: queries [B, T, N, H].
        edges: a^K in the layout ``letters`` ("TSH", "TSNH", "BTSH" or "BTSNH", as
            ``_spec.dense_edge_layout`` returns it), already broadcast to full size.
        letters: the layout of ``edges``.

    Returns:
        [B, N, T, S].
    """
    if "N" not in letters:
        return jnp.einsum(f"BTNH,{letters}->BNTS", q, edges)
    return _contract_h(q, edges, letters.startswith("B"))


def edge_value_term(probs: jax.Array, edges: jax.Array, letters: str) -> jax.Array:
    """sum_j alpha_ij a^V_ij for dense edges.

    Args:
        probs: attention weights [B, N, T, S].
        edges: a^V in the layout ``letters``, as for ``edge_key_term``.
        letters: the layout of ``edges``.

    Returns:
        [B, T, N, H].
    """
    if "N" not in letters:
        return jnp.einsum(f"BNTS,{letters}->BTNH", probs, edges)
    return _contract_s(probs, edges, letters.startswith("B"))


def _contract_h(x, edges, batched):
    """x [B, T, N, H], edges [(B,) T, S, N, H] -> [B, N, T, S]: sum over H of x * edges."""
    B, T, N, H = x.shape
    S = edges.shape[-3]
    eye = jnp.eye(N, dtype=x.dtype)  # the block-diagonal copy is zero off head n
    # one contracting axis of N * H (edges reshaped in place): XLA runs a plain batched GEMM
    if batched:
        xbd = jnp.einsum("BTNH,NM->BTNHM", x, eye).reshape(B, T, N * H, N)
        out = jnp.einsum("BTSC,BTCM->BTSM", edges.reshape(B, T, S, N * H), xbd)  # [B, T, S, N]
        return jnp.transpose(out, (0, 3, 1, 2))
    xbd = jnp.einsum("BTNH,NM->TNHBM", x, eye).reshape(T, N * H, B * N)
    out = jnp.einsum("TSC,TCM->TSM", edges.reshape(T, S, N * H), xbd)  # [T, S, B * N]
    return jnp.transpose(out.reshape(T, S, B, N), (2, 3, 0, 1))


def _contract_s(y, edges, batched):
    """y [B, N, T, S], edges [(B,) T, S, N, H] -> [B, T, N, H]: sum over S of y * edges."""
    yt = jnp.transpose(y, (0, 2, 3, 1))[..., None]  # [B, T, S, N, 1]
    out_dtype = jnp.result_type(y, edges)
    acc = jnp.promote_types(out_dtype, jnp.float32)  # bf16 / fp16 sums accumulate in float32
    return jnp.sum(yt * (edges if batched else edges[None]), axis=2, dtype=acc).astype(out_dtype)
