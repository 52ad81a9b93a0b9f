"""The dense-edge terms of relation-aware attention, reading each edge tensor in place (PyTorch).

Why this twin differs: the JAX twin computes the key term and the edge gradients with the same
block-diagonal GEMMs, but leaves the derivatives to automatic differentiation and writes its
value term as a fused multiply-reduce over S, which XLA runs as fast. Torch's autograd would
keep the [T, B * N, N * H] products and allocate each edge gradient with torch's allocator, so
here the value term reads the diagonal of one GEMM and the backward is written out, with head
groups and NumPy-allocated gradient buffers.

Dimension legend as in ``attention.py``: B T S N H.

For edges with a head axis, [T, S, N, H] or [B, T, S, N, H], every edge element meets only B (or
one) query rows, so the work is bound by reading the edges once. An einsum batched over (T, N)
first copies the edges into [T, N, H, S] order, which takes longer than the whole product, and
per-head products batched over T are GEMV-shaped (B rows). Here each query row t meets its edges
viewed in place as one [S, N * H] matrix, against a block-diagonal copy of the B queries (row
(b, n) holds q[b, t, n] in head n's columns, zeros elsewhere): N times the flops, but one
well-shaped GEMM per row, batched over T.
    key term    [T, B * N, N * H] x [T, N * H, S] -> [T, B * N, S]
    value term  [T, B * N, S] x [T, S, N * H] -> [T, B * N, N * H], then each row's own head
    edge grads  [T, S, B * N] x [T, B * N, N * H] -> [T, S, N * H], written once
Heads form groups of G (``_GEMM_ROWS`` = B * G rows per GEMM) so the wasted flops stay bounded for
large B * N; for B * N <= 16 there is one group. The backward is a custom autograd function (twice
differentiable), and it writes each edge gradient into a buffer from NumPy's allocator, which
advises huge pages (``_empty_edges``). The measured times are on the Performance page of the docs.
Shared edges [T, S, H] and [B, T, S, H] keep the plain einsum, which needs no copy.
Like any GEMM form, an inf in the edges turns into NaN through the zero blocks (0 * inf).
"""

from __future__ import annotations

import math

import numpy as np
import torch

_HUGE_BYTES = 1 << 25  # edge buffers from 32 MiB up are allocated by NumPy (see _empty_edges)
_GEMM_ROWS = 16  # query rows per block-diagonal GEMM that the head grouping aims for


def edge_key_term(q: torch.Tensor, edges: torch.Tensor, letters: str) -> torch.Tensor:
    """q_i . a^K_ij for dense edges.

    Args:
        q: queries [B, T, N, H].
        edges: a^K in the layout ``letters`` ("TSH", "TSNH", "BTSH" or "BTSNH", as
            ``_spec.dense_edge_layout`` returns it), already broadcast to full size.
        letters: the layout of ``edges``.

    Returns:
        [B, N, T, S].
    """
    if "N" not in letters or q.numel() == 0 or edges.numel() == 0:  # shared edges, or nothing to multiply
        return torch.einsum(f"BTNH,{letters}->BNTS", q, edges)
    return _EdgeKey.apply(q, edges, letters.startswith("B"))


def edge_value_term(probs: torch.Tensor, edges: torch.Tensor, letters: str) -> torch.Tensor:
    """sum_j alpha_ij a^V_ij for dense edges.

    Args:
        probs: attention weights [B, N, T, S].
        edges: a^V in the layout ``letters``, as for ``edge_key_term``.
        letters: the layout of ``edges``.

    Returns:
        [B, T, N, H].
    """
    if "N" not in letters or probs.numel() == 0 or edges.numel() == 0:
        return torch.einsum(f"BNTS,{letters}->BTNH", probs, edges)
    return _EdgeValue.apply(probs, edges, letters.startswith("B"))


def _groups(B, N):
    """Heads per block-diagonal group G: the largest divisor of N with B * G <= ``_GEMM_ROWS``."""
    want = max(1, _GEMM_ROWS // max(1, B))
    return max(g for g in range(1, N + 1) if N % g == 0 and g <= want)


def _block_diag(x, G):
    """x [B, T, N, H] -> [N / G, T, B * G, G * H]: row (b, g) of group c holds x[b, t, c * G + g]
    in columns g * H .. (g + 1) * H and zeros elsewhere. A broadcast multiply, so differentiable."""
    B, T, N, H = x.shape
    eye = torch.eye(G, dtype=x.dtype, device=x.device)[:, :, None]  # [G, G, 1]
    xg = x.reshape(B, T, N // G, G, 1, H).permute(2, 1, 0, 3, 4, 5)  # [N / G, T, B, G, 1, H]
    return (xg * eye).reshape(N // G, T, B * G, G * H)


def _group(edges, c, G):
    """Heads c * G .. (c + 1) * G of edges [T, S, N, H] as [T, S, G * H]: a view when the (N, H)
    axes are contiguous (any T, S strides, broadcast ones included), which BLAS reads in place."""
    e = edges[:, :, c * G:(c + 1) * G]
    return e.reshape(e.shape[0], e.shape[1], -1)


def _contract_h(x, edges, batched):
    """x [B, T, N, H], edges [(B,) T, S, N, H] -> [B, N, T, S]: sum over H of x * edges."""
    if batched:  # each example's edges meet one query row: B single-example products
        return torch.cat([_contract_h(x[b:b + 1], edges[b], False) for b in range(x.shape[0])])
    B, T, N, H = x.shape
    G = _groups(B, N)
    xbd = _block_diag(x, G)
    out = [torch.bmm(xbd[c], _group(edges, c, G).transpose(1, 2)) for c in range(N // G)]  # [T, B * G, S]
    out = out[0] if len(out) == 1 else torch.cat([o.view(T, B, G, -1) for o in out], 2)
    return out.view(T, B, N, -1).permute(1, 2, 0, 3)


def _contract_s(y, edges, batched):
    """y [B, N, T, S], edges [(B,) T, S, N, H] -> [B, T, N, H]: sum over S of y * edges."""
    if batched:
        return torch.cat([_contract_s(y[b:b + 1], edges[b], False) for b in range(y.shape[0])])
    B, N, T, S = y.shape
    G = _groups(B, N)
    out = []
    for c in range(N // G):
        yc = y[:, c * G:(c + 1) * G].permute(2, 0, 1, 3).reshape(T, B * G, S)
        full = torch.bmm(yc, _group(edges, c, G)).view(T, B, G, G, -1)  # every row against every head
        out.append(full.diagonal(dim1=2, dim2=3).permute(1, 0, 3, 2))  # row (b, g) against head g
    return out[0] if len(out) == 1 else torch.cat(out, 2)


def _outer(y, x, shape, batched):
    """y [B, N, T, S], x [B, T, N, H] -> edges-shaped y * x, summed over B unless ``batched``.

    Under grad mode (a double backward) written with differentiable ops only; otherwise each
    group's product is written straight into one fresh edge-sized buffer (``_empty_edges``).
    """
    B, N, T, S = y.shape
    if batched:  # the (B, T) pairs become one query axis of a single example
        y, x = y.transpose(0, 1).reshape(1, N, B * T, S), x.reshape(1, B * T, N, -1)
        B, T = 1, B * T
    G = _groups(B, N)
    xbd = _block_diag(x, G)
    ys = [y[:, c * G:(c + 1) * G].permute(2, 3, 0, 1).reshape(T, S, B * G) for c in range(N // G)]
    if torch.is_grad_enabled():
        out = [torch.bmm(yc, xbd[c]).view(T, S, G, -1) for c, yc in enumerate(ys)]  # [T, S, G, H]
        return (out[0] if len(out) == 1 else torch.cat(out, 2)).view(shape)
    out = _empty_edges((T, S, N, x.shape[-1]), y)
    for c, yc in enumerate(ys):
        if G == N:
            torch.bmm(yc, xbd[c], out=out.view(T, S, -1))
        else:
            out[:, :, c * G:(c + 1) * G].copy_(torch.bmm(yc, xbd[c]).view(T, S, G, -1))
    return out.view(shape)


def _empty_edges(shape, like):
    """An uninitialised edge-sized buffer that Linux may back with 2 MiB pages.

    The first write of a fresh edge-sized tensor is dominated by 4 KiB page faults on a CPU whose
    transparent huge pages are in "madvise" mode (torch's allocator gives no hint unless
    THP_MEM_ALLOC_ENABLE=1 is set). NumPy's allocator advises huge pages for large arrays, which
    removes most of that cost.
    """
    nbytes = math.prod(shape) * like.element_size()
    if like.device.type != "cpu" or nbytes < _HUGE_BYTES:
        return like.new_empty(shape)
    return torch.from_numpy(np.empty(nbytes, np.uint8)).view(like.dtype).view(shape)


class _EdgeKey(torch.autograd.Function):
    """[B, T, N, H] x edges -> [B, N, T, S]; its backward is ``_contract_s`` and ``_outer``."""

    @staticmethod
    def forward(ctx, q, edges, batched):
        ctx.save_for_backward(q, edges)
        ctx.batched = batched
        return _contract_h(q, edges, batched)

    @staticmethod
    def backward(ctx, g):
        q, edges = ctx.saved_tensors
        dq = _EdgeValue.apply(g, edges, ctx.batched) if ctx.needs_input_grad[0] else None
        de = _outer(g, q, edges.shape, ctx.batched) if ctx.needs_input_grad[1] else None
        return dq, de, None


class _EdgeValue(torch.autograd.Function):
    """[B, N, T, S] x edges -> [B, T, N, H]; its backward is ``_contract_h`` and ``_outer``."""

    @staticmethod
    def forward(ctx, probs, edges, batched):
        ctx.save_for_backward(probs, edges)
        ctx.batched = batched
        return _contract_s(probs, edges, batched)

    @staticmethod
    def backward(ctx, g):
        probs, edges = ctx.saved_tensors
        dp = _EdgeKey.apply(g, edges, ctx.batched) if ctx.needs_input_grad[0] else None
        de = _outer(probs, g, edges.shape, ctx.batched) if ctx.needs_input_grad[1] else None
        return dp, de, None
