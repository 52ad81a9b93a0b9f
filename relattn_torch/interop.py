"""Import weights from PyTorch's standard attention layer.

``torch.nn.MultiheadAttention`` keeps its projections as ``Linear`` weights
[out, in] over flattened heads (feature n * H + h); ours keeps them per head:

    in_proj_weight [3E, E] = [W_q; W_k; W_v]  ->  w_q[e, n, h] = W_q[n * H + h, e]   [E, N, H]
    in_proj_bias   [3E]    = [b_q; b_k; b_v]  ->  b_q[n, h]    = b_q[n * H + h]      [N, H]
    out_proj.weight [E, E]                    ->  w_o[n, h, e] = W_o[e, n * H + h]   [N, H, E]
    out_proj.bias   [E]                       ->  b_o                                [E]
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import RelativeMultiHeadAttention

_FROM_SOURCE = ("embed_dim", "num_heads", "head_dim", "bias", "device", "dtype")


def from_torch_mha(mha: nn.MultiheadAttention, **options) -> RelativeMultiHeadAttention:
    """A ``RelativeMultiHeadAttention`` with the projections of ``mha``.

    The relation tables start at zero, so the new module computes what ``mha``
    computes (with relative terms on or off) until training moves the tables. Our
    module is batch-first ([B, T, E]) and its mask is True = may attend, so a torch
    ``key_padding_mask`` (True = ignore) becomes ``mask=~key_padding_mask[:, None, None, :]``.

    Args:
        mha: a ``torch.nn.MultiheadAttention`` (``batch_first=True`` matches our
            calling convention; the weights do not depend on it). Unsupported, and
            rejected: ``add_bias_kv``, ``add_zero_attn``, ``kdim``/``vdim`` != embed_dim.
        **options: other ``RelativeMultiHeadAttention`` arguments (``max_distance``,
            ``relative_keys``, ``relative_values``, ``share_relative_heads``, ``dropout``
            (default ``mha.dropout``), ``scale``). Sizes, bias, dtype and device come from ``mha``.

    Returns:
        The new module, on ``mha``'s device and dtype, in ``mha``'s train/eval mode.
    """
    if not isinstance(mha, nn.MultiheadAttention):
        raise TypeError(f"mha must be a torch.nn.MultiheadAttention, got {type(mha).__name__}")
    taken = sorted(set(options) & set(_FROM_SOURCE))
    if taken:
        raise TypeError(f"from_torch_mha takes {', '.join(taken)} from mha; do not pass them as options")
    _check_supported(mha)
    E, N = mha.embed_dim, mha.num_heads
    w_q, w_k, w_v = mha.in_proj_weight.detach().chunk(3)  # each [E, E] as [out, in]
    ref = w_q
    out = RelativeMultiHeadAttention(
        E, N, bias=mha.in_proj_bias is not None, **{"dropout": mha.dropout, **options},
        device=ref.device, dtype=ref.dtype,
    )
    H = out.head_dim
    new = {
        "w_q": w_q.T.reshape(E, N, H), "w_k": w_k.T.reshape(E, N, H), "w_v": w_v.T.reshape(E, N, H),
        "w_o": mha.out_proj.weight.T.reshape(N, H, E),
    }
    if mha.in_proj_bias is not None:
        b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
        new.update(b_q=b_q.reshape(N, H), b_k=b_k.reshape(N, H), b_v=b_v.reshape(N, H), b_o=mha.out_proj.bias)
    with torch.no_grad():
        for name, value in new.items():
            getattr(out, name).copy_(value)
        for name in ("rel_k", "rel_v"):
            if getattr(out, name) is not None:
                getattr(out, name).zero_()
    return out.train(mha.training)


def _check_supported(mha: nn.MultiheadAttention) -> None:
    if mha.bias_k is not None or mha.bias_v is not None:
        raise ValueError("mha has add_bias_kv=True (learned extra key/value rows), which RelativeMultiHeadAttention lacks")
    if mha.add_zero_attn:
        raise ValueError("mha has add_zero_attn=True, which RelativeMultiHeadAttention lacks")
    if mha.kdim != mha.embed_dim or mha.vdim != mha.embed_dim:
        raise ValueError(
            f"mha must have kdim = vdim = embed_dim = {mha.embed_dim} (our keys and values are [B, S, E]), "
            f"got kdim={mha.kdim}, vdim={mha.vdim}"
        )

