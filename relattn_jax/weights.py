"""One safetensors weight file for ``relattn_torch`` and ``relattn_jax`` (JAX side).

Tensor names are the canonical parameter names: the nnx ``Param`` paths joined by
"." (``w_q``, ``rel_k``, ``blocks.0.attn.w_o``), equal to ``named_parameters()``
names in the twin. Layouts are identical in both frameworks, so nothing is
transposed. Each tensor keeps its parameter's dtype (float64, float32, float16 or
bfloat16), little-endian; the metadata is ``METADATA``, plus the attention layers'
options that names and shapes do not show (a bucket scheme, grouped key/value heads, a^Q,
a bias table, one shared table, ALiBi; see ``_weightfile.metadata``), which ``load_weights``
compares with the module's. Both twins hand the same names, dtypes, shapes, options and
bytes to the same serializer, so the same weights saved from either framework give
byte-identical files. Only ``nnx.Param`` state is saved.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._weightfile import (  # noqa: F401 (METADATA, LoadResult, Mismatch re-exported)
    METADATA, LoadResult, Mismatch, check_cast, check_finite, check_flags, check_records, compare, describe,
    read, read_records, write,
)

# safetensors header dtype -> this framework's dtype (parameters are floating).
_DTYPES = {"F64": jnp.float64, "F32": jnp.float32, "F16": jnp.float16, "BF16": jnp.bfloat16}


def save_weights(module: nnx.Module, path) -> None:
    """Write every parameter of ``module`` to ``path`` as safetensors.

    Keys are the canonical names in sorted order, dtypes are the parameters' own,
    and the metadata is fixed by the attention layers' options, so the file depends only
    on the weights and those options. The file is
    written to a temporary name and renamed, so a crash never leaves half a file.

    Args:
        module: an NNX module; every parameter is written under its canonical name.
        path: the file to write (str or ``os.PathLike``).
    """
    params, _ = _named_params(module)
    arrays = {name: _to_bytes(p[...]) for name, p in sorted(params.items())}
    write(arrays, path, _records(module))


def load_weights(module: nnx.Module, path, *, strict: bool = True, allow_non_finite: bool = False) -> LoadResult:
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
    params, paths = _named_params(module)
    expected = {n: tuple(p.shape) for n, p in params.items()}
    result = compare(expected, found)
    if strict and any(result):
        raise ValueError(describe(path, result, expected, found))
    bad = set(result.missing) | {m.name for m in result.mismatched}
    names = [n for n in params if n not in bad]
    check_finite(path, found, names, allow_non_finite)
    new = {paths[n]: _cast(path, n, found[n], params[n].dtype) for n in names}
    nnx.update(module, nnx.from_flat_state({path: jnp.asarray(x) for path, x in new.items()}))
    return result


def _named_params(module: nnx.Module) -> tuple[dict, dict]:
    """{canonical name: nnx.Param} and {canonical name: state path}; name = path joined by "."."""
    flat = list(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    return {".".join(map(str, p)): v for p, v in flat}, {".".join(map(str, p)): p for p, _ in flat}


def _records(module: nnx.Module) -> dict:
    """{layer name: option record} of every attention layer (``RelativeMultiHeadAttention._weight_record``)."""
    # nnx.iter_graph, not nnx.iter_modules: the latter is missing from flax 0.12.0 (our lower bound)
    return {".".join(map(str, path)): node._weight_record() for path, node in nnx.iter_graph(module)
            if isinstance(node, nnx.Module) and hasattr(node, "_weight_record")}


def _to_bytes(x: jax.Array):
    """(dtype name, shape, little-endian bytes as a uint8 array) of a parameter."""
    a = np.ascontiguousarray(jax.device_get(x))
    return np.dtype(a.dtype).name, tuple(a.shape), a.reshape(-1).view(np.uint8)


def _from_bytes(dtype: str, shape, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=_DTYPES[dtype]).reshape(shape)


def _cast(path, name: str, entry, dtype) -> np.ndarray:
    """The file tensor in the parameter's dtype; a cast that overflows to Inf is refused."""
    stored = _from_bytes(*entry)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below, naming the tensor
        value = stored.astype(dtype)
    if value.dtype != stored.dtype:
        count = int(np.count_nonzero(np.isfinite(stored) & ~np.isfinite(value)))
        check_cast(path, name, entry[0], np.dtype(dtype).name, count)
    return value
