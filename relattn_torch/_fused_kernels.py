"""Triton kernels of the fused relative attention; ``relattn_torch/fused.py`` launches them.

Twin of ``relattn_jax/_fused_kernels.py`` (the Pallas kernels): both packages keep the public
function, checks and gradient wiring in ``fused.py`` and the kernels here. Here the split also lets
``fused.py`` import triton lazily: this module imports it at the top, and Triton decides when it is
first imported whether ``@triton.jit`` builds interpreter or compiled kernels (``TRITON_INTERPRET``).

The kernels see the Shaw form of any scheme: ids r_ij = bucket(j - i - q_offset) = clip(., -K, K) + K
over expanded tables of R = 2K + 1 rows, and the relation terms as two additive logit tables made
outside: QA [T, R] by query row and KA [S, R] by key column. Per (batch, query head n) and block
of ``BLOCK_T`` query rows; keys and values are read from head n // G (grouped heads):

- forward: loop over key tiles of ``BLOCK_S`` columns; logits c q_i . k_j + QA_i[r_ij] + KA_j[r_ij],
  gathered only in band tiles (|j - i - q_offset| < K somewhere in the tile); elsewhere a row adds
  its constant QA_i[0] or QA_i[2K] and a column its KA_j[0] or KA_j[2K]. Kept per row: the running
  max m, sum l, accumulator acc [BLOCK_T, H] and the masses of the two clipped buckets 0 and 2K
  (rescaled like acc). A band bucket holds one key per row, so its mass is that key's probability:
  the kernel writes the band logits into C and the launcher turns them into exp(logit - lse).
  Saved: lse = m + log l and C [T, R].
- backward, row pass: recompute p from q, k, QA, KA and lse; dp = dO . v + dC[r_ij]; ds = p (dp - D);
  dq = c * sum_j ds k_j and E = dQA, the row bucket sums of ds (band entries written, clipped
  buckets summed per row).
- backward, column pass, per key block of kv head m, looping over its G query heads: the same p
  and ds by query tile; dk = c * sum ds q, dv = sum p dO (summed over the group), and F = dKA, the
  column bucket sums of ds (band entries written, clipped buckets summed per column).

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
def _rel_tile(TAB, own, own_ok, d, in_band, R: tl.constexpr, K: tl.constexpr):
    """tab[own, r_ij] as a [BLOCK_T, BLOCK_S] tile of a table with R ids per row.

    own indexes the table's rows: i[:, None] ([BLOCK_T, 1]) for QA and dC, j[None, :] ([1, BLOCK_S]) for KA.
    """
    base = TAB + own * R  # [BLOCK_T, 1] or [1, BLOCK_S]
    if in_band:
        val = tl.load(base + bucket(d, K), mask=own_ok, other=0.0)
    else:  # one id per row and column: 0 left of the band, 2K right of it
        first = tl.load(base, mask=own_ok, other=0.0)
        last = tl.load(base + 2 * K, mask=own_ok, other=0.0)
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
def _logits(q, kt, QA, KA, i, j, qo, in_band, vis, scale, T, S, R: tl.constexpr, K: tl.constexpr,
            HAS_QA: tl.constexpr, HAS_KA: tl.constexpr, DOT_PREC: tl.constexpr):
    """c q . k + QA_i[r] + KA_j[r] with -inf on invisible entries: [BLOCK_T, BLOCK_S] float32."""
    s = tl.dot(q, tl.trans(kt), input_precision=DOT_PREC) * scale  # [BLOCK_T, BLOCK_S]
    d = j[None, :] - i[:, None] - qo  # [BLOCK_T, BLOCK_S]
    if HAS_QA:
        s += _rel_tile(QA, i[:, None], i[:, None] < T, d, in_band, R, K)
    if HAS_KA:
        s += _rel_tile(KA, j[None, :], j[None, :] < S, d, in_band, R, K)
    return tl.where(vis, s, float("-inf"))


@triton.jit
def _bucket_ends(x, d, K: tl.constexpr, AXIS: tl.constexpr):
    """Sums of a [BLOCK_T, BLOCK_S] tile along AXIS (1: per row, 0: per column) over the clipped
    ids: (bucket 0, bucket 2K)."""
    left = d <= -K
    right = (d >= K) & (d > -K)
    return tl.sum(tl.where(left, x, 0.0), AXIS), tl.sum(tl.where(right, x, 0.0), AXIS)


@triton.jit
def _store_band(OUT, own, d, x, vis, R: tl.constexpr, K: tl.constexpr):
    """Write band entries of a tile to OUT[own, r_ij] (own: i[:, None] or j[None, :]); each row
    (and each column) holds one entry per id 0 < r < 2K."""
    tl.store(OUT + own * R + bucket(d, K), x, mask=vis & (d > -K) & (d < K))


@triton.jit
def _store_ends(OUT, idx, ok, first, last, R: tl.constexpr, K: tl.constexpr):
    """Write the clipped buckets' sums to OUT[idx, 0] and OUT[idx, 2K] (one cell when K = 0)."""
    if K == 0:
        tl.store(OUT + idx * R, first + last, mask=ok)
    else:
        tl.store(OUT + idx * R, first, mask=ok)
        tl.store(OUT + idx * R + 2 * K, last, mask=ok)


@triton.jit
def _key_length(KL, b, S, HAS_KL: tl.constexpr):
    """Keys of example b that may be seen: key_lengths[b] (at most S), or S without key lengths."""
    kl = S
    if HAS_KL:
        kl = tl.minimum(tl.load(KL + b), S)
    return kl


@triton.jit
def _row_stats(LSE, D, rows, i, row_ok):
    """lse and D of rows i; a row that sees no key has lse = -inf, read as 0 (p = 0)."""
    lse = tl.load(LSE + rows + i, mask=row_ok, other=0.0)
    delta = tl.load(D + rows + i, mask=row_ok, other=0.0)
    return tl.where(lse == float("-inf"), 0.0, lse), delta


@triton.jit
def _probs_and_ds(s, lse, delta, do, vt, GV, i, j, qo, in_band, T, R: tl.constexpr, K: tl.constexpr,
                  HAS_GV: tl.constexpr, DOT_PREC: tl.constexpr):
    """p = exp(s - lse) and ds = p (dO v^T + dC_i[r_ij] - D) of one tile, both [BLOCK_T, BLOCK_S]."""
    p = tl.exp(s - lse[:, None])
    dp = tl.dot(do, tl.trans(vt), input_precision=DOT_PREC)
    if HAS_GV:
        dp += _rel_tile(GV, i[:, None], i[:, None] < T, j[None, :] - i[:, None] - qo, in_band, R, K)
    return p, p * (dp - delta[:, None])


@triton.jit
def _key_range(i0, T, S, kl, BLOCK_T: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """End of the key loop for a query block: the key length, and the causal edge."""
    hi = kl
    if IS_CAUSAL:
        hi = tl.minimum(hi, i0 + BLOCK_T + S - T)
    return hi


@triton.jit
def _fwd_kernel(Q, Kp, V, QA, KA, MASK, KL, QOFF, O, LSE, C,
                sq_b, sq_t, sq_n, sk_b, sk_s, sk_n, sm_b, sm_n, sm_t, sm_s,
                T, S, N, G, scale,
                H: tl.constexpr, HP: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                HAS_QA: tl.constexpr, HAS_KA: tl.constexpr, HAS_C: tl.constexpr, HAS_MASK: tl.constexpr,
                HAS_KL: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """One block of BLOCK_T query rows of one (batch, query head): O (float32), LSE and C (module doc).

    Q, O are [B, T, N, H] and Kp, V [B, S, N / G, H] with unit stride on H; QA, C are [B, N, T, R]
    and KA [B, N, S, R] float32, LSE [B, N, T]; MASK is read through strides (0 on broadcast dims),
    KL is [B], QOFF a one-element int32 tensor.
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
    Kp += b * sk_b + (n // G) * sk_n
    V += b * sk_b + (n // G) * sk_n
    QA += bn.to(tl.int64) * T * R
    KA += bn.to(tl.int64) * S * R
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
        s = _logits(q, kt, QA, KA, i, j, qo, in_band, vis, scale, T, S, R, K,
                    HAS_QA, HAS_KA, DOT_PREC)  # [BLOCK_T, BLOCK_S]
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no (-inf) - (-inf)
        alpha = tl.exp(m - m_safe)  # [BLOCK_T]
        p = tl.exp(s - m_safe[:, None])  # [BLOCK_T, BLOCK_S]
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt, input_precision=DOT_PREC)
        if HAS_C:
            d = j[None, :] - i[:, None] - qo  # [BLOCK_T, BLOCK_S]
            first, last = _bucket_ends(p, d, K, 1)  # [BLOCK_T] each
            c_first = c_first * alpha + first
            c_last = c_last * alpha + last
            if in_band:
                _store_band(C, i[:, None], d, s, vis, R, K)
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
def _bwd_rows_kernel(Q, Kp, V, DO, QA, KA, GV, LSE, D, MASK, KL, QOFF, DQ, E,
                     sq_b, sq_t, sq_n, sk_b, sk_s, sk_n, sm_b, sm_n, sm_t, sm_s,
                     T, S, N, G, scale,
                     H: tl.constexpr, HP: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                     HAS_QA: tl.constexpr, HAS_KA: tl.constexpr, HAS_GV: tl.constexpr,
                     HAS_MASK: tl.constexpr, HAS_KL: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """Row pass: DQ (float32, the c ds k part) and E = dQA [B, N, T, R] for a query block.

    DO, DQ share Q's strides; GV (dC) is [B, N, T, R] float32, D [B, N, T] float32; E starts as zeros.
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
    Kp += b * sk_b + (n // G) * sk_n
    V += b * sk_b + (n // G) * sk_n
    QA += rows * R
    KA += bn.to(tl.int64) * S * R
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
        s = _logits(q, kt, QA, KA, i, j, qo, in_band, vis, scale, T, S, R, K,
                    HAS_QA, HAS_KA, DOT_PREC)  # [BLOCK_T, BLOCK_S]
        p, ds = _probs_and_ds(s, lse, delta, do, vt, GV, i, j, qo, in_band, T, R, K, HAS_GV, DOT_PREC)
        dq += tl.dot(ds.to(kt.dtype), kt, input_precision=DOT_PREC)  # [BLOCK_T, HP]
        if HAS_QA:
            d = j[None, :] - i[:, None] - qo  # [BLOCK_T, BLOCK_S]
            first, last = _bucket_ends(ds, d, K, 1)  # [BLOCK_T] each
            e_first += first
            e_last += last
            if in_band:
                _store_band(E, i[:, None], d, ds, vis, R, K)

    tl.store(DQ + q_off, dq * scale, mask=q_ok)
    if HAS_QA:
        _store_ends(E, i, row_ok, e_first, e_last, R, K)


@triton.jit
def _bwd_cols_kernel(Q, Kp, V, DO, QA, KA, GV, LSE, D, MASK, KL, QOFF, DK, DV, F,
                     sq_b, sq_t, sq_n, sk_b, sk_s, sk_n, sm_b, sm_n, sm_t, sm_s,
                     T, S, N, G, scale,
                     H: tl.constexpr, HP: tl.constexpr, R: tl.constexpr, K: tl.constexpr,
                     HAS_QA: tl.constexpr, HAS_KA: tl.constexpr, HAS_GV: tl.constexpr,
                     HAS_MASK: tl.constexpr, HAS_KL: tl.constexpr, IS_CAUSAL: tl.constexpr,
                     DOT_PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr):
    """Column pass for a block of BLOCK_S keys of one (batch, kv head m): DK and DV (k's dtype and
    strides, summed over the G query heads m G .. m G + G - 1) and F = dKA [B, N, S, R] of each."""
    j0 = tl.program_id(0) * BLOCK_S
    bm = tl.program_id(1)
    b = (bm // (N // G)).to(tl.int64)
    m = (bm % (N // G)).to(tl.int64)
    j = j0 + tl.arange(0, BLOCK_S)  # [BLOCK_S]
    hd = tl.arange(0, HP)  # [HP]
    col_ok = j < S
    qo = tl.load(QOFF)
    kl = _key_length(KL, b, S, HAS_KL)
    k_off = b * sk_b + m * sk_n + j[:, None] * sk_s + hd[None, :]
    kv_ok = col_ok[:, None] & (hd[None, :] < H)
    kt = tl.load(Kp + k_off, mask=kv_ok, other=0.0)  # [BLOCK_S, HP]
    vt = tl.load(V + k_off, mask=kv_ok, other=0.0)  # [BLOCK_S, HP]

    lo = 0
    if IS_CAUSAL:  # rows above the first that sees key j0 see none of this block
        lo = tl.maximum(j0 - (S - T), 0) // BLOCK_T * BLOCK_T
    hi = tl.where(j0 < kl, T, 0)  # keys past the key length get no gradient
    dk = tl.zeros([BLOCK_S, HP], tl.float32)
    dv = tl.zeros([BLOCK_S, HP], tl.float32)
    for g in range(0, G):  # the query heads that read kv head m
        n = m * G + g
        bn = b * N + n
        rows = bn * T
        q_base = Q + b * sq_b + n * sq_n
        do_base = DO + b * sq_b + n * sq_n
        mask_base = MASK + b * sm_b + n * sm_n
        f_first = tl.zeros([BLOCK_S], tl.float32)
        f_last = tl.zeros([BLOCK_S], tl.float32)
        for i0 in range(lo, hi, BLOCK_T):
            i = i0 + tl.arange(0, BLOCK_T)  # [BLOCK_T]
            row_ok = i < T
            q_ok = row_ok[:, None] & (hd[None, :] < H)
            q = tl.load(q_base + i[:, None] * sq_t + hd[None, :], mask=q_ok, other=0.0)  # [BLOCK_T, HP]
            do = tl.load(do_base + i[:, None] * sq_t + hd[None, :], mask=q_ok, other=0.0)  # [BLOCK_T, HP]
            lse, delta = _row_stats(LSE, D, rows, i, row_ok)  # [BLOCK_T] each
            in_band = _in_band(i0, j0, qo, BLOCK_T, BLOCK_S, K)
            vis = _visible(i, j, T, S, kl, mask_base, sm_t, sm_s, HAS_MASK, IS_CAUSAL)
            s = _logits(q, kt, QA + rows * R, KA + bn * S * R, i, j, qo, in_band, vis, scale, T, S, R, K,
                        HAS_QA, HAS_KA, DOT_PREC)  # [BLOCK_T, BLOCK_S]
            p, ds = _probs_and_ds(s, lse, delta, do, vt, GV + rows * R, i, j, qo, in_band, T, R, K,
                                  HAS_GV, DOT_PREC)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)  # [BLOCK_S, HP]
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)  # [BLOCK_S, HP]
            if HAS_KA:
                d = j[None, :] - i[:, None] - qo  # [BLOCK_T, BLOCK_S]
                first, last = _bucket_ends(ds, d, K, 0)  # [BLOCK_S] each
                f_first += first
                f_last += last
                if in_band:
                    _store_band(F + bn * S * R, j[None, :], d, ds, vis, R, K)
        if HAS_KA:
            _store_ends(F + bn * S * R, j, col_ok, f_first, f_last, R, K)

    tl.store(DK + k_off, (dk * scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + k_off, dv.to(DV.dtype.element_ty), mask=kv_ok)
