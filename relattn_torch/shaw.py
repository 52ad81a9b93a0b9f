"""Exact Shaw attention: fused attention on the clipped tails, O(T*k) work on the band (PyTorch).

Dimension legend as in ``attention.py``: B T S N H R.

Shaw ids r_ij = clip(j - i - q_offset, -K, K) + K (K = max_distance, R = 2K + 1) split each
query row into three key sets, d = j - i - q_offset:
    left tail   d <= -K          a_ij = table[0]       (one row for the whole tail)
    band        -K < d < K       a_ij = table[d + K]   (2K - 1 diagonals)
    right tail  d >= max(K, 1)   a_ij = table[2K]
On a tail the key term q_i . a^K is a per-row constant: softmax ignores it except through the
log-sum-exp, and the value term is the tail's probability mass times one table row. So each tail
is plain attention over a shifted triangle, run by torch's fused CPU flash kernel (which returns
its log-sum-exp and skips masked blocks; the right tail runs on flipped sequences). The band is
done in query blocks of ``block`` rows by small batched matmuls. Pieces merge by log-sum-exp.

The backward reuses the fused kernel's backward with the merged log-sum-exp (shifted by the tail's
constant) and the merged output (shifted by the tail's value row), which makes the kernel's
internal rowsum(dO * O) equal dz . (z - a^V_tail): exactly the softmax-Jacobian term of the full
attention. No [B, N, T, S] tensor exists in either direction; memory is O(B N (T + S) (H + K)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BAND_BLOCK = 32  # query rows per band block
_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class _Call:
    """One fused-attention call: query rows / key range in call coordinates (flipped if ``flip``)."""

    rows: tuple[int, int]
    keys: tuple[int, int]
    causal: bool
    flip: bool
    row: int  # table row of this tail


def tail_calls(T: int, S: int, q_offset: int, max_distance: int, causal_offset: int | None) -> list[_Call]:
    """The fused calls that cover both tails; ``causal_offset`` is S - T when causal, else None."""
    K, R = max_distance, 2 * max_distance + 1
    big = T + S + 1
    left = min(q_offset - K, big if causal_offset is None else causal_offset)
    calls = [_Call(*c, flip=False, row=0) for c in _triangle(T, S, left)]
    if causal_offset is None:  # key j >= i + q_offset + max(K, 1)  <=>  flipped j' <= i' + c
        right = S - T - q_offset - max(K, 1)
        calls += [_Call(*c, flip=True, row=R - 1) for c in _triangle(T, S, right)]
    return calls


def _triangle(T, S, c):
    """Calls (rows, keys, causal) so that query i sees exactly keys 0 <= j <= min(i + c, S - 1)."""
    if c >= S - 1:
        return [((0, T), (0, S), False)]
    if c <= 0:
        start = -c  # rows before it see nothing; top-left causal does the rest
        return [((start, T), (0, S), True)] if start < T and S > 0 else []
    return [((0, T), (0, c), False), ((0, T), (c, S), True)]


def supports(T, S, q_offset, max_distance, is_causal) -> bool:
    """Whether the banded path covers this case (else the caller falls back)."""
    if not isinstance(q_offset, int) or isinstance(q_offset, bool):
        return False
    return not is_causal or q_offset + max(max_distance, 1) > S - T


def shaw_attention(q, k, v, rel_k, rel_v, *, max_distance: int, q_offset: int, is_causal: bool, scale: float,
                   block: int | None = None):
    """Shaw attention with implied ids clip(j - i - q_offset, +-max_distance) + max_distance.

    Args:
        q: [B, T, N, H]; k, v: [B, S, N, H] (float32 or float64).
        rel_k, rel_v: tables [R, H] or [R, N, H] with R = 2 * max_distance + 1, or None.
        max_distance, q_offset: the Shaw ids (int q_offset).
        is_causal: bottom-right causal, as in ``relative_attention``; needs
            q_offset + max(max_distance, 1) > S - T (see ``supports``).
        scale: logit scale. block: query rows per band block; default ``BAND_BLOCK``.

    Returns:
        [B, T, N, H]; a query that sees no key returns 0.
    """
    T, S = q.shape[1], k.shape[1]
    causal_offset = S - T if is_causal else None
    calls = tail_calls(T, S, q_offset, max_distance, causal_offset)
    block = BAND_BLOCK if block is None else block
    geo = _BandGeometry(T, S, q_offset, max_distance, causal_offset, block, q.device)
    return _ShawFunction.apply(q, k, v, rel_k, rel_v, calls, geo, scale)


class _BandGeometry:
    """Index tables of the band in query blocks: block b of rows meets a window of P * block keys."""

    def __init__(self, T, S, q_offset, K, causal_offset, block, device):
        self.K, self.b = K, block
        self.nblk = -(-T // block)
        self.P = max(1, -(-(block + 2 * K - 2) // block))
        self.j_min = q_offset - K + 1  # key of window column 0 in block 0
        self.L = (self.nblk + self.P - 1) * block
        u = torch.arange(block, device=device)[:, None]
        w = torch.arange(self.P * block, device=device)[None, :]
        rel = w - u + 1  # table row of (u, w); band iff 1 <= rel <= 2K - 1
        blk = torch.arange(self.nblk, device=device)[:, None, None] * block
        i, j = blk + u, blk + w + self.j_min
        valid = (rel >= 1) & (rel <= 2 * K - 1) & (i < T) & (j >= 0) & (j < S)
        if causal_offset is not None:
            valid &= j <= i + causal_offset
        self.valid = valid  # [nblk, b, P * b]
        self.ids = rel.clamp(0, 2 * K)  # [b, P * b]
        self.lo, self.hi = max(0, self.j_min), min(S, self.j_min + self.L)

    def windows(self, x):
        """[B, N, S, H] -> [B, N, nblk, P * b, H] key windows (zeros off the sequence)."""
        B, N, _, H = x.shape
        ext = x.new_zeros(B, N, self.L, H)
        if self.lo < self.hi:
            ext[:, :, self.lo - self.j_min : self.hi - self.j_min] = x[:, :, self.lo : self.hi]
        ext = ext.view(B, N, self.nblk + self.P - 1, self.b, H)
        return torch.cat([ext[:, :, p : p + self.nblk] for p in range(self.P)], dim=3)

    def fold(self, win, S):
        """Adjoint of ``windows``: [B, N, nblk, P * b, H] -> [B, N, S, H]."""
        B, N, _, _, H = win.shape
        ext = win.new_zeros(B, N, self.nblk + self.P - 1, self.b, H)
        for p in range(self.P):
            ext[:, :, p : p + self.nblk] += win[:, :, :, p * self.b : (p + 1) * self.b]
        out = win.new_zeros(B, N, S, H)
        if self.lo < self.hi:
            out[:, :, self.lo : self.hi] = ext.view(B, N, self.L, H)[:, :, self.lo - self.j_min : self.hi - self.j_min]
        return out

    def rows(self, x):
        """[B, N, T, ...] -> [B, N, nblk, b, ...], zero-padded."""
        pad = self.nblk * self.b - x.shape[2]
        if pad:
            x = torch.cat([x, x.new_zeros(*x.shape[:2], pad, *x.shape[3:])], dim=2)
        return x.view(*x.shape[:2], self.nblk, self.b, *x.shape[3:])

    def unrows(self, x, T):
        return x.reshape(*x.shape[:2], self.nblk * self.b, *x.shape[4:])[:, :, :T]

    def gather(self, x):
        """[B, N, T, R] per-row table values -> [B, N, nblk, b, P * b] at each band entry."""
        xb = self.rows(x)
        return torch.gather(xb, -1, self.ids.expand(*xb.shape[:3], *self.ids.shape))

    def scatter(self, x, T, R):
        """Adjoint of ``gather``: [B, N, nblk, b, P * b] -> [B, N, T, R]."""
        out = x.new_zeros(*x.shape[:4], R).scatter_add_(-1, self.ids.expand(x.shape), x)
        return self.unrows(out, T)


def _table(t, N, H):
    """[R, H] or [R, N, H] -> [R, N, H] view."""
    return t[:, None, :].expand(t.shape[0], N, H) if t.dim() == 2 else t


def _natural(c: _Call, T):
    lo, hi = c.rows
    return (T - hi, T - lo) if c.flip else (lo, hi)


def _unflip(x, c):
    return x.flip(2) if c.flip else x


class _ShawFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_k, rel_v, calls, geo, scale):
        B, T, N, H = q.shape
        S = k.shape[1]
        R = 2 * geo.K + 1
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, N, L, H]
        flipped = (qt.flip(2), kt.flip(2), vt.flip(2)) if any(c.flip for c in calls) else None
        rk = None if rel_k is None else _table(rel_k, N, H)
        rv = None if rel_v is None else _table(rel_v, N, H)
        qa = q.new_zeros(B, N, T, R) if rk is None else scale * torch.einsum("BTNH,RNH->BNTR", q, rk)

        pieces, lses = [], []
        for c in calls:
            cq, ck, cv = flipped if c.flip else (qt, kt, vt)
            (r0, r1), (s0, s1) = c.rows, c.keys
            o, l = _flash(cq[:, :, r0:r1], ck[:, :, s0:s1], cv[:, :, s0:s1], 0.0, c.causal, scale=scale)
            lo, hi = _natural(c, T)
            full = torch.full((B, N, T), -torch.inf, dtype=q.dtype, device=q.device)
            full[:, :, lo:hi] = _unflip(l.to(q.dtype), c) + qa[:, :, lo:hi, c.row]
            pieces.append(_unflip(o, c))
            lses.append(full)
        band = _band_logits(qt, kt, qa, geo, scale) if geo.K > 0 else None
        if band is not None:
            lses.append(geo.unrows(torch.logsumexp(band, dim=-1), T))
        lse = torch.logsumexp(torch.stack(lses), dim=0) if lses else q.new_full((B, N, T), -torch.inf)
        lse_safe = torch.where(torch.isfinite(lse), lse, 0.0)

        z = qt.new_zeros(B, N, T, H)
        buckets = q.new_zeros(B, N, T, R)
        weights = []
        for c, o, l in zip(calls, pieces, lses):
            lo, hi = _natural(c, T)
            w = torch.exp(l[:, :, lo:hi] - lse_safe[:, :, lo:hi])  # the tail's probability mass
            z[:, :, lo:hi] += w[..., None] * o
            buckets[:, :, lo:hi, c.row] += w
            weights.append(w)
        if band is not None:
            p = torch.exp(band - geo.rows(lse_safe)[..., None])  # masked entries are exp(-inf) = 0
            z += geo.unrows(p @ geo.windows(vt), T)
            buckets += geo.scatter(p, T, R)
        if rv is not None:
            z += torch.einsum("BNTR,RNH->BNTH", buckets, rv)
        ctx.save_for_backward(q, k, v, rel_k, rel_v, z, lse, buckets, *pieces, *weights)
        ctx.calls, ctx.geo, ctx.scale = calls, geo, scale
        return z.transpose(1, 2)

    @staticmethod
    def backward(ctx, dz):
        q, k, v, rel_k, rel_v, z, lse, buckets, *saved = ctx.saved_tensors
        calls, geo, scale = ctx.calls, ctx.geo, ctx.scale
        pieces, weights = saved[: len(calls)], saved[len(calls) :]
        B, T, N, H = q.shape
        S = k.shape[1]
        R = 2 * geo.K + 1
        qt, kt, vt, dzt = (x.transpose(1, 2).contiguous() for x in (q, k, v, dz))
        rk = None if rel_k is None else _table(rel_k, N, H)
        rv = None if rel_v is None else _table(rel_v, N, H)
        qa = q.new_zeros(B, N, T, R) if rk is None else scale * torch.einsum("BTNH,RNH->BNTR", q, rk)
        D = (dzt * z).sum(-1)  # [B, N, T]
        lse_safe = torch.where(torch.isfinite(lse), lse, 0.0)
        dq, dk, dv = torch.zeros_like(qt), torch.zeros_like(kt), torch.zeros_like(vt)
        dqa = q.new_zeros(B, N, T, R)

        for c, o, w in zip(calls, pieces, weights):
            lo, hi = _natural(c, T)
            av = 0.0 if rv is None else rv[c.row][None, :, None, :]  # [1, N, 1, H]
            full = (dzt, qt, kt, vt, z - av, lse_safe - qa[..., c.row])
            cdz, cq, ck, cv, cout, cl = (x.flip(2) if c.flip else x for x in full)
            (r0, r1), (s0, s1) = c.rows, c.keys
            gq, gk, gv = _flash_bwd(cdz[:, :, r0:r1], cq[:, :, r0:r1], ck[:, :, s0:s1], cv[:, :, s0:s1],
                                    cout[:, :, r0:r1], cl[:, :, r0:r1].contiguous(), 0.0, c.causal, scale=scale)
            dq[:, :, lo:hi] += _unflip(gq, c)
            ks = (S - s1, S - s0) if c.flip else (s0, s1)
            dk[:, :, ks[0] : ks[1]] += _unflip(gk, c)
            dv[:, :, ks[0] : ks[1]] += _unflip(gv, c)
            # sum over the tail of dlogits = w * (dz . (o + a^V_tail) - D): the tail constant's gradient
            dqa[:, :, lo:hi, c.row] += w * ((dzt[:, :, lo:hi] * (o + av)).sum(-1) - D[:, :, lo:hi])
        if geo.K > 0:
            _band_backward(qt, kt, vt, dzt, qa, rv, lse_safe, D, geo, scale, dq, dk, dv, dqa)
        drk = drv = None
        if rk is not None:
            dq += scale * torch.einsum("BNTR,RNH->BNTH", dqa, rk)
            drk = scale * torch.einsum("BNTR,BNTH->RNH", dqa, qt)
            drk = drk.sum(1) if rel_k.dim() == 2 else drk
        if rv is not None:
            drv = torch.einsum("BNTR,BNTH->RNH", buckets, dzt)
            drv = drv.sum(1) if rel_v.dim() == 2 else drv
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2), drk, drv, None, None, None


def _band_logits(qt, kt, qa, geo, scale):
    """Band logits [B, N, nblk, b, P * b]; entries off the band are -inf."""
    logits = scale * geo.rows(qt) @ geo.windows(kt).transpose(-1, -2) + geo.gather(qa)
    return logits.masked_fill(~geo.valid, -torch.inf)


def _band_backward(qt, kt, vt, dzt, qa, rv, lse_safe, D, geo, scale, dq, dk, dv, dqa):
    """Add the band's share of the gradients into dq, dk, dv (all [B, N, L, H]) and dqa [B, N, T, R]."""
    T, S, R = qt.shape[2], kt.shape[2], qa.shape[-1]
    k_win, v_win, q_blk, dz_blk = geo.windows(kt), geo.windows(vt), geo.rows(qt), geo.rows(dzt)
    p = torch.exp(_band_logits(qt, kt, qa, geo, scale) - geo.rows(lse_safe)[..., None])
    dp = dz_blk @ v_win.transpose(-1, -2)
    if rv is not None:
        dp += geo.gather(torch.einsum("BNTH,RNH->BNTR", dzt, rv))
    ds = p * (dp - geo.rows(D)[..., None])
    dq += scale * geo.unrows(ds @ k_win, T)
    dk += scale * geo.fold(ds.transpose(-1, -2) @ q_blk, S)
    dv += geo.fold(p.transpose(-1, -2) @ dz_blk, S)
    dqa += geo.scatter(ds, T, R)
