"""RelativeMultiHeadAttention's family options (issue 16) in both frameworks.

scheme=, relative_queries (rel_q), relative_bias (rel_bias), num_kv_heads (grouped k, v),
shared_relative_table (one rel_kv) and alibi_slopes: each against the float64 oracle from the
same named weights (ids from the oracle's own bucket transcriptions), torch vs JAX by name,
prefill + decode == full forward through the KV cache (sized by N_kv), the weight file across
frameworks, and the error paths. Small sizes, fixed seeds.
"""

from __future__ import annotations

import importlib
import importlib.util

import numpy as np
import pytest

from . import oracle
from .backends import backend
from .numerics import assert_close, relative_error

E, N, H = 12, 4, 3

# name -> (module options; scheme as (class name, args), the oracle's bucket of one relative position)
CONFIGS = {
    "t5 bias, bidirectional": dict(
        kw=dict(relative_bias=True, relative_keys=False, relative_values=False),
        scheme=("T5Buckets", (8, 16, True)), bucket=lambda d: oracle.t5_bucket(d, 8, 16, True)),
    "t5 bias, causal": dict(
        kw=dict(relative_bias=True, relative_keys=False, relative_values=False),
        scheme=("T5Buckets", (6, 12, False)), bucket=lambda d: oracle.t5_bucket(d, 6, 12, False)),
    "deberta c2p + p2c, per head": dict(
        kw=dict(relative_queries=True, relative_values=False, share_relative_heads=False),
        scheme=("DebertaBuckets", (4, 8)), bucket=lambda d: oracle.deberta_bucket(d, 4, 8)),
    "bert key_query": dict(
        kw=dict(relative_queries=True, relative_values=False),
        scheme=("BertBuckets", (5,)), bucket=lambda d: oracle.bert_bucket(d, 5)),
    "shaw, every term": dict(
        kw=dict(max_distance=2, relative_queries=True, relative_bias=True, share_relative_heads=False),
        scheme=None, bucket=lambda d: min(max(d, -2), 2) + 2),
    "gqa 2 kv heads": dict(kw=dict(max_distance=3, num_kv_heads=2), scheme=None,
                           bucket=lambda d: min(max(d, -3), 3) + 3),
    "gqa 1 kv head, t5": dict(
        kw=dict(num_kv_heads=1, relative_bias=True, relative_queries=True),
        scheme=("T5Buckets", (8, 16, True)), bucket=lambda d: oracle.t5_bucket(d, 8, 16, True)),
    "shared table": dict(kw=dict(max_distance=2, shared_relative_table=True), scheme=None,
                         bucket=lambda d: min(max(d, -2), 2) + 2),
    "shared table, deberta, gqa": dict(
        kw=dict(shared_relative_table=True, num_kv_heads=2, share_relative_heads=False),
        scheme=("DebertaBuckets", (4, 8)), bucket=lambda d: oracle.deberta_bucket(d, 4, 8)),
    "alibi alone": dict(kw=dict(alibi_slopes=True, relative_keys=False, relative_values=False), scheme=None,
                        bucket=None),
    "alibi + t5 bias + gqa": dict(
        kw=dict(alibi_slopes=(0.5, -0.25, 0.125, 1.0), relative_bias=True, relative_keys=False,
                relative_values=False, num_kv_heads=2),
        scheme=("T5Buckets", (8, 16, True)), bucket=lambda d: oracle.t5_bucket(d, 8, 16, True)),
}


def make(b, name, params=None, **extra):
    """The config's float64 module in backend ``b``; parameters set by name when given."""
    cfg = CONFIGS[name]
    kw = dict(cfg["kw"], **extra)
    if cfg["scheme"] is not None:
        cls, args = cfg["scheme"]
        kw["scheme"] = getattr(b.lib, cls)(*args)
    m = b.module("RelativeMultiHeadAttention", E, N, head_dim=H, **kw)
    if params is not None:
        b.set_params(m, params)
    return m


def random_params(b, module, seed=0) -> dict:
    """Unit-scale values for every parameter, drawn in sorted name order (the same in both frameworks)."""
    rng = np.random.default_rng(seed)
    shapes = {n: p.shape for n, p in b.params(module).items()}
    return {n: rng.standard_normal(shapes[n]) * 0.5 for n in sorted(shapes)}


def reference(name, params, query, key=None, *, mask=None, is_causal=False, q_offset=None):
    """The oracle of the module: projections by einsum, ids by the oracle's bucket, the oracle's attention."""
    cfg, p = CONFIGS[name], params
    key = query if key is None else key

    def proj(x, w, b):
        return np.einsum("bte,enh->btnh", x, p[w]) + p[b]

    q, k, v = proj(query, "w_q", "b_q"), proj(key, "w_k", "b_k"), proj(key, "w_v", "b_v")
    T, S = query.shape[1], key.shape[1]
    offset = S - T if q_offset is None else q_offset
    ids = None if cfg["bucket"] is None else oracle.scheme_ids(cfg["bucket"], T, S, offset)
    rel_k, rel_v = (p["rel_kv"], p["rel_kv"]) if "rel_kv" in p else (p.get("rel_k"), p.get("rel_v"))
    slopes = cfg["kw"].get("alibi_slopes")
    slopes = ALIBI_4 if slopes is True else slopes
    z = oracle.relative_attention(q, k, v, rel_k, rel_v, rel_ids=ids, rel_q=p.get("rel_q"), rel_bias=p.get("rel_bias"),
                                  mask=mask, is_causal=is_causal, q_offset=offset, alibi_slopes=slopes)
    return np.einsum("btnh,nhe->bte", z, p["w_o"]) + p["b_o"]


ALIBI_4 = (2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8)  # the ALiBi paper's slopes for 4 heads, written out


def inputs(seed=1, B=2, T=5, S=None):
    rng = np.random.default_rng(seed)
    query = rng.standard_normal((B, T, E))
    return query, (None if S is None else rng.standard_normal((B, S, E)))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("is_causal", [False, True])
def test_module_matches_oracle(bk, name, is_causal):
    m = make(bk, name)
    params = random_params(bk, m)
    bk.set_params(m, params)
    query, _ = inputs()
    mask = np.ones((2, 1, 1, 5), bool)
    mask[1, ..., 0] = False
    out = bk.call(m, query, mask=mask, is_causal=is_causal)
    assert_close(out, reference(name, params, query, mask=mask, is_causal=is_causal))


@pytest.mark.parametrize("name", ["t5 bias, causal", "gqa 1 kv head, t5", "alibi + t5 bias + gqa", "bert key_query"])
@pytest.mark.parametrize("T,S,q_offset", [(3, 7, None), (6, 3, None), (3, 7, 1)])
def test_cross_attention_and_q_offset(bk, name, T, S, q_offset):
    """T != S: the ids and the ALiBi distances use q_offset (default S - T) like the oracle."""
    m = make(bk, name)
    params = random_params(bk, m, seed=3)
    bk.set_params(m, params)
    query, key = inputs(seed=4, T=T, S=S)
    out = bk.call(m, query, key, q_offset=q_offset)
    assert_close(out, reference(name, params, query, key, q_offset=q_offset))


def test_parameters_names_and_shapes(bk):
    """The weight-file names: rel_kv alone for a shared table, rel_q and rel_bias, N_kv-head k/v projections."""
    t5 = bk.params(make(bk, "gqa 1 kv head, t5"))
    assert sorted(t5) == ["b_k", "b_o", "b_q", "b_v", "rel_bias", "rel_k", "rel_q", "rel_v", "w_k", "w_o", "w_q", "w_v"]
    assert t5["rel_bias"].shape == (8, N) and t5["rel_q"].shape == (8, H) and t5["rel_k"].shape == (8, H)
    assert t5["w_k"].shape == (E, 1, H) and t5["w_v"].shape == (E, 1, H) and t5["b_k"].shape == (1, H)
    assert t5["w_q"].shape == (E, N, H) and t5["b_q"].shape == (N, H) and t5["w_o"].shape == (N, H, E)
    shared = bk.params(make(bk, "shared table, deberta, gqa"))
    assert "rel_k" not in shared and "rel_v" not in shared and shared["rel_kv"].shape == (8, N, H)
    alibi = bk.params(make(bk, "alibi alone"))
    assert sorted(alibi) == ["b_k", "b_o", "b_q", "b_v", "w_k", "w_o", "w_q", "w_v"]  # the slopes are fixed


def test_defaults_unchanged(bk):
    """No new option: the parameters of today's layer (same draws), and Shaw ids as max_distance=16."""
    m = bk.module("RelativeMultiHeadAttention", 16, 4)
    p = bk.params(m)
    assert sorted(p) == ["b_k", "b_o", "b_q", "b_v", "rel_k", "rel_v", "w_k", "w_o", "w_q", "w_v"]
    assert p["rel_k"].shape == (33, 4) and m.max_distance == 16 and m.num_kv_heads == 4
    assert m._weight_record() == {}


def test_torch_and_jax_agree_by_name_with_gradients():
    """One set of weights copied by name: same outputs and same parameter gradients in both frameworks."""
    tb, jb = backend("torch"), backend("jax")
    import torch

    for name in ["gqa 1 kv head, t5", "shared table, deberta, gqa", "alibi + t5 bias + gqa"]:
        tm = make(tb, name)
        params = random_params(tb, tm, seed=5)
        tb.set_params(tm, params)
        jm = make(jb, name, params)
        query, _ = inputs(seed=6)
        cot = np.random.default_rng(7).standard_normal((2, 5, E))
        out_t = tm(torch.from_numpy(query), is_causal=True)
        (out_t * torch.from_numpy(cot)).sum().backward()
        g_t = {n: p.grad.numpy() for n, p in tm.named_parameters()}

        def loss(m):
            return (m(jb.array(query), is_causal=True) * cot).sum()

        g_j = jb.nnx.grad(loss)(jm)
        g_j = {".".join(map(str, path)): np.asarray(v[...]) for path, v in jb.nnx.to_flat_state(g_j)}
        assert relative_error(np.asarray(jm(jb.array(query), is_causal=True)), out_t.detach().numpy()) <= 1e-12
        assert sorted(g_t) == sorted(g_j), name
        scale = max(np.abs(g).max() for g in g_t.values())  # b_k's gradient is 0 up to rounding
        for n in g_t:
            assert np.abs(g_j[n] - g_t[n]).max() <= 1e-12 * scale, (name, n)
        assert np.abs(g_j["w_k"]).max() > 1e-3 * scale


def test_shared_table_gradient_is_the_sum_of_both_uses(bk):
    """rel_kv's gradient == rel_k's + rel_v's gradients of the two-table layer holding the same table."""
    shared = make(bk, "shared table")
    params = random_params(bk, shared, seed=8)
    two = make(bk, "shared table", shared_relative_table=False)
    two_params = {n: v for n, v in params.items() if n != "rel_kv"}
    two_params.update(rel_k=params["rel_kv"], rel_v=params["rel_kv"])
    query, _ = inputs(seed=9)
    g_shared, out_shared = param_grads(bk, shared, params, query)
    g_two, out_two = param_grads(bk, two, two_params, query)
    assert_close(out_shared, out_two)
    assert_close(g_shared["rel_kv"], g_two["rel_k"] + g_two["rel_v"])
    assert relative_error(g_two["rel_k"], g_two["rel_v"]) > 1e-3  # both uses count, not one twice


def param_grads(b, module, params, query):
    """({name: d(sum(out * c))/d(param)}, out) with a fixed cotangent c."""
    b.set_params(module, params)
    cot = np.random.default_rng(10).standard_normal((query.shape[0], query.shape[1], E))
    if b.name == "torch":
        out = module(b.array(query), is_causal=True)
        (out * b.array(cot)).sum().backward()
        return {n: p.grad.numpy() for n, p in module.named_parameters()}, out.detach().numpy()
    grads = b.nnx.grad(lambda m: (m(b.array(query), is_causal=True) * cot).sum())(module)
    flat = {".".join(map(str, path)): np.asarray(v[...]) for path, v in b.nnx.to_flat_state(grads)}
    return flat, b.call(module, query, is_causal=True)


# --- the KV cache --------------------------------------------------------------------------------

def decode(b, module, x, chunks, max_length, mask=None):
    cache = module.init_cache(x.shape[0], max_length)
    kw = {} if mask is None else {"mask": b.array(mask)}
    outs, start = [], 0
    for size in chunks:
        out, cache = module(b.array(x[:, start : start + size]), cache=cache, **kw)
        outs.append(b.numpy(out))
        start += size
    return np.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_and_decode_equal_the_full_forward(bk, name):
    """Cache buffers [B, max_length, N_kv, H]; prefill + token steps and other chunks == full causal pass."""
    m = make(bk, name)
    params = random_params(bk, m, seed=11)
    bk.set_params(m, params)
    x = np.random.default_rng(12).standard_normal((2, 7, E))
    full = bk.call(m, x, is_causal=True)
    assert_close(full, reference(name, params, x, is_causal=True))
    stepped, cache = decode(bk, m, x, [3, 1, 1, 1, 1], max_length=9)
    chunked, _ = decode(bk, m, x, [2, 4, 1], max_length=7)
    assert relative_error(stepped, full) <= 1e-12 and relative_error(chunked, full) <= 1e-12
    assert tuple(cache.k.shape) == (2, 9, m.num_kv_heads, H) and int(cache.length) == 7


def test_gqa_cache_takes_a_per_query_head_mask(bk):
    """With grouped heads the cached call's mask may still carry the N query heads [B, N, T, max_length]."""
    m = make(bk, "gqa 2 kv heads")
    params = random_params(bk, m, seed=13)
    bk.set_params(m, params)
    x = np.random.default_rng(14).standard_normal((1, 4, E))
    mask = np.ones((1, N, 1, 4), bool)
    mask[0, 1, 0, 0] = False  # head 1 never sees key 0
    out, _ = decode(bk, m, x, [1, 1, 1, 1], max_length=4, mask=mask)
    full = bk.call(m, x, is_causal=True, mask=mask[:, :, :, :4])
    assert_close(out, full)
    assert_close(full, reference("gqa 2 kv heads", params, x, is_causal=True, mask=mask))


def test_jitted_decode_step_with_a_traced_offset():
    """JAX: one jitted step over the cache (q_offset a traced length) for a T5 + GQA + ALiBi layer."""
    b = backend("jax")
    name = "alibi + t5 bias + gqa"
    m = make(b, name)
    params = random_params(b, m, seed=15)
    b.set_params(m, params)
    x = np.random.default_rng(16).standard_normal((2, 6, E))
    traces = []

    @b.nnx.jit
    def step(module, token, cache):
        traces.append(1)
        return module(token, cache=cache)

    cache, outs = m.init_cache(2, 6), []
    for t in range(6):
        out, cache = step(m, b.array(x[:, t : t + 1]), cache)
        outs.append(np.asarray(out))
    assert len(traces) == 1
    assert relative_error(np.concatenate(outs, 1), reference(name, params, x, is_causal=True)) <= 1e-12


# --- the weight file -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("src,dst", [("torch", "jax"), ("jax", "torch")])
def test_weight_file_across_frameworks(tmp_path, name, src, dst):
    """save_weights in one framework, load_weights in the other: same outputs, same bytes back."""
    a, b = backend(src), backend(dst)
    ma = make(a, name)
    params = random_params(a, ma, seed=17)
    a.set_params(ma, params)
    a.lib.save_weights(ma, tmp_path / "a.safetensors")
    mb = make(b, name)
    b.lib.load_weights(mb, tmp_path / "a.safetensors")
    x = np.random.default_rng(18).standard_normal((2, 5, E))
    assert relative_error(b.call(mb, x, is_causal=True), a.call(ma, x, is_causal=True)) <= 1e-12
    b.lib.save_weights(mb, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_weight_file_records_the_options(tmp_path, bk):
    import safetensors

    bk.lib.save_weights(make(bk, "gqa 1 kv head, t5"), tmp_path / "w.safetensors")
    with safetensors.safe_open(tmp_path / "w.safetensors", "np") as f:
        meta = f.metadata()
    assert meta == {"format": 'relattn-v1; attention={"":{"num_kv_heads":1,"relative_bias":true,'
                              '"relative_queries":true,"scheme":"T5Buckets(num_buckets=8, max_distance=16, '
                              'bidirectional=True)"}}'}
    bk.lib.save_weights(bk.module("RelativeMultiHeadAttention", E, N), tmp_path / "plain.safetensors")
    with safetensors.safe_open(tmp_path / "plain.safetensors", "np") as f:
        assert f.metadata() == {"format": "relattn-v1"}  # today's files, byte for byte


# (file config, loading config, a phrase the refusal must hold); every pair has equal names and shapes
# where it can, so only the recorded options tell them apart.
MISMATCHES = [
    (dict(scheme=("T5Buckets", (9, 16, True)), relative_bias=True),
     dict(max_distance=4, relative_bias=True), "scheme: the module has the default, the file was saved with scheme="),
    (dict(scheme=("T5Buckets", (8, 16, True)), relative_bias=True),
     dict(scheme=("T5Buckets", (8, 16, False)), relative_bias=True), "bidirectional=True"),
    (dict(max_distance=2, num_kv_heads=2), dict(max_distance=2), "num_kv_heads: the module has the default"),
    (dict(max_distance=2, shared_relative_table=True), dict(max_distance=2), "shared_relative_table=True"),
    (dict(max_distance=2, alibi_slopes=True), dict(max_distance=2, alibi_slopes=(1.0, 1.0, 1.0, 1.0)),
     "alibi_slopes=[0.25, 0.0625"),
    (dict(max_distance=2), dict(max_distance=2, relative_queries=True), "relative_queries: the module has "
                                                                         "relative_queries=True, the file"),
]


def build(b, kw):
    kw = dict(kw)
    if "scheme" in kw:
        cls, args = kw["scheme"]
        kw["scheme"] = getattr(b.lib, cls)(*args)
    return b.module("RelativeMultiHeadAttention", E, N, head_dim=H, **kw)


@pytest.mark.parametrize("case", range(len(MISMATCHES)))
@pytest.mark.parametrize("src,dst", [("torch", "jax"), ("jax", "torch")])
def test_a_file_of_another_configuration_is_refused(tmp_path, case, src, dst):
    saved, loading, phrase = MISMATCHES[case]
    a, b = backend(src), backend(dst)
    a.lib.save_weights(build(a, saved), tmp_path / "w.safetensors")
    m = build(b, loading)
    before = b.params(m)
    for strict in (True, False):
        with pytest.raises(ValueError, match="configured differently") as err:
            b.lib.load_weights(m, tmp_path / "w.safetensors", strict=strict)
        assert phrase in str(err.value)
    after = b.params(m)
    assert all(np.array_equal(before[n], after[n]) for n in before)  # nothing loaded
    b.lib.load_weights(build(b, saved), tmp_path / "w.safetensors")  # its own configuration loads


def test_nested_layers_are_recorded_by_name(tmp_path):
    """A DecoderLM's layers are recorded under their names (blocks.0.attn) and checked one by one."""
    tb, jb = backend("torch"), backend("jax")
    cfg = dict(vocab_size=11, embed_dim=8, num_heads=4, num_layers=2, mlp_dim=16, num_kv_heads=2)
    t = tb.lib.DecoderLM(tb.lib.DecoderConfig(**cfg, scheme=tb.lib.T5Buckets(8, 16, False)))
    tb.lib.save_weights(t, tmp_path / "lm.safetensors")
    j = jb.lib.DecoderLM(jb.lib.DecoderConfig(**cfg, scheme=jb.lib.T5Buckets(8, 16, False)), rngs=jb.nnx.Rngs(0))
    jb.lib.load_weights(j, tmp_path / "lm.safetensors")
    tokens = np.random.default_rng(19).integers(0, 11, (2, 6))
    import torch

    out_t = t(torch.from_numpy(tokens)).detach().numpy()
    assert relative_error(np.asarray(j(jb.array(tokens))), out_t) <= 1e-5  # float32 models
    other = jb.lib.DecoderLM(jb.lib.DecoderConfig(**cfg, scheme=jb.lib.T5Buckets(8, 16, True)), rngs=jb.nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"blocks\.0\.attn: scheme") as err:
        jb.lib.load_weights(other, tmp_path / "lm.safetensors")
    assert "blocks.1.attn: scheme" in str(err.value)


# --- errors --------------------------------------------------------------------------------------

ERRORS = [
    (dict(num_kv_heads=3), ValueError, "num_heads must be a multiple of num_kv_heads"),
    (dict(num_kv_heads=0), ValueError, "num_kv_heads must be an int >= 1"),
    (dict(max_distance=4, scheme=("T5Buckets", (8, 16, True))), ValueError, "either scheme= or max_distance"),
    (dict(scheme="t5"), TypeError, "scheme must be ShawBuckets"),
    (dict(shared_relative_table=True, relative_values=False), ValueError, "needs relative_keys=True and"),
    (dict(alibi_slopes=(1.0, 2.0)), ValueError, "alibi_slopes must hold num_heads = 4"),
    (dict(alibi_slopes=(1.0, 2.0, float("nan"), 1.0)), ValueError, "alibi_slopes must be finite"),
    (dict(relative_bias="yes"), TypeError, "relative_bias must be a bool"),
]


@pytest.mark.parametrize("case", range(len(ERRORS)))
def test_constructor_errors(bk, case):
    kw, kind, phrase = ERRORS[case]
    kw = dict(kw)
    if isinstance(kw.get("scheme"), tuple):
        cls, args = kw["scheme"]
        kw["scheme"] = getattr(bk.lib, cls)(*args)
    with pytest.raises(kind, match=phrase):
        bk.module("RelativeMultiHeadAttention", E, N, head_dim=H, **kw)


def test_alibi_slopes_rule():
    """True gives the ALiBi paper's slopes (BLOOM's rule for N not a power of two)."""
    # the twins are byte-identical: read whichever package this environment has
    have_torch = importlib.util.find_spec("torch") is not None
    _module_spec = importlib.import_module("relattn_torch._module_spec" if have_torch else "relattn_jax._module_spec")

    assert _module_spec.alibi_slopes(4) == ALIBI_4
    assert _module_spec.alibi_slopes(8) == tuple(2.0 ** -(i + 1) for i in range(8))
    # 6 heads: the 4-head slopes, then 2^-1 and 2^-3 from the 8-head ones (BLOOM's build_alibi_tensor)
    assert _module_spec.alibi_slopes(6) == (*ALIBI_4, 2.0**-1, 2.0**-3)


def test_generate_with_a_family_decoder(tmp_path):
    """A DecoderLM with grouped heads, DeBERTa ids, a^Q and a bias table: generate's cached greedy tokens
    are those of the uncached model fed its own output, and JAX (weights from the torch file, jitted
    scan, traced offsets) gives the same tokens."""
    tb, jb = backend("torch"), backend("jax")
    import torch

    opts = dict(vocab_size=13, embed_dim=8, num_heads=4, num_layers=2, mlp_dim=16, num_kv_heads=2,
                relative_queries=True, relative_bias=True)
    t = tb.lib.DecoderLM(tb.lib.DecoderConfig(**opts, scheme=tb.lib.DebertaBuckets(4, 8)), dtype=torch.float64)
    prompt = np.random.default_rng(20).integers(0, 13, (2, 3))
    tokens = tb.lib.generate(t.eval(), torch.from_numpy(prompt), 6).numpy()
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            logits = t(torch.from_numpy(seq)).numpy()
            seq = np.concatenate([seq, logits[:, -1].argmax(-1)[:, None]], axis=1)
    assert (seq[:, 3:] == tokens).all()
    tb.lib.save_weights(t, tmp_path / "lm.safetensors")
    j = jb.lib.DecoderLM(jb.lib.DecoderConfig(**opts, scheme=jb.lib.DebertaBuckets(4, 8)),
                         param_dtype=jb.jnp.float64, rngs=jb.nnx.Rngs(0))
    jb.lib.load_weights(j, tmp_path / "lm.safetensors")
    assert (np.asarray(jb.lib.generate(j, jb.array(prompt), 6)) == tokens).all()
