"""The band plan of the banded Shaw path (``shaw.py``): which fused calls cover the tails, and the band's blocks.

The JAX package has no twin of this module: its Shaw path (``relattn_jax/shaw.py``) maps the
clipped ids through one expand / reduce pair over full [B, N, T, S] logits and has no band,
chunks or fused tail calls to plan. Here the geometry is kept apart from the autograd function
that runs it.

Dimension legend as in ``attention.py``: B T S N H R; K = max_distance, b the band block.

Shaw ids r_ij = clip(j - i - q_offset, -K, K) + K split each query row into a left tail
(d = j - i - q_offset <= -K, table row 0), the band (-K < d < K, 2K - 1 diagonals) and a right
tail (d >= max(K, 1), table row 2K). For query rows [r0, r1) a tail is a rectangle of keys
that every row sees plus a triangle (``tail_calls``): the left triangle is a top-left causal
call; the right one, mirrored, a causal call on reversed copies of only that triangle's rows
and keys. The band runs in blocks of b query rows, each against a window of P * b keys
(P = ceil((b + 2K - 2) / b)); ``Band`` builds those windows and reads the band's diagonals
through a skewed strided view (entry [u, u + r] is table row r + 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Call:
    """One fused-attention call over natural query rows / keys; ``flip`` runs it on reversed copies."""

    rows: tuple[int, int]
    keys: tuple[int, int]
    causal: bool  # top-left causal in call order (reversed order if flip)
    flip: bool
    row: int  # table row of this tail


def tail_calls(T: int, S: int, q_offset: int, max_distance: int, causal_offset: int | None,
               rows: tuple[int, int] | None = None, tile: int | None = None) -> list[Call]:
    """The fused calls that cover both tails for query rows ``rows`` (default all).

    ``causal_offset`` is S - T when causal, else None. ``tile``: at most this many keys per
    rectangle call (None: one rectangle per tail). Every call's first row sees at least one key.
    """
    K, R = max_distance, 2 * max_distance + 1
    r0, r1 = (0, T) if rows is None else rows
    left = q_offset - K if causal_offset is None else min(q_offset - K, causal_offset)
    calls = [Call(r, s, c, False, 0) for r, s, c in _left(r0, r1, S, left, tile)]
    if causal_offset is None:  # key j >= i + q_offset + max(K, 1)  <=>  j' <= i' + right (reversed)
        right = S - T - q_offset - max(K, 1)
        for (a0, a1), (b0, b1), c in _left(T - r1, T - r0, S, right, tile):
            calls.append(Call((T - a1, T - a0), (S - b1, S - b0), c, c, R - 1))
    return calls


def _left(r0, r1, S, c, tile):
    """(rows, keys, causal) calls in which query r0 <= i < r1 sees exactly keys 0 <= j <= min(i + c, S - 1)."""
    out = []
    if r1 <= r0 or S <= 0:
        return out
    cc = r0 + c  # row r0 sees keys j <= cc
    if cc >= 0:
        e = min(cc + 1, S)  # a rectangle every row sees, tiled
        step = e if tile is None else tile
        out += [((r0, r1), (s, min(s + step, e)), False) for s in range(0, e, step)]
        if e < S and r1 - r0 > 1:  # row r0 + 1 + u sees keys cc + 1 .. cc + 1 + u: top-left causal
            out.append(((r0 + 1, r1), (e, min(S, cc + r1 - r0)), True))
    elif r1 + c > 0:  # rows before i0 = -c see nothing; row i0 + u sees keys 0 .. u
        out.append(((-c, r1), (0, min(S, r1 + c)), True))
    return out


class Plan:
    """Chunks of query rows and the band's geometry: block n of b rows meets keys n * b + j_min + [0, P * b).

    ``chunk``: query rows per backward chunk, a multiple of the band block ``block``.
    """

    def __init__(self, T, S, q_offset, K, causal_offset, block, chunk):
        self.T, self.S, self.q_offset, self.K, self.causal_offset = T, S, q_offset, K, causal_offset
        self.b = b = block
        self.chunk = chunk
        self.P = max(1, -(-(b + 2 * K - 2) // b))
        self.j_min = q_offset - K + 1  # key of window column 0 in block 0
        self._invalid = None

    def chunks(self, size):
        return [(r0, min(r0 + size, self.T)) for r0 in range(0, self.T, size)]

    def calls(self, r0, r1, tile=None):
        return tail_calls(self.T, self.S, self.q_offset, self.K, self.causal_offset, (r0, r1), tile)

    def invalid(self, device):
        """[T / b, b, P * b] bool: True where a window entry is not a visible band entry (computed once)."""
        if self._invalid is None:
            b, Pb, K = self.b, self.P * self.b, self.K
            u = torch.arange(b, device=device)[:, None]
            w = torch.arange(Pb, device=device)[None, :]
            rel = w - u + 1  # table row; j - i = rel - K + q_offset
            ok = (rel >= 1) & (rel <= 2 * K - 1)
            if self.causal_offset is not None:
                ok &= rel - K + self.q_offset <= self.causal_offset
            blk = torch.arange(-(-self.T // b), device=device)[:, None, None] * b
            j = blk + w + self.j_min
            self._invalid = ~(ok & (blk + u < self.T) & (j >= 0) & (j < self.S))
        return self._invalid


class Band:
    """The band of query rows [r0, r1) (r0 a multiple of b): nblk blocks, keys [j0, j0 + L)."""

    def __init__(self, plan, r0, r1):
        self.b, self.P, self.K, self.S = plan.b, plan.P, plan.K, plan.S
        self.n, self.nblk = r1 - r0, -(-(r1 - r0) // plan.b)
        self.j0 = r0 + plan.j_min
        self.L = (self.nblk + self.P - 1) * self.b
        self.rows = (r0, r1)
        self.plan = plan

    def invalid(self, device):
        """[nblk, b, P * b] bool: True off the visible band."""
        n0 = self.rows[0] // self.b
        return self.plan.invalid(device)[n0 : n0 + self.nblk]

    def blocks(self, x, scale=None):
        """Chunk rows x [B, N, n, H] as a contiguous [B, N, nblk, b, H] (times ``scale``), zero-padded."""
        B, N, _, H = x.shape
        if torch.compiler.is_compiling():
            # the eager form below writes through out=; inductor (torch 2.13, T = 4096) gave that
            # result x's strides while its graph said contiguous, and then failed to view it as 3-d
            y = x if scale is None else x * scale
            y = F.pad(y, (0, 0, 0, self.nblk * self.b - self.n)).contiguous()
            return y.view(B, N, self.nblk, self.b, H)
        out = x.new_empty(B, N, self.nblk * self.b, H)
        if scale is None:
            out[:, :, : self.n] = x
        else:
            torch.mul(x, scale, out=out[:, :, : self.n])
        if self.n < out.shape[2]:
            out[:, :, self.n :] = 0
        return out.view(B, N, self.nblk, self.b, H)

    def windows(self, xt):
        """Every block's key window: xt [B, N, S, H] -> contiguous [B, N, nblk, P * b, H], zero off the sequence."""
        lo, hi = max(0, self.j0), min(self.S, self.j0 + self.L)
        if lo >= hi:
            x = xt.new_zeros(*xt.shape[:2], self.L, xt.shape[3])
        elif lo != self.j0 or hi != self.j0 + self.L:
            x = F.pad(xt[:, :, lo:hi], (0, 0, lo - self.j0, self.j0 + self.L - hi))
        else:
            x = xt[:, :, lo:hi]
        return x.unfold(2, self.P * self.b, self.b).transpose(-1, -2).contiguous()

    def fold_into(self, win, xt):
        """xt[:, :, keys] += the adjoint of ``windows`` applied to win [B, N, nblk, P * b, H]."""
        B, N, _, _, H = win.shape
        b, span = self.b, self.nblk * self.b
        for p in range(self.P):
            part = win[:, :, :, p * b : (p + 1) * b]
            start = self.j0 + p * b
            lo, hi = max(0, start), min(self.S, start + span)
            if lo >= hi:
                continue
            if lo == start and hi == start + span:
                xt[:, :, lo:hi].unflatten(2, (self.nblk, b)).add_(part)
            else:
                xt[:, :, lo:hi].add_(part.reshape(B, N, span, H)[:, :, lo - start : hi - start])

    def diagonals(self, x):
        """Band of x [B, N, nblk, b, P * b] (contiguous) as a view: [..., u, r] = x[..., u, u + r], table row r + 1."""
        s = x.stride()
        return x.as_strided((*x.shape[:4], 2 * self.K - 1), (s[0], s[1], s[2], s[3] + 1, 1), x.storage_offset())

    def unblocks(self, x):
        """[B, N, nblk, b, ...] -> [B, N, n, ...]."""
        return x.reshape(*x.shape[:2], self.nblk * self.b, *x.shape[4:])[:, :, : self.n]
