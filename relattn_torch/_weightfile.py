"""The framework-free half of the weight file: format, reading, writing, checks.

Byte-identical in ``relattn_torch`` and ``relattn_jax`` (a test enforces it); each
package's ``weights.py`` turns its own parameters into (dtype, shape, bytes) and back.
Tensors travel as {name: (safetensors dtype name, shape, bytes)}.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from typing import NamedTuple

import numpy as np
import safetensors

# One key only: the serializer keeps metadata in a hash map, so two keys would come
# out in a per-process random order and break byte-identical files.
METADATA = {"format": "relattn-v1"}
# A file whose attention layers use options beyond names and shapes (a bucket scheme, grouped
# key/value heads, a^Q, a bias table, one shared table, ALiBi) says so in that one value:
# "relattn-v1; attention=" + sorted compact JSON {layer name: {option: value}}.
_RECORD_SEP = "; attention="
# The safetensors dtypes a parameter may be stored in (parameters are floating).
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Each floating dtype's bits as an unsigned int and its exponent field: all ones is Inf or NaN.
_EXPONENT = {"F64": ("<u8", 0x7FF0000000000000), "F32": ("<u4", 0x7F800000), "F16": ("<u2", 0x7C00), "BF16": ("<u2", 0x7F80)}


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


def metadata(records: dict) -> dict:
    """The file's metadata: ``METADATA``, with the layers' option records when any is not empty."""
    records = {name: r for name, r in records.items() if r}
    if not records:
        return METADATA
    text = json.dumps(records, sort_keys=True, separators=(",", ":"))
    return {"format": METADATA["format"] + _RECORD_SEP + text}


def read_records(path) -> dict:
    """{layer name: option record} written by ``metadata`` ({} for a file without any, e.g. an older one)."""
    with open(os.fspath(path), "rb") as f:
        head = f.read(8)
        size = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        try:
            header = json.loads(f.read(size)) if 0 < size < 1 << 27 else {}
        except ValueError:
            header = {}
    value = header.get("__metadata__", {}).get("format", "") if isinstance(header, dict) else ""
    _, sep, text = value.partition(_RECORD_SEP) if isinstance(value, str) else ("", "", "")
    return json.loads(text) if sep else {}


def check_records(path, module_records: dict, file_records: dict) -> None:
    """Every attention layer of the module must have the options its layer in the file was saved
    with (names and shapes cannot tell a T5 table from a Shaw one of as many rows, or a causal
    scheme from a bidirectional one); one ValueError naming each layer and option otherwise."""
    lines = []
    for layer in sorted(module_records):
        want, got = module_records[layer], file_records.get(layer, {})
        for option in sorted(set(want) | set(got)):
            if want.get(option) != got.get(option):
                lines.append(f"  {layer or '(the module)'}: {option}: the module has {_option(want, option)}, "
                             f"the file was saved with {_option(got, option)}")
    if lines:
        raise ValueError(
            f"weight file {os.fspath(path)!r} was saved from attention layers configured differently "
            f"(nothing was loaded; build the module with the file's options):\n" + "\n".join(lines)
        )


def _option(record: dict, option: str) -> str:
    return f"{option}={record[option]!r}" if option in record else "the default"


def write(arrays: dict, path, records: dict | None = None) -> None:
    """Serialize {name: (dtype name, shape, uint8 array)} and write it atomically; ``records``:
    {layer name: option record} (see ``metadata``)."""
    if sys.byteorder != "little":
        raise RuntimeError("save_weights writes little-endian data and needs a little-endian machine")
    specs = {
        name: safetensors.TensorSpec(dtype=dtype, shape=list(shape), data_ptr=raw.ctypes.data, data_len=raw.nbytes)
        for name, (dtype, shape, raw) in arrays.items()
    }
    data = bytes(safetensors.serialize(specs, metadata=metadata(records or {})))
    path = os.fspath(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read(path) -> dict:
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


def compare(expected: dict, found: dict) -> LoadResult:
    """Match {name: shape} of the module against {name: (dtype, shape, bytes)} of the file."""
    missing = sorted(n for n in expected if n not in found)
    unexpected = sorted(n for n in found if n not in expected)
    mismatched = [
        Mismatch(n, expected[n], found[n][1], found[n][0])
        for n in sorted(expected)
        if n in found and (found[n][1] != expected[n] or found[n][0] not in FLOAT_DTYPES)
    ]
    return LoadResult(missing, unexpected, mismatched)


def describe(path, result: LoadResult, expected: dict, found: dict) -> str:
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


def check_flags(**flags) -> None:
    """load_weights' switches must be bools ("False" is a truthy string)."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}")


def count_non_finite(dtype: str, data) -> int:
    """Number of NaN/Inf values in little-endian ``data`` of a floating safetensors dtype.

    Read off the exponent bits, so it needs no framework and no cast (bfloat16 included).
    """
    kind, exponent = _EXPONENT[dtype]
    bits = np.frombuffer(data, dtype=kind)
    return int(np.count_nonzero((bits & np.array(exponent, kind)) == exponent))


def check_finite(path, found: dict, names, allow_non_finite: bool) -> None:
    """Refuse file tensors holding NaN or Inf (one ValueError naming each), unless allowed."""
    if allow_non_finite:
        return
    counts = {n: count_non_finite(found[n][0], found[n][2]) for n in sorted(names)}
    bad = [f"  {n}: {c} of {_size(found[n][1])} values" for n, c in counts.items() if c]
    if bad:
        raise ValueError(
            f"weight file {os.fspath(path)!r} holds non-finite values (NaN or Inf); nothing was loaded "
            f"(pass allow_non_finite=True to load them anyway):\n" + "\n".join(bad)
        )


def check_cast(path, name: str, stored: str, target: str, count: int) -> None:
    """Refuse a cast that turns ``count`` finite stored values into Inf (out of the target's range)."""
    if count:
        raise ValueError(
            f"weight file {os.fspath(path)!r}: tensor {name} stored as {stored} does not fit its parameter's "
            f"dtype {target}: the cast turns {count} finite value(s) into Inf (beyond the {target} range); "
            f"nothing was loaded"
        )


def _size(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
