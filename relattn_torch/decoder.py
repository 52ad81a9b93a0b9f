"""A small decoder-only language model built on ``RelativeMultiHeadAttention`` (PyTorch).

The twin of ``relattn_jax.decoder``: the same config, the same parameter names and
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

import torch
import torch.nn.functional as F
from torch import nn

from . import _cache_spec, _spec
from .modules import RelativeMultiHeadAttention


@dataclass(frozen=True)
class DecoderConfig:
    """Sizes of a ``DecoderLM``; identical fields in ``relattn_jax.decoder``.

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


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with ``scale``/``bias`` [E]; statistics in float32 for half inputs."""

    def __init__(self, dim: int, eps: float, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., E] -> [..., E] in x's dtype."""
        h = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
        mean = h.mean(-1, keepdim=True)
        var = ((h - mean) ** 2).mean(-1, keepdim=True)
        h = (h - mean) * torch.rsqrt(var + self.eps)
        return (h * self.scale.to(h.dtype) + self.bias.to(h.dtype)).to(x.dtype)


class MLP(nn.Module):
    """x -> gelu(x w_in + b_in) w_out + b_out, exact (erf) GELU."""

    def __init__(self, dim: int, hidden: int, *, device=None, dtype=None):
        super().__init__()
        new = dict(device=device, dtype=dtype)
        self.w_in = nn.Parameter(torch.empty(dim, hidden, **new))
        self.b_in = nn.Parameter(torch.zeros(hidden, **new))
        self.w_out = nn.Parameter(torch.empty(hidden, dim, **new))
        self.b_out = nn.Parameter(torch.zeros(dim, **new))
        nn.init.normal_(self.w_in, std=1 / math.sqrt(dim))
        nn.init.normal_(self.w_out, std=1 / math.sqrt(hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, E] -> [B, T, E]."""
        h = F.gelu(torch.einsum("BTE,EF->BTF", x, self.w_in) + self.b_in)
        return torch.einsum("BTF,FE->BTE", h, self.w_out) + self.b_out


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then + mlp(ln2(x))."""

    def __init__(self, cfg: DecoderConfig, *, device=None, dtype=None):
        super().__init__()
        new = dict(device=device, dtype=dtype)
        self.ln1 = LayerNorm(cfg.embed_dim, cfg.ln_eps, **new)
        self.attn = RelativeMultiHeadAttention(
            cfg.embed_dim, cfg.num_heads, **cfg.attention_options(), **new,
        )
        self.ln2 = LayerNorm(cfg.embed_dim, cfg.ln_eps, **new)
        self.mlp = MLP(cfg.embed_dim, cfg.mlp_dim, **new)

    def forward(self, x: torch.Tensor, *, cache=None, mask=None):
        """x [B, T, E] -> [B, T, E] (and the layer's new cache when one is given); mask as in the attention."""
        if cache is None:
            x = x + self.attn(self.ln1(x), mask=mask, is_causal=True)
        else:
            a, cache = self.attn(self.ln1(x), mask=mask, is_causal=True, cache=cache)
            x = x + a
        x = x + self.mlp(self.ln2(x))
        return x if cache is None else (x, cache)


class DecoderLM(nn.Module):
    """Causal decoder LM: embedding, ``num_layers`` pre-norm blocks, final LayerNorm, head.

    Args:
        cfg: ``DecoderConfig``.
        device, dtype: factory arguments for the parameters, as in ``torch.nn``.
    """

    def __init__(self, cfg: DecoderConfig, *, device=None, dtype=None):
        super().__init__()
        self.cfg = cfg
        new = dict(device=device, dtype=dtype)
        E = cfg.embed_dim
        self.tok_emb = nn.Parameter(torch.randn(cfg.vocab_size, E, **new))
        self.pos_emb = None if cfg.relative else nn.Parameter(torch.randn(cfg.max_len, E, **new))
        self.blocks = nn.ModuleList([Block(cfg, **new) for _ in range(cfg.num_layers)])
        self.ln_f = LayerNorm(E, cfg.ln_eps, **new)
        self.head = nn.Parameter(torch.randn(E, cfg.vocab_size, **new) / math.sqrt(E))

    def forward(self, tokens: torch.Tensor, *, cache=None, mask=None):
        """Next-token logits.

        Args:
            tokens: int [B, T], ids in [0, vocab_size) (checked unless compiling; one
                host sync per call).
            cache: optional per-layer KV caches from ``init_cache``; the tokens then
                continue the cached sequence (absolute positions start at its length).
            mask: optional bool mask broadcastable to [B, N, T, S] (True = may attend),
                combined with the causal mask in every layer (e.g. to hide left padding).

        Returns:
            logits [B, T, V] in the parameter dtype, or ``(logits, new_cache)`` when
            ``cache`` is given.
        """
        _check_tokens(tokens, self.cfg)
        _check_cache(cache, self.cfg)
        x = self.tok_emb[tokens]  # [B, T, E]
        if self.pos_emb is not None:
            start = 0 if cache is None else int(_cache_length(cache[0]))
            x = x + self.pos_emb[start : start + tokens.shape[1]][None]
        new_cache = None if cache is None else []
        for i, block in enumerate(self.blocks):
            if cache is None:
                x = block(x, mask=mask)
            else:
                x, layer_cache = block(x, cache=cache[i], mask=mask)
                new_cache.append(layer_cache)
        logits = torch.einsum("BTE,EV->BTV", self.ln_f(x), self.head)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype=None, *, checked: bool = False):
        """One attention KV cache per layer (a list), each from ``attn.init_cache`` (``checked`` as there)."""
        if not self.cfg.relative and max_length > self.cfg.max_len:
            raise ValueError(f"max_length must be <= max_len ({self.cfg.max_len}) for absolute positions, got {max_length}")
        dtype = dtype or self.tok_emb.dtype
        return [block.attn.init_cache(batch_size, max_length, dtype=dtype, checked=checked) for block in self.blocks]


def _check_tokens(tokens, cfg: DecoderConfig) -> None:
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be [B, T], got shape [{', '.join(map(str, tokens.shape))}]")
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise TypeError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    if not cfg.relative and tokens.shape[1] > cfg.max_len:
        raise ValueError(f"tokens length T must be <= max_len ({cfg.max_len}) for absolute positions, got {tokens.shape[1]}")
    if tokens.numel() and not torch.compiler.is_compiling():  # compiled: inductor's own index assert
        lo, hi = torch.aminmax(tokens)
        _cache_spec.check_token_range("tokens", int(lo), int(hi), cfg.vocab_size)


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
        value = layer_cache.get(name) if isinstance(layer_cache, dict) else getattr(layer_cache, name, None)
        if value is not None:
            return value
    raise TypeError(f"cannot read the cached length from a {type(layer_cache).__name__}")
