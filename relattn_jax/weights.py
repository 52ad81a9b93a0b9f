"""One safetensors weight file for ``relattn_torch`` and ``relattn_jax`` (JAX side).

Tensor names are the canonical parameter names: the nnx ``Param`` paths joined by
"." (``w_q``, ``rel_k``, ``blocks.0.attn.w_o``), equal to ``named_parameters()``
names in the twin. Layouts are identical in both frameworks, so nothing is
transposed. Each tensor keeps its parameter's dtype (float64, float32, float16 or
bfloat16), little-endian; the metadata is always ``METADATA``. Both twins hand the
same names, dtypes, shapes and bytes to the same serializer, so the same weights
saved from either framework give byte-identical files. Only ``nnx.Param`` state is saved.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
from flax import nnx

# One key only: the serializer keeps metadata in a hash map, so two keys would come
# out in a per-process random order and break byte-identical files.
METADATA = {"format": "relattn-v1"}
# safetensors header dtype -> this framework's dtype (parameters are floating).
_DTYPES = {"F64": jnp.float64, "F32": jnp.float32, "F16": jnp.float16, "BF16": jnp.bfloat16}


class Mismatch(NamedTuple):
    """A file tensor whose shape (or non-floating dtype) does not fit its parameter."""

    name: str
    expected: tuple[int, ...]
    found: tuple[int, ...]
    found_dtype: str


class LoadResult(NamedTuple):
    """What ``load_weights`` could not load (all empty after a complete load)."""

    missing: list[str]  # parameters of the module absent from the file
    unexpected: list[str]  # file tensors that name no parameter
    mismatched: list[Mismatch]  # same name, wrong shape or non-floating dtype


def save_weights(module: nnx.Module, path) -> None:
    """Write every parameter of ``module`` to ``path`` as safetensors.

    Keys are the canonical names in sorted order, dtypes are the parameters' own,
    and the metadata is fixed, so the file depends only on the weights. The file is
    written to a temporary name and renamed, so a crash never leaves half a file.
    """
    params, _ = _named_params(module)
    arrays = {name: _to_bytes(p[...]) for name, p in sorted(params.items())}
    _write(arrays, path)


def load_weights(module: nnx.Module, path, *, strict: bool = True) -> LoadResult:
    """Copy the tensors of the safetensors file ``path`` into ``module``'s parameters.

    Everything is checked before anything is copied, so on any error the module is
    left unchanged. A tensor stored in another floating dtype than its parameter is
    cast to the parameter's dtype (e.g. a float32 file loads into a float64 module).

    Args:
        module: the module to fill; its parameter names are the keys looked up.
        path: a safetensors file, e.g. written by either twin's ``save_weights``.
        strict: if True, any missing, unexpected or mismatched tensor raises one
            ``ValueError`` listing every offending name with expected vs found shape.
            If False, the tensors that match are loaded and the rest are reported.

    Returns:
        ``LoadResult(missing, unexpected, mismatched)``.

    Raises:
        ValueError: the file is not a readable safetensors file (e.g. truncated), or
            ``strict`` and the file does not match the module.
    """
    found = _read(path)
    params, paths = _named_params(module)
    expected = {n: tuple(p.shape) for n, p in params.items()}
    result = _compare(expected, found)
    if strict and any(result):
        raise ValueError(_describe(path, result, expected, found))
    bad = set(result.missing) | {m.name for m in result.mismatched}
    new = {paths[n]: _from_bytes(*found[n]).astype(params[n].dtype) for n in params if n not in bad}
    nnx.update(module, nnx.from_flat_state({path: jnp.asarray(x) for path, x in new.items()}))
    return result


def _named_params(module: nnx.Module) -> tuple[dict, dict]:
    """{canonical name: nnx.Param} and {canonical name: state path}; name = path joined by "."."""
    flat = list(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    return {".".join(map(str, p)): v for p, v in flat}, {".".join(map(str, p)): p for p, _ in flat}


def _to_bytes(x: jax.Array):
    """(dtype name, shape, little-endian bytes as a uint8 array) of a parameter."""
    a = np.ascontiguousarray(jax.device_get(x))
    return np.dtype(a.dtype).name, tuple(a.shape), a.reshape(-1).view(np.uint8)


def _from_bytes(dtype: str, shape, data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=_DTYPES[dtype]).reshape(shape)


# ---- framework-free helpers: identical in relattn_jax/weights.py ----


def _write(arrays: dict, path) -> None:
    """Serialize {name: (dtype name, shape, uint8 array)} and write it atomically."""
    if sys.byteorder != "little":
        raise RuntimeError("save_weights writes little-endian data and needs a little-endian machine")
    specs = {
        name: safetensors.TensorSpec(dtype=dtype, shape=list(shape), data_ptr=raw.ctypes.data, data_len=raw.nbytes)
        for name, (dtype, shape, raw) in arrays.items()
    }
    data = bytes(safetensors.serialize(specs, metadata=METADATA))
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _read(path) -> dict:
    """{name: (header dtype, shape, bytes)} of a safetensors file; ValueError if unreadable."""
    with open(os.fspath(path), "rb") as f:
        data = f.read()
    try:
        entries = safetensors.deserialize(data)
    except Exception as err:  # SafetensorError, or a header the parser rejects
        raise ValueError(
            f"{os.fspath(path)!r} is not a readable safetensors file ({len(data)} bytes; "
            f"truncated or not safetensors): {err}"
        ) from None
    return {name: (e["dtype"], tuple(e["shape"]), e["data"]) for name, e in entries}


def _compare(expected: dict, found: dict) -> LoadResult:
    """Match {name: shape} of the module against {name: (dtype, shape, bytes)} of the file."""
    missing = sorted(n for n in expected if n not in found)
    unexpected = sorted(n for n in found if n not in expected)
    mismatched = [
        Mismatch(n, expected[n], found[n][1], found[n][0])
        for n in sorted(expected)
        if n in found and (found[n][1] != expected[n] or found[n][0] not in _DTYPES)
    ]
    return LoadResult(missing, unexpected, mismatched)


def _describe(path, result: LoadResult, expected: dict, found: dict) -> str:
    """One message naming every offending tensor with expected vs found shape."""

    def fmt(shape):
        return "[" + ", ".join(map(str, shape)) + "]"

    lines = [f"weight file {os.fspath(path)!r} does not match the module (nothing was loaded):"]
    lines += [f"  missing: {n}: expected shape {fmt(expected[n])}, found nothing" for n in result.missing]
    lines += [
        f"  unexpected: {n}: expected nothing, found shape {fmt(found[n][1])} {found[n][0]}" for n in result.unexpected
    ]
    lines += [
        f"  mismatched: {m.name}: expected shape {fmt(m.expected)} (floating), found {fmt(m.found)} {m.found_dtype}"
        for m in result.mismatched
    ]
    return "\n".join(lines)
