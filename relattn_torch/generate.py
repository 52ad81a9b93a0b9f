"""Autoregressive generation with a KV cache: greedy and seeded temperature sampling.

Why this twin differs: torch runs an eager loop well (each op is dispatched as it comes), so
this is one loop under ``torch.no_grad`` with one seeded ``torch.Generator`` for the draws. The
JAX twin compiles the whole loop (a jitted prefill and a ``lax.scan`` over the decode steps, with
the step as a function of its own) and folds the step number into its key for each draw.

Works with any model offering ``init_cache(batch_size, max_length, dtype=...)`` and
``model(tokens [B, T], *, cache=...) -> (logits [B, T, V], cache)``, e.g. ``DecoderLM``.
The twin of ``relattn_jax/generate.py`` (the same tokens for greedy decoding with the
same weights; sampled tokens differ, the two frameworks' random streams differ).
"""

from __future__ import annotations

import torch

from . import _cache_spec, _spec


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int = 0,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` by ``max_new_tokens`` tokens, one cached step at a time.

    Args:
        model: see the module docstring; it is called as given (call ``.eval()``
            first to disable dropout).
        prompt: int tokens [B, P], B >= 1, P >= 1, ids in [0, vocab_size) (the upper
            bound is checked when the model has ``cfg.vocab_size`` or ``vocab_size``).
        max_new_tokens: number of tokens to generate (>= 1).
        temperature: 0 for greedy (argmax); > 0 (finite) samples from softmax(logits / temperature).
        seed: seed of the sampling generator, an int in [0, 2**32) (ignored when greedy).
        prompt_lengths: int [B], for a batch of right-padded prompts of different
            lengths. The prompts are moved to the right (left padding), the pad slots
            are hidden by a padding mask over the cache and the model is called with
            ``mask=``. Relative positions are shift-invariant, so each row gets exactly
            the tokens it would get alone (needs a relative-position model that
            accepts ``mask=``).

    Returns:
        int [B, max_new_tokens], the new tokens only.

    Raises:
        TypeError, ValueError: naming the argument, before anything runs.
    """
    B, P = _check_args(model, prompt, max_new_tokens, temperature, seed, prompt_lengths)
    kw = {}
    if prompt_lengths is not None:
        prompt, kw["mask"] = left_pad(prompt, prompt_lengths, P + max_new_tokens)
    gen = torch.Generator(device=prompt.device).manual_seed(seed) if temperature > 0 else None
    cache = model.init_cache(B, P + max_new_tokens)
    logits, cache = model(prompt, cache=cache, **kw)  # prefill
    token = sample(logits[:, -1], temperature, gen)  # [B]
    out = [token]
    for _ in range(max_new_tokens - 1):
        logits, cache = model(token[:, None], cache=cache, **kw)
        token = sample(logits[:, -1], temperature, gen)
        out.append(token)
    return torch.stack(out, dim=1)


def sample(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next tokens [B] from logits [B, V]: argmax if temperature == 0, else a seeded draw."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def left_pad(prompt: torch.Tensor, lengths: torch.Tensor, max_length: int):
    """Right-padded prompts [B, P] with ``lengths`` [B] -> (left-padded [B, P], mask [B, 1, 1, max_length]).

    Row b's ``lengths[b]`` tokens move to the end; the mask hides cache slots
    j < P - lengths[b] (the pads) from every query.
    """
    B, P = prompt.shape
    shift = P - lengths.to(prompt.device).long()  # [B]
    src = (torch.arange(P, device=prompt.device)[None, :] - shift[:, None]) % P  # [B, P]
    slot = torch.arange(max_length, device=prompt.device)
    return torch.gather(prompt, 1, src), (slot[None, :] >= shift[:, None])[:, None, None, :]


def _check_args(model, prompt, max_new_tokens, temperature, seed, prompt_lengths) -> tuple[int, int]:
    """Every argument, eagerly (rules and messages as in the JAX twin); returns (B, P)."""
    if not isinstance(prompt, torch.Tensor):
        raise TypeError(f"prompt must be a tensor of int tokens [B, P], got {type(prompt).__name__}")
    if prompt.dim() != 2 or prompt.dtype.is_floating_point or prompt.dtype == torch.bool:
        raise ValueError(f"prompt must be int tokens [B, P], got shape {_spec.fmt(prompt.shape)} dtype {prompt.dtype}")
    B, P = prompt.shape
    _cache_spec.check_generate_args(B, P, max_new_tokens, temperature, seed)
    if not callable(getattr(model, "init_cache", None)):
        raise TypeError(
            f"model must offer init_cache(batch_size, max_length) and model(tokens, *, cache=...) "
            f"(e.g. DecoderLM), got {type(model).__name__}"
        )
    lo, hi = torch.aminmax(prompt)
    _cache_spec.check_token_range("prompt", int(lo), int(hi), _vocab_size(model))
    if prompt_lengths is not None:
        if not isinstance(prompt_lengths, torch.Tensor) or prompt_lengths.dtype.is_floating_point or prompt_lengths.dtype == torch.bool:
            raise TypeError(f"prompt_lengths must be an int tensor [B], got {_describe(prompt_lengths)}")
        if tuple(prompt_lengths.shape) != (B,):
            raise ValueError(f"prompt_lengths must be [B] = [{B}], got shape {_spec.fmt(prompt_lengths.shape)}")
        if int(prompt_lengths.min()) < 1 or int(prompt_lengths.max()) > P:
            raise ValueError(f"prompt_lengths must be in [1, P] = [1, {P}], got {prompt_lengths.tolist()}")
    return B, P


def _vocab_size(model):
    """The model's vocabulary size (``cfg.vocab_size`` or ``vocab_size``), or None if it has none."""
    size = getattr(getattr(model, "cfg", None), "vocab_size", None)
    size = getattr(model, "vocab_size", None) if size is None else size
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def _describe(x) -> str:
    shape = getattr(x, "shape", None)
    return type(x).__name__ if shape is None else f"shape {_spec.fmt(shape)} dtype {x.dtype}"
