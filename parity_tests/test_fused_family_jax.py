"""The Pallas fused kernel on the relative-position family: bucket schemes, rel_q, rel_bias, GQA.

As in ``test_fused_jax.py``: kernels in the Pallas interpreter with 16 x 16 tiles, float32 (bfloat16
once), the output against the float64 oracle and the float64 einsum path of ``relative_attention``,
every gradient (q, k, v, rel_k, rel_v, rel_q, rel_bias) against the einsum path, and the lowering
for the real targets (Triton on cuda, Mosaic on tpu) with ``jax.export``, without a device.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.export  # noqa: E402,F401 (jax 0.7.1, the declared floor, does not load it with jax)
import jax.numpy as jnp  # noqa: E402

from relattn_jax import fused, padding_mask, relative_attention  # noqa: E402
from relattn_jax.buckets import BertBuckets, DebertaBuckets, ShawBuckets, T5Buckets  # noqa: E402

from . import oracle  # noqa: E402
from .numerics import assert_close  # noqa: E402
from .test_fused_jax import TILE, TOL, TRITON_CALL, _compile, _rounded, assert_triton_ir_compiles_for_sm90  # noqa: E402

pytestmark = pytest.mark.fused

B, N = 2, 4
F32 = jnp.float32
ARGS = ("q", "k", "v", "rel_k", "rel_v", "rel_q", "rel_bias")
TERMS = ("rel_k", "rel_v", "rel_q", "rel_bias")
T5 = T5Buckets(num_buckets=8, max_distance=20)  # saturation 7
T5_CAUSAL = T5Buckets(num_buckets=8, max_distance=20, bidirectional=False)  # saturation 14
DEBERTA = DebertaBuckets(position_buckets=8, max_relative_positions=24)  # saturation 24 (> a tile)
BERT = BertBuckets(max_position_embeddings=12)  # Shaw(11) mirrored


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(fused, "BLOCK_T", TILE)
    monkeypatch.setattr(fused, "BLOCK_S", TILE)


def _inputs(seed, T, S, H, R, terms=TERMS, N_kv=N, shared=False):
    """q [B, T, N, H], k, v [B, S, N_kv, H], the named tables ([R, H] or [R, N, H]; rel_bias [R, N])."""
    rng = np.random.default_rng(seed)
    table = (R, H) if shared else (R, N, H)
    x = {"q": rng.normal(size=(B, T, N, H)), "k": rng.normal(size=(B, S, N_kv, H)),
         "v": rng.normal(size=(B, S, N_kv, H)), "cot": rng.normal(size=(B, T, N, H))}
    for name in TERMS:
        x[name] = None if name not in terms else rng.normal(size=(R, N) if name == "rel_bias" else table)
    return x


def _value_and_grads(fn, x, dtype):
    """fn's output and the gradients of sum(out * cot) for every array input, in ``dtype``."""
    names = [n for n in ARGS if x.get(n) is not None]
    arrays = [jnp.asarray(x[n], dtype) for n in names]
    cot = jnp.asarray(x["cot"], jnp.float32 if dtype != jnp.float64 else jnp.float64)

    def loss(*arrays):
        out = fn(**dict(zip(names, arrays)))
        return jnp.sum(out.astype(cot.dtype) * cot), out

    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(names))), has_aux=True))
    (_, out), grads = _compile(step, *arrays)(*arrays)
    as64 = lambda a: np.asarray(a.astype(jnp.float32) if a.dtype != jnp.float64 else a, np.float64)
    return as64(out), {n: as64(g) for n, g in zip(names, grads)}


def _check(x, scheme, dtype="float32", q_offset=None, is_causal=False, mask=None, key_lengths=None):
    """Output against the oracle and the float64 einsum path; every gradient against the einsum path."""
    dt = jnp.dtype(dtype)
    T, S = x["q"].shape[1], x["k"].shape[1]
    visible = mask
    if key_lengths is not None:
        pad = np.asarray(padding_mask(jnp.asarray(key_lengths), S))
        visible = pad if mask is None else np.asarray(mask) & pad
    ids_kw = dict(max_distance=scheme) if isinstance(scheme, int) else dict(scheme=scheme)

    def run_fused(**a):
        return fused.fused_attention(**a, **ids_kw, q_offset=q_offset, is_causal=is_causal, interpret=True,
                                     mask=None if mask is None else jnp.asarray(mask), key_lengths=key_lengths)

    def run_einsum(**a):
        return relative_attention(**a, **ids_kw, q_offset=q_offset, is_causal=is_causal, implementation="einsum",
                                  mask=None if visible is None else jnp.asarray(visible))

    out, grads = _value_and_grads(run_fused, x, dt)
    x64 = _rounded(x, dt)
    ref, ref_grads = _value_and_grads(run_einsum, x64, jnp.float64)
    off = S - T if q_offset is None else int(q_offset)
    scheme_obj = ShawBuckets(scheme) if isinstance(scheme, int) else scheme
    ids = np.asarray(scheme_obj.ids(T, S, off))
    want = oracle.relative_attention(*(x64[n] for n in ARGS[:5]), rel_q=x64["rel_q"], rel_bias=x64["rel_bias"],
                                     rel_ids=ids, mask=visible, is_causal=is_causal)
    assert_close(ref, want, 1e-12)  # the reference itself
    assert_close(out, want, TOL[dtype])
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name
        assert_close(g, ref_grads[name], TOL[dtype])
    return out, grads


# (scheme, T, S, H, terms, N_kv, shared, q_offset, causal, mask kind)
CASES = [
    pytest.param(T5, 37, 45, 32, ("rel_bias",), N, False, None, False, "keys", id="t5-bias-padding"),
    pytest.param(T5_CAUSAL, 40, 40, 32, ("rel_bias",), 2, False, None, True, None, id="t5-causal-gqa"),
    pytest.param(DEBERTA, 36, 43, 32, ("rel_k", "rel_q"), N, False, None, False, "general",
                 id="deberta-c2p-p2c-mask"),
    pytest.param(BERT, 41, 34, 32, ("rel_k", "rel_q"), N, True, None, False, "lengths", id="bert-key-query"),
    pytest.param(ShawBuckets(5), 38, 47, 32, TERMS, 2, False, 3, True, None, id="shaw-all-terms-gqa"),
    pytest.param(4, 35, 42, 32, ("rel_q",), 1, True, None, False, None, id="max-distance-rel-q-mqa"),
    pytest.param(6, 39, 33, 16, ("rel_v", "rel_bias"), 2, False, -4, True, "general", id="max-distance-v-bias"),
]


@pytest.mark.parametrize("scheme, T, S, H, terms, N_kv, shared, q_offset, causal, masking", CASES)
def test_parity(scheme, T, S, H, terms, N_kv, shared, q_offset, causal, masking):
    R = 2 * scheme + 1 if isinstance(scheme, int) else scheme.num_ids
    x = _inputs(T + S + H, T, S, H, R, terms, N_kv, shared)
    rng = np.random.default_rng(T * S)
    mask = key_lengths = None
    if masking == "keys":  # [B, 1, 1, S] padding
        mask = np.arange(S)[None, None, None, :] < np.array([S, S - 20])[:, None, None, None]
    elif masking == "general":  # [B, N, T, S] with an empty row
        mask = rng.random((B, N, T, S)) < 0.6
        mask[1, 2, 4] = False
    elif masking == "lengths":
        key_lengths = jnp.asarray([S, 13], jnp.int32)
    _check(x, scheme, q_offset=q_offset, is_causal=causal, mask=mask, key_lengths=key_lengths)


def test_bfloat16_every_term_gqa():
    x = _inputs(21, 40, 46, 64, DEBERTA.num_ids, N_kv=2)
    _check(x, DEBERTA, dtype="bfloat16", is_causal=True)


def test_traced_q_offset_with_a_scheme():
    """With a traced q_offset the clip is the scheme's saturation (shaw_width cannot shrink it)."""
    x = _inputs(22, 1, 40, 32, T5.num_ids, N_kv=2)
    arrays = [jnp.asarray(x[n], jnp.float32) for n in ARGS if x[n] is not None]

    def step(off, *a):
        return fused.fused_attention(*a[:3], a[3], a[4], rel_q=a[5], rel_bias=a[6], scheme=T5, q_offset=off,
                                     key_lengths=jnp.full((B,), off + 1, jnp.int32), interpret=True)

    off = jnp.asarray(25, jnp.int32)
    out = _compile(jax.jit(step), off, *arrays)(off, *arrays)
    keep = np.arange(40)[None, None, None, :] <= 25
    want = oracle.relative_attention(*(x[n] for n in ARGS[:5]), rel_q=x["rel_q"], rel_bias=x["rel_bias"],
                                     rel_ids=np.asarray(T5.ids(1, 40, 25)), mask=keep)
    assert_close(np.asarray(out, np.float64), want, TOL["float32"])


def test_invariants():
    """C rows sum to 1 (with A^V all ones the value term of a row that sees a key is 1) and E rows sum
    to 0 (so rel_bias's gradient sums to 0 over r for each head), with a scheme, rel_q and GQA."""
    x = _inputs(23, 42, 50, 32, T5.num_ids, N_kv=2)
    x["rel_v"] = np.ones_like(x["rel_v"])
    mask = np.random.default_rng(3).random((B, 1, 42, 50)) < 0.5
    mask[1, 0, 7] = False
    run = lambda **a: fused.fused_attention(**a, scheme=T5, mask=jnp.asarray(mask), interpret=True)
    out, grads = _value_and_grads(run, x, jnp.float32)
    plain, _ = _value_and_grads(lambda **a: relative_attention(**a, scheme=T5, mask=jnp.asarray(mask),
                                                               implementation="einsum"),
                                dict(x, rel_v=None), jnp.float64)
    sees = np.broadcast_to(mask.any(-1)[:, 0, :, None, None], out.shape)
    assert np.abs((out - plain) - np.where(sees, 1.0, 0.0)).max() < 1e-5
    g = grads["rel_bias"]  # [R, N]
    assert np.abs(g.sum(0)).max() <= 1e-5 * np.abs(g).max()


@pytest.mark.parametrize("kw, error, match", [
    (dict(), ValueError, "pass scheme= \\(a buckets scheme\\) or max_distance"),
    (dict(scheme=T5, max_distance=2), ValueError, "pass either scheme= or max_distance"),
    (dict(scheme="t5"), TypeError, "scheme must be a relattn_jax.buckets scheme"),
    (dict(scheme=T5, rel_bias=jnp.zeros((7, N), F32)), ValueError, "rel_bias must have R = scheme.num_ids = 8 rows"),
    (dict(scheme=T5, rel_bias=jnp.zeros((8, 2), F32)), ValueError, "rel_bias \\(per-head bias table\\) must be \\[R, N\\]"),
    (dict(max_distance=2, rel_q=jnp.zeros((4, 16), F32)), ValueError, "rel_q must have R = 2 \\* max_distance \\+ 1 = 5"),
    (dict(scheme=BERT, rel_q=jnp.zeros((23, 3, 16), F32)), ValueError, "rel_q \\(relation table"),
    (dict(max_distance=2, rel_bias=jnp.zeros((5, N), jnp.float16)), TypeError, "rel_bias must have the same dtype"),
])
def test_argument_errors(kw, error, match):
    q = jnp.zeros((B, 5, N, 16), jnp.float32)
    kv = jnp.zeros((B, 6, 2, 16), jnp.float32)
    with pytest.raises(error, match=match):
        fused.fused_attention(q, kv, kv, **kw, interpret=True)


# --- lowering for the real targets, without a device ---------------------------------------------

def _export(platform, dtype, grad, scheme, monkeypatch):
    """jax.export of the fused call with every term, GQA (N = 4, N_kv = 2), a mask, key_lengths and a
    traced q_offset (or its gradient) for ``platform``; returns the module text."""
    monkeypatch.delenv(fused._INTERPRET_ENV, raising=False)
    monkeypatch.setattr(fused, "_platform", lambda q=None: "gpu" if platform == "cuda" else platform)
    Bx, T, S, Nx, Nkv, H, R = 2, 128, 192, 4, 2, 64, scheme.num_ids
    sd = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
    args = (sd(Bx, T, Nx, H), sd(Bx, S, Nkv, H), sd(Bx, S, Nkv, H), sd(R, Nx, H), sd(R, H), sd(R, Nx, H),
            sd(R, Nx), sd(Bx, Nx, T, S, dt=jnp.bool_), sd(dt=jnp.int32), sd(Bx, dt=jnp.int32))

    def f(q, k, v, rk, rv, rq, rb, mask, off, lengths):
        return fused.fused_attention(q, k, v, rk, rv, rel_q=rq, rel_bias=rb, scheme=scheme, q_offset=off,
                                     is_causal=True, mask=mask, key_lengths=lengths)

    def g(*a):
        return jax.grad(lambda *t: f(*t, *a[7:]).astype(jnp.float32).sum(), argnums=tuple(range(7)))(*a[:7])

    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if platform == "cuda" else []
    exported = jax.export.export(jax.jit(g if grad else f), platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_lowers_for_cuda_triton(monkeypatch, dtype, grad):
    text = _export("cuda", jnp.dtype(dtype), grad, T5, monkeypatch)
    assert text.count(TRITON_CALL) == (3 if grad else 1)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_lowers_for_tpu_mosaic(monkeypatch, dtype, grad):
    if jax.__version_info__ < fused._TPU_MIN_JAX:  # the floor venv: a clear refusal, not a RecursionError
        with pytest.raises(RuntimeError, match=r"TPU lowering needs jax >= 0\.10"):
            _export("tpu", jnp.dtype(dtype), grad, DEBERTA, monkeypatch)
        return
    text = _export("tpu", jnp.dtype(dtype), grad, DEBERTA, monkeypatch)
    assert text.count("tpu_custom_call") == (3 if grad else 1)


# --- slow sweep -----------------------------------------------------------------------------------

SCHEMES = [T5, T5_CAUSAL, DEBERTA, BERT, ShawBuckets(3), DebertaBuckets(position_buckets=0, max_relative_positions=6)]


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10))
def test_random_sweep(seed):
    rng = np.random.default_rng(300 + seed)
    T, S = int(rng.integers(1, 60)), int(rng.integers(1, 60))
    scheme = SCHEMES[seed % len(SCHEMES)]
    terms = tuple(t for t in TERMS if rng.integers(2)) or ("rel_bias",)
    N_kv = int(rng.choice([1, 2, 4]))
    x = _inputs(seed, T, S, int(rng.choice([16, 32, 48])), scheme.num_ids, terms, N_kv, bool(rng.integers(2)))
    mask = rng.random((B, int(rng.choice([1, N])), T, S)) < 0.8 if rng.integers(2) else None
    dtype = str(rng.choice(["float32", "float32", "bfloat16"]))
    _check(x, scheme, dtype=dtype, q_offset=int(rng.integers(-5, 6)) if rng.integers(2) else None,
           is_causal=bool(rng.integers(2)), mask=mask)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_triton_ir_compiles_for_sm90(monkeypatch, tmp_path, dtype):
    """The three kernels with every term and GQA (T5: R = 2 * 91 + 1 = 183, padded to 256): their Triton IR,
    captured while exporting for cuda, compiles to a cubin for sm_90 with the triton package here,
    within the 227 KiB of shared memory an H100/H200 block may use (a cross-check, as in
    test_fused_jax: the device compiles with jaxlib's own Triton)."""
    monkeypatch.setattr(fused, "BLOCK_T", 64)
    monkeypatch.setattr(fused, "BLOCK_S", 64)
    t5 = T5Buckets(num_buckets=32, max_distance=128)
    assert_triton_ir_compiles_for_sm90(monkeypatch, tmp_path,
                                       lambda: _export("cuda", jnp.dtype(dtype), True, t5, monkeypatch))
