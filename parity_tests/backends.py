"""One interface over the two packages, so a test is written once and run on both.

Every method takes and returns NumPy arrays at the boundary; the framework work
happens inside. ``backend("torch")`` / ``backend("jax")`` skip the test when that
framework is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest

ATTN_INPUTS = ("q", "k", "v", "rel_k", "rel_v", "rel_q", "rel_bias")


class TorchBackend:
    name = "torch"

    def __init__(self):
        self.torch = pytest.importorskip("torch")
        import relattn_torch

        self.lib = relattn_torch

    def array(self, x, dtype=None):
        if x is None:
            return None
        t = self.torch.from_numpy(np.ascontiguousarray(x))
        return t if dtype is None else t.to(getattr(self.torch, dtype))

    def numpy(self, x):
        return x.detach().float().numpy() if x.dtype in (self.torch.bfloat16, self.torch.float16) else x.detach().numpy()

    def attention(self, inputs: dict, dtype=None, **kw):
        args = {n: self.array(inputs.get(n), dtype) for n in ATTN_INPUTS}
        kw = self._convert_kw(kw)
        return self.numpy(self.lib.relative_attention(**args, **kw))

    def attention_grads(self, inputs: dict, cotangent, **kw):
        """Output and d<output . cotangent>/d(input) for every array input."""
        args = {n: self.array(inputs.get(n)) for n in ATTN_INPUTS}
        for t in args.values():
            if t is not None:
                t.requires_grad_(True)
        out = self.lib.relative_attention(**args, **self._convert_kw(kw))
        (out * self.array(cotangent)).sum().backward()
        return self.numpy(out), {n: self.numpy(t.grad) for n, t in args.items() if t is not None}

    def _convert_kw(self, kw):
        return {n: (self.array(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}

    def module(self, cls_name, *args, dtype="float64", **kw):
        return getattr(self.lib, cls_name)(*args, dtype=getattr(self.torch, dtype), **kw)

    def params(self, module) -> dict:
        return {n: self.numpy(p) for n, p in module.named_parameters()}

    def set_params(self, module, params: dict):
        with self.torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(self.array(params[n]))

    def call(self, module, *args, **kw):
        args = [self.array(a) if isinstance(a, np.ndarray) else a for a in args]
        return self.numpy(module(*args, **self._convert_kw(kw)))


class JaxBackend:
    name = "jax"

    def __init__(self):
        self.jax = pytest.importorskip("jax")
        import jax.numpy as jnp
        from flax import nnx

        import relattn_jax

        self.jnp, self.nnx, self.lib = jnp, nnx, relattn_jax

    def array(self, x, dtype=None):
        if x is None:
            return None
        return self.jnp.asarray(x, dtype=dtype)

    def numpy(self, x):
        x = np.asarray(x.astype(self.jnp.float32) if x.dtype in (self.jnp.bfloat16, self.jnp.float16) else x)
        return x

    def attention(self, inputs: dict, dtype=None, **kw):
        args = {n: self.array(inputs.get(n), dtype) for n in ATTN_INPUTS}
        return self.numpy(self.lib.relative_attention(**args, **self._convert_kw(kw)))

    def attention_grads(self, inputs: dict, cotangent, **kw):
        names = [n for n in ATTN_INPUTS if inputs.get(n) is not None]
        kw = self._convert_kw(kw)
        fixed = {n: None for n in ATTN_INPUTS}

        def f(arrays):
            out = self.lib.relative_attention(**{**fixed, **arrays}, **kw)
            return (out * cotangent).sum(), out

        (_, out), grads = self.jax.value_and_grad(f, has_aux=True)({n: self.array(inputs[n]) for n in names})
        return self.numpy(out), {n: self.numpy(g) for n, g in grads.items()}

    def _convert_kw(self, kw):
        return {n: (self.array(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()}

    def module(self, cls_name, *args, dtype="float64", **kw):
        dt = getattr(self.jnp, dtype)
        return getattr(self.lib, cls_name)(*args, param_dtype=dt, rngs=self.nnx.Rngs(0), **kw)

    def params(self, module) -> dict:
        state = self.nnx.state(module, self.nnx.Param)
        return {param_name(path): np.asarray(v[...]) for path, v in _flat(self.nnx, state)}

    def set_params(self, module, params: dict):
        for path, var in _flat(self.nnx, self.nnx.state(module, self.nnx.Param)):
            name = param_name(path)
            _owner(module, path)[...] = self.jnp.asarray(params[name], var[...].dtype)

    def call(self, module, *args, **kw):
        args = [self.array(a) if isinstance(a, np.ndarray) else a for a in args]
        return self.numpy(module(*args, **self._convert_kw(kw)))


def param_name(path) -> str:
    """The canonical parameter name of an nnx state path, as torch's ``named_parameters`` spells it."""
    return ".".join(map(str, path))


def _flat(nnx, state):
    return nnx.to_flat_state(state)


def _owner(module, path):
    obj = module
    for p in path:
        obj = obj[p] if isinstance(p, int) else getattr(obj, p)
    return obj


BACKENDS = {"torch": TorchBackend, "jax": JaxBackend}


def backend(name: str):
    return BACKENDS[name]()
