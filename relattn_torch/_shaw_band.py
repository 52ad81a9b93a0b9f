"""The band of the banded Shaw path (``shaw.py``): its forward and backward by batched matmuls (PyTorch).

The JAX package has no twin of this module: its Shaw path (``relattn_jax/shaw.py``) maps the
clipped ids through one expand / reduce pair over full [B, N, T, S] logits and has no band to
compute apart. Here the band is the part of each query row that torch's fused CPU kernel cannot
take, since its key and value table terms differ per diagonal.

Dimension legend as in ``attention.py``: B T S N H R; K = max_distance, b the band block, P the
window of P * b keys per block (``_shaw_plan.Band``). ``x``, ``o`` and ``g`` are ``shaw.py``'s
``_Inputs`` (q, k, v as [B, N, L, H] views, per-head tables [N, R, H], scale, key-padding mask),
``_Output`` (z, dz, lse) and ``_Grads`` (dq, dk, dv and the table gradients being summed).
"""

from __future__ import annotations

import torch


def band_forward(band, x, acc, m):
    """Write the band's output and lse for rows [r0, r1) into acc [B, N, n, H] and m [B, N, n] (0, -inf: no entry)."""
    r0, r1 = band.rows
    K = band.K
    qs = band.blocks(x.qt[:, :, r0:r1], x.scale)  # [B, N, nblk, b, H]: scale * q
    s = torch.matmul(qs, band.windows(x.kt).transpose(-1, -2))  # [B, N, nblk, b, P * b]
    if x.rk is not None:
        band.diagonals(s).add_(_rows_times(qs, x.rk[:, 1 : 2 * K].transpose(-1, -2)))  # + scale q . a^K_ij
    del qs
    s.masked_fill_(band.invalid(s.device), -torch.inf)
    if x.valid is not None:
        s.masked_fill_(_padded_keys(band, x.valid), -torch.inf)
    mx = s.amax(-1).clamp_min_(torch.finfo(s.dtype).min)  # finite
    p = s.sub_(mx[..., None]).exp_()
    total = p.sum(-1)
    out = torch.matmul(p, band.windows(x.vt))
    if x.rv is not None:
        out += _rows_times(band.diagonals(p), x.rv[:, 1 : 2 * K])
    out /= total.clamp_min(torch.finfo(s.dtype).tiny)[..., None]
    acc.copy_(band.unblocks(out))
    m.copy_(band.unblocks(mx.add_(total.log_())))


def band_backward(band, x, o, g):
    """Add the band's share of rows [r0, r1) into the gradients ``g``.

    Ordered so that at most about 7 chunk-sized buffers ([B, N, n, H]; a window counts P) are alive.
    """
    r0, r1 = band.rows
    K = band.K
    dqt, dkt, dvt = g.views
    dzb = band.blocks(o.dzt[:, :, r0:r1])
    ds = torch.matmul(dzb, band.windows(x.vt).transpose(-1, -2))  # dz . v_j  [B, N, nblk, b, P * b]
    if x.rv is not None:
        band.diagonals(ds).add_(_rows_times(dzb, x.rv[:, 1 : 2 * K].transpose(-1, -2)))  # + dz . a^V_ij
    ds.sub_(band.blocks((o.dzt[:, :, r0:r1] * o.zt[:, :, r0:r1]).sum(-1, keepdim=True)))  # - D, D = dz . z
    qs = band.blocks(x.qt[:, :, r0:r1], x.scale)
    k_win = band.windows(x.kt)
    p = torch.matmul(qs, k_win.transpose(-1, -2))
    if x.rk is not None:
        band.diagonals(p).add_(_rows_times(qs, x.rk[:, 1 : 2 * K].transpose(-1, -2)))
    p.masked_fill_(band.invalid(p.device), -torch.inf)
    if x.valid is not None:
        p.masked_fill_(_padded_keys(band, x.valid), -torch.inf)
    p.sub_(band.blocks(o.lse[:, :, r0:r1, None])).exp_()  # probabilities; off-band entries are exp(-inf) = 0
    ds.mul_(p)  # d logits = p * (dz . (v_j + a^V_ij) - D)
    dq = torch.matmul(ds, k_win)
    del k_win
    if x.rk is not None:
        dqa = band.diagonals(ds)  # [B, N, nblk, b, 2K - 1]: d logits per table row 1 .. 2K - 1
        dq += _rows_times(dqa, x.rk[:, 1 : 2 * K])
        g.drk[:, 1 : 2 * K].add_(_rows_dot(dqa, qs))
        del dqa
    dqt[:, :, r0:r1].add_(band.unblocks(dq), alpha=x.scale)
    del dq
    band.fold_into(torch.matmul(ds.transpose(-1, -2), qs), dkt)  # ds^T (scale q)
    del ds, qs
    band.fold_into(torch.matmul(p.transpose(-1, -2), dzb), dvt)
    if x.rv is not None:
        g.drv[:, 1 : 2 * K].add_(_rows_dot(band.diagonals(p), dzb))


def _padded_keys(band, valid):
    """[B, 1, nblk, 1, P * b] bool: True where a block's window key is padding (off the sequence counts as valid:
    ``Band.invalid`` masks it)."""
    win = band.windows((~valid)[:, None, :, None].to(torch.uint8))  # [B, 1, nblk, P * b, 1]
    return win.squeeze(-1).bool()[:, :, :, None, :]


def _rows_times(x, t):
    """x [B, N, nblk, b, I] times a per-head matrix t [N, I, J] -> [B, N, nblk, b, J]."""
    B, N, X, U, I = x.shape
    return torch.matmul(x.reshape(B, N, X * U, I), t).view(B, N, X, U, t.shape[-1])


def _rows_dot(x, y):
    """sum over batch and rows of x^T y: x [B, N, nblk, b, I], y [B, N, nblk, b, J] -> [N, I, J]."""
    B, N, X, U, _ = x.shape
    return torch.matmul(x.reshape(B, N, X * U, -1).transpose(-1, -2), y.reshape(B, N, X * U, -1)).sum(0)
