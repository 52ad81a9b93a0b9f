"""torch's fused CPU flash-attention kernel, a private aten op, looked up and never assumed.

Why this file has no twin in ``relattn_jax``: XLA has no fused attention kernel on CPU, so only the
torch banded Shaw path (``shaw.py``) runs one. The op is private: a torch without it, or with
another signature, must still import relattn_torch; ``choice.py`` then blocks the banded path with
``MISSING``.
"""

from __future__ import annotations

import torch

OP = "_scaled_dot_product_flash_attention_for_cpu"
POSITIONAL = {  # the arguments shaw.py passes by position (and scale= by name)
    OP: ("query", "key", "value", "dropout_p", "is_causal"),
    f"{OP}_backward": ("grad_out", "query", "key", "value", "out", "logsumexp", "dropout_p", "is_causal"),
}


def private_op(name: str):
    """torch.ops.aten.<name> if it exists and takes the arguments shaw.py passes, else None."""
    try:
        op = getattr(torch.ops.aten, name)
        names = [a.name for a in op.default._schema.arguments]
    except (AttributeError, RuntimeError):
        return None
    expected = POSITIONAL[name]
    return op if tuple(names[: len(expected)]) == expected and "scale" in names else None


flash = private_op(OP)
flash_bwd = private_op(f"{OP}_backward")
# Why this torch cannot run the banded path, or None when it can.
MISSING = None if flash is not None and flash_bwd is not None else (
    f"needs torch's private op aten.{OP} (and its backward) with the arguments "
    f"{', '.join(POSITIONAL[OP])}, scale=, which torch {torch.__version__} does not have")
