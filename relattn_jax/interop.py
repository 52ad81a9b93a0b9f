"""Import weights from Flax NNX's standard attention layer.

``flax.nnx.MultiHeadAttention`` already keeps per-head kernels, in our layout:

    query.kernel [E, N, H] -> w_q    query.bias [N, H] -> b_q    (same for key, value)
    out.kernel   [N, H, E] -> w_o    out.bias   [E]    -> b_o
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from .modules import RelativeMultiHeadAttention

_FROM_SOURCE = ("embed_dim", "num_heads", "head_dim", "bias", "dtype", "param_dtype")


def from_nnx_mha(mha: nnx.MultiHeadAttention, *, rngs: nnx.Rngs, **options) -> RelativeMultiHeadAttention:
    """A ``RelativeMultiHeadAttention`` with the projections of ``mha``.

    The relation tables start at zero, so the new module computes what ``mha``
    computes (with relative terms on or off) until training moves the tables.
    Both modules take bool masks with True = may attend. nnx's default attention
    computes its softmax in float32 even for float64 inputs; ours keeps float64.

    Args:
        mha: a ``flax.nnx.MultiHeadAttention`` with the default scaled dot-product
            attention. Rejected: ``normalize_qk``, grouped kv heads, and
            ``in_kv_features`` or ``out_features`` != ``in_features``.
        rngs: ``nnx.Rngs`` for the new module (dropout stream, and the initial
            values that are then overwritten).
        **options: other ``RelativeMultiHeadAttention`` arguments (``max_distance``,
            ``relative_keys``, ``relative_values``, ``share_relative_heads``, ``dropout``
            (default ``mha.dropout_rate``), ``scale``, ``deterministic``). Sizes, bias
            and dtypes come from ``mha``.

    Returns:
        The new module with ``mha``'s parameter dtype and compute dtype.
    """
    if not isinstance(mha, nnx.MultiHeadAttention):
        raise TypeError(f"mha must be a flax.nnx.MultiHeadAttention, got {type(mha).__name__}")
    taken = sorted(set(options) & set(_FROM_SOURCE))
    if taken:
        raise TypeError(f"from_nnx_mha takes {', '.join(taken)} from mha; do not pass them as options")
    _check_supported(mha)
    kernel = mha.query.kernel[...]  # [E, N, H]
    defaults = {"dropout": mha.dropout_rate}
    if mha.deterministic is not None:
        defaults["deterministic"] = mha.deterministic
    out = RelativeMultiHeadAttention(
        mha.in_features, mha.num_heads, head_dim=mha.head_dim, bias=mha.use_bias, **{**defaults, **options},
        dtype=mha.dtype, param_dtype=kernel.dtype, rngs=rngs,
    )
    new = {("w_q",): kernel, ("w_k",): mha.key.kernel[...], ("w_v",): mha.value.kernel[...], ("w_o",): mha.out.kernel[...]}
    if mha.use_bias:
        new.update({("b_q",): mha.query.bias[...], ("b_k",): mha.key.bias[...], ("b_v",): mha.value.bias[...],
                    ("b_o",): mha.out.bias[...]})
    for name in ("rel_k", "rel_v"):
        table = getattr(out, name)
        if table is not None:
            new[(name,)] = jnp.zeros_like(table[...])
    nnx.update(out, nnx.from_flat_state({path: jnp.asarray(x, kernel.dtype) for path, x in new.items()}))
    return out


def _check_supported(mha: nnx.MultiHeadAttention) -> None:
    if mha.normalize_qk:
        raise ValueError("mha has normalize_qk=True (LayerNorm on q and k), which RelativeMultiHeadAttention lacks")
    if mha.num_kv_heads != mha.num_heads:
        raise ValueError(
            f"mha must have num_kv_heads = num_heads = {mha.num_heads} (no grouped kv heads), got {mha.num_kv_heads}"
        )
    E = mha.in_features
    if mha.in_kv_features != E or mha.out_features != E:
        raise ValueError(
            f"mha must have in_kv_features = out_features = in_features = {E} (our inputs and output are [B, L, E]), "
            f"got in_kv_features={mha.in_kv_features}, out_features={mha.out_features}"
        )
