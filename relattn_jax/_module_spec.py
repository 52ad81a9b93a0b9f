"""Framework-free rules of ``RelativeMultiHeadAttention``'s options (the layers' twin of ``_spec.py``).

Byte-identical in ``relattn_torch`` and ``relattn_jax`` (a test enforces it); plain ints, floats and
strings only, no framework. Used by ``modules.py`` (the constructor's checks, the ALiBi slopes and
the option record) and ``weights.py`` (that record, written into and compared with the weight file).

Dimension legend: N query heads, N_kv key/value heads (N = N_kv * G), R relation ids.
"""

from __future__ import annotations

import math
import numbers


def check_kv_heads(num_heads: int, num_kv_heads) -> int:
    """N_kv: None means N; else an int >= 1 dividing N (query head n reads key/value head n // (N // N_kv))."""
    if num_kv_heads is None:
        return num_heads
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, numbers.Integral) or num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be an int >= 1 or None, got {num_kv_heads!r}")
    if num_heads % int(num_kv_heads):
        raise ValueError(
            f"num_heads must be a multiple of num_kv_heads (each key/value head serves N // N_kv query heads), "
            f"got num_heads={num_heads}, num_kv_heads={num_kv_heads}"
        )
    return int(num_kv_heads)


def check_shared_table(shared: bool, relative_keys: bool, relative_values: bool) -> None:
    """One table for keys and values needs both terms on."""
    if shared and not (relative_keys and relative_values):
        raise ValueError(
            "shared_relative_table=True makes one table (rel_kv) serve keys and values: it needs "
            f"relative_keys=True and relative_values=True, got relative_keys={relative_keys}, "
            f"relative_values={relative_values}"
        )


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """The ALiBi paper's slopes (Press et al. 2022; BLOOM's ``build_alibi_tensor``): for N a power of
    two, 2^(-8 (n + 1) / N); otherwise those of the power of two below N, then every other slope of
    the power of two above it."""
    closest = 2 ** math.floor(math.log2(num_heads))

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    return tuple(powers(closest) + powers(2 * closest)[0::2][: num_heads - closest])


def check_alibi_slopes(slopes, num_heads: int) -> tuple[float, ...] | None:
    """None, True (the paper's slopes) or N finite real numbers -> a tuple of N floats (or None)."""
    if slopes is None or slopes is False:
        return None
    if slopes is True:
        return alibi_slopes(num_heads)
    try:
        values = tuple(slopes)
    except TypeError:
        raise TypeError(f"alibi_slopes must be None, True or a sequence of num_heads = {num_heads} floats, "
                        f"got {slopes!r}") from None
    if len(values) != num_heads:
        raise ValueError(f"alibi_slopes must hold num_heads = {num_heads} slopes (one per query head), "
                         f"got {len(values)}")
    for x in values:
        if isinstance(x, bool) or not isinstance(x, numbers.Real) or not math.isfinite(float(x)):
            raise ValueError(f"alibi_slopes must be finite real numbers, got {list(values)!r}")
    return tuple(float(x) for x in values)


def option_record(*, scheme_repr, num_heads: int, num_kv_heads: int, relative_queries: bool,
                  relative_bias: bool, shared_relative_table: bool, alibi) -> dict:
    """The options that change what the weights mean beyond their names and shapes, as the weight
    file records them: only those away from their defaults, so today's layers record nothing.

    ``scheme_repr`` is the scheme's repr, or None for Shaw ids (the default: max_distance shows in
    the tables' rows) and for a layer without tables (no ids to record).
    """
    record = {}
    if scheme_repr is not None:
        record["scheme"] = scheme_repr
    if num_kv_heads != num_heads:
        record["num_kv_heads"] = num_kv_heads
    for name, on in (("relative_queries", relative_queries), ("relative_bias", relative_bias),
                     ("shared_relative_table", shared_relative_table)):
        if on:
            record[name] = True
    if alibi is not None:
        record["alibi_slopes"] = list(alibi)
    return record
