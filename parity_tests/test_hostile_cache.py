"""Hostile and careless use of the KV cache and generate() (issue 13), in both frameworks.

A mask over T instead of the cache buffer, an overflow under jit / torch.compile with a
``checked`` cache, empty prompts, token ids outside the vocabulary and malformed generate
arguments: each fails early with an error that names the argument, the same in both
frameworks, and the valid input next to it still works. The unchecked overflow default is
tested (as documented) in ``test_cache.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from .backends import backend
from .numerics import relative_error

BACKENDS = ["torch", "jax"]
V = 11  # vocabulary of the tiny DecoderLM


def attn(b):
    return b.module("RelativeMultiHeadAttention", 4, 2, max_distance=2)


X = np.random.default_rng(0).standard_normal((2, 3, 4))


# ---------------------------------------------------------------- mask with cache=


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", [(2, 1, 1, 3), (3, 3), (2, 2, 3, 3), (3,), (2, 1, 3, 7), (1, 2, 2, 3, 6)])
def test_cache_mask_must_cover_max_length(name, shape):
    """A mask over T (or any shape that does not broadcast to [B, N, T, max_length]) names mask."""
    b = backend(name)
    m = attn(b)
    with pytest.raises(ValueError, match=r"mask with cache= .*\[B, N, T, max_length\] = \[2, 2, 3, 6\], got shape"):
        m(b.array(X), cache=m.init_cache(2, 6), mask=b.array(np.ones(shape, bool)))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("shape", [(6,), (3, 6), (2, 1, 1, 6), (2, 2, 3, 6), (1, 1, 1, 1)])
def test_cache_mask_over_the_buffer_still_works(name, shape):
    """Positive control: every shape that broadcasts to [B, N, T, max_length]; all-True = no mask."""
    b = backend(name)
    m = attn(b)
    out, cache = m(b.array(X), cache=m.init_cache(2, 6), mask=b.array(np.ones(shape, bool)))
    ref, _ = m(b.array(X), cache=m.init_cache(2, 6))
    assert relative_error(b.numpy(out), b.numpy(ref)) == 0
    assert int(cache.length) == 3 and not bool(cache.overflowed)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_cache_mask_must_be_bool(name, dtype):
    """A float mask failed inside the mask AND with a cache; now the message of relative_attention."""
    b = backend(name)
    m = attn(b)
    with pytest.raises(TypeError, match=r"mask must be a bool (tensor|array) \(True = may attend\), got dtype"):
        m(b.array(X), cache=m.init_cache(2, 6), mask=b.array(np.ones((3, 6), dtype)))


def test_cache_mask_array_types():
    """torch wants a tensor (as relative_attention); JAX takes array-likes (numpy, lists)."""
    tb, jb = backend("torch"), backend("jax")
    tm, jm = attn(tb), attn(jb)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor or None, got numpy.ndarray"):
        tm(tb.array(X), cache=tm.init_cache(2, 6), mask=np.ones((3, 6), bool))
    ref, _ = jm(jb.array(X), cache=jm.init_cache(2, 6))
    for mask in (np.ones((3, 6), bool), [[True] * 6] * 3):
        out, _ = jm(jb.array(X), cache=jm.init_cache(2, 6), mask=mask)
        np.testing.assert_array_equal(jb.numpy(out), jb.numpy(ref))


@pytest.mark.parametrize("name", BACKENDS)
def test_decoder_cache_must_be_one_per_layer(name):
    b, model = decoder(name)
    tokens = b.array(GOOD)
    caches = model.init_cache(2, 4)
    with pytest.raises(TypeError, match=r"cache must be a list of num_layers = 1 layer caches \(from init_cache\), got KVCache"):
        model(tokens, cache=caches[0])
    with pytest.raises(ValueError, match=r"cache must be a list of num_layers = 1 layer caches .*, got 2"):
        model(tokens, cache=caches * 2)
    logits, caches = model(tokens, cache=caches)
    assert int(caches[0].length) == 3


# ---------------------------------------------------------------- overflow: checked caches


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("checked", [False, True])
def test_overflow_eager_raises_checked_or_not(name, checked):
    b = backend(name)
    m = attn(b)
    _, cache = m(b.array(X), cache=m.init_cache(2, 4, checked=checked))
    assert cache.checked is checked
    with pytest.raises(ValueError, match=r"cache overflow: cache length 3 \+ 2 new positions > max_length 4"):
        m(b.array(X[:, :2]), cache=cache)


def test_a_write_longer_than_the_cache_is_refused_even_when_traced():
    """T > max_length is known from the shapes alone: a ValueError under jit / compile too
    (torch.compile with fullgraph=True wraps it, as every input check, in dynamo's Unsupported)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("jax")
    message = r"cache overflow: the cache length \+ 5 new positions > max_length 4"
    jb = backend("jax")
    m = attn(jb)
    step = jb.nnx.jit(lambda m, x, c: m(x, cache=c))
    with pytest.raises(ValueError, match=message):
        step(m, jb.array(np.zeros((2, 5, 4))), m.init_cache(2, 4))
    tm = attn(backend("torch")).eval()
    x = torch.zeros(2, 5, 4, dtype=torch.float64)
    torch._dynamo.reset()
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        torch.compile(lambda x_t, c: tm(x_t, cache=c), backend="eager")(x, tm.init_cache(2, 4))
    with torch.no_grad(), pytest.raises(RuntimeError, match=message):
        torch_step(tm, "eager")(x, tm.init_cache(2, 4))


@pytest.mark.parametrize("name", BACKENDS)
def test_checked_must_be_a_bool(name):
    b = backend(name)
    with pytest.raises(TypeError, match="checked must be a bool, got 'yes'"):
        attn(b).init_cache(2, 4, checked="yes")


def test_checked_cache_under_nnx_jit():
    """checked=True: the jitted step raises a RuntimeError with the eager message; inside the
    room it gives the unchecked numbers and is traced once. Unchecked: overflowed tells."""
    b = backend("jax")
    m = attn(b)
    traces = []

    @b.nnx.jit
    def step(module, x_t, cache):
        traces.append(1)
        return module(x_t, cache=cache)

    outs = {}
    for checked in (True, False):
        cache = m.init_cache(2, 4, checked=checked)
        outs[checked] = []
        for t in range(3):
            out, cache = step(m, b.array(X[:, t : t + 1]), cache)
            outs[checked].append(b.numpy(out))
        assert not bool(cache.overflowed)
        _, cache = step(m, b.array(X[:, :1]), cache)  # fills the last slot
        if checked:
            with pytest.raises(RuntimeError, match=r"cache overflow: cache length 4 \+ 1 new positions > max_length 4"):
                out, _ = step(m, b.array(X[:, :1]), cache)
                b.numpy(out)
        else:
            _, cache = step(m, b.array(X[:, :1]), cache)
            assert int(cache.length) == 5 and bool(cache.overflowed)  # silent, but visible
    np.testing.assert_array_equal(np.concatenate(outs[True], 1), np.concatenate(outs[False], 1))
    assert len(traces) == 2  # once per cache kind (checked is static), never per step


def test_checked_cache_under_lax_scan():
    """The check also fires from inside a scan body (one jitted program)."""
    jax = pytest.importorskip("jax")

    b = backend("jax")
    m = attn(b)
    graphdef, state = b.nnx.split(m)

    @jax.jit
    def run(state, xs, cache):
        def body(cache, x_t):
            out, cache = b.nnx.merge(graphdef, state)(x_t[:, None], cache=cache)
            return cache, out

        return jax.lax.scan(body, cache, xs)

    xs = b.array(np.random.default_rng(1).standard_normal((5, 2, 4)))
    cache, _ = run(state, xs[:4], m.init_cache(2, 4, checked=True))
    assert int(cache.length) == 4
    with pytest.raises(RuntimeError, match=r"cache overflow: cache length 4 \+ 1 new positions > max_length 4"):
        cache, out = run(state, xs, m.init_cache(2, 4, checked=True))
        b.numpy(out)


def torch_step(m, compile_backend):
    torch = pytest.importorskip("torch")

    torch._dynamo.reset()
    return torch.compile(lambda x_t, c: m(x_t, cache=c), backend=compile_backend, fullgraph=True)


@pytest.mark.parametrize("compile_backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_checked_cache_under_torch_compile(compile_backend):
    """checked=True: the compiled step asserts on the device (RuntimeError, the overflow
    message without the length, which only the device knows) instead of an index error.

    aot_eager runs the traced, functionalized graph (fast); inductor, the compiler users hit,
    lowers the assert to a C++ check (about 10 s to compile on CPU, so under --slow)."""
    torch = pytest.importorskip("torch")

    b = backend("torch")
    m = attn(b).eval()
    step = torch_step(m, compile_backend)
    x = torch.from_numpy(X)
    with torch.no_grad():
        cache = m.init_cache(2, 4, checked=True)
        outs = []
        for t in range(3):
            out, cache = step(x[:, t : t + 1], cache)
            outs.append(out)
        ref, _ = m(x, cache=m.init_cache(2, 4))
        _, cache = step(x[:, :1], cache)
        assert int(cache.length) == 4 and not bool(cache.overflowed)
        with pytest.raises(RuntimeError, match=r"cache overflow: the cache length \+ 1 new positions > max_length 4"):
            step(x[:, :1], cache)
    assert relative_error(torch.cat(outs, 1).numpy(), ref.numpy()) <= 1e-12


def test_checked_cache_compiles_once():
    torch = pytest.importorskip("torch")
    from torch._dynamo.testing import CompileCounter

    b = backend("torch")
    m = attn(b).eval()
    counter = CompileCounter()
    step = torch_step(m, counter)
    with torch.no_grad():
        cache = m.init_cache(2, 6, checked=True)
        for t in range(6):
            _, cache = step(torch.from_numpy(X[:, t % 3 : t % 3 + 1]), cache)
    assert counter.frame_count == 1 and int(cache.length) == 6


# ---------------------------------------------------------------- generate() and DecoderLM tokens


def decoder(name):
    b = backend(name)
    kw = dict(vocab_size=V, embed_dim=8, num_heads=2, num_layers=1, mlp_dim=16, max_distance=2)
    if name == "torch":
        from relattn_torch.decoder import DecoderConfig, DecoderLM

        return b, DecoderLM(DecoderConfig(**kw)).eval()
    from relattn_jax.decoder import DecoderConfig, DecoderLM

    return b, DecoderLM(DecoderConfig(**kw), rngs=b.nnx.Rngs(0))


GOOD = np.array([[0, 3, V - 1], [1, 2, 4]])
RANGE = r"prompt must hold token ids in \[0, vocab_size\) = \[0, 11\), got values in "

GENERATE_ERRORS = [  # (id, prompt, kwargs, error type, message)
    ("empty-P", np.zeros((2, 0), np.int64), {}, ValueError, r"prompt must hold at least one row and one token.*\[2, 0\]"),
    ("empty-B", np.zeros((0, 3), np.int64), {}, ValueError, r"prompt must hold at least one row and one token.*\[0, 3\]"),
    ("id-V", np.array([[1, V]]), {}, ValueError, RANGE + r"\[1, 11\]"),
    ("id-minus-1", np.array([[-1, 2]]), {}, ValueError, RANGE + r"\[-1, 2\]"),
    ("id-huge", np.array([[2**31 - 1, 2]]), {}, ValueError, RANGE + r"\[2, 2147483647\]"),
    ("pad-id-V", np.array([[1, 2, V]]), {"prompt_lengths": np.array([2])}, ValueError, RANGE),
    ("prompt-list", [[1, 2]], {}, TypeError, "prompt must be an? .*int tokens"),
    ("prompt-float", np.array([[1.0, 2.0]]), {}, ValueError, r"prompt must be int tokens \[B, P\]"),
    ("max-new-0", GOOD, {"max_new_tokens": 0}, ValueError, "max_new_tokens must be a positive int, got 0"),
    ("max-new-float", GOOD, {"max_new_tokens": 2.0}, ValueError, "max_new_tokens must be a positive int, got 2.0"),
    ("temp-inf", GOOD, {"temperature": float("inf")}, ValueError, r"temperature must be >= 0 \(0 = greedy\) and finite"),
    ("temp-nan", GOOD, {"temperature": float("nan")}, ValueError, "temperature must be >= 0"),
    ("temp-neg", GOOD, {"temperature": -0.5}, ValueError, "temperature must be >= 0"),
    ("temp-str", GOOD, {"temperature": "0.5"}, TypeError, "temperature must be a real number"),
    ("seed-neg", GOOD, {"seed": -1}, ValueError, r"seed must be an int in \[0, 2\*\*32\), got -1"),
    ("seed-big", GOOD, {"seed": 2**32}, ValueError, r"seed must be an int in \[0, 2\*\*32\)"),
    ("seed-float", GOOD, {"seed": 1.5}, ValueError, r"seed must be an int in \[0, 2\*\*32\), got 1.5"),
    ("lengths-list", GOOD, {"prompt_lengths": [3, 2]}, TypeError, "prompt_lengths must be an int"),
    ("lengths-float", GOOD, {"prompt_lengths": np.array([3.0, 2.0])}, TypeError, "prompt_lengths must be an int"),
]


def call_generate(b, model, prompt, kw):
    kw = dict(kw)
    n = kw.pop("max_new_tokens", 2)
    if isinstance(kw.get("prompt_lengths"), np.ndarray):
        kw["prompt_lengths"] = b.array(kw["prompt_lengths"])
    prompt = b.array(prompt) if isinstance(prompt, np.ndarray) else prompt
    return np.asarray(b.lib.generate(model, prompt, n, **kw))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", GENERATE_ERRORS, ids=[c[0] for c in GENERATE_ERRORS])
def test_generate_refuses_bad_arguments(name, case):
    _, prompt, kw, error, message = case
    b, model = decoder(name)
    with pytest.raises(error, match=message):
        call_generate(b, model, prompt, kw)


@pytest.mark.parametrize("name", BACKENDS)
def test_generate_needs_a_cache_model(name):
    b = backend(name)
    with pytest.raises(TypeError, match=r"model must offer init_cache\(batch_size, max_length\).*got object"):
        call_generate(b, object(), GOOD, {})


@pytest.mark.parametrize("name", BACKENDS)
def test_negative_ids_refused_without_a_known_vocabulary(name):
    """A model with no vocab_size still gets the lower bound checked."""
    b, model = decoder(name)

    class Bare:  # init_cache and __call__ of the DecoderLM, nothing else
        init_cache = staticmethod(model.init_cache)

        def __call__(self, tokens, **kw):
            return model(tokens, **kw)

    with pytest.raises(ValueError, match=r"prompt must hold token ids in \[0, vocab_size\), got values in \[-1, 2\]"):
        call_generate(b, Bare(), np.array([[-1, 2]]), {})


@pytest.mark.parametrize("name", BACKENDS)
def test_generate_accepts_the_edges_of_the_valid_range(name):
    """Positive control: ids 0 and V - 1, P = 1, seed 2**32 - 1, numpy ints for seed/temperature."""
    b, model = decoder(name)
    out = call_generate(b, model, GOOD, {})
    assert out.shape == (2, 2) and out.min() >= 0 and out.max() < V
    assert call_generate(b, model, GOOD[:, :1], {"max_new_tokens": 1}).shape == (2, 1)
    out = call_generate(b, model, GOOD, {"temperature": np.float64(0.7), "seed": 2**32 - 1})
    assert out.shape == (2, 2) and out.max() < V


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("bad, seen", [(V, r"\[0, 11\]"), (-1, r"\[-1, 3\]")])
def test_decoder_refuses_ids_out_of_the_vocabulary(name, bad, seen):
    """DecoderLM itself, eagerly (with and without a cache); the valid ids still run."""
    b, model = decoder(name)
    tokens = b.array(np.array([[0, 3, bad]]))
    with pytest.raises(ValueError, match=r"tokens must hold token ids in \[0, vocab_size\) = \[0, 11\), got values in " + seen):
        model(tokens)
    with pytest.raises(ValueError, match="tokens must hold token ids in"):
        model(tokens, cache=model.init_cache(1, 4))
    logits = b.numpy(model(b.array(GOOD)))
    assert logits.shape == (2, 3, V) and np.isfinite(logits).all()


# ---------------------------------------------------------------- sweeps (hypothesis)

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def broadcasts(shape, target) -> bool:
    return len(shape) <= len(target) and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


@pytest.mark.parametrize("name", BACKENDS)
@given(shape=st.lists(st.sampled_from([1, 2, 3, 6, 7]), min_size=0, max_size=5).map(tuple))
def test_cache_mask_shapes_sweep(name, shape):
    """Any mask shape: accepted iff it broadcasts to [B, N, T, max_length] = [2, 2, 3, 6]."""
    b = backend(name)
    m = attn(b)
    call = lambda: m(b.array(X), cache=m.init_cache(2, 6), mask=b.array(np.ones(shape, bool)))  # noqa: E731
    if broadcasts(shape, (2, 2, 3, 6)):
        out, _ = call()
        assert np.isfinite(b.numpy(out)).all()
    else:
        with pytest.raises(ValueError, match=r"mask with cache= .*\[B, N, T, max_length\] = \[2, 2, 3, 6\]"):
            call()


@pytest.mark.parametrize("name", BACKENDS)
@given(ids=st.lists(st.integers(-3, V + 3), min_size=6, max_size=6))
def test_generate_prompt_ids_sweep(name, ids):
    """Prompt ids anywhere around [0, V): refused iff one is outside, naming the range seen."""
    b, model = decoder_cached(name)
    prompt = np.array(ids).reshape(2, 3)
    if 0 <= prompt.min() and prompt.max() < V:
        out = call_generate(b, model, prompt, {"max_new_tokens": 1})
        assert out.shape == (2, 1) and 0 <= out.min() and out.max() < V
    else:
        with pytest.raises(ValueError, match=RANGE + rf"\[{prompt.min()}, {prompt.max()}\]"):
            call_generate(b, model, prompt, {"max_new_tokens": 1})


_DECODERS = {}


def decoder_cached(name):
    """One model per framework for the sweep, so JAX compiles generate once."""
    if name not in _DECODERS:
        _DECODERS[name] = decoder(name)
    return _DECODERS[name]
