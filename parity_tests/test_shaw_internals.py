"""The Shaw paths' own pieces: torch's chunks, tiles, tail calls and compiled form; jax's expand /
reduce pair, half precision and second order through its custom VJP.

Outputs against the float64 oracle, gradients against the same framework's einsum path.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import oracle
from .backends import backend
from .numerics import allowed_error
from .shaw_cases import B, H, N, SCALE, SHAW_CASES, ShawCase, check_path, oracle_shaw, shaw_inputs
from .shaw_cases import small_blocks  # noqa: F401 (autouse fixture)


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
    pytest.importorskip("torch")
    import relattn_torch.shaw

    monkeypatch.setattr(relattn_torch.shaw, "_CHUNK_ELEMENTS", chunk_rows * B * N * H)
    monkeypatch.setattr(relattn_torch.shaw, "_BAND_BLOCK", 1 if chunk_rows == 1 else 3)
    be = backend("torch")
    x = shaw_inputs(13, case.T, case.S, case.K, shared=chunk_rows != 3)
    ref = oracle_shaw(x, case.K, case.offset, case.T, case.S, is_causal=case.causal)
    kw = dict(max_distance=case.K, q_offset=case.q_offset, is_causal=case.causal, scale=SCALE)
    check_path(be, x, np.random.default_rng(5).normal(size=ref.shape), ref, "shaw", **kw)


def test_torch_shaw_tail_calls_cover_each_tail_once():
    """Every (query, key) pair of a tail is in exactly one fused call, for every chunk and tile size."""
    pytest.importorskip("torch")
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
@pytest.mark.parametrize("T, S, K, off", [(7, 12, 2, None), (5, 12, 1, -4), (6, 12, 0, 3), (3, 12, 9, 1)],
                         ids=["T7-S12-K2", "T5-S12-K1-off-4", "T6-S12-K0-off3", "T3-S12-K9-off1"])
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
    x = shaw_inputs(21, T, S, K)
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
