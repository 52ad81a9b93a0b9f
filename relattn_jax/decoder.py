"""A small decoder-only language model built on ``RelativeMultiHeadAttention`` (Flax NNX).

The twin of ``relattn_torch.decoder``: the same config, the same parameter names and
layouts (the weight-file names), the same equations. Parameters:

    tok_emb                  [V, E]   token embedding
    pos_emb                  [P, E]   learned absolute positions (``position="absolute"`` only)
    blocks.{i}.ln1.scale/bias [E]     pre-attention LayerNorm
    blocks.{i}.attn.*                 RelativeMultiHeadAttention (no relation tables when absolute)
    blocks.{i}.ln2.scale/bias [E]     pre-MLP LayerNorm
    blocks.{i}.mlp.w_in [E, F], b_in [F], w_out [F, E], b_out [E]
    ln_f.scale/bias          [E]      final LayerNorm
    head                     [E, V]   output projection (untied)

Dimension legend as in ``attention.py``, plus V vocabulary, F MLP width, P max positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from . import _cache_spec, _spec
from .modules import RelativeMultiHeadAttention


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of a ``DecoderLM``; identical fields in ``relattn_torch.decoder``.

    ``position`` is ``"relative"`` (relation tables in every layer, no position embedding)
    or ``"absolute"`` (learned ``pos_emb`` [max_len, E], attention without relative terms).
    The tables' ids are Shaw's clipped at ``max_distance``, or ``scheme``'s when it is given
    (a ``buckets.py`` scheme; then ``max_distance`` is unused). ``num_kv_heads`` (grouped
    key/value heads), ``relative_queries`` and ``relative_bias`` are passed to every layer's
    ``RelativeMultiHeadAttention``; the defaults give today's model, parameters and numbers.
    """

    vocab_size: int = 128
    embed_dim: int = 64
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 256
    max_distance: int = 8
    max_len: int = 512
    position: str = "relative"
    share_relative_heads: bool = False
    ln_eps: float = 1e-5
    num_kv_heads: int | None = None
    scheme: object = None
    relative_queries: bool = False
    relative_bias: bool = False

    def __post_init__(self):
        if self.position not in ("relative", "absolute"):
            raise ValueError(f"position must be 'relative' or 'absolute', got {self.position!r}")
        for name in ("vocab_size", "embed_dim", "num_heads", "num_layers", "mlp_dim", "max_len"):
            _spec.check_int(name, getattr(self, name))

    @property
    def relative(self) -> bool:
        return self.position == "relative"

    def attention_options(self) -> dict:
        """The keyword arguments of every layer's ``RelativeMultiHeadAttention`` (besides E, N and dtypes)."""
        positions = dict(max_distance=self.max_distance) if self.scheme is None else dict(scheme=self.scheme)
        rel = self.relative
        return dict(positions, relative_keys=rel, relative_values=rel, share_relative_heads=self.share_relative_heads,
                    num_kv_heads=self.num_kv_heads, relative_queries=rel and self.relative_queries,
                    relative_bias=rel and self.relative_bias)


class LayerNorm(nnx.Module):
    """LayerNorm over the last axis with ``scale``/``bias`` [E]; statistics in float32 for half inputs."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., E] -> [..., E] in x's dtype."""
        h = x.astype(jnp.float32) if x.dtype in (jnp.bfloat16, jnp.float16) else x
        mean = h.mean(-1, keepdims=True)
        var = ((h - mean) ** 2).mean(-1, keepdims=True)
        h = (h - mean) * jax.lax.rsqrt(var + self.eps)
        return (h * self.scale[...].astype(h.dtype) + self.bias[...].astype(h.dtype)).astype(x.dtype)


class MLP(nnx.Module):
    """x -> gelu(x w_in + b_in) w_out + b_out, exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.w_in = _normal(rngs, (dim, hidden), 1 / math.sqrt(dim), param_dtype)
        self.b_in = nnx.Param(jnp.zeros((hidden,), param_dtype))
        self.w_out = _normal(rngs, (hidden, dim), 1 / math.sqrt(hidden), param_dtype)
        self.b_out = nnx.Param(jnp.zeros((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, E] -> [B, T, E]."""
        h = jnp.einsum("BTE,EF->BTF", x, self.w_in[...].astype(x.dtype)) + self.b_in[...].astype(x.dtype)
        h = jax.nn.gelu(h, approximate=False)
        return jnp.einsum("BTF,FE->BTE", h, self.w_out[...].astype(x.dtype)) + self.b_out[...].astype(x.dtype)


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: DecoderConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.ln1 = LayerNorm(cfg.embed_dim, cfg.ln_eps, param_dtype=param_dtype)
        self.attn = RelativeMultiHeadAttention(
            cfg.embed_dim, cfg.num_heads, **cfg.attention_options(), dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )
        self.ln2 = LayerNorm(cfg.embed_dim, cfg.ln_eps, param_dtype=param_dtype)
        self.mlp = MLP(cfg.embed_dim, cfg.mlp_dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, *, cache=None, mask=None):
        """x [B, T, E] -> [B, T, E] (and the layer's new cache when one is given); mask as in the attention."""
        if cache is None:
            x = x + self.attn(self.ln1(x), mask=mask, is_causal=True)
        else:
            a, cache = self.attn(self.ln1(x), mask=mask, is_causal=True, cache=cache)
            x = x + a
        x = x + self.mlp(self.ln2(x))
        return x if cache is None else (x, cache)


class DecoderLM(nnx.Module):
    """Causal decoder LM: embedding, ``num_layers`` pre-norm blocks, final LayerNorm, head.

    Args:
        cfg: ``DecoderConfig``.
        dtype: compute dtype (e.g. ``jnp.bfloat16``); default the parameter dtype.
        param_dtype: parameter dtype (float32).
        rngs: ``nnx.Rngs`` with a ``params`` stream.
    """

    def __init__(self, cfg: DecoderConfig, *, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        E = cfg.embed_dim
        self.tok_emb = _normal(rngs, (cfg.vocab_size, E), 1.0, param_dtype)
        self.pos_emb = None if cfg.relative else _normal(rngs, (cfg.max_len, E), 1.0, param_dtype)
        self.blocks = nnx.List(
            [Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(cfg.num_layers)]
        )
        self.ln_f = LayerNorm(E, cfg.ln_eps, param_dtype=param_dtype)
        self.head = _normal(rngs, (E, cfg.vocab_size), 1 / math.sqrt(E), param_dtype)

    def __call__(self, tokens: jax.Array, *, cache=None, mask=None):
        """Next-token logits.

        Args:
            tokens: int [B, T], ids in [0, vocab_size) (checked unless traced: under
                ``jit`` an id out of range reads NaN rows, and -1 the last row).
            cache: optional per-layer KV caches from ``init_cache``; the tokens then
                continue the cached sequence (absolute positions start at its length).
            mask: optional bool mask broadcastable to [B, N, T, S] (True = may attend),
                combined with the causal mask in every layer (e.g. to hide left padding).

        Returns:
            logits [B, T, V] in float32 (or the parameter dtype), or
            ``(logits, new_cache)`` when ``cache`` is given.
        """
        _check_tokens(tokens, self.cfg)
        _check_cache(cache, self.cfg)
        dtype = self.dtype or self.tok_emb[...].dtype
        x = jnp.take(self.tok_emb[...], tokens, axis=0).astype(dtype)  # [B, T, E]
        if self.pos_emb is not None:
            start = 0 if cache is None else _cache_length(cache[0])
            pos = jax.lax.dynamic_slice_in_dim(self.pos_emb[...], start, tokens.shape[1], axis=0)
            x = x + pos.astype(dtype)[None]
        new_cache = None if cache is None else []
        for i, block in enumerate(self.blocks):
            if cache is None:
                x = block(x, mask=mask)
            else:
                x, layer_cache = block(x, cache=cache[i], mask=mask)
                new_cache.append(layer_cache)
        x = self.ln_f(x)
        out_dtype = jnp.promote_types(self.head[...].dtype, jnp.float32)
        logits = jnp.einsum("BTE,EV->BTV", x, self.head[...].astype(dtype)).astype(out_dtype)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype=None, *, checked: bool = False):
        """One attention KV cache per layer (a list), each from ``attn.init_cache`` (``checked`` as there)."""
        if not self.cfg.relative and max_length > self.cfg.max_len:
            raise ValueError(f"max_length must be <= max_len ({self.cfg.max_len}) for absolute positions, got {max_length}")
        dtype = dtype or self.dtype or self.tok_emb[...].dtype
        return [block.attn.init_cache(batch_size, max_length, dtype=dtype, checked=checked) for block in self.blocks]


def _check_tokens(tokens, cfg: DecoderConfig) -> None:
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T], got shape [{', '.join(map(str, tokens.shape))}]")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be an integer array, got dtype {tokens.dtype}")
    if not cfg.relative and tokens.shape[1] > cfg.max_len:
        raise ValueError(f"tokens length T must be <= max_len ({cfg.max_len}) for absolute positions, got {tokens.shape[1]}")
    if tokens.size and not isinstance(tokens, jax.core.Tracer):  # traced: out-of-range ids give NaN rows
        _cache_spec.check_token_range("tokens", int(jnp.min(tokens)), int(jnp.max(tokens)), cfg.vocab_size)


def _check_cache(cache, cfg: DecoderConfig) -> None:
    """None, or one layer cache per block, as ``init_cache`` returns them."""
    if cache is None:
        return
    want = f"cache must be a list of num_layers = {cfg.num_layers} layer caches (from init_cache)"
    if not isinstance(cache, (list, tuple)):
        raise TypeError(f"{want}, got {type(cache).__name__}")
    if len(cache) != cfg.num_layers:
        raise ValueError(f"{want}, got {len(cache)}")


def _cache_length(layer_cache):
    """Number of positions already in a layer cache (its ``length`` / ``index`` field)."""
    for name in ("length", "index", "end", "pos"):
        value = getattr(layer_cache, name, None)
        if value is None and isinstance(layer_cache, dict):
            value = layer_cache.get(name)
        if value is not None:
            return value[...] if isinstance(value, nnx.Variable) else value
    raise TypeError(f"cannot read the cached length from a {type(layer_cache).__name__}")


def _normal(rngs: nnx.Rngs, shape, std: float, dtype) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, dtype) * jnp.asarray(std, dtype))
