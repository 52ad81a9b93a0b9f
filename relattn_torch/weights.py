"""One safetensors weight file for ``relattn_torch`` and ``relattn_jax`` (PyTorch side).

Tensor names are the canonical parameter names: ``module.named_parameters()`` names,
equal to the nnx ``Param`` paths joined by "." in the twin (``w_q``, ``rel_k``,
``blocks.0.attn.w_o``). Layouts are identical in both frameworks, so nothing is
transposed. Each tensor keeps its parameter's dtype (float64, float32, float16 or
bfloat16), little-endian; the metadata is ``METADATA``, plus the attention layers'
options that names and shapes do not show (a bucket scheme, grouped key/value heads, a^Q,
a bias table, one shared table, ALiBi; see ``_weightfile.metadata``), which ``load_weights``
compares with the module's. Both twins hand the same names, dtypes, shapes, options and
bytes to the same serializer, so the same weights saved from either framework give
byte-identical files. Buffers are not saved.
"""

from __future__ import annotations

import torch

from ._weightfile import (  # noqa: F401 (METADATA, LoadResult, Mismatch re-exported)
    METADATA, LoadResult, Mismatch, check_cast, check_finite, check_flags, check_records, compare, describe,
    read, read_records, write,
)

# safetensors header dtype -> this framework's dtype (parameters are floating).
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def save_weights(module: torch.nn.Module, path) -> None:
    """Write every parameter of ``module`` to ``path`` as safetensors.

    Keys are the canonical names in sorted order, dtypes are the parameters' own,
    and the metadata is fixed by the attention layers' options, so the file depends only
    on the weights and those options. The file is
    written to a temporary name and renamed, so a crash never leaves half a file.

    Args:
        module: a ``torch.nn.Module``; every parameter is written under its canonical name.
        path: the file to write (str or ``os.PathLike``).
    """
    arrays = {name: _to_bytes(p) for name, p in sorted(module.named_parameters())}
    write(arrays, path, _records(module))


def load_weights(module: torch.nn.Module, path, *, strict: bool = True, allow_non_finite: bool = False) -> LoadResult:
    """Copy the tensors of the safetensors file ``path`` into ``module``'s parameters.

    Everything is checked before anything is copied, so on any error the module is
    left unchanged. A tensor stored in another floating dtype than its parameter is
    cast to the parameter's dtype (e.g. a float32 file loads into a float64 module);
    a cast that turns a finite value into Inf (1e300 into float32) is refused, always.

    Args:
        module: the module to fill; its parameter names are the keys looked up.
        path: a safetensors file, e.g. written by either twin's ``save_weights``.
        strict: if True, any missing, unexpected or mismatched tensor raises one
            ``ValueError`` listing every offending name with expected vs found shape.
            If False, the tensors that match are loaded and the rest are reported.
        allow_non_finite: if False (default), a tensor holding NaN or Inf raises one
            ``ValueError`` naming every such tensor (whatever ``strict``); True loads them.

    Returns:
        ``LoadResult(missing, unexpected, mismatched)``.

    Raises:
        ValueError: the file is not a readable safetensors file (e.g. truncated), or
            an attention layer was saved with other options than the module's (a scheme,
            num_kv_heads, relative_queries, relative_bias, shared_relative_table or
            alibi_slopes; whatever ``strict``), or ``strict`` and the file does not match
            the module, or a tensor holds NaN/Inf
            (unless ``allow_non_finite``), or a cast to the parameter's dtype overflows.
    """
    check_flags(strict=strict, allow_non_finite=allow_non_finite)
    found = read(path)
    check_records(path, _records(module), read_records(path))
    params = dict(module.named_parameters())
    expected = {n: tuple(p.shape) for n, p in params.items()}
    result = compare(expected, found)
    if strict and any(result):
        raise ValueError(describe(path, result, expected, found))
    bad = set(result.missing) | {m.name for m in result.mismatched}
    names = [n for n in params if n not in bad]
    check_finite(path, found, names, allow_non_finite)
    new = {n: _cast(path, n, found[n], params[n].dtype) for n in names}
    with torch.no_grad():
        for name, value in new.items():
            params[name].copy_(value)
    return result


def _records(module: torch.nn.Module) -> dict:
    """{layer name: option record} of every attention layer (``RelativeMultiHeadAttention._weight_record``)."""
    return {name: m._weight_record() for name, m in module.named_modules() if hasattr(m, "_weight_record")}


def _to_bytes(p: torch.Tensor):
    """(dtype name, shape, little-endian bytes as a uint8 array) of a parameter."""
    t = p.detach().cpu().contiguous()
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy()


def _from_bytes(dtype: str, shape, data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=_DTYPES[dtype])
    return torch.frombuffer(bytearray(data), dtype=_DTYPES[dtype]).reshape(shape)


def _cast(path, name: str, entry, dtype: torch.dtype) -> torch.Tensor:
    """The file tensor in the parameter's dtype; a cast that overflows to Inf is refused."""
    stored = _from_bytes(*entry)
    value = stored.to(dtype)
    if value.dtype != stored.dtype:
        count = int((torch.isfinite(stored) & ~torch.isfinite(value)).sum())
        check_cast(path, name, entry[0], str(dtype).removeprefix("torch."), count)
    return value
