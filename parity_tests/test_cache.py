"""KV-cache decoding with exact relative positions (issue 6), in both frameworks.

The central claim: for any configuration, full causal forward == prefill +
token-by-token decode == chunked prefill + decode (float64, <= 1e-12 relative), in
each framework, across frameworks with shared weights, and against the NumPy oracle.
Then: padded batches through the mask, errors, compile-once under jax.jit and
torch.compile, and generate() (greedy and seeded sampling, scan == eager loop).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from . import oracle
from .backends import backend
from .numerics import relative_error

BACKENDS = ["torch", "jax"]
TOL = 1e-12
TRACES = {"count": 0}  # incremented by the JAX tiny LM each time its __call__ runs (= traces under jit)




def make_module(b, cfg, params=None):
    """A float64 RelativeMultiHeadAttention from a config dict; weights copied by name if given."""
    tables = cfg.get("tables", "both")
    m = b.module(
        "RelativeMultiHeadAttention", cfg["E"], cfg["N"], head_dim=cfg["H"], max_distance=cfg["max_distance"],
        relative_keys=tables in ("both", "keys"), relative_values=tables in ("both", "values"),
        share_relative_heads=cfg.get("share", True), bias=cfg.get("bias", True),
    )
    if params is not None:
        b.set_params(m, params)
    return m


def run_cached(b, module, x, chunks, *, max_length=None, mask=None):
    """x [B, L, E] through ``module`` with a cache, ``chunks`` positions per call; -> ([B, L, E], cache)."""
    cache = module.init_cache(x.shape[0], max_length or x.shape[1])
    kw = {} if mask is None else {"mask": b.array(mask)}
    outs, start = [], 0
    for size in chunks:
        out, cache = module(b.array(x[:, start : start + size]), cache=cache, **kw)
        outs.append(b.numpy(out))
        start += size
    assert start == x.shape[1]
    return np.concatenate(outs, axis=1), cache


def random_chunks(rng, L: int) -> list[int]:
    """A random split of L positions into consecutive chunks (sizes >= 1)."""
    cuts = sorted(rng.choice(np.arange(1, L), size=rng.integers(0, L), replace=False).tolist()) if L > 1 else []
    edges = [0, *cuts, L]
    return [b - a for a, b in zip(edges, edges[1:])]


semantics = dict(
    tables=st.sampled_from(["both", "keys", "values"]), share=st.booleans(), bias=st.booleans(),
    prefill=st.integers(1, 9), seed=st.integers(0, 2**16),
)
# Torch: every size random.
config_strategy = st.fixed_dictionaries(
    dict(
        B=st.integers(1, 2), L=st.integers(1, 9), N=st.integers(1, 3), H=st.sampled_from([2, 3, 4]),
        E=st.sampled_from([4, 6, 8]), max_distance=st.integers(0, 12), extra=st.integers(0, 3), **semantics,
    )
)
# JAX compiles every op for every new shape (~0.1 s each), so its sweep keeps the sizes
# fixed (those of NAMED below, so compiled ops are reused) and varies what the cache logic
# depends on: tables, layout, distance, chunking; and it runs a quarter of the examples.
fixed_size_strategy = st.fixed_dictionaries(
    dict(B=st.just(2), L=st.just(9), N=st.just(2), H=st.just(3), E=st.just(6), extra=st.just(3),
         max_distance=st.sampled_from([1, 16]), **semantics)  # < and > L
)

# Named cases that must always run: max_distance below / above the length, table layouts.
NAMED = {
    "short-range-shared-both": dict(max_distance=1, tables="both", share=True),
    "long-range-per-head-both": dict(max_distance=16, tables="both", share=False),
    "keys-only-per-head": dict(max_distance=2, tables="keys", share=False),
    "values-only-shared": dict(max_distance=3, tables="values", share=True),
    "no-bias-zero-distance": dict(max_distance=0, tables="both", share=False, bias=False),
}


def named_config(name):
    return dict(B=2, L=9, N=2, H=3, E=6, prefill=4, extra=3, seed=7, **NAMED[name])


def check_decode_paths(name, cfg, params=None):
    """Full causal forward, token-by-token, chunked prefill + decode, and the oracle agree.

    Returns the token-by-token outputs [B, L, E]."""
    b = backend(name)
    rng = np.random.default_rng(cfg["seed"])
    m = make_module(b, cfg, params)
    L, prefill = cfg["L"], min(cfg["prefill"], cfg["L"])
    x = rng.standard_normal((cfg["B"], L, cfg["E"]))
    full = b.call(m, x, is_causal=True)
    ref = oracle.multi_head_attention(b.params(m), x, max_distance=cfg["max_distance"], is_causal=True)
    assert relative_error(full, ref) <= TOL
    max_length = L + cfg["extra"]  # a buffer longer than the sequence leaves unwritten slots
    by_token, cache = run_cached(b, m, x, [prefill] + [1] * (L - prefill), max_length=max_length)
    chunked, _ = run_cached(b, m, x, random_chunks(rng, L), max_length=max_length)
    assert relative_error(by_token, full) <= TOL, "prefill + token-by-token decode != full causal forward"
    assert relative_error(chunked, full) <= TOL, "chunked prefill + decode != full causal forward"
    assert int(cache.length) == L and cache.max_length == max_length
    return by_token


@given(cfg=config_strategy)
def test_decode_equals_full_forward_random_configs_torch(cfg):
    check_decode_paths("torch", cfg)


@settings(max_examples=max(3, settings.default.max_examples // 4))
@given(cfg=fixed_size_strategy)
def test_decode_equals_full_forward_random_configs_jax_and_across(cfg):
    """JAX decode paths agree with its full forward and the oracle, and with torch on shared weights."""
    tb = backend("torch")
    params = tb.params(make_module(tb, cfg))
    t_out = check_decode_paths("torch", cfg, params)
    j_out = check_decode_paths("jax", cfg, params)
    assert relative_error(j_out, t_out) <= TOL


@pytest.mark.parametrize("case", sorted(NAMED))
@pytest.mark.parametrize("name", BACKENDS)
def test_decode_equals_full_forward_named_cases(name, case):
    check_decode_paths(name, named_config(case))


@pytest.mark.parametrize("case", sorted(NAMED))
def test_decode_across_frameworks_shared_weights(case):
    cfg = named_config(case)
    tb, jb = backend("torch"), backend("jax")
    tm = make_module(tb, cfg)
    jm = make_module(jb, cfg, tb.params(tm))
    x = np.random.default_rng(3).standard_normal((cfg["B"], cfg["L"], cfg["E"]))
    chunks = [3, 1, 2, 1, 1, 1]
    t_out, _ = run_cached(tb, tm, x, chunks, max_length=12)
    j_out, _ = run_cached(jb, jm, x, chunks, max_length=12)
    assert relative_error(j_out, t_out) <= TOL
    ref = oracle.multi_head_attention(tb.params(tm), x, max_distance=cfg["max_distance"], is_causal=True)
    assert relative_error(t_out, ref) <= TOL


def test_relative_ids_use_cache_length_literal():
    """With max_distance = 1 the ids of a query at cache length 2 over a 4-slot buffer are
    clip(j - 2) + 1 = [0, 0, 1, 2]. A one-token step at position 2 equals row 2 of the
    full forward (and the oracle with q_offset = 2), and differs from the oracle with
    q_offset = 0, the ids [1, 2, 2] of a cache bug that restarts positions at every call."""
    b = backend("torch")
    m = make_module(b, dict(E=4, N=1, H=4, max_distance=1))
    x = np.random.default_rng(0).standard_normal((1, 3, 4))
    np.testing.assert_array_equal(oracle.shaw_ids(1, 4, 1, q_offset=2), [[0, 0, 1, 2]])
    full = b.call(m, x, is_causal=True)
    out, _ = run_cached(b, m, x, [2, 1], max_length=4)
    assert relative_error(out[:, 2], full[:, 2]) <= TOL
    right = oracle.multi_head_attention(b.params(m), x[:, 2:], x, max_distance=1, q_offset=2)
    wrong = oracle.multi_head_attention(b.params(m), x[:, 2:], x, max_distance=1, q_offset=0)
    assert relative_error(out[:, 2:], right) <= TOL
    assert relative_error(wrong, right) > 1e-3


@pytest.mark.parametrize("name", BACKENDS)
def test_left_padded_batch_through_mask_is_exact(name):
    """Row 1 is left-padded by 3; a padding mask over the buffer hides the pads. Relative
    positions are shift-invariant, so its real positions equal a solo, unpadded run."""
    b = backend(name)
    cfg = named_config("long-range-per-head-both")  # sizes shared with the other tests
    m = make_module(b, cfg)
    L, pad, max_length = 9, 3, 12
    x = np.random.default_rng(1).standard_normal((2, L, 6))
    x[1, :pad] = 1e3  # garbage in the pad slots must not leak
    mask = (np.arange(max_length)[None, :] >= np.array([0, pad])[:, None])[:, None, None, :]  # [B, 1, 1, S]
    out, _ = run_cached(b, m, x, [5, 1, 1, 1, 1], max_length=max_length, mask=mask)
    solo0, _ = run_cached(b, m, x[[0, 0]], [5, 1, 1, 1, 1], max_length=max_length)
    solo1, _ = run_cached(b, m, x[[1, 1], pad:], [2, 1, 1, 1, 1], max_length=max_length)  # B=2 reuses shapes
    assert relative_error(out[0], solo0[0]) <= TOL
    assert relative_error(out[1, pad:], solo1[0]) <= TOL


@pytest.mark.parametrize("name", BACKENDS)
def test_cache_errors_name_the_argument(name):
    b = backend(name)
    m = make_module(b, dict(E=4, N=2, H=2, max_distance=2))
    x = np.random.default_rng(0).standard_normal((2, 3, 4))
    cache = m.init_cache(2, 4)
    _, cache = m(b.array(x), cache=cache)
    with pytest.raises(ValueError, match=r"cache overflow: cache length 3 \+ 3 new positions > max_length 4"):
        m(b.array(x), cache=cache)
    with pytest.raises(ValueError, match=r"cache buffers must be \[B, S, N, H\] = \[2, 5, 2, 2\].*got k \[1, 5, 2, 2\]"):
        m(b.array(x), cache=m.init_cache(1, 5))
    with pytest.raises(TypeError, match="cache dtype must be the keys' dtype"):
        m(b.array(x), cache=m.init_cache(2, 5, dtype=b.array(np.zeros(1, np.float32)).dtype))
    with pytest.raises(ValueError, match="cache is for self-attention"):
        m(b.array(x), b.array(x), cache=m.init_cache(2, 5))
    with pytest.raises(ValueError, match="q_offset must be None with cache="):
        m(b.array(x), q_offset=1, cache=m.init_cache(2, 5))
    with pytest.raises(ValueError, match="max_length must be a positive int, got 0"):
        m.init_cache(2, 0)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        m(b.array(x), cache={"k": None})


def test_torch_cache_is_functional_and_autograd_safe():
    """The old cache keeps its length; in-place (no_grad) and out-of-place (autograd)
    writes agree; gradients through a cached forward equal the full forward's."""
    torch = pytest.importorskip("torch")

    b = backend("torch")
    m = make_module(b, dict(E=6, N=2, H=3, max_distance=2, share=False))
    x = torch.from_numpy(np.random.default_rng(2).standard_normal((2, 5, 6)))
    c0 = m.init_cache(2, 6)
    with torch.no_grad():
        out_a, c1 = m(x[:, :3], cache=c0)
        out_b, _ = m(x[:, 3:], cache=c1)
    assert int(c0.length) == 0 and int(c1.length) == 3
    full = m(x, is_causal=True)
    (full**2).sum().backward()
    g_full = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    y1, c = m(x[:, :3], cache=m.init_cache(2, 6))
    y2, _ = m(x[:, 3:], cache=c)
    (torch.cat([y1, y2], 1) ** 2).sum().backward()
    assert relative_error(torch.cat([out_a, out_b], 1).numpy(), full.detach().numpy()) <= TOL
    scale = max(float(g.abs().max()) for g in g_full.values())  # b_k's gradient is exactly 0 in theory
    for n, p in m.named_parameters():
        assert float((p.grad - g_full[n]).abs().max()) <= TOL * scale, n


def test_jax_jitted_decode_step_traces_once():
    jax = pytest.importorskip("jax")
    from flax import nnx

    b = backend("jax")
    m = make_module(b, dict(E=6, N=2, H=3, max_distance=2))
    x = np.random.default_rng(4).standard_normal((2, 9, 6))
    traces = []

    @nnx.jit
    def step(module, x_t, cache):
        traces.append(1)  # runs only while tracing
        return module(x_t, cache=cache)

    out, cache = m(b.array(x[:, :3]), cache=m.init_cache(2, 9))
    outs = [b.numpy(out)]
    for t in range(3, 9):
        out, cache = step(m, b.array(x[:, t : t + 1]), cache)
        outs.append(b.numpy(out))
    assert len(traces) == 1, f"the decode step was traced {len(traces)} times"
    assert isinstance(cache.length, jax.Array) and int(cache.length) == 9
    assert relative_error(np.concatenate(outs, 1), b.call(m, x, is_causal=True)) <= TOL


def test_torch_compiled_decode_step_compiles_once():
    torch = pytest.importorskip("torch")
    from torch._dynamo.testing import CompileCounter

    b = backend("torch")
    m = make_module(b, dict(E=6, N=2, H=3, max_distance=2)).eval()
    x = torch.from_numpy(np.random.default_rng(5).standard_normal((2, 9, 6)))
    counter = CompileCounter()
    torch._dynamo.reset()
    step = torch.compile(lambda x_t, cache: m(x_t, cache=cache), backend=counter, fullgraph=True)
    with torch.no_grad():
        out, cache = m(x[:, :3], cache=m.init_cache(2, 9))
        outs = [out]
        for t in range(3, 9):
            out, cache = step(x[:, t : t + 1], cache)
            outs.append(out)
        full = m(x, is_causal=True)
    assert counter.frame_count == 1, f"compiled {counter.frame_count} times"
    assert relative_error(torch.cat(outs, 1).numpy(), full.numpy()) <= TOL



def test_overflow_under_jit_and_compile_is_as_documented():
    """No host check when traced/compiled: JAX clamps the write (length runs past
    max_length, the last slot is overwritten); torch's compiled index_copy_ raises IndexError."""
    jax = pytest.importorskip("jax")
    torch = pytest.importorskip("torch")
    from torch._dynamo.testing import CompileCounter

    from relattn_jax.cache import init_kv_cache, update_kv_cache

    jb = backend("jax")
    cache = init_kv_cache(1, 2, 1, 1, dtype=jb.jnp.float64)
    write = jax.jit(update_kv_cache)
    for value in (1.0, 2.0, 3.0):
        cache = write(cache, jb.jnp.full((1, 1, 1, 1), value), jb.jnp.full((1, 1, 1, 1), value))
    assert int(cache.length) == 3  # past max_length 2: nothing raised
    np.testing.assert_array_equal(np.asarray(cache.k).ravel(), [1.0, 3.0])  # clamped onto the last slot

    tb = backend("torch")
    m = make_module(tb, dict(E=6, N=2, H=3, max_distance=2)).eval()
    torch._dynamo.reset()
    step = torch.compile(lambda x_t, c: m(x_t, cache=c), backend=CompileCounter(), fullgraph=True)
    x = torch.zeros(2, 1, 6, dtype=torch.float64)
    with torch.no_grad():
        _, c = step(x, m.init_cache(2, 1))
        with pytest.raises(IndexError, match="out of bounds"):
            step(x, c)


# ---------------------------------------------------------------- generate()


V, N_NEW = 11, 6  # vocabulary of the tiny LM; tokens generated per test (one jit compile shared)


@functools.lru_cache(maxsize=None)
def tiny_lm_class(name):
    """Embedding -> RelativeMultiHeadAttention -> head: the smallest model generate() accepts.

    Built once per framework, so JAX sees one graph definition (one compile) across tests."""
    pytest.importorskip(name)  # skips the test where that framework is not installed
    E, N, max_distance = 8, 2, 3
    if name == "torch":
        import torch
        from torch import nn

        import relattn_torch as lib

        class TinyLM(nn.Module):
            def __init__(self):
                super().__init__()
                g = torch.Generator().manual_seed(0)
                self.emb = nn.Parameter(torch.randn(V, E, generator=g, dtype=torch.float64))
                self.attn = lib.RelativeMultiHeadAttention(E, N, max_distance=max_distance, dtype=torch.float64)
                self.head = nn.Parameter(torch.randn(E, V, generator=g, dtype=torch.float64))

            def init_cache(self, batch_size, max_length, dtype=None):
                return self.attn.init_cache(batch_size, max_length, dtype=dtype)

            def forward(self, tokens, *, cache=None, mask=None):
                h = self.emb[tokens]
                if cache is None:
                    return self.attn(h, is_causal=True, mask=mask) @ self.head
                h, cache = self.attn(h, cache=cache, mask=mask)
                return h @ self.head, cache

        return TinyLM
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    from flax import nnx

    import relattn_jax as lib

    class TinyLM(nnx.Module):
        def __init__(self, rngs):
            self.emb = nnx.Param(jax.random.normal(rngs.params(), (V, E), jnp.float64))
            self.attn = lib.RelativeMultiHeadAttention(E, N, max_distance=max_distance, param_dtype=jnp.float64,
                                                       rngs=rngs)
            self.head = nnx.Param(jax.random.normal(rngs.params(), (E, V), jnp.float64))

        def init_cache(self, batch_size, max_length, dtype=None):
            return self.attn.init_cache(batch_size, max_length, dtype=dtype)

        def __call__(self, tokens, *, cache=None, mask=None):
            TRACES["count"] += 1
            h = self.emb[...][tokens]
            if cache is None:
                return self.attn(h, is_causal=True, mask=mask) @ self.head[...]
            h, cache = self.attn(h, cache=cache, mask=mask)
            return h @ self.head[...], cache

    return TinyLM


def tiny_lm(name, params=None):
    pytest.importorskip(name)  # skips the test where that framework is not installed
    if name == "torch":
        model = tiny_lm_class(name)()
    else:
        from flax import nnx

        model = tiny_lm_class(name)(nnx.Rngs(0))
    if params is not None:
        backend(name).set_params(model, params)
    return model


def naive_greedy(b, model, prompt, n):
    """Greedy decoding that recomputes the full causal forward (no cache) every step.

    The forward always runs on a [B, P + n] array (not yet generated slots hold 0):
    causality makes the logits at t independent of later slots, and one shape means
    JAX compiles once instead of once per length."""
    P = prompt.shape[1]
    seq = np.concatenate([np.asarray(prompt), np.zeros((prompt.shape[0], n), prompt.dtype)], axis=1)
    forward = model if b.name == "torch" else b.nnx.jit(lambda m, s: m(s))  # one XLA program, not ~60
    for t in range(P, P + n):
        logits = b.numpy(forward(model, b.array(seq)) if b.name == "jax" else forward(b.array(seq)))
        seq[:, t] = logits[:, t - 1].argmax(-1)
    return seq[:, P:]


def gen(name, model, prompt, n=N_NEW, **kw):
    b = backend(name)
    lengths = kw.pop("prompt_lengths", None)
    if lengths is not None:
        kw["prompt_lengths"] = b.array(lengths)
    return np.asarray(b.lib.generate(model, b.array(prompt), n, **kw))


PROMPT = np.array([[1, 5, 2, 7, 3], [4, 4, 9, 0, 6]])


@pytest.mark.parametrize("name", BACKENDS)
def test_greedy_generate_equals_full_recompute(name):
    model = tiny_lm(name)
    tokens = gen(name, model, PROMPT)
    assert tokens.shape == (2, N_NEW)
    np.testing.assert_array_equal(tokens, naive_greedy(backend(name), model, PROMPT, N_NEW))


def test_greedy_generate_across_frameworks():
    tb = backend("torch")
    tm = tiny_lm("torch")
    jm = tiny_lm("jax", params=tb.params(tm))
    np.testing.assert_array_equal(gen("torch", tm, PROMPT), gen("jax", jm, PROMPT))


@pytest.mark.parametrize("temperature", [0.0, 1.5])
def test_jax_scan_loop_equals_eager_loop_and_compiles_once(temperature):
    model = tiny_lm("jax")
    eager = gen("jax", model, PROMPT, temperature=temperature, seed=11, loop="eager")
    scanned = gen("jax", model, PROMPT, temperature=temperature, seed=11, loop="scan")
    np.testing.assert_array_equal(scanned, eager)
    TRACES["count"] = 0
    gen("jax", tiny_lm("jax"), PROMPT, temperature=temperature, seed=12, loop="scan")  # new seed and model
    assert TRACES["count"] == 0, "the jitted generate loop was traced again"


@pytest.mark.parametrize("name", BACKENDS)
def test_sampling_is_seeded(name):
    model = tiny_lm(name)
    a = gen(name, model, PROMPT, temperature=1.5, seed=1)
    np.testing.assert_array_equal(a, gen(name, model, PROMPT, temperature=1.5, seed=1))
    assert (a != gen(name, model, PROMPT, temperature=1.5, seed=2)).any()
    assert (a != gen(name, model, PROMPT)).any()  # sampling at T=1.5 is not greedy
    assert a.min() >= 0 and a.max() < V


@pytest.mark.parametrize("name", BACKENDS)
def test_right_padded_prompts_generate_like_solo_prompts(name):
    model = tiny_lm(name)
    prompt = np.array([[1, 5, 2, 7, 3], [4, 9, 0, 0, 0]])  # row 1 right-padded with 0
    batched = gen(name, model, prompt, prompt_lengths=np.array([5, 2]))
    np.testing.assert_array_equal(batched[0], gen(name, model, prompt)[0])
    np.testing.assert_array_equal(batched[1], gen(name, model, prompt[1:, :2])[0])


@pytest.mark.parametrize("name", BACKENDS)
def test_generate_errors(name):
    model = tiny_lm(name)
    with pytest.raises(ValueError, match=r"prompt must be int tokens \[B, P\], got shape \[5\]"):
        gen(name, model, PROMPT[0])
    with pytest.raises(ValueError, match="max_new_tokens must be a positive int, got 0"):
        gen(name, model, PROMPT, 0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        gen(name, model, PROMPT, temperature=-1.0)
    with pytest.raises(ValueError, match=r"prompt_lengths must be \[B\] = \[2\], got shape \[3\]"):
        gen(name, model, PROMPT, prompt_lengths=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"prompt_lengths must be in \[1, P\] = \[1, 5\]"):
        gen(name, model, PROMPT, prompt_lengths=np.array([0, 5]))


def test_generate_with_decoder_lm_across_frameworks():
    """The training issue's DecoderLM: greedy generate equals a full recompute and the twin."""
    td = pytest.importorskip("relattn_torch.decoder")
    jd = pytest.importorskip("relattn_jax.decoder")
    import jax.numpy as jnp
    torch = pytest.importorskip("torch")
    from flax import nnx

    cfg = dict(vocab_size=13, embed_dim=8, num_heads=2, num_layers=2, mlp_dim=16, max_distance=3, max_len=32)
    tb, jb = backend("torch"), backend("jax")
    tm = td.DecoderLM(td.DecoderConfig(**cfg), dtype=torch.float64).eval()
    jm = jd.DecoderLM(jd.DecoderConfig(**cfg), param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    jb.set_params(jm, tb.params(tm))
    t_tokens = gen("torch", tm, PROMPT)
    np.testing.assert_array_equal(t_tokens, naive_greedy(tb, tm, PROMPT, N_NEW))
    np.testing.assert_array_equal(gen("jax", jm, PROMPT), t_tokens)


def test_generate_right_padded_with_decoder_lm():
    """DecoderLM with ``mask=``: right-padded batch rows generate like solo prompts, both frameworks."""
    import inspect

    td = pytest.importorskip("relattn_torch.decoder")
    if "mask" not in inspect.signature(td.DecoderLM.forward).parameters:
        pytest.skip("this DecoderLM does not accept mask=")
    torch = pytest.importorskip("torch")

    cfg = td.DecoderConfig(vocab_size=13, embed_dim=8, num_heads=2, num_layers=2, mlp_dim=16, max_distance=3)
    model = td.DecoderLM(cfg, dtype=torch.float64).eval()
    prompt = np.array([[1, 5, 2, 7, 3], [4, 9, 0, 0, 0]])
    batched = gen("torch", model, prompt, prompt_lengths=np.array([5, 2]))
    np.testing.assert_array_equal(batched[0], gen("torch", model, prompt)[0])
    np.testing.assert_array_equal(batched[1], gen("torch", model, prompt[1:, :2])[0])
