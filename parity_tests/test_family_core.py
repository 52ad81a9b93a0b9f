"""Issue 16, the function level: scheme=, grouped key/value heads and ALiBi slopes in relative_attention.

Every scheme x term (rel_k, rel_v, rel_q, rel_bias, alibi_slopes) x grouped heads x mask / causal
is checked against the float64 oracle (``oracle.py``, written from the equation) on every path
that accepts the call, with gradients against central differences of the oracle, in both
frameworks, and torch against JAX on the same inputs. Then the new errors, and negative controls:
a mirrored table, a wrong bucket count, the wrong head grouping and a flipped ALiBi sign each
miss the oracle by far more than the tolerance, so these comparisons can fail.
"""

from __future__ import annotations

import importlib
import zlib

import numpy as np
import pytest

from . import oracle
from .backends import backend
from .numerics import allowed_error, assert_close

B, T, S, N, H = 2, 5, 7, 4, 3
SCHEMES = {  # name -> (class, arguments, the oracle's bucket of one relative position)
    "shaw-2": ("ShawBuckets", (2,), lambda r: min(max(r, -2), 2) + 2),
    "t5-8-16-bidir": ("T5Buckets", (8, 16, True), lambda r: oracle.t5_bucket(r, 8, 16, True)),
    "t5-8-12-causal": ("T5Buckets", (8, 12, False), lambda r: oracle.t5_bucket(r, 8, 12, False)),
    "deberta-4-6": ("DebertaBuckets", (4, 6), lambda r: oracle.deberta_bucket(r, 4, 6)),
    "deberta-plain-3": ("DebertaBuckets", (0, 3), lambda r: oracle.deberta_bucket(r, 0, 3)),
    "bert-4": ("BertBuckets", (4,), lambda r: oracle.bert_bucket(r, 4)),
}
# visibility -> the call's mask / causal / q_offset keywords (mask arrays drawn per case)
VISIBILITY = ("none", "mask", "pad", "causal", "causal-offset")


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def make_scheme(bk, name):
    cls, args, _ = SCHEMES[name]
    return getattr(bk.lib, cls)(*args)


def inputs(rng, R, terms, N_kv, per_head=True, T=T, S=S):
    """q, k, v (k, v with N_kv heads) and the tables of ``terms``: k rel_k, v rel_v, q rel_q, b rel_bias,
    a alibi_slopes. ``per_head`` alternates [R, N, H] and [R, H] between the tables."""
    x = {"q": rng.standard_normal((B, T, N, H)), "k": rng.standard_normal((B, S, N_kv, H)),
         "v": rng.standard_normal((B, S, N_kv, H))}
    shapes = {"k": ("rel_k", (R, N, H) if per_head else (R, H)), "v": ("rel_v", (R, H) if per_head else (R, N, H)),
              "q": ("rel_q", (R, H) if per_head else (R, N, H)), "b": ("rel_bias", (R, N)), "a": ("alibi_slopes", (N,))}
    for t in terms:
        name, shape = shapes[t]
        x[name] = rng.random(shape) if t == "a" else rng.standard_normal(shape)
    return x


def visibility(rng, vis, T=T, S=S):
    return {"none": {}, "mask": {"mask": rng.random((B, 1, T, S)) < 0.75},
            "pad": {"mask": np.arange(S)[None, None, None, :] < np.array([S, S - 2])[:, None, None, None]},
            "causal": {"is_causal": True},
            "causal-offset": {"is_causal": True, "q_offset": 1, "mask": rng.random((B, 1, T, S)) < 0.8}}[vis]


def expected(x, scheme_name, T=T, S=S, **kw):
    """The oracle, with the scheme's ids from the oracle's own bucket transcription."""
    tables = [n for n in ("rel_k", "rel_v", "rel_q", "rel_bias") if n in x]
    offset = kw.get("q_offset", S - T)
    ids = oracle.scheme_ids(SCHEMES[scheme_name][2], T, S, offset) if scheme_name and tables else None
    return oracle.relative_attention(**x, rel_ids=ids, **kw)


def call(bk, x, **kw):
    arrays = {n: bk.array(a) for n, a in x.items()}
    return bk.numpy(bk.lib.relative_attention(**arrays, **bk._convert_kw(kw)))


def grads(bk, x, cot, **kw):
    """Output and d(sum(out * cot)) / d(input) for every array in ``x`` (alibi_slopes included)."""
    kw = bk._convert_kw(kw)
    if bk.name == "torch":
        arrays = {n: bk.array(a).requires_grad_(True) for n, a in x.items()}
        out = bk.lib.relative_attention(**arrays, **kw)
        (out * bk.array(cot)).sum().backward()
        return bk.numpy(out), {n: bk.numpy(t.grad) for n, t in arrays.items()}

    def f(arrays):
        out = bk.lib.relative_attention(**arrays, **kw)
        return (out * cot).sum(), out

    (_, out), g = bk.jax.jit(bk.jax.value_and_grad(f, has_aux=True))({n: bk.array(a) for n, a in x.items()})
    return bk.numpy(out), {n: bk.numpy(a) for n, a in g.items()}


def paths_run(bk, x, paths=("einsum", "blockwise", "shaw"), **kw):
    """{path: output} for every path of ``paths`` that accepts the call (a forced path that cannot says why)."""
    out = {}
    for impl in paths:
        try:
            out[impl] = call(bk, x, implementation=impl, **kw)
        except ValueError as e:
            assert f"implementation='{impl}' needs" in str(e), e
    return out


@pytest.fixture
def small_blocks(bk, monkeypatch):
    """Query blocks of 2 rows, so the blockwise path shifts q_offset and cuts the mask per block."""
    monkeypatch.setattr(importlib.import_module(f"relattn_{bk.name}.blockwise"), "BLOCK_ROWS", 2)


# --- every scheme x term x grouping x visibility against the oracle -------------------------------

# (terms, N_kv), N = 4. The terms add up in the logits and the output, so the case with all five
# fails if any one of them is wrong; "kv" alone is the form that the Shaw paths take.
GRID = [("kv", 2), ("kqvba", 4), ("kqvba", 1)]


@pytest.mark.parametrize("terms,N_kv", GRID, ids=[f"{t}-kv{n}" for t, n in GRID])
@pytest.mark.parametrize("name", list(SCHEMES))
def test_schemes_and_terms_match_the_oracle_on_every_path(bk, small_blocks, name, terms, N_kv):
    """einsum and shaw (where it runs) on every visibility; blockwise (blocks of 2 rows, each a fresh
    compile in JAX) on the hardest one: a mask, causal and a q_offset other than S - T."""
    rng = np.random.default_rng(_seed(name, terms, N_kv))
    s = make_scheme(bk, name)
    x = inputs(rng, s.num_ids, terms, N_kv, per_head=N_kv == 4)  # N_kv = 1: rel_q and rel_v per head
    for vis in VISIBILITY:
        kw = visibility(rng, vis)
        ref = expected(x, name, **kw)
        paths = ("einsum", "blockwise", "shaw") if vis == "causal-offset" else ("einsum", "shaw")
        got = paths_run(bk, x, paths, scheme=s, **kw)
        assert "einsum" in got and ("blockwise" in got) == (vis == "causal-offset"), vis
        if vis in ("none", "pad"):  # the Shaw paths: rel_k / rel_v only; JAX's takes the Shaw scheme only
            assert ("shaw" in got) == (terms == "kv" and (bk.name == "torch" or name == "shaw-2")), (vis, set(got))
        for impl, out in got.items():
            assert_close(out, ref)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_gradients_match_finite_differences_of_the_oracle(bk, name):
    """All eight inputs (slopes included), N_kv = 2 or 1 by scheme; blockwise on half the schemes
    (its gradient compiles for seconds in JAX)."""
    N_kv = 2 if list(SCHEMES).index(name) % 2 else 1
    rng = np.random.default_rng(_seed(name, N_kv, "grad"))
    s = make_scheme(bk, name)
    T_, S_ = 3, 4
    x = inputs(rng, s.num_ids, "kqvba", N_kv, T=T_, S=S_)
    kw = dict(mask=rng.random((B, 1, T_, S_)) < 0.8, is_causal=True, scale=0.8)
    cot = rng.standard_normal((B, T_, N, H))
    paths = ("einsum", "blockwise") if N_kv == 1 else ("einsum",)
    runs = {impl: grads(bk, x, cot, scheme=s, implementation=impl, **kw) for impl in paths}
    eps = 1e-6
    for name_in in x:
        d = rng.standard_normal(x[name_in].shape)
        plus = expected({**x, name_in: x[name_in] + eps * d}, name, T=T_, S=S_, **kw)
        minus = expected({**x, name_in: x[name_in] - eps * d}, name, T=T_, S=S_, **kw)
        numeric = ((plus - minus) * cot).sum() / (2 * eps)
        for impl, (_, g) in runs.items():
            assert abs(numeric - (g[name_in] * d).sum()) <= allowed_error(numeric, 1e-7), (impl, name_in)
            assert np.abs(g[name_in]).max() > 0, (impl, name_in)


@pytest.mark.parametrize("name", ["t5-8-12-causal", "deberta-4-6", "bert-4"])
def test_torch_and_jax_agree_on_the_same_inputs(name):
    t, j = backend("torch"), backend("jax")
    rng = np.random.default_rng(_seed(name, "xfw"))
    x = inputs(rng, make_scheme(t, name).num_ids, "kqvba", 2)
    kw = dict(mask=rng.random((B, 1, T, S)) < 0.8, is_causal=True, q_offset=3)
    cot = rng.standard_normal((B, T, N, H))
    (out_t, g_t), (out_j, g_j) = (grads(bk, x, cot, scheme=make_scheme(bk, name), **kw) for bk in (t, j))
    assert_close(out_t, out_j)
    assert_close(out_t, expected(x, name, **kw))
    for n in x:
        assert_close(g_t[n], g_j[n])


# --- the banded torch path with schemes, ShawBuckets as max_distance ------------------------------

@pytest.mark.parametrize("name", ["t5-8-16-bidir", "deberta-4-6", "bert-4", "t5-8-12-causal"])
@pytest.mark.parametrize("vis", ["none", "pad-causal"])
def test_torch_banded_path_runs_schemes_with_tails(name, vis):
    """At T = S = 40 every scheme's shaw_width is below S, so the band, both tails and the expanded
    tables all take part; outputs and gradients equal the einsum path's (float64, 1e-12)."""
    t = backend("torch")
    rng = np.random.default_rng(_seed(name, vis, "band"))
    s = make_scheme(t, name)
    x = inputs(rng, s.num_ids, "kv", 2, T=40, S=40)
    lengths = np.array([40, 31])[:, None, None, None]
    kw = {} if vis == "none" else dict(mask=np.arange(40)[None, None, None, :] < lengths, is_causal=True)
    assert t.lib.buckets.shaw_width(s, 40, 40, 0) < 39
    cot = rng.standard_normal((B, 40, N, H))
    out_b, g_b = grads(t, x, cot, scheme=s, implementation="shaw", **kw)
    out_e, g_e = grads(t, x, cot, scheme=s, implementation="einsum", **kw)
    assert_close(out_b, out_e)
    for n in x:
        assert_close(g_b[n], g_e[n])


def test_torch_auto_takes_the_banded_path_for_schemes_past_the_crossover():
    torch = pytest.importorskip("torch")
    from relattn_torch import choose_implementation
    from relattn_torch.einsum import AttentionArgs

    q = torch.zeros(2, 1024, 8, 1)
    s = backend("torch").lib.T5Buckets(32, 128)  # shaw_width 91 here: a band of 183 keys
    args = AttentionArgs(rel_k=torch.zeros(32, 1), scheme=s, q_offset=0)
    assert choose_implementation(q, q, q, args).name == "shaw"
    for size in (16, 512):  # below the logits crossover; S < 3 band widths
        small = torch.zeros(2, size, 8, 1)
        assert choose_implementation(small, small, small, args).name == "einsum"
    with_bias = AttentionArgs(rel_bias=torch.zeros(32, 8), scheme=s, q_offset=0)
    assert choose_implementation(q, q, q, with_bias).name == "einsum"


def test_shaw_buckets_are_max_distance_bit_for_bit(bk):
    rng = np.random.default_rng(40)
    x = inputs(rng, 5, "kv", 2)
    for impl in (None, "einsum", "blockwise", "shaw"):
        for kw in ({}, {"is_causal": True, "q_offset": 3}):
            a = call(bk, x, scheme=bk.lib.ShawBuckets(2), implementation=impl, **kw)
            assert np.array_equal(a, call(bk, x, max_distance=2, implementation=impl, **kw)), (impl, kw)


def test_offsets_as_arrays_and_traced(bk):
    """q_offset as a 0-d integer tensor / array (and traced under jax.jit) moves the scheme's ids and ALiBi's
    distances alike."""
    rng = np.random.default_rng(41)
    s = make_scheme(bk, "t5-8-16-bidir")
    x = inputs(rng, 8, "kba", 2)
    ref = expected(x, "t5-8-16-bidir", q_offset=-2)
    off = bk.torch.tensor(-2) if bk.name == "torch" else bk.jnp.asarray(-2)  # 0-d
    assert_close(call(bk, x, scheme=s, q_offset=off), ref)
    if bk.name == "jax":
        arrays = {n: bk.array(a) for n, a in x.items()}
        f = bk.jax.jit(lambda off: bk.lib.relative_attention(**arrays, scheme=s, q_offset=off))
        assert_close(np.asarray(f(bk.jnp.asarray(-2))), ref)


# --- ALiBi and grouped heads, literally -----------------------------------------------------------

def test_alibi_alone_is_a_distance_penalty(bk):
    """With q = 0 only ALiBi decides the weights: softmax_j(-m_n |j - i - q_offset|); slopes of 0 change nothing."""
    rng = np.random.default_rng(42)
    x = inputs(rng, 1, "a", N)
    x["q"] = np.zeros_like(x["q"])
    d = np.abs(np.arange(S)[None, :] - np.arange(T)[:, None] - (S - T))  # [T, S]
    w = np.exp(-x["alibi_slopes"][:, None, None] * d)  # [N, T, S]
    w /= w.sum(-1, keepdims=True)
    assert_close(call(bk, x), np.einsum("nts,bsnh->btnh", w, x["v"]))
    plain = {n: x[n] for n in "qkv"}
    assert_close(call(bk, {**plain, "alibi_slopes": np.zeros(N)}), call(bk, plain))
    x["q"] = rng.standard_normal(x["q"].shape)
    for kw in ({}, {"is_causal": True}, {"mask": rng.random((B, N, T, S)) < 0.7, "q_offset": -1}):
        assert_close(call(bk, x, **kw), oracle.relative_attention(**x, **kw))


def test_grouped_heads_read_their_group_in_place(bk):
    """k, v with N_kv heads equal the call with each head repeated G times in place (HF repeat_kv order)."""
    rng = np.random.default_rng(43)
    x = inputs(rng, 5, "kqvb", 2)
    full = {**x, "k": np.repeat(x["k"], 2, axis=2), "v": np.repeat(x["v"], 2, axis=2)}
    for impl in ("einsum", "blockwise", "shaw"):
        kw = dict(max_distance=2, implementation=impl) if impl != "shaw" else dict(max_distance=2)
        assert_close(call(bk, x, **kw), call(bk, full, **kw))
    kv_only = {n: x[n] for n in ("q", "k", "v", "rel_k", "rel_v")}
    assert_close(call(bk, kv_only, max_distance=2, implementation="shaw"),
                 call(bk, {**kv_only, "k": full["k"], "v": full["v"]}, max_distance=2, implementation="shaw"))


# --- negative controls: the comparisons can fail -------------------------------------------------

def _far(a, b) -> bool:
    return np.abs(a - b).max() > 100 * allowed_error(b)


def test_negative_controls(bk):
    rng = np.random.default_rng(44)
    s = make_scheme(bk, "t5-8-16-bidir")
    x = inputs(rng, 8, "kqvb", 2)
    ref = expected(x, "t5-8-16-bidir")
    assert_close(call(bk, x, scheme=s), ref)
    mirrored = {**x, **{n: x[n][::-1].copy() for n in ("rel_k", "rel_v", "rel_q", "rel_bias")}}
    assert _far(call(bk, mirrored, scheme=s), ref)  # an unreversed / reversed table
    ids6 = oracle.scheme_ids(lambda r: oracle.t5_bucket(r, 6, 16, True), T, S, S - T)
    assert _far(call(bk, x, scheme=s), oracle.relative_attention(**x, rel_ids=ids6))  # a wrong bucket count
    tiled = {**x, "k": np.tile(x["k"], (1, 1, 2, 1)), "v": np.tile(x["v"], (1, 1, 2, 1))}  # head n -> n % N_kv
    assert _far(call(bk, x, scheme=s), expected(tiled, "t5-8-16-bidir"))
    a = inputs(rng, 1, "a", N)
    assert _far(call(bk, {**a, "alibi_slopes": -a["alibi_slopes"]}), oracle.relative_attention(**a))


# --- errors ---------------------------------------------------------------------------------------

ERRORS = [  # keywords of the call (tables by shape), error type, message
    (dict(scheme="t5", rel_bias=(8, N), rel_ids=True), ValueError,
     r"pass either scheme= \(ids from a bucket scheme\) or rel_ids, not both"),
    (dict(scheme="t5", rel_bias=(8, N), max_distance=2), ValueError, r"pass either scheme= or max_distance"),
    (dict(scheme="t5", rel_bias=(7, N)), ValueError,
     r"rel_bias must have R = scheme.num_ids = 8 rows for T5Buckets\(num_buckets=8, max_distance=16, "
     r"bidirectional=True\), got shape \[7, 4\] \(7 rows\)"),
    (dict(scheme="t5", rel_k=(9, N, H)), ValueError, r"rel_k must have R = scheme.num_ids = 8 rows"),
    (dict(scheme="t5", rel_q=(8, H + 1)), ValueError, r"rel_q \(relation table.*got shape \[8, 4\]"),
    (dict(scheme="shaw", rel_v=(4, H)), ValueError, r"rel_v must have R = scheme.num_ids = 5 rows for ShawBuckets"),
    (dict(scheme="t5"), ValueError, r"scheme= was given but rel_k, rel_v, rel_q and rel_bias are all None"),
    (dict(scheme=3, rel_bias=(8, N)), TypeError,
     r"scheme must be None, ShawBuckets, T5Buckets, DebertaBuckets or BertBuckets, got builtins.int"),
    (dict(N_kv=3), ValueError, r"k and v must have N_kv heads with N % N_kv == 0 .*got N = 4 query heads and "
                               r"N_kv = 3 in k \[2, 7, 3, 3\]"),
    (dict(N_kv=8), ValueError, r"got N = 4 query heads and N_kv = 8"),
    (dict(v_heads=2), ValueError, r"k and v must have the same shape"),
    (dict(alibi_slopes=(N + 1,)), ValueError, r"alibi_slopes must be \[N\] = \[4\] \(one slope per query head\), "
                                              r"got shape \[5\]"),
    (dict(alibi_slopes=(1, N)), ValueError, r"alibi_slopes must be \[N\] = \[4\].*got shape \[1, 4\]"),
    (dict(alibi_slopes="nan"), ValueError, r"alibi_slopes must be finite, got a NaN or inf slope"),
    (dict(alibi_slopes="float32"), TypeError,
     r"alibi_slopes must have the same dtype as q \(.*float64\), got .*float32"),
    (dict(alibi_slopes="list"), TypeError, r"alibi_slopes must be a (torch.Tensor|jax.Array or numpy.ndarray) or None"),
    (dict(q_offset=1), ValueError, r"q_offset describes relative positions and needs max_distance, scheme= or "
                                   r"alibi_slopes"),
    (dict(alibi_slopes=(N,), implementation="shaw", max_distance=1, rel_k=(3, H)), ValueError,
     r"implementation='shaw' needs alibi_slopes=None \(the einsum and blockwise paths take them\)"),
]


@pytest.mark.parametrize("kw,kind,match", ERRORS, ids=[m[:40] for _, _, m in ERRORS])
def test_errors(bk, kw, kind, match):
    kw = dict(kw)
    rng = np.random.default_rng(0)
    N_kv = kw.pop("N_kv", N)
    x = {"q": bk.array(rng.standard_normal((B, T, N, H))), "k": bk.array(rng.standard_normal((B, S, N_kv, H))),
         "v": bk.array(rng.standard_normal((B, S, kw.pop("v_heads", N_kv), H)))}
    for name in ("rel_k", "rel_v", "rel_q", "rel_bias"):
        if name in kw:
            x[name] = bk.array(rng.standard_normal(kw.pop(name)))
    scheme = kw.pop("scheme", None)
    if scheme is not None:
        kw["scheme"] = {"t5": bk.lib.T5Buckets(8, 16), "shaw": bk.lib.ShawBuckets(2)}.get(scheme, scheme)
    if kw.pop("rel_ids", False):
        kw["rel_ids"] = bk.array(np.zeros((T, S), np.int64))
    slopes = kw.pop("alibi_slopes", None)
    if slopes is not None:
        special = {"nan": bk.array(np.array([0.5, np.nan, 0.1, 0.2])), "list": [0.1] * N,
                   "float32": bk.array(np.ones(N), "float32")}
        kw["alibi_slopes"] = special[slopes] if isinstance(slopes, str) else bk.array(rng.random(slopes))
    with pytest.raises(kind, match=match):
        bk.lib.relative_attention(**x, **kw)


# --- the fused kernels through relative_attention -------------------------------------------------

def test_relative_attention_runs_the_fused_kernels_with_the_family(bk, monkeypatch):
    """implementation="fused" passes the scheme, rel_q, rel_bias and grouped k, v on to the kernel (here in
    its interpreter, float32): equal to the oracle within float32 rounding; alibi_slopes is refused."""
    if bk.name == "torch":
        pytest.importorskip("triton")
        if bk.lib.fused.unavailable(bk.array(np.zeros(1))) is not None:
            pytest.skip("triton's interpreter is not on in this process")
    else:
        monkeypatch.setenv("RELATTN_PALLAS_INTERPRET", "1")
    rng = np.random.default_rng(45)
    s = make_scheme(bk, "t5-8-16-bidir")
    x = inputs(rng, 8, "kqvb", 2)
    kw = dict(mask=rng.random((B, 1, T, S)) < 0.8, is_causal=True, q_offset=3)
    got = bk.numpy(bk.lib.relative_attention(**{n: bk.array(a, "float32") for n, a in x.items()}, scheme=s,
                                             implementation="fused", **bk._convert_kw(kw)))
    ref = expected(x, "t5-8-16-bidir", **kw)
    assert np.abs(got - ref).max() <= 2e-5 * max(1.0, np.abs(ref).max())
    slopes = bk.array(rng.random(N), "float32")
    with pytest.raises(ValueError, match=r"implementation='fused' needs alibi_slopes=None"):
        bk.lib.relative_attention(**{n: bk.array(a, "float32") for n, a in x.items()}, scheme=s, alibi_slopes=slopes,
                                  implementation="fused")
