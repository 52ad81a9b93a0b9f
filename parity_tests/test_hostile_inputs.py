"""Careless and hostile input to ``relative_attention`` and the module: scalars, empty sizes, ids
under jit / compile, non-finite values behind masks, half precision. Both frameworks."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from . import oracle
from .backends import backend
from .numerics import assert_close

B, T, S, N, H, K = 2, 5, 6, 2, 4, 2
R = 2 * K + 1


def _inputs(rng, form="shaw", T=T, S=S):
    x = {n: rng.standard_normal(shape) for n, shape in (("q", (B, T, N, H)), ("k", (B, S, N, H)), ("v", (B, S, N, H)))}
    if form == "shaw" or form == "table":
        x["rel_k"], x["rel_v"] = rng.standard_normal((R, H)), rng.standard_normal((R, N, H))
    elif form == "dense":
        x["rel_k"], x["rel_v"] = rng.standard_normal((T, S, N, H)), rng.standard_normal((T, S, H))
    return x


def _form_kw(form, rng, T=T, S=S):
    if form == "shaw":
        return dict(max_distance=K)
    if form == "table":
        return dict(rel_ids=rng.integers(0, R, (B, T, S)))
    return {}


# --- scalars ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,error,match", [
    (dict(scale=float("nan")), ValueError, r"scale must be finite, got nan"),
    (dict(scale=float("inf")), ValueError, r"scale must be finite, got inf"),
    (dict(scale="0.5"), TypeError, r"scale must be None or a real number \(float\), got '0.5' \(str\)"),
    (dict(scale=True), TypeError, r"scale must be None or a real number"),
    (dict(is_causal="False"), TypeError, r"is_causal must be a bool, got 'False' \(str\)"),
    (dict(is_causal=1), TypeError, r"is_causal must be a bool, got 1 \(int\)"),
    (dict(check_ids="yes"), TypeError, r"check_ids must be a bool"),
    (dict(q_offset=1.5), TypeError, r"q_offset must be None, an int or a 0-d integer array, got 1.5 \(float\)"),
    (dict(q_offset=True), TypeError, r"q_offset must be None, an int or a 0-d integer array, got True"),
    (dict(q_offset="3"), TypeError, r"q_offset must be None, an int or a 0-d integer array, got '3'"),
    (dict(q_offset=np.asarray(1.0)), TypeError, r"q_offset must be .* array of dtype .*float"),
    (dict(q_offset=np.zeros(2, np.int64)), TypeError, r"q_offset must be .* got a 1-d array"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\), got -0.1"),
    (dict(dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\), got 1.5"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    (dict(dropout_p="0.1"), TypeError, r"dropout_p must be a real number in \[0, 1\), got '0.1'"),
    (dict(max_distance=10**12), ValueError, r"max_distance must be an int in \[0, 1048576\].*got 1000000000000"),
])
def test_scalar_arguments_are_checked_and_named(bk, kw, error, match):
    rng = np.random.default_rng(0)
    x = _inputs(rng)
    kw = {"max_distance": K, **kw}
    with pytest.raises(error, match=match):
        bk.attention(x, **kw)


def test_non_array_inputs_name_the_argument(bk):
    rng = np.random.default_rng(0)
    x = {n: bk.array(a) for n, a in _inputs(rng, "none").items()}
    bad = x["q"].tolist() if bk.name == "jax" else np.asarray(x["q"])  # torch: a NumPy array; jax: a list
    kind = r"jax.Array or numpy.ndarray, got builtins.list" if bk.name == "jax" else r"torch.Tensor, got numpy.ndarray"
    with pytest.raises(TypeError, match=rf"^q must be a {kind}"):
        bk.lib.relative_attention(bad, x["k"], x["v"])
    with pytest.raises(TypeError, match=r"^mask must be a .* or None, got builtins.list"):
        bk.lib.relative_attention(x["q"], x["k"], x["v"], mask=[[True]])


def test_numpy_inputs_work_in_jax():
    bk = backend("jax")
    rng = np.random.default_rng(0)
    x = _inputs(rng)
    out = bk.lib.relative_attention(*(x[n] for n in ("q", "k", "v", "rel_k", "rel_v")), max_distance=K)
    assert_close(np.asarray(out), bk.attention(x, max_distance=K), rel=0)


def test_max_distance_limit_in_the_module(bk):
    with pytest.raises(ValueError, match=r"max_distance must be an int in \[0, 1048576\]"):
        bk.module("RelativeMultiHeadAttention", 8, 2, max_distance=10**12)


@pytest.mark.parametrize("scale", [0.0, -0.7])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("implementation", ["auto", "einsum", "blockwise", "shaw"])
def test_zero_and_negative_scale_match_the_oracle(bk, scale, is_causal, implementation):
    rng = np.random.default_rng(1)
    x = _inputs(rng)
    ref = oracle.relative_attention(x["q"], x["k"], x["v"], x["rel_k"], x["rel_v"],
                                    rel_ids=oracle.shaw_ids(T, S, K, S - T), is_causal=is_causal, scale=scale)
    out = bk.attention(x, max_distance=K, scale=scale, is_causal=is_causal, implementation=implementation)
    assert np.isfinite(out).all()
    assert_close(out, ref)


# --- empty sizes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["none", "dense", "table", "shaw"])
@pytest.mark.parametrize("zero", "BTSNH")
def test_every_empty_size_gives_the_obvious_result(bk, form, zero):
    sizes = {**dict(B=2, T=3, S=4, N=2, H=3), zero: 0}
    b, t, s, n, h = (sizes[c] for c in "BTSNH")
    rng = np.random.default_rng(2)
    x = {"q": rng.standard_normal((b, t, n, h)), "k": rng.standard_normal((b, s, n, h)),
         "v": rng.standard_normal((b, s, n, h))}
    kw = {}
    if form in ("table", "shaw"):
        x["rel_k"], x["rel_v"] = rng.standard_normal((R, h)), rng.standard_normal((R, n, h))
        kw = dict(max_distance=K) if form == "shaw" else dict(rel_ids=np.zeros((t, s), np.int64))
    elif form == "dense":
        x["rel_k"], x["rel_v"] = rng.standard_normal((t, s, n, h)), rng.standard_normal((t, s, h))
    out, grads = bk.attention_grads(x, np.ones((b, t, n, h)), is_causal=form == "shaw", **kw)
    assert out.shape == (b, t, n, h)
    np.testing.assert_array_equal(out, 0.0)  # no key to attend (S = 0), or nothing to hold
    for name, g in grads.items():
        assert g.shape == x[name].shape and np.all(g == 0.0), name


@pytest.mark.parametrize("implementation", ["shaw", "blockwise"])
def test_forcing_a_fast_path_on_an_empty_call_says_why(bk, implementation):
    rng = np.random.default_rng(2)
    x = _inputs(rng)
    x["q"] = x["q"][:, :, :0]
    x["k"], x["v"] = x["k"][:, :, :0], x["v"][:, :, :0]
    x["rel_v"] = x["rel_v"][:, :0]
    with pytest.raises(ValueError, match=rf"implementation='{implementation}' needs non-empty inputs, got N = 0"):
        bk.attention(x, max_distance=K, implementation=implementation)


# --- ids under jit / torch.compile ------------------------------------------------------------------

def test_out_of_range_ids_under_jax_jit():
    jax = pytest.importorskip("jax")
    from jax.experimental import checkify

    bk = backend("jax")
    rng = np.random.default_rng(3)
    x = {n: bk.array(a) for n, a in _inputs(rng, "table").items()}
    ids = rng.integers(0, R, (T, S))
    bad = ids.copy()
    bad[0, 0], bad[1, 2] = R, -1
    run = lambda ids, check=False: bk.lib.relative_attention(  # noqa: E731
        x["q"], x["k"], x["v"], x["rel_k"], x["rel_v"], rel_ids=ids, check_ids=check)
    with pytest.raises(ValueError, match=r"rel_ids values must be in \[0, R\) = \[0, 5\)"):
        run(bad)  # eager: always checked
    clamped = np.clip(bad, 0, R - 1)
    assert_close(np.asarray(jax.jit(run)(bad)), np.asarray(run(clamped)), rel=1e-15)  # jit: clamped
    err, _ = checkify.checkify(jax.jit(lambda i: run(i, True)))(bad)
    with pytest.raises(Exception, match=r"rel_ids values must be in \[0, R\) = \[0, 5\).*got values in \[-1, 5\]"):
        err.throw()
    err, out = checkify.checkify(jax.jit(lambda i: run(i, True)))(ids)
    err.throw()  # in range: no error
    assert_close(np.asarray(out), np.asarray(run(ids)), rel=1e-15)
    with pytest.raises(ValueError, match=r"checkify"):
        jax.jit(lambda i: run(i, True))(ids)  # an unfunctionalised check is refused


def test_out_of_range_ids_under_torch_compile():
    torch = pytest.importorskip("torch")
    bk = backend("torch")
    rng = np.random.default_rng(3)
    x = {n: bk.array(a) for n, a in _inputs(rng, "table").items()}
    ids = torch.from_numpy(rng.integers(0, R, (T, S)))
    bad = ids.clone()
    bad[0, 0], bad[1, 2] = R, -1

    def run(ids, check=False):
        return bk.lib.relative_attention(x["q"], x["k"], x["v"], x["rel_k"], x["rel_v"], rel_ids=ids, check_ids=check)

    with pytest.raises(ValueError, match=r"rel_ids values must be in \[0, R\) = \[0, 5\)"):
        run(bad)
    torch._dynamo.reset()
    compiled = torch.compile(run, fullgraph=True)
    assert_close(compiled(bad).numpy(), run(bad.clamp(0, R - 1)).numpy(), rel=1e-13)
    with pytest.raises(RuntimeError, match=r"rel_ids values must be in \[0, R\) = \[0, 5\)"):
        compiled(bad, True)
    assert_close(compiled(ids, True).numpy(), run(ids).numpy(), rel=1e-13)


# --- non-finite values behind masks -----------------------------------------------------------------

def _mask(kind, rng):
    if kind == "padding":  # keys 4, 5 of example 1 are padding
        m = np.ones((B, 1, 1, S), bool)
        m[1, ..., 4:] = False
        return m, False
    if kind == "causal":
        return None, True
    m = rng.random((B, 1, T, S)) < 0.6  # a general mask, with one empty row
    m[0, 0, 2] = False
    return m, False


def _spoil(x, where, kw, vis, value, rng):
    """Put ``value`` into one masked entry of input ``where``; return (spoilt inputs, rows [B, N, T] that see it)."""
    x = {n: a.copy() for n, a in x.items()}
    hidden = np.argwhere(~vis)  # (b, n, i, j) entries nobody attends in that row
    b, n, i, j = hidden[rng.integers(len(hidden))]
    if where in ("k", "v"):
        x[where][b, j, n, 0] = value
        bad = np.zeros((B, N, S), bool)
        bad[b, n, j] = True
        seen = (vis & bad[:, :, None, :]).any(-1)
    elif where in ("rel_k", "rel_v") and "rel_ids" not in kw and "max_distance" not in kw:  # dense
        a = x[where]
        if a.ndim == 4:  # [T, S, N, H]
            a[i, j, n, 0] = value
            bad = np.zeros((1, N, T, S), bool)
            bad[0, n, i, j] = True
        else:  # [T, S, H]
            a[i, j, 0] = value
            bad = np.zeros((1, 1, T, S), bool)
            bad[..., i, j] = True
        seen = (vis & bad).any(-1)
    else:  # a table row: the id of the hidden entry
        ids = oracle.shaw_ids(T, S, K, S - T) if "max_distance" in kw else np.asarray(kw["rel_ids"])[b]
        r = ids[i, j]
        a = x[where]
        if a.ndim == 2:
            a[r, 0] = value
            heads = np.ones(N, bool)
        else:
            a[r, n, 0] = value
            heads = np.arange(N) == n
        full = np.broadcast_to(kw["rel_ids"], (B, T, S)) if "rel_ids" in kw else np.broadcast_to(ids, (B, T, S))
        bad = (full == r)[:, None] & heads[None, :, None, None]
        seen = (vis & bad).any(-1)
    return x, seen


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mask_kind", ["padding", "causal", "general"])
@pytest.mark.parametrize("form,where", [("none", "k"), ("none", "v"), ("dense", "rel_k"), ("dense", "rel_v"),
                                        ("table", "rel_k"), ("table", "rel_v"), ("shaw", "rel_k"), ("shaw", "rel_v"),
                                        ("shaw", "v")])
def test_a_masked_entry_changes_no_output_and_no_gradient(bk, form, where, mask_kind, value):
    rng = np.random.default_rng(4)
    x = _inputs(rng, form)
    kw = _form_kw(form, rng)
    mask, causal = _mask(mask_kind, rng)
    vis = oracle.visibility(B, N, T, S, mask, causal)
    spoilt, seen = _spoil(x, where, kw, vis, value, rng)
    cot = rng.standard_normal((B, T, N, H)) * ~np.moveaxis(seen, 1, 2)[..., None]  # no cotangent on NaN rows
    kw.update(mask=mask, is_causal=causal)
    out, grads = bk.attention_grads(spoilt, cot, **kw)
    clean_out, clean_grads = bk.attention_grads(x, cot, **kw)
    rows = np.moveaxis(seen, 1, 2)  # [B, T, N]
    assert np.isnan(out[rows]).all()
    assert_close(out[~rows], clean_out[~rows])
    for name, g in grads.items():
        assert np.isfinite(g).all(), name
        spot = ~np.isfinite(spoilt[name])
        assert_close(np.where(spot, 0.0, g), np.where(spot, 0.0, clean_grads[name]))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_module_ignores_non_finite_padding(bk, value):
    rng = np.random.default_rng(5)
    m = bk.module("RelativeMultiHeadAttention", 8, 2, max_distance=2)
    params = bk.params(m)
    x = rng.standard_normal((B, S, 8))
    valid = np.ones((B, S), bool)
    valid[1, 4:] = False
    mask = valid[:, None, :, None] & valid[:, None, None, :]  # padded queries and keys
    spoilt = np.where(valid[..., None], x, value)

    def loss_and_grads(inputs):
        if bk.name == "torch":
            torch = bk.torch
            out = m(bk.array(inputs), mask=bk.array(mask))
            m.zero_grad()
            torch.where(bk.array(valid)[..., None], out, 0.0).square().sum().backward()
            return out.detach().numpy(), {n: p.grad.numpy() for n, p in m.named_parameters()}
        jnp, nnx = bk.jnp, bk.nnx

        def f(model):
            out = model(jnp.asarray(inputs), mask=jnp.asarray(mask))
            return jnp.square(jnp.where(valid[..., None], out, 0.0)).sum(), out

        (_, out), g = nnx.value_and_grad(f, has_aux=True)(m)
        return np.asarray(out), {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(g)}

    out, grads = loss_and_grads(spoilt)
    clean_out, clean_grads = loss_and_grads(x)
    assert_close(out[valid], clean_out[valid])
    assert set(grads) == set(params)
    for name in grads:
        assert np.isfinite(grads[name]).all(), name
        assert_close(grads[name], clean_grads[name])


# --- half precision ---------------------------------------------------------------------------------

def _framework_attention(bk, q, k, v, dtype):
    if bk.name == "torch":
        torch = bk.torch
        qt, kt, vt = (bk.array(a, dtype).transpose(1, 2) for a in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).double().numpy()
    jax = bk.jax
    return np.asarray(jax.nn.dot_product_attention(*(bk.array(a, dtype) for a in (q, k, v))), np.float64)


@pytest.mark.parametrize("dtype,magnitude", [("float16", 1e3), ("bfloat16", 10.0)])
@pytest.mark.parametrize("form", ["none", "shaw"])
def test_half_precision_loses_no_more_than_the_framework_attention(bk, dtype, magnitude, form):
    rng = np.random.default_rng(6)
    b, t, n, h = 2, 48, 2, 32
    q, k, v = rng.standard_normal((b, t, n, h)), rng.standard_normal((b, t, n, h)), rng.standard_normal((b, t, n, h))
    q, k = q * np.sqrt(magnitude), k * np.sqrt(magnitude)  # logits q . k / sqrt(H) of about +-magnitude
    x = {"q": q, "k": k, "v": v}
    kw = {}
    if form == "shaw":
        x["rel_k"], x["rel_v"] = rng.standard_normal((R, h)) * 0.01, rng.standard_normal((R, h)) * 0.01
        kw = dict(max_distance=K)
    rounded = {n: bk.numpy(bk.array(a, dtype)).astype(np.float64) for n, a in x.items()}
    exact = oracle.relative_attention(rounded["q"], rounded["k"], rounded["v"], rounded.get("rel_k"),
                                      rounded.get("rel_v"),
                                      rel_ids=oracle.shaw_ids(t, t, K) if form == "shaw" else None)
    ours = bk.attention(x, dtype=dtype, **kw)
    theirs = _framework_attention(bk, q, k, v, dtype)
    exact_plain = oracle.relative_attention(rounded["q"], rounded["k"], rounded["v"])
    our_err, their_err = np.abs(ours - exact).max(), np.abs(theirs - exact_plain).max()
    assert np.isfinite(ours).all()
    assert our_err <= 1.5 * their_err + 4e-3, (our_err, their_err)


@given(data=st.data())
def test_non_finite_values_behind_random_masks(data):
    """Random sizes, masks (with and without causal) and NaN / inf in random masked entries of k, v and
    the Shaw tables: the rows that see none of them are unchanged, the others NaN; both frameworks."""
    b, t, s, n = (data.draw(st.integers(1, hi), label=name) for name, hi in (("B", 2), ("T", 5), ("S", 6), ("N", 2)))
    h, k_max = 3, data.draw(st.integers(0, 3), label="K")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    rng = np.random.default_rng(seed)
    causal = data.draw(st.booleans(), label="is_causal")
    mask = rng.random((b, 1, t, s)) < data.draw(st.sampled_from([0.3, 0.7]), label="density")
    vis = oracle.visibility(b, n, t, s, mask, causal)
    r = 2 * k_max + 1
    x = {"q": rng.standard_normal((b, t, n, h)), "k": rng.standard_normal((b, s, n, h)),
         "v": rng.standard_normal((b, s, n, h)), "rel_k": rng.standard_normal((r, h)),
         "rel_v": rng.standard_normal((r, n, h))}
    spoilt = {name: a.copy() for name, a in x.items()}
    bad = np.zeros((b, n, t, s), bool)  # entries whose inputs hold a non-finite value
    ids = oracle.shaw_ids(t, s, k_max, s - t)
    for _ in range(data.draw(st.integers(1, 3), label="spoils")):
        value = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]), label="value")
        where = data.draw(st.sampled_from(["k", "v", "rel_k", "rel_v"]), label="where")
        if where in ("k", "v"):
            bb, j, nn = rng.integers(b), rng.integers(s), rng.integers(n)
            spoilt[where][bb, j, nn, rng.integers(h)] = value
            bad[bb, nn, :, j] = True
        else:
            row = rng.integers(r)
            heads = np.ones(n, bool) if where == "rel_k" else np.arange(n) == rng.integers(n)
            if where == "rel_k":
                spoilt[where][row, rng.integers(h)] = value
            else:
                spoilt[where][row, np.argmax(heads), rng.integers(h)] = value
            bad |= (ids == row)[None, None] & heads[None, :, None, None]
    rows = np.moveaxis((vis & bad).any(-1), 1, 2)  # [B, T, N]
    for name in ("torch", "jax"):
        bk = backend(name)
        kw = dict(max_distance=k_max, mask=mask, is_causal=causal)
        out, clean = bk.attention(spoilt, **kw), bk.attention(x, **kw)
        assert np.isnan(out[rows]).all(), name
        if (~rows).any():
            assert_close(out[~rows], clean[~rows])


def test_module_inputs_of_the_wrong_type_are_named(bk):
    m = bk.module("RelativeMultiHeadAttention", 8, 2, max_distance=2)
    x = np.zeros((2, 5, 8))
    bad = x.tolist() if bk.name == "jax" else x  # torch: a NumPy array; jax: a list
    kind = "jax.Array or numpy.ndarray" if bk.name == "jax" else "torch.Tensor"
    with pytest.raises(TypeError, match=rf"^query must be a {kind}, got"):
        m(bad)
    with pytest.raises(TypeError, match=rf"^key must be a {kind} or None, got"):
        m(bk.array(x), bad)
    with pytest.raises(TypeError, match=rf"^mask must be a {kind}.* or None, got builtins.list"):
        m(bk.array(x), mask=[[True] * 5] * 2)
    r = bk.module("RelationAwareAttention", 2, 4)
    with pytest.raises(TypeError, match=rf"^x must be a {kind}, got"):
        r(np.zeros((2, 5, 2, 4)).tolist())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_finiteness_check_is_one_sum_that_misses_nothing(bk, dtype):
    """finite._all_finite (eager and under jit in JAX): a NaN or +-inf anywhere is found in every
    dtype, and a float16 tensor whose float16 sum would overflow (1000 x 100 > 65504) counts as finite."""
    finite = importlib.import_module(f"relattn_{bk.name}.finite")
    check = finite._all_finite if bk.name == "torch" else bk.jax.jit(finite._all_finite)
    t = np.full((10, 10, 10), 100.0)
    arr = lambda a: bk.array(a).to(getattr(bk.torch, dtype)) if bk.name == "torch" else bk.array(a).astype(dtype)  # noqa: E731
    assert bool(check(arr(t)))
    for value in (np.nan, np.inf, -np.inf):
        for where in ((0, 0, 0), (9, 9, 9), (4, 7, 1)):
            bad = t.copy()
            bad[where] = value
            assert not bool(check(arr(bad))), (value, where)
    both = t.copy()
    both[0, 0, 0], both[1, 1, 1] = np.inf, -np.inf  # inf + -inf in the sum is NaN: still found
    assert not bool(check(arr(both)))
