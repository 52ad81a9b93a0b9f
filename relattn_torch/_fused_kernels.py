"""Triton kernels of the fused Shaw attention; ``relattn_torch/fused.py`` launches them.

Twin of ``relattn_jax/_fused_kernels.py`` (the Pallas kernels): both packages keep the public
function, checks and gradient wiring in ``fused.py`` and the kernels here. Here the split also lets
``fused.py`` import triton lazily: this module imports it at the top, and Triton decides when it is
first imported whether ``@triton.jit`` builds interpreter or compiled kernels (``TRITON_INTERPRET``).

Per (batch, head) and block of ``BLOCK_T`` query rows, with ids r_ij = bucket(j - i - q_offset):

- forward: loop over key tiles of ``BLOCK_S`` columns; logits c * (q_i . k_j + qa_i[r_ij]), where
  qa = q . A^K [T, R] comes from a GEMM before the kernel and is gathered only in band tiles
  (|j - i - q_offset| < K somewhere in the tile); elsewhere a row adds its constant qa_i[0] or qa_i[2K].
  Kept per row: the running max m, sum l, accumulator acc [BLOCK_T, H] and the masses of the two
  clipped buckets 0 and 2K (rescaled like acc). A band bucket holds one key per row, so its mass
  is that key's probability: the kernel writes the band logits into C and the launcher turns them
  into exp(logit - lse). Saved: lse = m + log l and C [T, R].
- backward, row pass: recompute p from q, k, qa and lse; dp = dO . v + gv[r_ij] with gv = dO . A^V;
  ds = p (dp - D); dq = c * sum_j ds k_j and the bucket sums E of ds (band entries written, clipped
  buckets summed per row).
- backward, column pass: the same p and ds by key tile; dk = c * sum_i ds q_i, dv = sum_i p dO.

Masked entries are -inf inside a tile; a row that sees no key keeps m = -inf, l = 0 and gets
o = 0, lse = -inf, C = 0 and zero gradients (every exp and division is guarded).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def bucket(d, K: tl.constexpr):
    """Shaw relation id of the distance d = j - i - q_offset: clip(d, -K, K) + K."""
    return tl.minimum(tl.maximum(d, -K), K) + K


@triton.jit
def _in_band(i0, j0, qo, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, K: tl.constexpr):
    """Whether the tile has an entry with |j - i - q_offset| < K (ids that vary along a row)."""
    return (j0 + BLOCK_S - 1 - i0 - qo > -K) & (j0 - (i0 + BLOCK_T - 1) - qo < K)


@triton.jit
def _rel_tile(TAB, i, j, qo, in_band, T, R: tl.constexpr, K: tl.constexpr):
    """tab_i[r_ij] for a [T, R] table (qa or gv) as a [BLOCK_T, BLOCK_S] tile."""
    d = j[None, :] - i[:, None] - qo  # [BLOCK_T, BLOCK_S]
    rows = i[:, None] * R  # [BLOCK_T, 1]
    row_ok = i[:, None] < T  # [BLOCK_T, 1]
    if in_band:
        val = tl.load(TAB + rows + bucket(d, K), mask=row_ok, other=0.0)
    else:  # one id per row: 0 left of the band, 2K right of it
        first = tl.load(TAB + rows, mask=row_ok, other=0.0)  # [BLOCK_T, 1]
        last = tl.load(TAB + rows + 2 * K, mask=row_ok, other=0.0)  # [BLOCK_T, 1]
        val = tl.where(d < 0, first, last)
    return val


@triton.jit
def _visible(i, j, T, S, kl, MASK, sm_t, sm_s, HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """[BLOCK_T, BLOCK_S] bool: query i may attend key j (bounds, key length, causal, mask)."""
    vis = (i[:, None] < T) & (j[None, :] < kl)
    if IS_CAUSAL:  # bottom-right aligned
        vis = vis & (j[None, :] <= i[:, None] + (S - T))
    if HAS_MASK:
        allowed = tl.load(MASK + i[:, None] * sm_t + j[None, :] * sm_s, mask=vis, other=0)
        vis = vis & (allowed != 0)
    return vis


@triton.jit
def _logits(q, kt, QA, i, j, qo, in_band, vis, scale, T, R: tl.constexpr, K: tl.constexpr,
            HAS_QA: tl.constexpr, DOT_PREC: tl.constexpr):
    """c * (q . k + qa[r]) with -inf on invisible entries: [BLOCK_T, BLOCK_S] float32."""
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC)  # [BLOCK_T, BLOCK_S]
    if HAS_QA:
        s += _rel_tile(QA, i, j, qo, in_band, T, R, K)
    return tl.where(vis, s * scale, float("-inf"))


@triton.jit
def _bucket_ends(x, d, K: tl.constexpr):
    """Row sums of a [BLOCK_T, BLOCK_S] tile over the clipped ids: (bucket 0, bucket 2K)."""
    left = d <= -K
    right = (d >= K) & (d > -K)
    return tl.sum(tl.where(left, x, 0.0), 1), tl.sum(tl.where(right, x, 0.0), 1)


@triton.jit
def _store_band(OUT, i, j, qo, x, vis, R: tl.constexpr, K: tl.constexpr):
    """Write band entries of a tile to OUT[i, r_ij]; each (i, r) with 0 < r < 2K has one key."""
    d = j[None, :] - i[:, None] - qo  # [BLOCK_T, BLOCK_S]
    tl.store(OUT + i[:, None] * R + bucket(d, K), x, mask=vis & (d > -K) & (d < K))


@triton.jit
def _store_ends(OUT, i, row_ok, first, last, R: tl.constexpr, K: tl.constexpr):
    """Write the clipped buckets' row sums to OUT[i, 0] and OUT[i, 2K] (one cell when K = 0)."""
    if K == 0:
        tl.store(OUT + i * R, first + last, mask=row_ok)
    else:
        tl.store(OUT + i * R, first, mask=row_ok)
        tl.store(OUT + i * R + 2 * K, last, mask=row_ok)


@triton.jit
def _key_length(KL, b, S, HAS_KL: tl.constexpr):
    """Keys of example b that may be seen: key_lengths[b] (at most S), or S without key lengths."""
    kl = S
    if HAS_KL:
        kl = tl.minimum(tl.load(KL + b), S)
    return kl


@triton.jit
def _row_stats(LSE, D, rows, i, row_ok):
    """lse and D = rowsum(dO * o) of rows i; a row that sees no key has lse = -inf, read as 0 (p = 0)."""
    lse = tl.load(LSE + rows + i, mask=row_ok, other=0.0)
    delta = tl.load(D + rows + i, mask=row_ok, other=0.0)
    return tl.where(lse == float("-inf"), 0.0, lse), delta


@triton.jit
def _probs_and_ds(s, lse, delta, do, vt, GV, i, j, qo, in_band, T, R: tl.constexpr, K: tl.constexpr,
                  HAS_GV: tl.constexpr, DOT_PREC: tl.constexpr):
    """p = exp(s - lse) and ds = p (dO v^T + gv[r_ij] - D) of one tile, both [BLOCK_T, BLOCK_S]."""
    p = tl.exp(s - lse[:, None])
    dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)
    if HAS_GV:
        dp += _rel_tile(GV, i, j, qo, in_band, T, R, K)
    return p, p * (dp - delta[:, None])


@triton.jit
def _key_range(i0, T, S, kl, BLOCK_T: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """End of the key loop for a query block: the key length, and the causal edge."""
    hi = kl
    if IS_CAUSAL:
        hi = tl.minimum(hi, i0 + BLOCK_T + S - T)
    return hi


@triton.jit
def _fwd_kernel(Q, Kp, V, QA, MASK, KL, QOFF, O, LSE, C,
                sq_b, sq_t, sq_n, sk_b, sk_s, sk_n, sm_b, sm_n, sm_t, sm_s,
                T, S, N, scale,
                H: tl.constexpr, HP: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                HAS_QA: tl.constexpr, HAS_C: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KL: tl.constexpr,
                IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """One block of BLOCK_T query rows of one (batch, head): O (float32), LSE and C (see module doc).

    Q, O are [B, T, N, H] and Kp, V [B, S, N, H] with unit stride on H; QA, C are [B, N, T, R]
    float32 and LSE [B, N, T]; MASK is read through strides (0 on broadcast dims), KL is [B],
    QOFF a one-element int32 tensor.
    """
    i0 = tl.program_id(0) * BLOCK_T
    bn = tl.program_id(1)
    b = (bn // N).to(tl.int64)
    n = (bn % N).to(tl.int64)
    i = i0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    hd = tl.arange(0, HP)  # [HP]
    row_ok = i < T
    qo = tl.load(QOFF)
    kl = _key_length(KL, b, S, HAS_KL)
    q = tl.load(Q + b * sq_b + n * sq_n + i[:, None] * sq_t + hd[None, :],
                mask=row_ok[:, None] & (hd[None, :] < H), other=0.0)  # [BLOCK_T, HP]
    Kp += b * sk_b + n * sk_n
    V += b * sk_b + n * sk_n
    QA += bn.to(tl.int64) * T * R
    C += bn.to(tl.int64) * T * R
    MASK += b * sm_b + n * sm_n

    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, HP], tl.float32)
    c_first = tl.zeros([BLOCK_T], tl.float32)
    c_last = tl.zeros([BLOCK_T], tl.float32)
    for j0 in range(0, _key_range(i0, T, S, kl, BLOCK_T, IS_CAUSAL), BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        kv_ok = (j[:, None] < S) & (hd[None, :] < H)
        kt = tl.load(Kp + j[:, None] * sk_s + hd[None, :], mask=kv_ok, other=0.0)  # [BLOCK_S, HP]
        vt = tl.load(V + j[:, None] * sk_s + hd[None, :], mask=kv_ok, other=0.0)  # [BLOCK_S, HP]
        in_band = _in_band(i0, j0, qo, BLOCK_T, BLOCK_S, K)
        vis = _visible(i, j, T, S, kl, MASK, sm_t, sm_s, HAS_MASK, IS_CAUSAL)
        s = _logits(q, kt, QA, i, j, qo, in_band, vis, scale, T, R, K, HAS_QA, DOT_PREC)  # [BLOCK_T, BLOCK_S]
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
        alpha = tl.exp(m - m_safe)  # [BLOCK_T]
        p = tl.exp(s - m_safe[:, None])  # [BLOCK_T, BLOCK_S]
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        if HAS_C:
            first, last = _bucket_ends(p, j[None, :] - i[:, None] - qo, K)
            c_first = c_first * alpha + first
            c_last = c_last * alpha + last
            if in_band:
                _store_band(C, i, j, qo, s, vis, R, K)
        m = m_new

    seen = l > 0.0
    l_safe = tl.where(seen, l, 1.0)
    o = acc / l_safe[:, None]  # [BLOCK_T, HP]; rows that see no key have acc = 0
    tl.store(O + b * sq_b + n * sq_n + i[:, None] * sq_t + hd[None, :], o,
             mask=row_ok[:, None] & (hd[None, :] < H))
    tl.store(LSE + bn.to(tl.int64) * T + i, tl.where(seen, m + tl.log(l_safe), float("-inf")), mask=row_ok)
    if HAS_C:
        _store_ends(C, i, row_ok, c_first / l_safe, c_last / l_safe, R, K)


@triton.jit
def _bwd_rows_kernel(Q, Kp, V, DO, QA, GV, LSE, D, MASK, KL, QOFF, DQ, E,
                     sq_b, sq_t, sq_n, sk_b, sk_s, sk_n, sm_b, sm_n, sm_t, sm_s,
                     T, S, N, scale,
                     H: tl.constexpr, HP: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                     HAS_QA: tl.constexpr, HAS_GV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KL: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """Row pass: DQ (float32, without the table term c * E . A^K) and E [B, N, T, R] for a query block.

    DO, DQ share Q's strides; GV is [B, N, T, R] float32, D [B, N, T] float32; E starts as zeros.
    """
    i0 = tl.program_id(0) * BLOCK_T
    bn = tl.program_id(1)
    b = (bn // N).to(tl.int64)
    n = (bn % N).to(tl.int64)
    i = i0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    hd = tl.arange(0, HP)  # [HP]
    row_ok = i < T
    qo = tl.load(QOFF)
    kl = _key_length(KL, b, S, HAS_KL)
    q_off = b * sq_b + n * sq_n + i[:, None] * sq_t + hd[None, :]
    q_ok = row_ok[:, None] & (hd[None, :] < H)
    q = tl.load(Q + q_off, mask=q_ok, other=0.0)  # [BLOCK_T, HP]
    do = tl.load(DO + q_off, mask=q_ok, other=0.0)  # [BLOCK_T, HP]
    rows = bn.to(tl.int64) * T
    lse, delta = _row_stats(LSE, D, rows, i, row_ok)  # [BLOCK_T] each
    Kp += b * sk_b + n * sk_n
    V += b * sk_b + n * sk_n
    QA += rows * R
    GV += rows * R
    E += rows * R
    MASK += b * sm_b + n * sm_n

    dq = tl.zeros([BLOCK_T, HP], tl.float32)
    e_first = tl.zeros([BLOCK_T], tl.float32)
    e_last = tl.zeros([BLOCK_T], tl.float32)
    for j0 in range(0, _key_range(i0, T, S, kl, BLOCK_T, IS_CAUSAL), BLOCK_S):
        j = j0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
        kv_ok = (j[:, None] < S) & (hd[None, :] < H)
        kt = tl.load(Kp + j[:, None] * sk_s + hd[None, :], mask=kv_ok, other=0.0)  # [BLOCK_S, HP]
        vt = tl.load(V + j[:, None] * sk_s + hd[None, :], mask=kv_ok, other=0.0)  # [BLOCK_S, HP]
        in_band = _in_band(i0, j0, qo, BLOCK_T, BLOCK_S, K)
        vis = _visible(i, j, T, S, kl, MASK, sm_t, sm_s, HAS_MASK, IS_CAUSAL)
        s = _logits(q, kt, QA, i, j, qo, in_band, vis, scale, T, R, K, HAS_QA, DOT_PREC)  # [BLOCK_T, BLOCK_S]
        p, ds = _probs_and_ds(s, lse, delta, do, vt, GV, i, j, qo, in_band, T, R, K, HAS_GV, DOT_PREC)
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=DOT_PREC)
        if HAS_QA:
            first, last = _bucket_ends(ds, j[None, :] - i[:, None] - qo, K)
            e_first += first
            e_last += last
            if in_band:
                _store_band(E, i, j, qo, ds, vis, R, K)

    tl.store(DQ + q_off, dq * scale, mask=q_ok)
    if HAS_QA:
        _store_ends(E, i, row_ok, e_first, e_last, R, K)


@triton.jit
def _bwd_cols_kernel(Q, Kp, V, DO, QA, GV, LSE, D, MASK, KL, QOFF, DK, DV,
                     sq_b, sq_t, sq_n, sk_b, sk_s, sk_n, sm_b, sm_n, sm_t, sm_s,
                     T, S, N, scale,
                     H: tl.constexpr, HP: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                     HAS_QA: tl.constexpr, HAS_GV: tl.constexpr, HAS_MASK: tl.constexpr, HAS_KL: tl.constexpr,
                     IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """Column pass: DK and DV (k's dtype and strides) for a block of BLOCK_S keys."""
    j0 = tl.program_id(0) * BLOCK_S
    bn = tl.program_id(1)
    b = (bn // N).to(tl.int64)
    n = (bn % N).to(tl.int64)
    j = j0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    hd = tl.arange(0, HP)  # [HP]
    qo = tl.load(QOFF)
    kl = _key_length(KL, b, S, HAS_KL)
    k_off = b * sk_b + n * sk_n + j[:, None] * sk_s + hd[None, :]
    kv_ok = (j[:, None] < S) & (hd[None, :] < H)
    kt = tl.load(Kp + k_off, mask=kv_ok, other=0.0)  # [BLOCK_S, HP]
    vt = tl.load(V + k_off, mask=kv_ok, other=0.0)  # [BLOCK_S, HP]
    rows = bn.to(tl.int64) * T
    Q += b * sq_b + n * sq_n
    DO += b * sq_b + n * sq_n
    QA += rows * R
    GV += rows * R
    MASK += b * sm_b + n * sm_n

    lo = 0
    if IS_CAUSAL:  # rows above the first that sees key j0 see none of this block
        lo = tl.maximum(j0 - (S - T), 0) // BLOCK_T * BLOCK_T
    hi = tl.where(j0 < kl, T, 0)  # keys past the key length get no gradient
    dk = tl.zeros([BLOCK_S, HP], tl.float32)
    dv = tl.zeros([BLOCK_S, HP], tl.float32)
    for i0 in range(lo, hi, BLOCK_T):
        i = i0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
        row_ok = i < T
        q_ok = row_ok[:, None] & (hd[None, :] < H)
        q = tl.load(Q + i[:, None] * sq_t + hd[None, :], mask=q_ok, other=0.0)  # [BLOCK_T, HP]
        do = tl.load(DO + i[:, None] * sq_t + hd[None, :], mask=q_ok, other=0.0)  # [BLOCK_T, HP]
        lse, delta = _row_stats(LSE, D, rows, i, row_ok)  # [BLOCK_T] each
        in_band = _in_band(i0, j0, qo, BLOCK_T, BLOCK_S, K)
        vis = _visible(i, j, T, S, kl, MASK, sm_t, sm_s, HAS_MASK, IS_CAUSAL)
        s = _logits(q, kt, QA, i, j, qo, in_band, vis, scale, T, R, K, HAS_QA, DOT_PREC)  # [BLOCK_T, BLOCK_S]
        p, ds = _probs_and_ds(s, lse, delta, do, vt, GV, i, j, qo, in_band, T, R, K, HAS_GV, DOT_PREC)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)  # [BLOCK_S, HP]
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)  # [BLOCK_S, HP]

    tl.store(DK + k_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + k_off, dv.to(DV.dtype.element_ty), mask=kv_ok)
