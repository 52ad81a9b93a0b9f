"""The Triton fused kernels on the relative-position family: bucket schemes, rel_q, rel_bias, GQA.

Every scheme runs as the Shaw form with expanded tables (``fused.py``); these tests run the kernels
in Triton's interpreter (TRITON_INTERPRET=1 before triton is imported, as in test_fused_torch.py)
on float32 CPU tensors with 16 x 16 tiles, and compare the output and every gradient (q, k, v,
rel_k, rel_v, rel_q, rel_bias) with the einsum path in float64 on the scheme's ids
(``scheme.ids``), grouped k and v repeated per query head there. The new constexpr combinations
are compiled for sm_90 without a device.
"""

from __future__ import annotations

import os

if os.environ.get("RELATTN_FUSED_COMPILE") != "1":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported (one xdist worker per file)

import pytest  # noqa: E402

torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from parity_tests.numerics import assert_close  # noqa: E402
from parity_tests.test_fused_torch import (  # noqa: E402
    F32_TOL,
    TILE,
    _check_compiled,
    _compile_in_subprocess,
    _run,
    _visible_mask,
    small_tiles,  # noqa: F401 (the same autouse fixture: 16 x 16 tiles, a skip outside the interpreter)
)
from relattn_torch import _fused_terms, fused, relative_attention  # noqa: E402
from relattn_torch.buckets import BertBuckets, DebertaBuckets, ShawBuckets, T5Buckets, shaw_width  # noqa: E402
from relattn_torch.fused import fused_attention  # noqa: E402

pytestmark = pytest.mark.fused
NAMES = ("q", "k", "v", "rel_k", "rel_v", "rel_q", "rel_bias")


def _make(scheme, B, T, S, N, N_kv, H, terms, dtype=torch.float32, seed=0):
    """q [B, T, N, H], k, v [B, S, N_kv, H] and the tables named in ``terms`` ("k", "v", "q", "b";
    an upper-case letter makes a per-head table [R, N, H]; "b" or "B" the bias [R, N]), None for the others."""
    g = torch.Generator().manual_seed(seed)
    R = scheme.num_ids
    q, k, v = (torch.randn(B, L, n, H, generator=g).to(dtype) for L, n in ((T, N), (S, N_kv), (S, N_kv)))
    tables = []
    for letter in "kvq":
        shape = (R, N, H) if letter.upper() in terms else (R, H) if letter in terms else None
        tables.append(None if shape is None else (0.5 * torch.randn(*shape, generator=g)).to(dtype))
    bias = torch.randn(R, N, generator=g).to(dtype) if "b" in terms.lower() else None
    return [q, k, v, *tables, bias]


def _einsum_path(q, k, v, rel_k, rel_v, rel_q, rel_bias, *, scheme, q_offset, **kw):
    """The einsum path on the scheme's ids, with grouped k and v repeated per query head."""
    G = q.shape[2] // k.shape[2]
    ids = scheme.ids(q.shape[1], k.shape[1], q_offset)
    return relative_attention(q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2), rel_k, rel_v, rel_ids=ids,
                              rel_q=rel_q, rel_bias=rel_bias, implementation="einsum", **kw)


def _fused(q, k, v, rel_k, rel_v, rel_q, rel_bias, **kw):
    return fused_attention(q, k, v, rel_k, rel_v, rel_q=rel_q, rel_bias=rel_bias, **kw)


def _check(scheme, args, *, q_offset=None, is_causal=False, mask=None, key_lengths=None, scale=None,
           tol=F32_TOL, seed=1):
    """fused == einsum path in float64 (output and every gradient), to tol * max(1, max |ref|)."""
    q, k = args[0], args[1]
    B, T, N, H = q.shape
    S = k.shape[1]
    dout = torch.randn(B, T, N, H, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    kw = dict(is_causal=is_causal, scale=scale)
    out, grads = _run(_fused, args, dout, scheme=scheme, q_offset=q_offset, mask=mask, key_lengths=key_lengths,
                      **kw)
    offset = S - T if q_offset is None else int(q_offset)
    wide = [None if a is None else a.double() for a in args]
    out64, grads64 = _run(_einsum_path, wide, dout, scheme=scheme, q_offset=offset,
                          mask=_visible_mask(B, S, mask, key_lengths), **kw)
    errors = {"out": _error(out, out64, tol)}
    for name, got, want in zip(NAMES, grads, grads64):
        if want is not None:
            assert torch.isfinite(got).all(), name
            errors[name] = _error(got, want, tol)
    return out, grads, errors


def _error(got, want, tol):
    assert_close(got.double().numpy(), want.numpy(), rel=tol)
    return float((got.double() - want).abs().max() / max(1.0, float(want.abs().max())))


# scheme, B, T, S, N, N_kv, H, terms, options
CASES = {
    "t5_bias": (T5Buckets(8, 20), 2, 23, 37, 2, 2, 16, "b", dict(scale=1.0, key_lengths=[37, 25])),
    "t5_causal_gqa": (T5Buckets(8, 20, bidirectional=False), 1, 30, 30, 2, 1, 16, "b",
                      dict(scale=1.0, is_causal=True)),
    "deberta_c2p_p2c": (DebertaBuckets(8, 32), 1, 20, 25, 2, 2, 16, "kq", dict(mask="padding")),  # K 24 < W 32
    "bert_key_query": (BertBuckets(7), 1, 21, 29, 2, 2, 24, "kvq", dict(is_causal=True)),
    "shaw_all_gqa": (ShawBuckets(3), 1, 25, 34, 4, 2, 16, "KVQB", dict(mask="full", q_offset=5)),
    "rel_q_alone_gqa": (ShawBuckets(20), 1, 19, 40, 2, 1, 16, "Q", dict(is_causal=True)),
    "t5_everything": (T5Buckets(16, 40), 2, 33, 41, 2, 1, 32, "kVQb",
                      dict(mask="full", key_lengths=[41, 30], q_offset=torch.tensor(3))),
    "deberta_value_gqa": (DebertaBuckets(0, 6), 1, 17, 35, 2, 1, 16, "V", dict(is_causal=True)),
    "bert_key_alone": (BertBuckets(5), 1, 18, 22, 2, 2, 16, "K", dict(q_offset=-3)),
}
SLOW = {"t5_everything", "bert_key_query"}


def _options(opts, B, T, S, N):
    opts = dict(opts)
    g = torch.Generator().manual_seed(9)
    if opts.get("mask") == "padding":
        opts["mask"] = (torch.arange(S)[None, :] < torch.tensor([S - 7] + [S] * (B - 1))[:, None])[:, None, None, :]
    elif opts.get("mask") == "full":
        opts["mask"] = torch.rand(B, N, T, S, generator=g) > 0.3
    if "key_lengths" in opts:
        opts["key_lengths"] = torch.tensor(opts["key_lengths"])
    return opts


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c for c in CASES])
def test_family_matches_einsum_float64(case):
    scheme, B, T, S, N, N_kv, H, terms, opts = CASES[case]
    _check(scheme, _make(scheme, B, T, S, N, N_kv, H, terms), **_options(opts, B, T, S, N))


def test_plain_attention_with_grouped_heads():
    """No table at all: grouped flash attention (max_distance only has to be valid)."""
    q, k, v = _make(ShawBuckets(1), 1, 20, 26, 4, 1, 16, "")[:3]
    dout = torch.randn(1, 20, 4, 16, dtype=torch.float64)
    out, grads = _run(lambda *a: fused_attention(*a, max_distance=1, is_causal=True), [q, k, v], dout)
    wide = [a.double() for a in (q, k, v)]
    out64, grads64 = _run(lambda q, k, v: relative_attention(q, k.repeat_interleave(4, 2), v.repeat_interleave(4, 2),
                                                             is_causal=True, implementation="einsum"), wide, dout)
    for got, want in zip([out, *grads], [out64, *grads64]):
        _error(got, want, F32_TOL)


def test_max_distance_is_shaw_buckets():
    """scheme=ShawBuckets(K) takes the max_distance path bit for bit when K is lossless for the sizes,
    and a shorter clip (shaw_width) with the same numbers when the sequences are shorter than K."""
    args = _make(ShawBuckets(4), 1, 20, 24, 2, 2, 16, "KvQb")
    tables = dict(rel_k=args[3], rel_v=args[4], rel_q=args[5], rel_bias=args[6])
    by_distance = fused_attention(*args[:3], max_distance=4, **tables)
    assert torch.equal(by_distance, fused_attention(*args[:3], scheme=ShawBuckets(4), **tables))
    assert shaw_width(ShawBuckets(30), 20, 24) == 23
    long = _make(ShawBuckets(30), 1, 20, 24, 2, 2, 16, "KvQb")
    tables = dict(rel_k=long[3], rel_v=long[4], rel_q=long[5], rel_bias=long[6])
    assert_close(fused_attention(*long[:3], scheme=ShawBuckets(30), **tables).numpy(),
                 fused_attention(*long[:3], max_distance=30, **tables).numpy(), rel=F32_TOL)


def test_invariants_with_every_term():
    """sum_r C = 1 on rows that see a key; E = dQA rows sum to 0; F = dKA sums to 0 over all (j, r)."""
    scheme = T5Buckets(8, 20)
    q, k, v, rel_k, rel_v, rel_q, rel_bias = _make(scheme, 1, 29, 35, 2, 1, 16, "kvqb")
    mask = torch.ones(1, 1, 29, 35, dtype=torch.bool)
    mask[..., 6, :] = False
    d = fused._spec.check_qkv(tuple(q.shape), tuple(k.shape), tuple(v.shape))
    K, t = _fused_terms.shaw_form(scheme, None, dict(rel_k=rel_k, rel_v=rel_v, rel_q=rel_q, rel_bias=rel_bias), d, None)
    c = 16**-0.5
    launch = fused._Launch(K=K, scale=c, is_causal=True, interpret=True, config=fused._config(16, q.dtype))
    qoff = fused._offset_tensor(None, d, "cpu")
    qa, ka = _fused_terms.row_terms(q, t["rel_k"], t["rel_bias"], c), _fused_terms.column_terms(k, t["rel_q"], c, 2)
    o, lse, masses = fused._forward(q, k, v, qa, ka, True, qoff, mask, None, launch)
    seen = torch.ones(29, dtype=torch.bool)
    seen[6] = False
    sums = masses.sum(-1)[0]  # [N, T]
    assert torch.allclose(sums[:, seen], torch.ones(()), atol=1e-6) and (sums[:, ~seen] == 0).all()
    dout = torch.randn(1, 29, 2, 16)
    dc = _fused_terms._table_product(dout, t["rel_v"])
    delta = torch.einsum("BTNH,BTNH->BNT", dout, o) + (masses * dc).sum(-1)
    _, e, _, _, f = fused._backward(q, k, v, dout, qa, ka, dc, lse, delta.contiguous(), qoff, mask, None, launch)
    assert e.sum(-1).abs().max() < 1e-5
    assert f.sum((-1, -2)).abs().max() < 1e-5 and f.abs().max() > 1e-3


def test_failure_paths():
    q, k, v, rel_k, rel_v, rel_q, rel_bias = _make(T5Buckets(8, 20), 1, 8, 8, 4, 2, 16, "kvqb")
    with pytest.raises(ValueError, match="pass either scheme= or max_distance"):
        fused_attention(q, k, v, rel_k, scheme=T5Buckets(8, 20), max_distance=3)
    with pytest.raises(ValueError, match="needs the relation ids: pass scheme="):
        fused_attention(q, k, v, rel_k)
    with pytest.raises(ValueError, match="rel_q must have R = scheme.num_ids = 16 rows"):
        fused_attention(q, k, v, rel_q=rel_q, scheme=T5Buckets(16, 20))
    with pytest.raises(ValueError, match=r"rel_bias \(per-head bias table\) must be \[R, N\] = \[R, 4\]"):
        fused_attention(q, k, v, rel_bias=rel_bias[:, :2], scheme=T5Buckets(8, 20))
    with pytest.raises(ValueError, match="rel_bias must have R = 2 \\* max_distance \\+ 1 = 7"):
        fused_attention(q, k, v, rel_bias=rel_bias, max_distance=3)
    with pytest.raises(TypeError, match="rel_bias must have the same dtype as q"):
        fused_attention(q, k, v, rel_bias=rel_bias.double(), scheme=T5Buckets(8, 20))
    with pytest.raises(ValueError, match="N % N_kv == 0 .* got N = 4 query heads and N_kv = 3"):
        fused_attention(q, k[:, :, :1].expand(1, 8, 3, 16), v[:, :, :1].expand(1, 8, 3, 16), rel_k,
                        scheme=T5Buckets(8, 20))
    with pytest.raises(TypeError, match="scheme must be a relattn_torch.buckets scheme"):
        fused_attention(q, k, v, rel_k, scheme=8)


def test_float16_family_in_the_interpreter():
    """float16 with every term and GQA (bfloat16 has no NumPy arithmetic in the interpreter)."""
    scheme = DebertaBuckets(8, 32)
    args = _make(scheme, 1, 21, 27, 2, 1, 16, "kvqb", dtype=torch.float16)
    out, grads, errors = _check(scheme, args, is_causal=True, tol=1e-2)
    assert out.dtype == torch.float16 and all(g.dtype == torch.float16 for g in grads)
    assert errors["out"] < 2e-3, errors


# Compilation for sm_90 of the new constexpr combinations, no device needed; the compile helpers
# are test_fused_torch.py's, whose sweep compiles every config with every flag on (HAS_KA included).

NEW_FEATURES = ({"HAS_QA": False, "HAS_GV": False, "HAS_C": False}, {"HAS_KA": False, "HAS_MASK": False})


def test_compiles_family_sample():
    """Each kernel with rel_q's column gather on, one per dtype (the sweep runs with --slow)."""
    _check_compiled(_compile_in_subprocess([
        ("_fwd_kernel", 64, "bf16", 90),
        ("_bwd_rows_kernel", 64, "fp16", 90, NEW_FEATURES[0]),
        ("_bwd_cols_kernel", 64, "fp32", 90),
    ]))


@pytest.mark.slow
def test_compiles_family_all_combinations():
    """KA alone (no QA, dC, C) and QA without KA, every kernel and dtype, H = 64 and 128."""
    specs = [(name, H, dtype, 90, features) for name in ("_fwd_kernel", "_bwd_rows_kernel", "_bwd_cols_kernel")
             for dtype in ("fp32", "bf16", "fp16") for H in (64, 128) for features in NEW_FEATURES]
    _check_compiled(_compile_in_subprocess(specs))
