"""The Pallas fused kernel (``relattn_jax.fused``) against the float64 oracle and the einsum path.

Kernels run in the Pallas interpreter with 16 x 16 tiles, so T, S of 40-70 span several tiles with
ragged edges. Outputs are compared with ``oracle.relative_attention`` and every gradient with the
einsum path of ``relative_attention`` run in float64 on the same (rounded) inputs; one test checks
directional derivatives against finite differences of the oracle. Lowering for the real targets
(Triton on cuda, Mosaic on tpu) is checked with ``jax.export`` and needs no device.

Compiling an interpreted kernel costs seconds on this CPU (running it, milliseconds), so each case
compiles one jitted value-and-grad, with XLA's CPU optimisations off (``_compile``).
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.export  # noqa: E402,F401 (jax 0.7.1, the declared floor, does not load it with jax)
import jax.numpy as jnp  # noqa: E402

from relattn_jax import causal_mask, fused, padding_mask, relative_attention  # noqa: E402

from . import oracle  # noqa: E402
from .numerics import assert_close  # noqa: E402

pytestmark = pytest.mark.fused

B, N = 2, 3
TILE = 16
ARGS = ("q", "k", "v", "rel_k", "rel_v")
# XLA CPU compiles the interpreted kernels ~3x faster without its optimisation passes and fusion emitters.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
# float32: 2e-5 * max(1, |ref|). Half precision: the kernel rounds p to the input dtype before p @ v
# (as flash attention does) and the output once more, so with unit roundoff u (float16 2**-11,
# bfloat16 2**-8) and O(1) logits errors of a few u * |ref| are expected: the parity cases measured
# up to 2.3 u (outputs and all gradients); the bounds are 8 u.
TOL = {"float32": 2e-5, "float16": 4e-3, "bfloat16": 3e-2}


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(fused, "BLOCK_T", TILE)
    monkeypatch.setattr(fused, "BLOCK_S", TILE)


def _inputs(seed, T, S, H, K, shared=True, keys=True, values=True):
    rng = np.random.default_rng(seed)
    table = (2 * K + 1, H) if shared else (2 * K + 1, N, H)
    return {
        "q": rng.normal(size=(B, T, N, H)),
        "k": rng.normal(size=(B, S, N, H)),
        "v": rng.normal(size=(B, S, N, H)),
        "rel_k": rng.normal(size=table) if keys else None,
        "rel_v": rng.normal(size=table) if values else None,
        "cot": rng.normal(size=(B, T, N, H)),
    }


def _compile(jitted, *args):
    """jitted lowered and compiled with FAST_COMPILE (or plainly, where this XLA lacks those options)."""
    lowered = jitted.lower(*args)
    try:
        return lowered.compile(FAST_COMPILE)
    except Exception:  # an XLA without one of the options
        return lowered.compile()


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


def _rounded(x, dtype):
    """x's arrays rounded to dtype and back to float64 (the references see the kernel's inputs)."""
    return {n: (None if a is None else np.asarray(jnp.asarray(a, dtype).astype(jnp.float64))) for n, a in x.items()}


def _check(x, K, dtype="float32", q_offset=None, is_causal=False, mask=None, key_lengths=None, **fused_kw):
    """The fused kernel's output equals the oracle's and the float64 einsum path's; every gradient
    equals the einsum path's. Returns (output, grads) of the kernel."""
    dt = jnp.dtype(dtype)
    T, S = x["q"].shape[1], x["k"].shape[1]
    visible = mask
    if key_lengths is not None:
        pad = np.asarray(padding_mask(jnp.asarray(key_lengths), S))
        visible = pad if mask is None else np.asarray(mask) & pad
    tables = x["rel_k"] is not None or x["rel_v"] is not None

    def run_fused(**a):
        return fused.fused_attention(**a, max_distance=K, q_offset=q_offset, is_causal=is_causal,
                                     mask=None if mask is None else jnp.asarray(mask),
                                     key_lengths=key_lengths, **fused_kw)

    def run_einsum(**a):
        shaw = dict(max_distance=K, q_offset=q_offset) if tables else {}
        return relative_attention(**a, **shaw, is_causal=is_causal, implementation="einsum",
                                  mask=None if visible is None else jnp.asarray(visible))

    out, grads = _value_and_grads(run_fused, x, dt)
    x64 = _rounded(x, dt)
    ref, ref_grads = _value_and_grads(run_einsum, x64, jnp.float64)
    off = S - T if q_offset is None else int(q_offset)
    ids = oracle.shaw_ids(T, S, K, off) if tables else None
    want = oracle.relative_attention(x64["q"], x64["k"], x64["v"], x64["rel_k"], x64["rel_v"], rel_ids=ids,
                                     mask=visible, is_causal=is_causal)
    assert_close(ref, want, 1e-12)  # the reference itself
    assert_close(out, want, TOL[dtype])
    assert set(grads) == set(ref_grads)
    for name, g in grads.items():
        assert np.all(np.isfinite(g)), name
        assert_close(g, ref_grads[name], TOL[dtype])
    return out, grads


# (T, S, H, K, q_offset, causal, shared, keys, values)
CASES = [
    (40, 53, 32, 3, None, False, True, True, True),  # T != S, ragged tiles, shared tables
    (53, 40, 64, 20, None, True, False, True, True),  # K > tile, per-head, causal with S < T (empty rows)
    (48, 48, 128, 2, 0, True, True, True, False),  # prefill T = S, keys only, H = 128
    (40, 53, 32, 4, 7, False, False, False, True),  # values only, q_offset given
    (45, 61, 32, 0, None, False, True, True, True),  # K = 0: one relation id
    (37, 66, 32, 6, -5, True, False, True, True),  # negative q_offset (queries before the keys)
]


@pytest.mark.parametrize("T, S, H, K, q_offset, causal, shared, keys, values", CASES)
def test_parity(T, S, H, K, q_offset, causal, shared, keys, values):
    x = _inputs(T * S + K, T, S, H, K, shared, keys, values)
    _check(x, K, q_offset=q_offset, is_causal=causal, interpret=True)


def test_no_tables_and_square_mask_via_env_switch(monkeypatch):
    """Neither table: plain attention; a [1, 1, T, S] mask; interpret=None reads the env switch."""
    monkeypatch.setenv(fused._INTERPRET_ENV, "1")
    x = _inputs(1, 41, 50, 32, 3, keys=False, values=False)
    mask = np.random.default_rng(2).random((1, 1, 41, 50)) < 0.7
    _check(x, 3, mask=mask)


@pytest.mark.parametrize("form", ["mask", "key_lengths"])
def test_key_padding(form):
    """Padded keys as a [B, 1, 1, S] mask or as key_lengths (the kernel skips the padded key tiles)."""
    x = _inputs(3, 44, 57, 32, 5, shared=False)
    lengths = np.array([57, 19], np.int32)
    if form == "mask":
        _check(x, 5, mask=np.arange(57)[None, None, None, :] < lengths[:, None, None, None], interpret=True)
    else:
        _check(x, 5, key_lengths=jnp.asarray(lengths), is_causal=True, interpret=True)


def test_general_mask_with_empty_rows():
    """A [B, N, T, S] mask with rows that see no key: those rows are exactly 0 with zero gradients."""
    x = _inputs(4, 43, 52, 32, 4)
    mask = np.random.default_rng(5).random((B, N, 43, 52)) < 0.6
    mask[0, 1, 5] = False
    mask[1, :, 30:34] = False
    out, grads = _check(x, 4, mask=mask, interpret=True)
    assert np.all(out[0, 5, 1] == 0.0) and np.all(out[1, 30:34] == 0.0)
    assert np.all(grads["q"][0, 5, 1] == 0.0) and np.all(grads["q"][1, 30:34] == 0.0)


def test_causal_rows_before_the_keys_are_zero():
    """Causal with S < T: the first T - S queries see no key; exact zeros, finite gradients."""
    x = _inputs(6, 50, 34, 32, 2)
    out, grads = _check(x, 2, is_causal=True, interpret=True)
    assert np.all(out[:, :16] == 0.0) and np.all(grads["q"][:, :16] == 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(dtype):
    x = _inputs(7, 40, 51, 64, 9, shared=False)
    mask = np.arange(51)[None, None, None, :] < np.array([51, 30])[:, None, None, None]
    out, _ = _check(x, 9, dtype=dtype, is_causal=True, mask=mask, interpret=True)
    assert np.isfinite(out).all()


def test_q_offset_as_array():
    x = _inputs(8, 40, 53, 32, 3)
    _check(x, 3, q_offset=jnp.asarray(11, jnp.int32), interpret=True)


def _cache_step(x, K, length, form):
    """One call on a KV cache of S slots as ``relattn_jax.cache`` makes it, with q_offset (the old
    length) traced under jit. "prefill": T = S new positions into an empty cache, causal. "decode":
    one query at position ``length``, the unwritten slots hidden by the cache's [T, S] mask
    j <= i + q_offset built inside jit ("decode-mask") or by key_lengths = length + 1 ("decode-lengths")."""
    S = x["k"].shape[1]
    arrays = [jnp.asarray(x[n], jnp.float32) for n in ARGS]

    def step(off, *a):
        kw = dict(max_distance=K, q_offset=off, is_causal=True, interpret=True)
        if form == "decode-mask":
            kw["mask"] = causal_mask(1, S, q_offset=off)  # [1, S]
        elif form == "decode-lengths":
            kw["key_lengths"] = jnp.full((B,), off + 1, jnp.int32)
        return fused.fused_attention(*a, **kw)

    off = jnp.asarray(0 if form == "prefill" else length, jnp.int32)
    out = _compile(jax.jit(step), off, *arrays)(off, *arrays)
    T = x["q"].shape[1]
    ids = oracle.shaw_ids(T, S, K, int(off))
    keep = np.arange(S)[None, :] <= np.arange(T)[:, None] + int(off)  # [T, S]
    want = oracle.relative_attention(*(x[n] for n in ARGS), rel_ids=ids, mask=keep, is_causal=True)
    assert_close(np.asarray(out, np.float64), want, TOL["float32"])


@pytest.mark.parametrize("form", ["prefill", "decode-mask", "decode-lengths"])
def test_traced_q_offset_kv_cache(form):
    rng = np.random.default_rng(9)
    T, S = (50, 50) if form == "prefill" else (1, 50)
    x = {"q": rng.normal(size=(B, T, N, 32)), "k": rng.normal(size=(B, S, N, 32)),
         "v": rng.normal(size=(B, S, N, 32)), "rel_k": rng.normal(size=(9, 32)), "rel_v": rng.normal(size=(9, N, 32))}
    _cache_step(x, 4, 37, form)


def test_invariants():
    """Bucket masses sum to 1 per row (with A^V = all ones the value term of row i is sum_r C_ir), and
    the bucket sums of ds sum to 0 per row (so the key table's gradient sums to 0 over r)."""
    x = _inputs(10, 42, 55, 32, 5, shared=True)
    x["rel_v"] = np.ones_like(x["rel_v"])
    mask = np.random.default_rng(3).random((B, 1, 42, 55)) < 0.5
    mask[1, 0, 7] = False
    out, grads = _value_and_grads(
        lambda **a: fused.fused_attention(**a, max_distance=5, mask=jnp.asarray(mask), interpret=True),
        x, jnp.float32)
    no_values = dict(x, rel_v=None)
    plain, _ = _value_and_grads(lambda **a: relative_attention(**a, max_distance=5, mask=jnp.asarray(mask),
                                                               implementation="einsum"), no_values, jnp.float64)
    sees = np.broadcast_to(mask.any(-1)[:, 0, :, None, None], out.shape)
    assert np.abs((out - plain) - np.where(sees, 1.0, 0.0)).max() < 1e-5
    g = grads["rel_k"]
    assert np.abs(g.sum(0)).max() <= 1e-5 * np.abs(g).max()


def test_gradients_match_oracle_finite_differences():
    """Directional derivatives of the kernel's loss equal central differences of the float64 oracle."""
    x = _inputs(11, 35, 39, 32, 3, shared=False)
    _, grads = _value_and_grads(lambda **a: fused.fused_attention(**a, max_distance=3, is_causal=True,
                                                                  interpret=True), x, jnp.float32)
    ids = oracle.shaw_ids(35, 39, 3, 4)
    loss = lambda a: float(np.sum(oracle.relative_attention(*(a[n] for n in ARGS), rel_ids=ids, is_causal=True)
                                  * x["cot"]))
    rng, eps = np.random.default_rng(12), 1e-5
    for name in ARGS:
        d = rng.normal(size=x[name].shape)
        plus, minus = dict(x), dict(x)
        plus[name], minus[name] = x[name] + eps * d, x[name] - eps * d
        fd = (loss(plus) - loss(minus)) / (2 * eps)
        assert abs(float(np.sum(grads[name] * d)) - fd) <= 2e-5 * max(1.0, abs(fd)), name


@pytest.mark.parametrize("bug", ["band_edge", "dropped_bucket"])
def test_planted_bug_is_caught(monkeypatch, bug):
    monkeypatch.setattr(fused, "_PLANTED_BUG", bug)
    x = _inputs(13, 40, 45, 32, 3)
    with pytest.raises(AssertionError):
        _check(x, 3, interpret=True)


def _values(jaxpr, inside=False):
    """(where, aval) of every operand and result in jaxpr and the jaxprs nested in it; where is
    "kernel" inside a Pallas kernel, "operand" for a pallas_call's operands, else "outside"."""
    for eqn in jaxpr.eqns:
        kernel = eqn.primitive.name == "pallas_call"
        for var in [*eqn.invars, *eqn.outvars]:
            if hasattr(var, "aval") and hasattr(var.aval, "dtype"):
                yield ("kernel" if inside else "operand" if kernel else "outside"), var.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _values(sub, inside or kernel)


def test_32_bit_inside_the_kernels_under_x64():
    """With jax_enable_x64 on (as in this test session), the kernels' operands are 32-bit or smaller
    and no 64-bit value exists inside them but weak-typed scalar constants (folded into float32 or
    int32 where they are used)."""
    q, k, v = _small(T=20, S=30)
    tables = (jnp.zeros((7, 16), jnp.float32), jnp.zeros((7, N, 16), jnp.float32))
    loss = lambda *a: fused.fused_attention(*a, max_distance=3, is_causal=True, q_offset=jnp.asarray(4),
                                            mask=jnp.ones((B, 1, 1, 30), bool), key_lengths=jnp.asarray([30, 9]),
                                            interpret=True).sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, *tables).jaxpr
    values = list(_values(jaxpr))
    assert {w for w, _ in values} == {"kernel", "operand", "outside"}
    wide = [(w, a) for w, a in values if w != "outside" and a.dtype.itemsize > 4
            and not (w == "kernel" and a.weak_type and a.shape == ())]
    assert not wide, wide


# --- lowering for the real targets, without a device ---------------------------------------------

TRITON_CALL = "__gpu$xla.gpu.triton"


def _export(platform, dtype, grad, monkeypatch):
    """jax.export of the fused forward (or the gradient of a loss) for ``platform``; returns the module text."""
    monkeypatch.delenv(fused._INTERPRET_ENV, raising=False)
    monkeypatch.setattr(fused, "_platform", lambda q=None: "gpu" if platform == "cuda" else platform)
    Bx, T, S, Nx, H, K = 2, 128, 192, 4, 64, 8
    sd = lambda *shape, dt=dtype: jax.ShapeDtypeStruct(shape, dt)
    args = (sd(Bx, T, Nx, H), sd(Bx, S, Nx, H), sd(Bx, S, Nx, H), sd(2 * K + 1, H), sd(2 * K + 1, Nx, H),
            sd(Bx, 1, T, S, dt=jnp.bool_), sd(dt=jnp.int32), sd(Bx, dt=jnp.int32))

    def f(q, k, v, rk, rv, mask, off, lengths):
        return fused.fused_attention(q, k, v, rk, rv, max_distance=K, q_offset=off, is_causal=True, mask=mask,
                                     key_lengths=lengths)

    def g(q, k, v, rk, rv, *rest):
        return jax.grad(lambda *a: f(*a, *rest).astype(jnp.float32).sum(), argnums=(0, 1, 2, 3, 4))(q, k, v, rk, rv)

    checks = [jax.export.DisabledSafetyCheck.custom_call(TRITON_CALL)] if platform == "cuda" else []
    exported = jax.export.export(jax.jit(g if grad else f), platforms=[platform], disabled_checks=checks)(*args)
    return exported.mlir_module()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_lowers_for_cuda_triton(monkeypatch, dtype, grad):
    text = _export("cuda", jnp.dtype(dtype), grad, monkeypatch)
    assert text.count(TRITON_CALL) == (3 if grad else 1)


@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "bwd"])
def test_lowers_for_tpu_mosaic(monkeypatch, grad):
    if jax.__version_info__ < fused._TPU_MIN_JAX:  # the floor venv: a clear refusal, not a RecursionError
        with pytest.raises(RuntimeError, match=r"TPU lowering needs jax >= 0\.10"):
            _export("tpu", jnp.dtype("float32"), grad, monkeypatch)
        return
    text = _export("tpu", jnp.dtype("float32"), grad, monkeypatch)
    assert text.count("tpu_custom_call") == (3 if grad else 1)


def test_a_gather_in_the_kernel_fails_to_lower(monkeypatch):
    """The lowering tests catch the classic mistake: a value gather (take_along_axis) in a kernel."""
    monkeypatch.setattr(fused, "_PLANTED_BUG", "gather")
    with pytest.raises(NotImplementedError, match="gather"):
        _export("cuda", jnp.dtype("float32"), False, monkeypatch)


@pytest.mark.slow
def test_triton_ir_compiles_for_sm90(monkeypatch, tmp_path):
    """The three kernels' Triton IR (captured while exporting for cuda) compiles to a cubin for sm_90 with
    the triton package here, within the 227 KiB of shared memory an H100/H200 block may use. The device
    compiles with jaxlib's own Triton, so this is a cross-check, not the device's build."""
    assert_triton_ir_compiles_for_sm90(monkeypatch, tmp_path,
                                       lambda: _export("cuda", jnp.dtype("float32"), True, monkeypatch))


def assert_triton_ir_compiles_for_sm90(monkeypatch, tmp_path, export):
    """Capture the Triton IR of the three kernels while ``export()`` lowers them for cuda, and compile
    each to a cubin for sm_90 with the triton package here, within 227 KiB of shared memory."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget

    try:
        from jax._src.pallas.triton import pallas_call_registration as registration
        lower = registration.lowering.lower_jaxpr_to_triton_module
    except (ImportError, AttributeError):
        pytest.skip("this jax lowers Pallas to Triton through other internals")
    modules = []

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    monkeypatch.setattr(registration.lowering, "lower_jaxpr_to_triton_module", capture)
    export()
    assert len(modules) == 3
    for i, text in enumerate(modules):
        path = tmp_path / f"kernel{i}.ttir"
        path.write_text(text)
        kernel = triton.compile(str(path), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
        assert 0 < kernel.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("T, S, H, K, platform, tiles", [
    (1000, 1000, 64, 8, "gpu", (64, 64)),
    (1, 50, 64, 8, "gpu", (16, 64)),  # a decode step: the smallest query tile
    (300, 300, 256, 8, "gpu", (32, 32)),  # wide heads: smaller tiles (shared memory)
    (300, 300, 64, 64, "gpu", (32, 32)),  # >= 256 padded relation ids: smaller tiles (register spills)
    (300, 300, 64, 63, "gpu", (64, 64)),
    (40, 1000, 64, 8, "tpu", (128, 128)),  # Mosaic: whole 128-lane tiles
])
def test_tile_sizes(monkeypatch, T, S, H, K, platform, tiles):
    monkeypatch.setattr(fused, "BLOCK_T", 64)
    monkeypatch.setattr(fused, "BLOCK_S", 64)
    d = fused._spec.Dims(B=1, T=T, S=S, N=1, H=H)
    cfg, (Tp, Sp, _, _) = fused._config(d, K, 1.0, False, {}, 1, None, platform)
    assert (cfg.block_t, cfg.block_s) == tiles
    assert Tp % cfg.block_t == 0 and Sp % cfg.block_s == 0 and Tp - T < cfg.block_t and Sp - S < cfg.block_s


# --- availability and argument errors -------------------------------------------------------------

def test_unavailable_on_cpu(monkeypatch):
    monkeypatch.delenv(fused._INTERPRET_ENV, raising=False)
    q = jnp.zeros((1, 4, 1, 16), jnp.float32)
    if jax.default_backend() == "cpu":
        reason = fused.unavailable(q)
        assert isinstance(reason, str) and fused._INTERPRET_ENV in reason
        with pytest.raises(RuntimeError, match="GPU or TPU"):
            fused.fused_attention(q, q, q, max_distance=1)
    monkeypatch.setenv(fused._INTERPRET_ENV, "1")
    assert fused.unavailable(q) is None


def test_unavailable_on_tpu_below_the_checked_jax(monkeypatch):
    """The TPU lowering was checked at jax 0.10.2 and fails at 0.7.1: older jax gets a reason, not a crash."""
    monkeypatch.delenv(fused._INTERPRET_ENV, raising=False)
    monkeypatch.setattr(fused, "_platform", lambda q=None: "tpu")
    monkeypatch.setattr(jax, "__version_info__", (0, 7, 1))
    reason = fused.unavailable()
    assert reason is not None and "jax >= 0.10" in reason
    monkeypatch.setattr(jax, "__version_info__", (0, 10, 2))
    assert fused.unavailable() is None
    monkeypatch.setattr(fused, "_platform", lambda q=None: "gpu")
    monkeypatch.setattr(jax, "__version_info__", (0, 7, 1))
    assert fused.unavailable() is None  # the GPU (Triton) lowering is not affected


def _small(dtype=jnp.float32, T=5, S=6, H=16):
    return jnp.zeros((B, T, N, H), dtype), jnp.zeros((B, S, N, H), dtype), jnp.zeros((B, S, N, H), dtype)


@pytest.mark.parametrize("kw, error, match", [
    (dict(dtype=jnp.float64), TypeError, "q must be float32, float16 or bfloat16"),
    (dict(rel_k=jnp.zeros((4, 16), jnp.float32)), ValueError, "rel_k must have R = 2 \\* max_distance \\+ 1 = 5 rows"),
    (dict(rel_v=jnp.zeros((5, 2, 16), jnp.float32)), ValueError, "rel_v \\(relation table"),
    (dict(rel_k=jnp.zeros((5, 16), jnp.float16)), TypeError, "rel_k must have the same dtype"),
    (dict(mask=jnp.ones((B, N, 4, 6), bool)), ValueError, "mask must broadcast to \\[B, N, T, S\\]"),
    (dict(mask=jnp.ones((1, 1, 5, 6), jnp.int32)), TypeError, "mask must be a bool array"),
    (dict(key_lengths=jnp.ones((3,), jnp.int32)), ValueError, "key_lengths must be int \\[B\\]"),
    (dict(key_lengths=jnp.ones((B,), jnp.float32)), TypeError, "key_lengths must be an integer array"),
    (dict(q_offset=jnp.zeros((2,), jnp.int32)), TypeError, "q_offset must be an int or a 0-d integer array"),
    (dict(max_distance=-1), ValueError, "max_distance must be a non-negative int"),
])
def test_argument_errors(kw, error, match):
    q, k, v = _small(kw.pop("dtype", jnp.float32))
    args = dict(max_distance=2, interpret=True) | kw
    with pytest.raises(error, match=match):
        fused.fused_attention(q, k, v, args.pop("rel_k", None), args.pop("rel_v", None), **args)


def test_shape_errors_name_the_argument():
    q, k, v = _small()
    with pytest.raises(ValueError, match="k and v must have N_kv heads"):  # N = 3 is not a multiple of 2
        fused.fused_attention(q, k[:, :, :2], v[:, :, :2], max_distance=1, interpret=True)
    with pytest.raises(ValueError, match="k must be"):
        fused.fused_attention(q, k[..., :8], v[..., :8], max_distance=1, interpret=True)


# --- slow sweep -----------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("seed", range(12))
def test_random_sweep(seed):
    rng = np.random.default_rng(100 + seed)
    T, S = int(rng.integers(1, 70)), int(rng.integers(1, 70))
    # K >= 1: with K = 0 the key table's exact gradient is 0, and half-precision noise is not relative to it
    H, K = int(rng.choice([16, 32, 48, 64])), int(rng.integers(1, 24))
    x = _inputs(seed, T, S, H, K, shared=bool(rng.integers(2)), keys=bool(rng.integers(2)), values=True)
    mask = rng.random((B, 1, T, S)) < 0.8 if rng.integers(2) else None
    dtype = str(rng.choice(["float32", "float32", "bfloat16"]))
    _check(x, K, dtype=dtype, is_causal=bool(rng.integers(2)), mask=mask, interpret=True)
