"""Bucket schemes (Shaw, T5, DeBERTa) and the query-side and bias terms, in both frameworks.

Every scheme's ids are checked against the oracle's scalar transcription of the published
formula (and, where transformers is installed, against its own functions); every new term
against the float64 oracle, with gradients by central differences, and across frameworks.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import oracle
from .backends import backend
from .numerics import assert_close, assert_grads_match_finite_differences

SCHEMES = {  # name -> (constructor arguments, oracle bucket of one relative position)
    "shaw-3": ("ShawBuckets", dict(max_distance=3), lambda r: min(max(r, -3), 3) + 3),
    "t5-32-128-bidir": ("T5Buckets", dict(num_buckets=32, max_distance=128, bidirectional=True),
                        lambda r: oracle.t5_bucket(r, 32, 128, True)),
    "t5-32-128-causal": ("T5Buckets", dict(num_buckets=32, max_distance=128, bidirectional=False),
                         lambda r: oracle.t5_bucket(r, 32, 128, False)),
    "t5-9-20-bidir": ("T5Buckets", dict(num_buckets=9, max_distance=20, bidirectional=True),
                      lambda r: oracle.t5_bucket(r, 9, 20, True)),
    "deberta-256-512": ("DebertaBuckets", dict(position_buckets=256, max_relative_positions=512),
                        lambda r: oracle.deberta_bucket(r, 256, 512)),
    "deberta-8-40": ("DebertaBuckets", dict(position_buckets=8, max_relative_positions=40),
                     lambda r: oracle.deberta_bucket(r, 8, 40)),
    "deberta-plain-6": ("DebertaBuckets", dict(position_buckets=0, max_relative_positions=6),
                        lambda r: oracle.deberta_bucket(r, 0, 6)),
    "bert-8": ("BertBuckets", dict(max_position_embeddings=8), lambda r: oracle.bert_bucket(r, 8)),
}


def scheme(bk, name):
    cls, kw, _ = SCHEMES[name]
    return getattr(bk.lib, cls)(**kw)


def qkv(rng, B=2, T=5, S=7, N=3, H=4):
    return {"q": rng.standard_normal((B, T, N, H)), "k": rng.standard_normal((B, S, N, H)),
            "v": rng.standard_normal((B, S, N, H))}


# --- literal expectations -------------------------------------------------------------------------

def test_t5_literal_ids(bk):
    """T5 (num_buckets=8, max_distance=8): keys after the query get the upper half; 2 exact, then log."""
    ids = bk.numpy(bk.lib.T5Buckets(8, 8, True).ids(1, 9, q_offset=4))
    # relative = j - 4 = -4..4: |r| = 0, 1 exact; 2, 3 -> 2; 4 -> 3; positive r offset by 4
    np.testing.assert_array_equal(ids, [[3, 2, 2, 1, 0, 5, 6, 6, 7]])
    causal = bk.numpy(bk.lib.T5Buckets(8, 8, False).ids(1, 9, q_offset=4))
    # causal: n = max(-r, 0) over 8 buckets: 4 exact (0..3), then log; keys after the query are 0
    np.testing.assert_array_equal(causal, [[4, 3, 2, 1, 0, 0, 0, 0, 0]])


def test_deberta_literal_ids(bk):
    """DeBERTa measures query minus key: the key before the query (delta = +1) reads row span + 1."""
    ids = bk.numpy(bk.lib.DebertaBuckets(0, 3).ids(1, 7, q_offset=3))
    # delta = 3 - j = 3..-3, span 3, clamp to [0, 5]
    np.testing.assert_array_equal(ids, [[5, 5, 4, 3, 2, 1, 0]])


def test_shaw_scheme_is_relative_position_ids(bk):
    s = bk.lib.ShawBuckets(2)
    assert s.num_ids == 5
    for T, S, off in [(4, 6, 0), (3, 3, -2), (2, 9, 7)]:
        want = bk.numpy(bk.lib.relative_position_ids(T, S, 2, q_offset=off))
        np.testing.assert_array_equal(bk.numpy(s.ids(T, S, q_offset=off)), want)
        np.testing.assert_array_equal(bk.numpy(bk.lib.relative_position_ids(T, S, q_offset=off, scheme=s)), want)


# --- ids against the oracle's transcriptions ------------------------------------------------------

@pytest.mark.parametrize("name", list(SCHEMES))
def test_scheme_ids_match_oracle(bk, name):
    s = scheme(bk, name)
    bucket = SCHEMES[name][2]
    wide = bk.numpy(s.ids(1, 1201, q_offset=600))[0]  # relative positions -600..600
    np.testing.assert_array_equal(wide, [bucket(r) for r in range(-600, 601)])
    assert wide.min() >= 0 and wide.max() < s.num_ids
    for T, S, off in [(5, 5, 0), (3, 8, 5), (6, 4, -2)]:
        ids = bk.numpy(bk.lib.relative_position_ids(T, S, q_offset=off, scheme=s))
        np.testing.assert_array_equal(ids, oracle.scheme_ids(bucket, T, S, off))


def test_num_ids():
    """R is the rows of each model's table: T5 num_buckets, DeBERTa 2 * span."""
    for fw in ("torch", "jax"):
        lib = backend(fw).lib
        assert lib.T5Buckets(32, 128).num_ids == 32 and lib.T5Buckets(9, 20).num_ids == 9
        assert lib.DebertaBuckets(256, 512).num_ids == 512 and lib.DebertaBuckets(0, 6).num_ids == 12
        assert lib.ShawBuckets(0).num_ids == 1 and lib.BertBuckets(512).num_ids == 1023


@pytest.mark.parametrize("name", list(SCHEMES))
def test_scheme_ids_are_the_same_in_both_frameworks_and_under_jit(name):
    t, j = backend("torch"), backend("jax")
    want = t.numpy(scheme(t, name).ids(40, 2000, q_offset=-900))
    np.testing.assert_array_equal(j.numpy(scheme(j, name).ids(40, 2000, q_offset=-900)), want)
    s = scheme(j, name)
    traced = j.jax.jit(lambda off: s.ids(40, 2000, q_offset=off))(j.jnp.asarray(-900))
    np.testing.assert_array_equal(np.asarray(traced), want)


def test_scheme_ids_match_transformers():
    """The real transformers functions (T5Attention._relative_position_bucket, DeBERTa-v2's
    build_relative_position) give the same rows; transformers is not a dependency of the suite."""
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers.models.deberta_v2.modeling_deberta_v2 import build_relative_position
    from transformers.models.t5.modeling_t5 import T5Attention

    t, j = backend("torch"), backend("jax")
    rel = torch.arange(-3000, 3001)[None, :]
    for nb, md, bi in [(32, 128, True), (32, 128, False), (9, 20, True), (64, 256, True), (6, 4, False)]:
        want = T5Attention._relative_position_bucket(rel, bidirectional=bi, num_buckets=nb, max_distance=md)
        # relative = key - query = j - 3000 for one query at key position 3000
        np.testing.assert_array_equal(t.numpy(t.lib.T5Buckets(nb, md, bi).ids(1, 6001, q_offset=3000)), want)
        np.testing.assert_array_equal(j.numpy(j.lib.T5Buckets(nb, md, bi).ids(1, 6001, q_offset=3000)), want)
    for pb, mp in [(256, 512), (8, 40), (0, 6), (32, 1024)]:
        layer = torch.zeros(1, 1, 300, 1), torch.zeros(1, 1, 1100, 1)
        relpos = build_relative_position(*layer, bucket_size=pb if pb else -1, max_position=mp)[0]
        span = pb if pb > 0 else mp
        want = torch.clamp(relpos + span, 0, 2 * span - 1)  # the row DeBERTa's c2p gather reads
        np.testing.assert_array_equal(t.numpy(t.lib.DebertaBuckets(pb, mp).ids(300, 1100)), want)
        np.testing.assert_array_equal(j.numpy(j.lib.DebertaBuckets(pb, mp).ids(300, 1100)), want)


@pytest.mark.parametrize("cls,kw,match", [
    ("T5Buckets", dict(num_buckets=3), r"num_buckets must be >= 4 \(bidirectional T5 buckets\), got 3"),
    ("T5Buckets", dict(num_buckets=1, bidirectional=False), r"num_buckets must be >= 2 \(causal"),
    ("T5Buckets", dict(num_buckets=32, max_distance=8), r"max_distance must be an int in \(8, .*got 8"),
    ("T5Buckets", dict(num_buckets=0), r"num_buckets must be a positive int, got 0"),
    ("DebertaBuckets", dict(position_buckets=-1), r"position_buckets must be a non-negative int, got -1"),
    ("DebertaBuckets", dict(position_buckets=1), r"position_buckets must be 0 .* or >= 2, got 1"),
    ("DebertaBuckets", dict(position_buckets=256, max_relative_positions=129),
     r"max_relative_positions must be > position_buckets // 2 \+ 1 = 129"),
    ("DebertaBuckets", dict(max_relative_positions=0), r"max_relative_positions must be a positive int, got 0"),
    ("ShawBuckets", dict(max_distance=-1), r"max_distance must be a non-negative int, got -1"),
    ("BertBuckets", dict(max_position_embeddings=0), r"max_position_embeddings must be a positive int, got 0"),
])
def test_scheme_argument_errors(bk, cls, kw, match):
    with pytest.raises(ValueError, match=match):
        getattr(bk.lib, cls)(**kw)


def test_scheme_type_errors(bk):
    with pytest.raises(TypeError, match=r"bidirectional must be a bool, got 'no'"):
        bk.lib.T5Buckets(32, 128, "no")
    with pytest.raises(ValueError, match=r"pass either max_distance \(Shaw ids\) or scheme=.*not both"):
        bk.lib.relative_position_ids(3, 3, 2, scheme=bk.lib.ShawBuckets(2))
    with pytest.raises(ValueError, match=r"not neither"):
        bk.lib.relative_position_ids(3, 3)
    with pytest.raises(TypeError, match=r"scheme must be ShawBuckets, T5Buckets, DebertaBuckets or BertBuckets, got int"):
        bk.lib.relative_position_ids(3, 3, scheme=4)


def test_schemes_are_frozen_and_hashable(bk):
    s = bk.lib.T5Buckets(32, 128)
    assert s == bk.lib.T5Buckets(32, 128) and hash(s) == hash(bk.lib.T5Buckets(32, 128))
    with pytest.raises(Exception, match="cannot assign"):
        s.num_buckets = 8


# --- the query-side term and the bias table against the oracle -----------------------------------

def _terms(rng, terms, R, N, H, per_head=True):
    out = {}
    if "k" in terms:
        out["rel_k"] = rng.standard_normal((R, N, H) if per_head else (R, H))
    if "v" in terms:
        out["rel_v"] = rng.standard_normal((R, H) if per_head else (R, N, H))
    if "q" in terms:
        out["rel_q"] = rng.standard_normal((R, N, H) if per_head else (R, H))
    if "b" in terms:
        out["rel_bias"] = rng.standard_normal((R, N))
    return out


# (terms, tables per head, ids per example): k rel_k, v rel_v, q rel_q, b rel_bias
CASES = [("q", True, False), ("b", True, True), ("qb", False, False), ("kq", False, True), ("kqvb", True, False),
         ("vb", False, True)]


@pytest.mark.parametrize("terms,per_head,batched_ids", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_query_and_bias_terms_match_oracle(bk, terms, per_head, batched_ids):
    rng = np.random.default_rng(20)
    B, T, S, N, H, R = 2, 5, 7, 3, 4, 6
    inputs = {**qkv(rng, B, T, S, N, H), **_terms(rng, terms, R, N, H, per_head)}
    ids = rng.integers(0, R, (B, T, S) if batched_ids else (T, S))
    mask = rng.random((B, 1, T, S)) < 0.8
    for kw in (dict(), dict(scale=1.0), dict(scale=-0.7, is_causal=True), dict(mask=mask)):
        ref = oracle.relative_attention(**inputs, rel_ids=ids, **kw)
        for impl in ("einsum", "blockwise"):
            assert_close(bk.attention(inputs, rel_ids=ids, implementation=impl, **kw), ref)


@pytest.mark.parametrize("terms", ["q", "b", "kqvb"])
def test_query_and_bias_terms_in_the_shaw_form(bk, terms):
    """With max_distance the ids are Shaw's, and "auto" leaves the shaw and fused paths alone."""
    rng = np.random.default_rng(21)
    B, T, S, N, H, K = 2, 4, 6, 2, 3, 2
    inputs = {**qkv(rng, B, T, S, N, H), **_terms(rng, terms, 2 * K + 1, N, H)}
    for kw in (dict(), dict(q_offset=-1, is_causal=True)):
        ref = oracle.relative_attention(**inputs, max_distance=K, **kw)
        assert_close(bk.attention(inputs, max_distance=K, **kw), ref)


def test_blockwise_cuts_the_ids_per_block(bk, monkeypatch):
    """Several query blocks (BLOCK_ROWS = 2): each block reads its own rows of ids (and Shaw offset)."""
    import importlib

    monkeypatch.setattr(importlib.import_module(f"relattn_{bk.name}.blockwise"), "BLOCK_ROWS", 2)
    rng = np.random.default_rng(22)
    B, T, S, N, H, R = 1, 5, 6, 2, 3, 5
    inputs = {**qkv(rng, B, T, S, N, H), **_terms(rng, "kqb", R, N, H)}
    ids = rng.integers(0, R, (T, S))
    assert_close(bk.attention(inputs, rel_ids=ids, implementation="blockwise", is_causal=True),
                 oracle.relative_attention(**inputs, rel_ids=ids, is_causal=True))
    assert_close(bk.attention(inputs, max_distance=2, implementation="blockwise"),
                 oracle.relative_attention(**inputs, max_distance=2))


@pytest.mark.parametrize("name", ["t5-32-128-bidir", "t5-9-20-bidir", "deberta-8-40", "deberta-plain-6"])
def test_scheme_ids_drive_the_new_terms(bk, name):
    """The scheme's ids as rel_ids: the oracle takes its own transcription of the same ids."""
    rng = np.random.default_rng(23)
    s = scheme(bk, name)
    B, T, S, N, H, R = 2, 6, 9, 2, 3, s.num_ids
    inputs = {**qkv(rng, B, T, S, N, H), **_terms(rng, "kqb", R, N, H)}
    ids = bk.numpy(s.ids(T, S, q_offset=S - T))
    np.testing.assert_array_equal(ids, oracle.scheme_ids(SCHEMES[name][2], T, S, S - T))
    assert_close(bk.attention(inputs, rel_ids=ids, scale=1.0), oracle.relative_attention(**inputs, rel_ids=ids,
                                                                                          scale=1.0))



@pytest.mark.parametrize("impl", ["einsum", "blockwise"])
@pytest.mark.parametrize("form", ["table", "batched", "shaw"])
def test_gradients_match_finite_differences(bk, impl, form):
    rng = np.random.default_rng(24)
    B, T, S, N, H, R = 2, 3, 4, 2, 3, 5
    inputs = {**qkv(rng, B, T, S, N, H), **_terms(rng, "kqvb", R, N, H, per_head=form != "batched")}
    kw = dict(mask=rng.random((B, 1, T, S)) < 0.8, implementation=impl, scale=0.8)
    if form == "shaw":
        kw["max_distance"] = 2
    else:
        kw["rel_ids"] = rng.integers(0, R, (B, T, S) if form == "batched" else (T, S))
    assert_grads_match_finite_differences(bk, inputs, rng, nonzero=True, **kw)


def test_cross_framework_parity_with_gradients():
    rng = np.random.default_rng(25)
    B, T, S, N, H, R = 2, 6, 8, 3, 4, 7
    inputs = {**qkv(rng, B, T, S, N, H), **_terms(rng, "kqvb", R, N, H)}
    ids = rng.integers(0, R, (T, S))
    cot = rng.standard_normal((B, T, N, H))
    (out_t, g_t), (out_j, g_j) = (backend(fw).attention_grads(inputs, cot, rel_ids=ids, is_causal=True, scale=1.0)
                                  for fw in ("torch", "jax"))
    assert_close(out_t, out_j)
    assert set(g_t) == set(g_j) == set(inputs)
    for name in inputs:
        assert_close(g_t[name], g_j[name])


def test_existing_forms_keep_their_exact_numbers(bk):
    """rel_q=None and rel_bias=None change nothing: bit-identical to a call without them."""
    rng = np.random.default_rng(26)
    inputs = {**qkv(rng), **_terms(rng, "kv", 6, 3, 4)}
    ids = rng.integers(0, 6, (5, 7))
    base = {n: inputs[n] for n in ("q", "k", "v", "rel_k", "rel_v")}
    a = bk.attention(base, rel_ids=ids)
    b = bk.attention({**base, "rel_q": None, "rel_bias": None}, rel_ids=ids)
    assert np.array_equal(a, b)


def test_a_zero_bias_and_query_table_change_nothing_and_the_bias_is_not_scaled(bk):
    """b = 0, a^Q = 0 give the plain table result; a bias per head equal for all ids shifts every
    logit of that head equally (no change), while a bias that differs by id is added unscaled."""
    rng = np.random.default_rng(27)
    inputs = {**qkv(rng), **_terms(rng, "k", 6, 3, 4)}
    ids = rng.integers(0, 6, (5, 7))
    plain = bk.attention(inputs, rel_ids=ids, scale=0.3)
    zeros = {"rel_q": np.zeros((6, 4)), "rel_bias": np.zeros((6, 3))}
    assert_close(bk.attention({**inputs, **zeros}, rel_ids=ids, scale=0.3), plain)
    flat = {"rel_bias": np.tile(rng.standard_normal((1, 3)), (6, 1))}
    assert_close(bk.attention({**inputs, **flat}, rel_ids=ids, scale=0.3), plain)
    # T5: scale=1.0; with scale 0 only the bias decides the weights: softmax_j(b[r_ij])
    bias = rng.standard_normal((6, 3))
    z = bk.attention({"q": inputs["q"], "k": inputs["k"], "v": inputs["v"], "rel_bias": bias}, rel_ids=ids, scale=0.0)
    w = np.exp(bias[ids])  # [T, S, N]
    w /= w.sum(1, keepdims=True)
    assert_close(z, np.einsum("tsn,bsnh->btnh", w, inputs["v"]))


# --- the models' own formulas -----------------------------------------------------------------------

def test_deberta_c2p_and_p2c_read_the_same_ids(bk):
    """DeBERTa's disentangled score, transcribed from its gathers (p2c by the key's row of -r_pos,
    then transposed), equals rel_k = pos_key, rel_q = pos_query on DebertaBuckets ids with
    scale 1/sqrt(3H): the query-side term takes the same ids, no reversed table."""
    rng = np.random.default_rng(28)
    B, L, N, H = 1, 9, 2, 3
    s = bk.lib.DebertaBuckets(4, 6)
    span, R = s.span, s.num_ids
    q, k, v = (rng.standard_normal((B, L, N, H)) for _ in range(3))
    pos_key, pos_query = rng.standard_normal((R, N, H)), rng.standard_normal((R, N, H))
    # DeBERTa: relative_pos[i, j] = bucket(i - j); c2p index clamp(rel + span), p2c index clamp(-rel + span)
    rel = np.array([[oracle.deberta_delta(i - j, 4, 6) for j in range(L)] for i in range(L)])
    assert rel.max() == span and rel.min() == -span  # the clamps below cut one end each
    c2p_pos = np.clip(rel + span, 0, 2 * span - 1)
    p2c_pos = np.clip(-rel + span, 0, 2 * span - 1)
    scale = 1 / np.sqrt(3 * H)
    score = np.einsum("binh,bjnh->bnij", q, k)
    c2p = np.einsum("binh,rnh->bnir", q, pos_key)
    score = score + np.take_along_axis(c2p, np.broadcast_to(c2p_pos, (B, N, L, L)), -1)
    p2c = np.einsum("bjnh,rnh->bnjr", k, pos_query)  # key rows
    score = score + np.swapaxes(np.take_along_axis(p2c, np.broadcast_to(p2c_pos, (B, N, L, L)), -1), -1, -2)
    p = np.exp(score * scale - (score * scale).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bnij,bjnh->binh", p, v)
    ids = bk.numpy(s.ids(L, L))
    np.testing.assert_array_equal(ids, c2p_pos)
    got = bk.attention({"q": q, "k": k, "v": v, "rel_k": pos_key, "rel_q": pos_query}, rel_ids=ids, scale=scale)
    assert_close(got, want)


def test_t5_bias_as_t5_computes_it(bk):
    """T5: scores = q . k (no scaling) + bias[bucket(j - i), n], softmax; here with scale=1.0."""
    rng = np.random.default_rng(29)
    B, T, N, H = 2, 7, 2, 3
    s = bk.lib.T5Buckets(8, 16, True)
    q, k, v = (rng.standard_normal((B, T, N, H)) for _ in range(3))
    bias = rng.standard_normal((8, N))
    buckets = np.array([[oracle.t5_bucket(j - i, 8, 16, True) for j in range(T)] for i in range(T)])
    scores = np.einsum("binh,bjnh->bnij", q, k) + np.moveaxis(bias[buckets], -1, 0)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    got = bk.attention({"q": q, "k": k, "v": v, "rel_bias": bias}, rel_ids=bk.numpy(s.ids(T, T)), scale=1.0)
    assert_close(got, np.einsum("bnij,bjnh->binh", p, v))


def test_bert_relative_key_query_on_mirrored_shaw_rows(bk):
    """BERT relative_key_query: (q.k + q.a[i - j + P - 1] + k.a[i - j + P - 1]) / sqrt(H), transcribed;
    equal to BertBuckets' ids on BERT's table, and to the Shaw form (K = P - 1) on its rows mirrored."""
    rng = np.random.default_rng(33)
    B, T, N, H, P = 2, 6, 2, 3, 8
    q, k, v = (rng.standard_normal((B, T, N, H)) for _ in range(3))
    emb = rng.standard_normal((2 * P - 1, H))
    a = emb[np.subtract.outer(np.arange(T), np.arange(T)) + P - 1]  # [T, T, H], row i - j + P - 1
    scores = (np.einsum("binh,bjnh->bnij", q, k) + np.einsum("binh,ijh->bnij", q, a)
              + np.einsum("bjnh,ijh->bnij", k, a)) / np.sqrt(H)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bnij,bjnh->binh", p, v)
    ids = bk.numpy(bk.lib.BertBuckets(P).ids(T, T))  # BERT's own rows: its table as it is
    assert_close(bk.attention({"q": q, "k": k, "v": v, "rel_k": emb, "rel_q": emb}, rel_ids=ids), want)
    table = emb[::-1].copy()
    got = bk.attention({"q": q, "k": k, "v": v, "rel_k": table, "rel_q": table}, max_distance=P - 1)
    assert_close(got, want)
    unmirrored = bk.attention({"q": q, "k": k, "v": v, "rel_k": emb, "rel_q": emb}, max_distance=P - 1)
    assert np.abs(unmirrored - got).max() > 1e-3  # negative control: the rows' order matters


# --- dispatch, non-finite values, errors --------------------------------------------------------------

@pytest.mark.parametrize("impl", ["shaw"])  # the fused kernels take them (test_fused_family_*)
def test_forced_shaw_and_fused_refuse_the_new_terms(bk, impl):
    rng = np.random.default_rng(30)
    inputs = {**qkv(rng, 1, 4, 4, 2, 3), "rel_k": rng.standard_normal((5, 3)), "rel_bias": np.zeros((5, 2))}
    with pytest.raises(ValueError, match=rf"implementation='{impl}' needs rel_q=None and rel_bias=None"):
        bk.attention(inputs, max_distance=2, implementation=impl)


@pytest.mark.parametrize("term", ["rel_q", "rel_bias"])
def test_auto_takes_einsum_with_the_new_terms(bk, term):
    from importlib import import_module

    rng = np.random.default_rng(31)
    arrays = {n: bk.array(x) for n, x in qkv(rng, 1, 4, 4, 2, 3).items()}
    table = bk.array(rng.standard_normal((5, 3) if term == "rel_q" else (5, 2)))
    AttentionArgs = import_module(f"relattn_{bk.name}.einsum").AttentionArgs
    choice = bk.lib.choose_implementation(arrays["q"], arrays["k"], arrays["v"],
                                          AttentionArgs(max_distance=2, q_offset=0, **{term: table}))
    assert choice.name == "einsum", choice
    without = AttentionArgs(max_distance=2, q_offset=0)  # the same call without the term: shaw can run it
    assert bk.lib.choose_implementation(arrays["q"], arrays["k"], arrays["v"], without, "shaw").name == "shaw"


def test_non_finite_bias_and_query_rows_behind_a_mask_have_no_say(bk):
    rng = np.random.default_rng(32)
    B, T, S, N, H, R = 1, 3, 4, 2, 3, 4
    inputs = {**qkv(rng, B, T, S, N, H), **_terms(rng, "qb", R, N, H)}
    ids = np.array([[0, 1, 2, 3]] * T)
    mask = np.array([True, True, True, False])  # id 3 only on the masked key
    ref = bk.attention(inputs, rel_ids=ids, mask=mask)
    bad = {**inputs, "rel_q": inputs["rel_q"].copy(), "rel_bias": inputs["rel_bias"].copy()}
    bad["rel_q"][3, 1, 2] = np.nan  # one element of head 1's row
    assert np.array_equal(bk.attention(bad, rel_ids=ids, mask=mask), ref)
    out = bk.attention(bad, rel_ids=ids)  # unmasked: every row attends id 3; only head 1 reads the NaN
    assert np.isnan(out[:, :, 1]).all() and np.isfinite(out[:, :, 0]).all()
    assert_close(out[:, :, 0], bk.attention(inputs, rel_ids=ids)[:, :, 0])
    bad["rel_bias"][3, 0] = np.inf
    assert np.array_equal(bk.attention(bad, rel_ids=ids, mask=mask), ref)
    assert np.isnan(bk.attention(bad, rel_ids=ids)).all()


B, T, S, N, H = 2, 3, 4, 2, 5


@pytest.mark.parametrize("kw,match", [
    (dict(rel_q=(5, H + 1), rel_ids=True), r"rel_q \(relation table, since rel_ids is given\) must be \[R, H\] = "
                                           r"\[R, 5\] or \[R, N, H\] = \[R, 2, 5\], got shape \[5, 6\]"),
    (dict(rel_q=(5, N + 1, H), rel_ids=True), r"rel_q \(relation table.*got shape \[5, 3, 5\]"),
    (dict(rel_bias=(5,), rel_ids=True), r"rel_bias \(per-head bias table\) must be \[R, N\] = \[R, 2\], got shape \[5\]"),
    (dict(rel_bias=(5, N + 1), rel_ids=True), r"rel_bias \(per-head bias table\) must be \[R, N\].*got shape \[5, 3\]"),
    (dict(rel_bias=(4, N), rel_ids=True), r"rel_ids values must be in \[0, R\) = \[0, 4\) for rel_bias"),
    (dict(rel_q=(3, H), rel_ids=True), r"rel_ids values must be in \[0, R\) = \[0, 3\) for rel_q"),
    (dict(rel_q=(5, H)), r"rel_q is a relation table and needs relation ids: pass rel_ids or max_distance"),
    (dict(rel_bias=(5, N), rel_k=(T, S, H)), r"rel_bias is a relation table and needs relation ids"),
    (dict(rel_bias=(4, N), max_distance=2), r"rel_bias must have R = 2 \* max_distance \+ 1 = 5 rows.*\[4, 2\]"),
    (dict(rel_q=(4, N, H), max_distance=2), r"rel_q must have R = 2 \* max_distance \+ 1 = 5 rows.*\[4, 2, 5\]"),
])
def test_value_errors(bk, kw, match):
    kw = dict(kw)
    rng = np.random.default_rng(0)
    inputs = {"q": rng.standard_normal((B, T, N, H)), "k": rng.standard_normal((B, S, N, H)),
              "v": rng.standard_normal((B, S, N, H))}
    for name in ("rel_q", "rel_bias", "rel_k"):
        if name in kw:
            inputs[name] = rng.standard_normal(kw.pop(name))
    if kw.pop("rel_ids", False):
        kw["rel_ids"] = np.arange(S)[None, :].repeat(T, 0) + 1  # ids 1..4
    with pytest.raises(ValueError, match=match):
        bk.attention(inputs, **kw)


def test_type_errors(bk):
    rng = np.random.default_rng(0)
    inputs = {"q": rng.standard_normal((B, T, N, H)), "k": rng.standard_normal((B, S, N, H)),
              "v": rng.standard_normal((B, S, N, H))}
    ids = np.zeros((T, S), np.int64)
    q, k, v = (bk.array(inputs[n]) for n in "qkv")
    with pytest.raises(TypeError, match=r"rel_bias must have the same dtype as q \(.*float64\), got .*float32"):
        bk.lib.relative_attention(q, k, v, rel_ids=bk.array(ids), rel_bias=bk.array(np.zeros((2, N)), "float32"))
    with pytest.raises(TypeError, match=r"rel_q must be a (torch.Tensor|jax.Array or numpy.ndarray) or None, got "
                                        r"builtins.list"):
        bk.lib.relative_attention(q, k, v, rel_ids=bk.array(ids), rel_q=[[0.0] * H])


def test_traced_ids_are_clamped_to_the_bias_table_rows():
    """Under jax.jit with check_ids=False an id past rel_bias's R rows reads row R - 1 (the rule of the
    other tables); eager calls refuse it."""
    j = backend("jax")
    rng = np.random.default_rng(34)
    q, k, v = (j.jnp.asarray(x) for x in qkv(rng, 1, 3, 4, 2, 3).values())
    bias = j.jnp.asarray(rng.standard_normal((4, 2)))
    ids = np.full((3, 4), 2)
    ids[0, 0] = 9
    f = j.jax.jit(lambda ids: j.lib.relative_attention(q, k, v, rel_ids=ids, rel_bias=bias))
    clamped = ids.copy()
    clamped[0, 0] = 3
    assert_close(np.asarray(f(j.jnp.asarray(ids))),
                 np.asarray(j.lib.relative_attention(q, k, v, rel_ids=j.jnp.asarray(clamped), rel_bias=bias)))
    with pytest.raises(ValueError, match=r"rel_ids values must be in \[0, R\) = \[0, 4\) for rel_bias"):
        j.lib.relative_attention(q, k, v, rel_ids=j.jnp.asarray(ids), rel_bias=bias)


def test_half_precision_and_empty_sizes(bk):
    rng = np.random.default_rng(35)
    inputs = {**qkv(rng, 2, 5, 6, 2, 8), **_terms(rng, "kqvb", 4, 2, 8)}
    ids = rng.integers(0, 4, (5, 6))
    ref = oracle.relative_attention(**inputs, rel_ids=ids, scale=0.5)
    got = bk.attention(inputs, dtype="bfloat16", rel_ids=ids, scale=0.5)
    assert got.dtype == np.float32 and np.abs(got - ref).max() <= 3e-2 * max(1.0, np.abs(ref).max())
    for B, T, S in [(0, 5, 6), (2, 0, 6), (2, 5, 0)]:
        empty = {**qkv(rng, B, T, S, 2, 8), **_terms(rng, "qb", 4, 2, 8)}
        out = bk.attention(empty, rel_ids=np.zeros((T, S), np.int64))
        assert out.shape == (B, T, 2, 8) and not out.any()


def test_the_schemes_page_snippets_run():
    """docs/relative-schemes.md's Python snippets run as written and give [B, T, N, H]."""
    pytest.importorskip("torch")
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "relative-schemes.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", page, re.S)
    assert len(snippets) == 3
    for code in snippets:
        scope: dict = {}
        exec(compile(code, "relative-schemes.md", "exec"), scope)
        assert tuple(scope["z"].shape) == (2, 10, 4, 16) and bool(scope["z"].isfinite().all())
