"""The shared-weights harness: one module, two frameworks, one weight file.

``compare(cfg)`` builds a module in ``cfg.source`` (random weights, biases and
tables included), saves it with that framework's ``save_weights``, loads the file
into the same module built in the other framework, runs both on the same inputs
and compares, by canonical name:

    output       the forward output
    grad_inputs  d<out . c>/d(every input array) for a fixed cotangent c
    grad_params  d<out . c>/d(every parameter)
    oracle       each framework's output vs the float64 NumPy oracle

Tolerances (max abs error per tensor): float64 1e-12 * max(1, max |reference|);
float32 2e-5 * max(1, max |reference|) (2e-5 absolute for unit-scale tensors);
bfloat16 2e-2 * max(1, max |reference|) (a smoke test: outputs only, no gradients).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass, replace

import numpy as np

from . import oracle
from .backends import backend, param_name
from .numerics import allowed_error

TOLERANCE = {"float64": 1e-12, "float32": 2e-5, "bfloat16": 2e-2}
OTHER = {"torch": "jax", "jax": "torch"}


@dataclass(frozen=True)
class Config:
    """One configuration. ``kind`` "mha" is RelativeMultiHeadAttention (Shaw ids from
    positions); "raa" is RelationAwareAttention with caller-given relations, either
    ``relation`` "ids" (tables + random relation ids) or "dense" (edge tensors)."""

    kind: str = "mha"  # "mha" | "raa"
    B: int = 2
    T: int = 4
    S: int = 4  # key length; must equal T unless cross (raa is always self)
    N: int = 2
    H: int = 3
    E: int = 6  # model width (mha)
    cross: bool = False  # mha: separate key/value inputs
    max_distance: int = 2
    tables: str = "shared"  # "shared" [R, H] / [T, S, H] | "per_head" [R, N, H] / [T, S, N, H]
    relative: str = "both"  # "both" | "keys" | "values" | "neither"
    relation: str = "ids"  # raa: "ids" | "dense"
    mask: str = "none"  # "none" | "padding" | "causal" | "both"
    empty_row: bool = False  # padding mask hides every key of example 0 (fully masked rows)
    bias: bool = True
    dtype: str = "float64"
    source: str = "torch"  # framework that builds and saves the weights
    seed: int = 0

    @property
    def family(self) -> str:
        """Configuration family for the report."""
        if self.kind == "raa":
            return f"raa-{self.relation}"
        if self.empty_row or (self.mask in ("causal", "both") and self.T > self.S):
            return "mha-fully-masked"
        if self.T == 1:
            return "mha-T=1"
        return "mha-cross" if self.cross else "mha-self"


@dataclass
class Comparison:
    quantity: str
    error: float  # max abs error over every tensor of this quantity
    scale: float  # max |reference| over those tensors
    tol: float  # allowed max abs error
    worst: str  # name of the tensor with the largest error / tol

    @property
    def ok(self) -> bool:
        return self.error <= self.tol


def tolerance(dtype: str, scale: float) -> float:
    """Allowed max abs error for a tensor whose largest |reference| entry is ``scale``.

    Absolute (one number per tensor, never elementwise relative), scaled up only
    when the reference exceeds unit scale: parameter gradients sum over B * T
    positions, and bf16 outputs near 3 have a 1-ulp spacing of 2**-6 = 0.0156.
    """
    return allowed_error(scale, TOLERANCE[dtype])


def normalize(cfg: Config) -> Config:
    """Make a drawn config consistent: self-attention has S = T, raa has no cross/bias/E."""
    if not cfg.cross or cfg.kind == "raa":
        cfg = replace(cfg, S=cfg.T, cross=False)
    if cfg.kind == "raa":
        cfg = replace(cfg, bias=False, E=cfg.N * cfg.H)
    return cfg


def build(fw: str, cfg: Config, seed: int):
    """A module of ``cfg`` in framework ``fw`` with fresh random parameters.

    Parameters are drawn by NumPy from ``seed`` (kernels N(0, 1/fan_in), biases and
    tables N(0, 1/4)), so biases and tables are non-zero. The JAX module is built
    abstractly (``nnx.eval_shape``) and then filled, which skips compiling its
    initialisers; every parameter is replaced, so nothing abstract is left.
    """
    b = backend(fw)
    if cfg.kind == "raa":
        args, kw = ("RelationAwareAttention", cfg.N, cfg.H), {}
    else:
        args = ("RelativeMultiHeadAttention", cfg.E, cfg.N)
        kw = dict(
            head_dim=cfg.H, max_distance=cfg.max_distance, relative_keys=cfg.relative in ("both", "keys"),
            relative_values=cfg.relative in ("both", "values"), share_relative_heads=cfg.tables == "shared",
            bias=cfg.bias,
        )
    rng = np.random.default_rng(seed)
    if fw == "torch":
        m = b.module(*args, dtype=cfg.dtype, **kw)
        shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    else:
        m = b.nnx.eval_shape(lambda: b.module(*args, dtype=cfg.dtype, **kw))
        paths = {param_name(p): p for p, _ in b.nnx.to_flat_state(b.nnx.state(m, b.nnx.Param))}
        shapes = {n: tuple(v.shape) for n, v in _jax_params(b, m).items()}
    params = {n: rng.normal(size=s) * (s[0] ** -0.5 if n.startswith("w_") else 0.5) for n, s in sorted(shapes.items())}
    if fw == "torch":
        b.set_params(m, params)
    else:
        new = {paths[n]: b.jnp.asarray(a, cfg.dtype) for n, a in params.items()}
        b.nnx.update(m, b.nnx.from_flat_state(new))
    return b, m


def _jax_params(b, m) -> dict:
    return {param_name(p): v for p, v in b.nnx.to_flat_state(b.nnx.state(m, b.nnx.Param))}


def inputs(cfg: Config) -> tuple[dict, dict]:
    """(arrays that get gradients, fixed keyword arguments), as float64 NumPy."""
    rng = np.random.default_rng(1000 + cfg.seed)
    kw = {"is_causal": cfg.mask in ("causal", "both")}
    if cfg.mask in ("padding", "both"):
        lengths = rng.integers(1, cfg.S + 1, size=cfg.B)
        lengths[0] = 0 if cfg.empty_row else lengths[0]
        kw["mask"] = (np.arange(cfg.S)[None, :] < lengths[:, None])[:, None, None, :]
    if cfg.kind == "mha":
        arrays = {"query": rng.normal(size=(cfg.B, cfg.T, cfg.E))}
        if cfg.cross:
            arrays.update(key=rng.normal(size=(cfg.B, cfg.S, cfg.E)), value=rng.normal(size=(cfg.B, cfg.S, cfg.E)))
        return arrays, kw
    arrays = {"x": rng.normal(size=(cfg.B, cfg.S, cfg.N, cfg.H))}
    per_head = (cfg.N,) if cfg.tables == "per_head" else ()
    R = 2 * cfg.max_distance + 1
    shape = (R, *per_head, cfg.H) if cfg.relation == "ids" else (cfg.T, cfg.S, *per_head, cfg.H)
    for name, on in (("rel_k", cfg.relative in ("both", "keys")), ("rel_v", cfg.relative in ("both", "values"))):
        if on:
            arrays[name] = rng.normal(size=shape) * 0.5
    if cfg.relation == "ids" and len(arrays) > 1:
        kw["rel_ids"] = rng.integers(0, R, size=(cfg.T, cfg.S))
    return arrays, kw


def run(b, module, cfg: Config, arrays: dict, kw: dict, cotangent, grads: bool = True):
    """(output, {input: grad}, {param: grad}) as NumPy; grads skipped if not ``grads``."""
    if b.name == "torch":
        return _run_torch(b, module, cfg, arrays, kw, cotangent, grads)
    return _run_jax(b, module, cfg, arrays, kw, cotangent, grads)


def _run_torch(b, module, cfg, arrays, kw, cotangent, grads):
    torch = b.torch
    xs = {n: b.array(a, cfg.dtype).requires_grad_(grads) for n, a in arrays.items()}
    kw = {n: (b.array(a) if isinstance(a, np.ndarray) else a) for n, a in kw.items()}
    module.zero_grad(set_to_none=True)
    with torch.enable_grad() if grads else torch.no_grad():
        out = _call(module, cfg, xs, kw)
        if not grads:
            return b.numpy(out), {}, {}
        (out * b.array(cotangent, cfg.dtype)).sum().backward()
    g_in = {n: b.numpy(x.grad) for n, x in xs.items()}
    g_par = {n: b.numpy(p.grad) for n, p in module.named_parameters()}
    return b.numpy(out), g_in, g_par


def _run_jax(b, module, cfg, arrays, kw, cotangent, grads):
    jax, jnp, nnx = b.jax, b.jnp, b.nnx
    xs = {n: jnp.asarray(a, cfg.dtype) for n, a in arrays.items()}
    kw = {n: (jnp.asarray(a) if isinstance(a, np.ndarray) else a) for n, a in kw.items()}
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    cot = jnp.asarray(cotangent, cfg.dtype)
    arrays_kw = {n: a for n, a in kw.items() if not isinstance(a, bool)}
    flags = {n: a for n, a in kw.items() if isinstance(a, bool)}

    def loss(params, xs, arrays_kw):
        out = _call(nnx.merge(graphdef, params, rest), cfg, xs, {**arrays_kw, **flags})
        return (out * cot).sum(), out

    # One XLA compile per configuration (eager mode compiles every op per shape);
    # masks and ids are arguments so equal shapes reuse the compiled code.
    # test_harness checks jit == eager separately.
    if not grads:
        return b.numpy(jax.jit(lambda *a: loss(*a)[1])(params, xs, arrays_kw)), {}, {}
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (_, out), (g_par, g_in) = step(params, xs, arrays_kw)
    g_par = {param_name(p): b.numpy(v[...]) for p, v in nnx.to_flat_state(g_par)}
    return b.numpy(out), {n: b.numpy(g) for n, g in g_in.items()}, g_par


def _call(module, cfg, xs, kw):
    if cfg.kind == "mha":
        return module(xs["query"], xs.get("key"), xs.get("value"), **kw)
    return module(xs["x"], xs.get("rel_k"), xs.get("rel_v"), **kw)


def oracle_output(cfg: Config, params: dict, arrays: dict, kw: dict) -> np.ndarray:
    """The float64 NumPy oracle on the same weights and inputs."""
    mask = kw.get("mask")
    if cfg.kind == "mha":
        return oracle.multi_head_attention(
            params, arrays["query"], arrays.get("key"), arrays.get("value"), max_distance=cfg.max_distance,
            mask=mask, is_causal=kw["is_causal"],
        )
    x = arrays["x"]
    q, k, v = (np.einsum("bsni,nih->bsnh", x, params[w]) for w in ("w_q", "w_k", "w_v"))
    return oracle.relative_attention(q, k, v, arrays.get("rel_k"), arrays.get("rel_v"), rel_ids=kw.get("rel_ids"),
                                     mask=mask, is_causal=kw["is_causal"])


def compare(cfg: Config, after_load=None) -> list[Comparison]:
    """Build ``cfg`` in ``cfg.source``, move it through the weight file, compare.

    ``after_load(module)``, if given, is applied to the loaded module (tests use it
    to check that a wrong weight is caught).
    """
    cfg = normalize(cfg)
    src_b, src = build(cfg.source, cfg, seed=cfg.seed)
    dst_b, dst = build(OTHER[cfg.source], cfg, seed=cfg.seed + 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "weights.safetensors")
        _weights(cfg.source).save_weights(src, path)
        _weights(OTHER[cfg.source]).load_weights(dst, path)
    if after_load is not None:
        after_load(dst)
    arrays, kw = inputs(cfg)
    grads = cfg.dtype != "bfloat16"
    n_out = (cfg.B, cfg.T, cfg.E) if cfg.kind == "mha" else (cfg.B, cfg.S, cfg.N, cfg.H)
    cot = np.random.default_rng(2000 + cfg.seed).normal(size=n_out)
    ref = run(src_b, src, cfg, _rounded(src_b, arrays, cfg.dtype), kw, cot, grads)
    got = run(dst_b, dst, cfg, _rounded(src_b, arrays, cfg.dtype), kw, cot, grads)
    out = [_max_error("output", {"output": ref[0]}, {"output": got[0]}, cfg.dtype)]
    if grads:
        out.append(_max_error("grad_inputs", ref[1], got[1], cfg.dtype))
        out.append(_max_error("grad_params", ref[2], got[2], cfg.dtype))
    params = {n: v.astype(np.float64) for n, v in src_b.params(src).items()}
    exact = oracle_output(cfg, params, _rounded(src_b, arrays, cfg.dtype), kw)
    out.append(_max_error("oracle", {"torch": exact, "jax": exact},
                          {src_b.name: ref[0], dst_b.name: got[0]}, cfg.dtype))
    return out


def failures(results: list[Comparison]) -> list[Comparison]:
    return [r for r in results if not r.ok]


def describe(cfg: Config, results: list[Comparison]) -> str:
    rows = [f"{r.quantity}: error {r.error:.3g} (tol {r.tol:.3g}, worst {r.worst})" for r in results]
    return f"{asdict(normalize(cfg))}\n  " + "\n  ".join(rows)


def _weights(fw: str):
    if fw == "torch":
        from relattn_torch import weights
    else:
        from relattn_jax import weights
    return weights


def _rounded(b, arrays: dict, dtype: str) -> dict:
    """Inputs as float64 holding values exactly representable in ``dtype``."""
    return {n: b.numpy(b.array(a, dtype)).astype(np.float64) for n, a in arrays.items()}


def _max_error(quantity: str, ref: dict, got: dict, dtype: str) -> Comparison:
    """Worst tensor (largest error / tolerance) among same-named tensors."""
    if set(ref) != set(got):
        raise AssertionError(f"{quantity}: names differ: {sorted(ref)} vs {sorted(got)}")
    best = Comparison(quantity, 0.0, 0.0, tolerance(dtype, 0.0), "-")
    for name in sorted(ref):
        r, g = np.asarray(ref[name], np.float64), np.asarray(got[name], np.float64)
        if r.shape != g.shape:
            raise AssertionError(f"{quantity} {name}: shapes differ: {r.shape} vs {g.shape}")
        scale = float(np.abs(r).max(initial=0.0))
        err = float(np.abs(r - g).max(initial=0.0))
        tol = tolerance(dtype, scale)
        if err / tol >= best.error / best.tol:
            best = Comparison(quantity, err, scale, tol, name)
    return best
