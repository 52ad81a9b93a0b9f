"""The fast paths (``shaw``, ``blockwise``, ``auto``) against the float64 oracle and across frameworks.

Outputs are compared with ``oracle.relative_attention``; gradients with the same framework's
``einsum`` path (itself checked against the oracle in test_core) and between frameworks.
Block sizes are lowered so that small inputs still cross several band / query blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from . import oracle
from .backends import backend
from .numerics import allowed_error

FRAMEWORKS = ["torch", "jax"]
B, N, H = 2, 3, 4
SCALE = 0.37


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks of 3 query rows, so T = 7 spans three band blocks and three long-sequence blocks.

    The torch Shaw path's chunks shrink to 3 rows (backward) / 6 rows (forward) for B N H = 2 3 4;
    the jax Shaw path's key blocks (for the tail sums of ``reduce``) to at most 3 keys, so S = 9 and
    S = 6 have three and two blocks, S = 4 two blocks of 2, and S = 7 or 5 blocks of one key.
    """
    import relattn_jax.blockwise
    import relattn_jax.shaw
    import relattn_torch.blockwise
    import relattn_torch.shaw

    monkeypatch.setattr(relattn_torch.shaw, "_BAND_BLOCK", 3)
    monkeypatch.setattr(relattn_torch.shaw, "_CHUNK_ELEMENTS", 3 * B * N * H)
    monkeypatch.setattr(relattn_torch.blockwise, "BLOCK_ROWS", 3)
    monkeypatch.setattr(relattn_jax.blockwise, "BLOCK_ROWS", 3)
    monkeypatch.setattr(relattn_jax.shaw, "_KEY_BLOCK", 3)


def _shaw_inputs(seed, T, S, K, shared=True, keys=True, values=True):
    rng = np.random.default_rng(seed)
    table = (2 * K + 1, H) if shared else (2 * K + 1, N, H)
    return {
        "q": rng.normal(size=(B, T, N, H)),
        "k": rng.normal(size=(B, S, N, H)),
        "v": rng.normal(size=(B, S, N, H)),
        "rel_k": rng.normal(size=table) if keys else None,
        "rel_v": rng.normal(size=table) if values else None,
    }


def _oracle_shaw(x, K, q_offset, T, S, **kw):
    ids = oracle.shaw_ids(T, S, K, q_offset)
    return oracle.relative_attention(x["q"], x["k"], x["v"], x["rel_k"], x["rel_v"], rel_ids=ids, scale=SCALE, **kw)


def _check_path(be, x, cot, ref, impl, **kw):
    """``impl``'s output equals the oracle's ``ref``; its gradients (of sum(out * cot)) are finite and
    equal the same framework's einsum path's. Returns the output."""
    out, grads = be.attention_grads(x, cot, implementation=impl, **kw)
    assert np.abs(out - ref).max() <= allowed_error(ref)
    _, ref_grads = be.attention_grads(x, cot, implementation="einsum", **kw)
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name
        assert np.abs(g - ref_grads[name]).max() <= allowed_error(ref_grads[name]), name
    return out


@dataclass(frozen=True)
class ShawCase:
    """One Shaw-form input: sizes, max_distance K, q_offset (None: S - T), causal, table forms."""

    T: int
    S: int
    K: int
    q_offset: int | None = None
    causal: bool = False
    shared: bool = True  # tables [R, H] shared by the heads, else [R, N, H]
    keys: bool = True  # a key table
    values: bool = True  # a value table

    @property
    def id(self) -> str:
        """E.g. ``T7-S7-K2-causal-keys+values``; the offset when given, ``per-head`` tables."""
        parts = [f"T{self.T}", f"S{self.S}", f"K{self.K}"]
        parts += [] if self.q_offset is None else [f"off{self.q_offset}"]
        parts += ["causal"] if self.causal else []
        parts += [] if self.shared else ["per-head"]
        parts.append("+".join(n for n, on in (("keys", self.keys), ("values", self.values)) if on))
        return "-".join(parts)

    @property
    def offset(self) -> int:
        return self.S - self.T if self.q_offset is None else self.q_offset

    def inputs(self, seed):
        return _shaw_inputs(seed, self.T, self.S, self.K, self.shared, self.keys, self.values)


SHAW_CASES = [
    ShawCase(7, 7, 2),
    ShawCase(7, 7, 2, causal=True, shared=False),
    ShawCase(5, 9, 3, causal=True),  # T != S, queries at the end (cache layout)
    ShawCase(9, 5, 2, 0, values=False),  # keys only
    ShawCase(6, 6, 1, 0, shared=False, keys=False),  # values only, per-head tables
    ShawCase(1, 6, 2, causal=True),  # T = 1 (one decode step)
    ShawCase(6, 1, 2, 0),  # S = 1
    ShawCase(5, 5, 8, 0, shared=False),  # max_distance >= sequence length: all band
    ShawCase(5, 5, 0, 0),  # max_distance = 0: one shared row
    ShawCase(4, 7, 2, -3),  # negative offset
    ShawCase(7, 4, 2, 5, causal=True),  # causal with T > S: first rows see no key
]


def _shaw_grid():
    """Every case on torch's banded path and jax's Shaw path; the rest of the cross product is slow."""
    for i, case in enumerate(SHAW_CASES):
        for fw in FRAMEWORKS:
            for impl in ("shaw", "blockwise", "auto"):
                quick = impl == "shaw" or (fw == "torch" and impl == "auto") or i in (1, 2, 10)
                marks = () if quick else (pytest.mark.slow,)
                yield pytest.param(fw, impl, case, marks=marks, id=f"{fw}-{impl}-{case.id}")


@pytest.mark.parametrize("fw, impl, case", list(_shaw_grid()))
def test_shaw_paths_match_oracle_and_einsum_grads(fw, impl, case):
    be = backend(fw)
    x = case.inputs(7)
    ref = _oracle_shaw(x, case.K, case.offset, case.T, case.S, is_causal=case.causal)
    kw = dict(max_distance=case.K, q_offset=case.q_offset, is_causal=case.causal, scale=SCALE)
    _check_path(be, x, np.random.default_rng(1).normal(size=ref.shape), ref, impl, **kw)


@pytest.mark.parametrize("case", [SHAW_CASES[i] for i in (1, 3, 5)], ids=lambda c: c.id)
def test_shaw_path_same_in_both_frameworks(case):
    x = case.inputs(11)
    kw = dict(max_distance=case.K, q_offset=case.q_offset, is_causal=case.causal, scale=SCALE, implementation="shaw")
    cot = np.random.default_rng(2).normal(size=(B, case.T, N, H))
    out_t, g_t = backend("torch").attention_grads(x, cot, **kw)
    out_j, g_j = backend("jax").attention_grads(x, cot, **kw)
    assert np.abs(out_t - out_j).max() <= allowed_error(out_t)
    for name in g_t:
        assert np.abs(g_t[name] - g_j[name]).max() <= allowed_error(g_t[name]), name


def _masks():
    keep = np.ones((B, 1, 1, 6), bool)
    keep[1, ..., 4:] = False  # padding of example 1
    rows = np.random.default_rng(3).random((B, N, 5, 6)) < 0.6
    rows[0, 1, 2] = False  # a fully masked row
    return {"padding": keep, "random_with_empty_row": rows, "all_masked": np.zeros((1, 1, 5, 6), bool)}


def _mask_grid():
    for name in _masks():
        for fw in FRAMEWORKS:
            for impl in ("blockwise", "auto", "shaw"):
                quick = fw == "torch" or impl == "shaw" or name == "random_with_empty_row"
                yield pytest.param(fw, impl, name, marks=() if quick else (pytest.mark.slow,), id=f"{fw}-{impl}-{name}")


@pytest.mark.parametrize("fw, impl, mask_name", list(_mask_grid()))
def test_masked_shaw(fw, impl, mask_name):
    """Masks go to an exact path: torch 'auto' falls back from the banded path, jax 'shaw' takes them."""
    be = backend(fw)
    mask = _masks()[mask_name]
    x = _shaw_inputs(5, 5, 6, 2)
    kw = dict(max_distance=2, mask=mask, scale=SCALE)
    if fw == "torch" and impl == "shaw":
        with pytest.raises(ValueError, match="implementation='shaw' needs"):
            be.attention(x, implementation=impl, **kw)
        return
    ref = _oracle_shaw(x, 2, 1, 5, 6, mask=mask)
    out = _check_path(be, x, np.random.default_rng(4).normal(size=ref.shape), ref, impl, **kw)
    vis = oracle.visibility(B, N, 5, 6, mask)
    empty = ~vis.any(-1)  # [B, N, T]
    assert np.all(out.transpose(0, 2, 1, 3)[empty] == 0.0)


def _table_and_dense_inputs(form, T=7, S=5):
    rng = np.random.default_rng(9)
    x = {"q": rng.normal(size=(B, T, N, H)), "k": rng.normal(size=(B, S, N, H)), "v": rng.normal(size=(B, S, N, H))}
    kw = {}
    if form == "table":
        x["rel_k"], x["rel_v"] = rng.normal(size=(4, N, H)), rng.normal(size=(4, H))
        kw["rel_ids"] = rng.integers(0, 4, size=(B, T, S))
    elif form == "dense":
        x["rel_k"], x["rel_v"] = rng.normal(size=(T, S, N, H)), rng.normal(size=(T, 1, H))
    else:  # dense per example with broadcast N
        x["rel_k"], x["rel_v"] = rng.normal(size=(B, T, S, 1, H)), None
    return x, kw


def _form_grid():
    for form in ("table", "dense", "dense5"):
        for causal in (False, True):
            for fw in FRAMEWORKS:
                quick = fw == "torch" or (form, causal) in (("table", True), ("dense", False))
                name = f"{fw}-{form}" + ("-causal" if causal else "")
            yield pytest.param(fw, form, causal, marks=() if quick else (pytest.mark.slow,), id=name)


@pytest.mark.parametrize("fw, form, causal", list(_form_grid()))
def test_blockwise_tables_and_dense_edges(fw, form, causal):
    be = backend(fw)
    x, kw = _table_and_dense_inputs(form)
    mask = np.random.default_rng(6).random((1, N, 7, 5)) < 0.7
    kw.update(is_causal=causal, mask=mask, scale=SCALE)
    ref = oracle.relative_attention(x["q"], x["k"], x["v"], x.get("rel_k"), x.get("rel_v"), **kw)
    _check_path(be, x, np.random.default_rng(8).normal(size=ref.shape), ref, "blockwise", **kw)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_auto_switches_to_blockwise_above_threshold(fw, monkeypatch):
    be = backend(fw)
    attention = be.lib.attention  # relative_attention looks its paths up here at call time
    calls = []
    real = attention.blockwise_attention

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(attention, "blockwise_attention", spy)
    x, kw = _table_and_dense_inputs("table")
    ref = oracle.relative_attention(x["q"], x["k"], x["v"], x["rel_k"], x["rel_v"], scale=SCALE, **kw)
    be.attention(x, scale=SCALE, **kw)
    assert calls == []  # below the threshold: the einsum path
    monkeypatch.setattr(be.lib.choice, "LONG_SEQUENCE_THRESHOLD", B * N * 7 * 5)
    out = be.attention(x, scale=SCALE, **kw)
    assert len(calls) == 1
    assert np.abs(out - ref).max() <= allowed_error(ref)


def test_torch_auto_picks_banded_shaw_path(monkeypatch):
    import relattn_torch.attention as attention

    be = backend("torch")
    calls = []
    real = attention.shaw_attention
    monkeypatch.setattr(attention, "shaw_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = _shaw_inputs(1, 6, 6, 2)
    be.attention(x, max_distance=2, scale=SCALE)
    assert calls == [1]
    be.attention(x, max_distance=2, scale=SCALE, mask=np.ones((6, 6), bool))  # masks fall back
    assert calls == [1]


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_module_matches_oracle_on_fast_path(fw):
    be = backend(fw)
    m = be.module("RelativeMultiHeadAttention", 12, 3, max_distance=2, share_relative_heads=False)
    params = be.params(m)
    x = np.random.default_rng(3).normal(size=(2, 7, 12))
    for causal in (False, True):
        ref = oracle.multi_head_attention(params, x, max_distance=2, is_causal=causal)
        out = be.call(m, x, is_causal=causal)
        assert np.abs(out - ref).max() <= allowed_error(ref)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_shaw_argument_errors(fw):
    be = backend(fw)
    x = _shaw_inputs(0, 4, 4, 2)
    with pytest.raises(ValueError, match=r"rel_k must have R = 2 \* max_distance \+ 1 = 7 rows.*got shape \[5, 4\]"):
        be.attention(x, max_distance=3)
    with pytest.raises(ValueError, match="either rel_ids or max_distance"):
        be.attention(x, max_distance=2, rel_ids=np.zeros((4, 4), np.int64))
    with pytest.raises(ValueError, match="q_offset .* needs max_distance"):
        be.attention({**x, "rel_k": None, "rel_v": None}, q_offset=1)
    with pytest.raises(ValueError, match="max_distance must be a non-negative int, got -1"):
        be.attention(x, max_distance=-1)
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        be.attention(x, max_distance=2, implementation="fast")
    with pytest.raises(ValueError, match="both rel_k and rel_v are None"):
        be.attention({**x, "rel_k": None, "rel_v": None}, max_distance=2)
    with pytest.raises(ValueError, match="implementation='shaw' needs max_distance"):
        be.attention(x, implementation="shaw", rel_ids=np.zeros((4, 4), np.int64))


def test_torch_shaw_rejects_unsupported_causal_offset():
    be = backend("torch")
    x = _shaw_inputs(0, 4, 4, 1)
    with pytest.raises(ValueError, match="q_offset \\+ max\\(max_distance, 1\\) > S - T"):
        be.attention(x, max_distance=1, q_offset=-3, is_causal=True, implementation="shaw")
    ref = _oracle_shaw(x, 1, -3, 4, 4, is_causal=True)  # 'auto' falls back and stays exact
    out = be.attention(x, max_distance=1, q_offset=-3, is_causal=True, scale=SCALE)
    assert np.abs(out - ref).max() <= allowed_error(ref)


# Longer than a chunk, so the tails are cut into several chunks, the backward tiles their
# rectangles, and the right tail's reversed triangles sit at chunk edges.
CHUNKED_SHAW_CASES = [
    ShawCase(13, 13, 1),
    ShawCase(13, 13, 2, causal=True),
    ShawCase(11, 16, 2, causal=True),  # T != S, queries at the end
    ShawCase(16, 9, 3, 2),
    ShawCase(14, 14, 0, 0),  # no band: both tails use table row 0
    ShawCase(12, 12, 4, -5),  # negative offset
    ShawCase(10, 6, 1, 8, causal=True),  # causal with T > S: the first rows see no key
]


@pytest.mark.parametrize("chunk_rows", [1, 3, 7])
@pytest.mark.parametrize("case", CHUNKED_SHAW_CASES, ids=lambda c: c.id)
def test_torch_shaw_chunks_and_tiles(case, chunk_rows, monkeypatch):
    """Chunk sizes of 1, 3 and 7 backward rows (band block 3 or 1) give the oracle's output, the einsum grads."""
    import relattn_torch.shaw

    monkeypatch.setattr(relattn_torch.shaw, "_CHUNK_ELEMENTS", chunk_rows * B * N * H)
    monkeypatch.setattr(relattn_torch.shaw, "_BAND_BLOCK", 1 if chunk_rows == 1 else 3)
    be = backend("torch")
    x = _shaw_inputs(13, case.T, case.S, case.K, shared=chunk_rows != 3)
    ref = _oracle_shaw(x, case.K, case.offset, case.T, case.S, is_causal=case.causal)
    kw = dict(max_distance=case.K, q_offset=case.q_offset, is_causal=case.causal, scale=SCALE)
    _check_path(be, x, np.random.default_rng(5).normal(size=ref.shape), ref, "shaw", **kw)


def test_torch_shaw_tail_calls_cover_each_tail_once():
    """Every (query, key) pair of a tail is in exactly one fused call, for every chunk and tile size."""
    from relattn_torch._shaw_plan import tail_calls

    for case in CHUNKED_SHAW_CASES + SHAW_CASES:
        T, S, K, q_offset, causal = case.T, case.S, case.K, case.offset, case.causal
        d = np.arange(S)[None, :] - np.arange(T)[:, None] - q_offset
        visible = d <= S - T - q_offset if causal else np.ones((T, S), bool)
        want = {0: (visible & (d <= -K)).astype(int)}  # table row -> how often each pair is covered
        want[2 * K] = want.get(2 * K, 0) + (visible & (d >= max(K, 1)))  # K = 0: one row for both tails
        for rows in (1, 2, 5, T):
            for tile in (None, 1, 3):
                seen = {0: np.zeros((T, S), int), 2 * K: np.zeros((T, S), int)}
                for r0 in range(0, T, rows):
                    for c in tail_calls(T, S, q_offset, K, S - T if causal else None, (r0, min(r0 + rows, T)), tile):
                        (lo, hi), (s0, s1) = c.rows, c.keys
                        assert lo < hi and s0 < s1 and (tile is None or c.causal or s1 - s0 <= tile)
                        u, t = np.arange(hi - lo)[:, None], np.arange(s1 - s0)[None, :]
                        hit = (t <= u) if c.causal else np.ones((hi - lo, s1 - s0), bool)
                        if c.flip:
                            hit = hit[::-1, ::-1]
                        assert hit[0 if not c.flip else -1].any()  # the call's first row sees a key
                        seen[c.row][lo:hi, s0:s1] += hit
                for row in want:
                    np.testing.assert_array_equal(seen[row], want[row])


@pytest.mark.parametrize("key_block", [2, 64])
@pytest.mark.parametrize("T, S, K, off", [(7, 12, 2, None), (5, 12, 1, -4), (6, 12, 0, 3), (3, 12, 9, 1)])
def test_jax_reduce_is_bucket_sums(T, S, K, off, key_block, monkeypatch):
    """jax ``_reduce`` (block sums + a window gather) equals a literal per-bucket sum, for key blocks of
    2 (six blocks of S = 12) and 64 (one block); its adjoint ``_expand`` is the literal lookup."""
    jax = pytest.importorskip("jax")
    import relattn_jax.shaw as shaw

    monkeypatch.setattr(shaw, "_KEY_BLOCK", key_block)
    q_offset = S - T if off is None else off
    ids = oracle.shaw_ids(T, S, K, q_offset)  # [T, S]
    y = np.random.default_rng(5).normal(size=(B, N, T, S))
    want = np.zeros((B, N, T, 2 * K + 1))
    for r in range(2 * K + 1):
        want[..., r] = np.where(ids == r, y, 0).sum(-1)
    got = np.asarray(shaw._reduce(jax.numpy.asarray(y), q_offset, K))  # float64 (conftest enables x64)
    x = np.random.default_rng(6).normal(size=(B, N, T, 2 * K + 1))
    expanded = np.asarray(shaw._expand(jax.numpy.asarray(x), q_offset, K, S))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(expanded, np.take_along_axis(x, np.broadcast_to(ids, (B, N, T, S)), -1))


def test_jax_shaw_half_precision_and_second_order():
    """bfloat16 inputs keep their dtype and stay within bfloat16 error of float32 (output and grads);
    grad of grad through the Shaw path's custom VJP equals the einsum path's in float64."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    import relattn_jax

    T, S, K = 7, 7, 2
    x = _shaw_inputs(21, T, S, K)
    names = ["q", "k", "v", "rel_k", "rel_v"]
    cot = np.random.default_rng(22).normal(size=(B, T, N, H))

    def loss(impl, dtype):
        def f(*a):
            out = relattn_jax.relative_attention(*a, max_distance=K, is_causal=True, implementation=impl)
            return (out.astype(jnp.float32 if dtype != jnp.float64 else dtype) * cot).sum()
        return f

    args32 = [jnp.asarray(x[n], jnp.float32) for n in names]
    out32, g32 = jax.value_and_grad(loss("shaw", jnp.float32), argnums=range(5))(*args32)
    args16 = [a.astype(jnp.bfloat16) for a in args32]
    out16, g16 = jax.value_and_grad(loss("shaw", jnp.bfloat16), argnums=range(5))(*args16)
    assert abs(float(out16) - float(out32)) <= allowed_error(float(out32), 0.05)
    for name, a, b in zip(names, g16, g32):
        assert a.dtype == jnp.bfloat16, name
        err = float(jnp.abs(a.astype(jnp.float32) - b).max())
        assert err <= allowed_error(np.asarray(b), 0.05), (name, err)

    args64 = [jnp.asarray(x[n], jnp.float64) for n in names]
    direction = [jnp.asarray(np.random.default_rng(23).normal(size=a.shape)) for a in args64]

    def hvp(impl):
        g = jax.grad(loss(impl, jnp.float64), argnums=range(5))
        inner = lambda *a: sum((gi * d).sum() for gi, d in zip(g(*a), direction))  # noqa: E731
        return jax.grad(inner, argnums=range(5))(*args64)

    for name, a, b in zip(names, hvp("shaw"), hvp("einsum")):
        assert float(jnp.abs(a - b).max()) <= allowed_error(np.asarray(b), 1e-10), name


@pytest.mark.parametrize("mode", ["fwd", pytest.param("fwdbwd", marks=pytest.mark.slow)])
def test_torch_compile_of_chunked_shaw_path(mode, monkeypatch):
    """torch.compile of the banded Shaw path over several row chunks equals eager (forward; with
    --slow also the gradients). Regression: inductor gave a band block buffer written through out=
    strides its matmul lowering could not view (T = 4096 in the benchmark; here 4 chunks of 4 rows)."""
    torch = pytest.importorskip("torch")
    import relattn_torch
    import relattn_torch.shaw

    b, n, h, T, K = 2, 2, 8, 16, 2
    monkeypatch.setattr(relattn_torch.shaw, "_BAND_BLOCK", 4)
    monkeypatch.setattr(relattn_torch.shaw, "_CHUNK_ELEMENTS", 4 * b * n * h)
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(b, T, n, h, generator=g, requires_grad=mode == "fwdbwd") for _ in range(3)]
    args += [torch.randn(2 * K + 1, h, generator=g, requires_grad=mode == "fwdbwd") for _ in range(2)]

    def f(*a):
        return relattn_torch.relative_attention(*a, max_distance=K, implementation="shaw")

    torch._dynamo.reset()
    out = torch.compile(f)(*args)
    ref = f(*args)
    assert (out - ref).abs().max() <= 1e-5
    if mode == "fwdbwd":
        grads = torch.autograd.grad(out.sum(), args)
        ref_grads = torch.autograd.grad(ref.sum(), args)
        for gc, gr in zip(grads, ref_grads):
            assert (gc - gr).abs().max() <= 1e-5
