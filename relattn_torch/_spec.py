"""Framework-free shape and dtype checks for relative attention.

This file is byte-identical in ``relattn_torch`` and ``relattn_jax`` (a test
enforces it), so both packages accept exactly the same inputs and raise the
same errors. It works on plain tuples of ints so it never imports a framework.

Dimension legend: B batch, T query length, S key length, N heads, H head dim,
R relation ids, E model width; N_kv key/value heads (grouped: N = N_kv * G).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

Shape = tuple[int, ...]

# The largest Shaw clipping distance: its tables hold 2 * max_distance + 1 rows, and a distance
# past any sequence length clips nothing (2**20 rows of H = 64 float32 are 256 MiB per table).
MAX_DISTANCE_LIMIT = 2**20

# Dense edge tensors: accepted rank -> the named dims of that rank.
_DENSE_LAYOUTS = {3: "TSH", 4: "TSNH", 5: "BTSNH"}
# Relation tables: accepted rank -> named dims.
_TABLE_LAYOUTS = {2: "RH", 3: "RNH"}


@dataclass(frozen=True)
class Dims:
    """Sizes read off q [B, T, N, H] and k, v [B, S, N_kv, H] (N_kv = N unless the heads are grouped)."""

    B: int
    T: int
    S: int
    N: int
    H: int
    N_kv: int | None = None  # key/value heads; None means N

    @property
    def kv_heads(self) -> int:
        return self.N if self.N_kv is None else self.N_kv

    @property
    def groups(self) -> int:
        """G, the query heads per key/value head: query head n reads key/value head n // G."""
        return self.N // self.kv_heads if self.kv_heads else 1


def fmt(shape) -> str:
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def check_qkv(q_shape: Shape, k_shape: Shape, v_shape: Shape) -> Dims:
    """Validate q [B, T, N, H], k [B, S, N_kv, H], v [B, S, N_kv, H] with N % N_kv == 0; return the sizes."""
    for name, shape in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(shape) != 4:
            raise ValueError(
                f"{name} must have 4 dims {'[B, T, N, H]' if name == 'q' else '[B, S, N, H]'}, "
                f"got shape {fmt(shape)}"
            )
    B, T, N, H = q_shape
    if tuple(k_shape) != tuple(v_shape):
        raise ValueError(f"k and v must have the same shape [B, S, N, H], got k {fmt(k_shape)} and v {fmt(v_shape)}")
    Bk, S, Nk, Hk = k_shape
    if (Bk, Hk) != (B, H):
        raise ValueError(
            f"k must be [B, S, N, H] = [{B}, S, {N}, {H}] to match q {fmt(q_shape)}, got {fmt(k_shape)}"
        )
    if Nk != N and (Nk < 1 or N % Nk):
        raise ValueError(
            f"k and v must have N_kv heads with N % N_kv == 0 (grouped key/value heads: query head n reads "
            f"head n // (N // N_kv)), got N = {N} query heads and N_kv = {Nk} in k {fmt(k_shape)}"
        )
    return Dims(B=B, T=T, S=S, N=N, H=H, N_kv=Nk)


def check_float_dtypes(named_dtypes, is_floating) -> None:
    """All named arrays must share one floating dtype (the first one's)."""
    (first_name, first), *rest = named_dtypes
    if not is_floating(first):
        raise TypeError(f"{first_name} must be a floating dtype, got {first}")
    for name, dtype in rest:
        if dtype != first:
            raise TypeError(f"{name} must have the same dtype as {first_name} ({first}), got {dtype}")


def dense_edge_layout(name: str, shape: Shape, d: Dims) -> tuple[str, Shape, Shape]:
    """Einsum letters for a dense edge tensor, its squeezed shape and its broadcast shape.

    Accepts [T, S, H] (shared by heads), [T, S, N, H] and [B, T, S, N, H], where any
    of B, T, S, N may be 1 (broadcast). A size-1 B or N is dropped from the letters
    (the einsum broadcasts it for free); a size-1 T or S is expanded. Returns e.g.
    ('TSH', (T, S, H), (T, S, H)) or ('TSNH', (1, S, N, H), (T, S, N, H)).
    """
    layout = _DENSE_LAYOUTS.get(len(shape))
    expected = (
        f"[T, S, H] = {fmt((d.T, d.S, d.H))}, [T, S, N, H] = {fmt((d.T, d.S, d.N, d.H))} "
        f"or [B, T, S, N, H] = {fmt((d.B, d.T, d.S, d.N, d.H))}"
    )
    if layout is None:
        raise ValueError(f"{name} (dense edges) must be {expected}, got shape {fmt(shape)}")
    full = {"B": d.B, "T": d.T, "S": d.S, "N": d.N, "H": d.H}
    letters, squeezed, target = [], [], []
    for letter, size in zip(layout, shape):
        want = full[letter]
        if size != want and not (size == 1 and letter != "H"):
            raise ValueError(
                f"{name} (dense edges) must be {expected} (size-1 dims broadcast), got shape {fmt(shape)}: "
                f"dim {letter} is {size}, expected {want}"
            )
        if size == 1 and letter in "BN" and want != 1:
            continue
        letters.append(letter)
        squeezed.append(size)
        target.append(want)
    return "".join(letters), tuple(squeezed), tuple(target)


def table_layout(name: str, shape: Shape, d: Dims) -> str:
    """Einsum letters for a relation table: 'RH' for [R, H], 'RNH' for [R, N, H]."""
    layout = _TABLE_LAYOUTS.get(len(shape))
    expected = f"[R, H] = [R, {d.H}] or [R, N, H] = [R, {d.N}, {d.H}]"
    if layout is None or shape[-1] != d.H or (layout == "RNH" and shape[1] != d.N) or shape[0] < 1:
        raise ValueError(f"{name} (relation table, since rel_ids is given) must be {expected}, got shape {fmt(shape)}")
    return layout


def check_rel_ids_shape(shape: Shape, d: Dims) -> None:
    """rel_ids must be [T, S] or [B, T, S] (B may be 1)."""
    ok = (len(shape) == 2 and tuple(shape) == (d.T, d.S)) or (
        len(shape) == 3 and tuple(shape[1:]) == (d.T, d.S) and shape[0] in (1, d.B)
    )
    if not ok:
        raise ValueError(
            f"rel_ids must be [T, S] = {fmt((d.T, d.S))} or [B, T, S] = {fmt((d.B, d.T, d.S))}, got shape {fmt(shape)}"
        )


def check_rel_ids_range(lo: int, hi: int, tables) -> None:
    """Concrete rel_ids values must lie in [0, R) for every table given."""
    for name, rows in tables:
        if lo < 0 or hi >= rows:
            raise ValueError(rel_ids_range_message(name, rows) + f", got values in [{lo}, {hi}]")


def rel_ids_range_message(name: str, rows: int) -> str:
    return f"rel_ids values must be in [0, R) = [0, {rows}) for {name} with R = {rows} rows"


def check_mask_shape(shape: Shape, d: Dims) -> None:
    """mask must broadcast to [B, N, T, S]."""
    target = (d.B, d.N, d.T, d.S)
    ok = len(shape) <= 4 and all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))
    if not ok:
        raise ValueError(f"mask must broadcast to [B, N, T, S] = {fmt(target)}, got shape {fmt(shape)}")


def is_key_padding(mask_shape: Shape, T: int, N: int) -> bool:
    """Whether a mask of this shape (broadcastable to [B, N, T, S]) varies only along B and S."""
    full = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
    return (full[1] == 1 or N == 1) and (full[2] == 1 or T == 1)


def check_rel_args(rel_k, rel_v, rel_ids, rel_q=None, rel_bias=None) -> None:
    if rel_ids is not None and rel_k is None and rel_v is None and rel_q is None and rel_bias is None:
        raise ValueError("rel_ids was given but both rel_k and rel_v are None (and rel_q, rel_bias); "
                         "pass at least one relation table")


def check_query_terms(rel_q_shape, rel_bias_shape, has_ids: bool, d: Dims) -> None:
    """rel_q [R, H] or [R, N, H] and rel_bias [R, N] are tables indexed by the relation ids.

    Shapes are None for an absent term. They need ids: ``rel_ids`` or ``max_distance``
    (``has_ids``); with dense edges there is no relation id to index them by.
    """
    for name, shape in (("rel_q", rel_q_shape), ("rel_bias", rel_bias_shape)):
        if shape is not None and not has_ids:
            raise ValueError(f"{name} is a relation table and needs relation ids: pass rel_ids or max_distance "
                             f"(got neither; dense edges have no ids to index it by)")
    if rel_q_shape is not None:
        table_layout("rel_q", tuple(rel_q_shape), d)
    if rel_bias_shape is not None:
        shape = tuple(rel_bias_shape)
        if len(shape) != 2 or shape[1] != d.N or shape[0] < 1:
            raise ValueError(f"rel_bias (per-head bias table) must be [R, N] = [R, {d.N}], got shape {fmt(shape)}")


def check_int(name: str, value, minimum: int = 1) -> None:
    """value must be a Python int >= minimum (bool is not an int here)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive int" if minimum == 1 else "a non-negative int" if minimum == 0 else f"an int >= {minimum}"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


def check_positions(q_len, k_len, max_distance) -> None:
    for name, value in (("q_len", q_len), ("k_len", k_len), ("max_distance", max_distance)):
        check_int(name, value, minimum=0)
    check_max_distance(max_distance)


def check_max_distance(max_distance) -> None:
    """max_distance must be an int in [0, MAX_DISTANCE_LIMIT] (its tables hold 2 * max_distance + 1 rows)."""
    check_int("max_distance", max_distance, minimum=0)
    if max_distance > MAX_DISTANCE_LIMIT:
        raise ValueError(
            f"max_distance must be an int in [0, {MAX_DISTANCE_LIMIT}] (its tables hold 2 * max_distance + 1 rows; "
            f"a distance past every sequence length clips nothing), got {max_distance!r}"
        )


# --- scalar arguments -----------------------------------------------------------------------------

def _kind(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_scale(scale) -> None:
    """scale must be None or a finite real number (any sign: 0 gives uniform weights)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be None or a real number (float), got {_kind(scale)}")
    if not math.isfinite(float(scale)):
        raise ValueError(f"scale must be finite, got {scale!r}")


def default_scale(H: int) -> float:
    """1 / sqrt(H); 1.0 for H = 0 (there is no logit to scale)."""
    return H**-0.5 if H else 1.0


def check_bool(name: str, value) -> None:
    """value must be a bool (a string such as "False" is not)."""
    if not (isinstance(value, bool) or type(value).__name__ == "bool_"):
        raise TypeError(f"{name} must be a bool, got {_kind(value)}")


def check_dropout_p(p) -> None:
    """dropout_p must be a real number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number in [0, 1), got {_kind(p)}")
    if not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")


def check_int_offset(value) -> None:
    """A Python q_offset must be an int (bool, float and str are not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"q_offset must be None, an int or a 0-d integer array, got {_kind(value)}")


def check_offset_array(dtype_is_integer: bool, ndim: int, dtype) -> None:
    """An array q_offset must be a 0-d integer array."""
    if not dtype_is_integer or ndim != 0:
        raise TypeError(f"q_offset must be None, an int or a 0-d integer array, got a {ndim}-d array of dtype {dtype}")


def check_heads(embed_dim: int, num_heads: int, head_dim) -> int:
    """Return the head dim; embed_dim must split evenly unless head_dim is given."""
    check_int("embed_dim", embed_dim)
    check_int("num_heads", num_heads)
    if head_dim is None:
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads}), or pass head_dim explicitly"
            )
        return embed_dim // num_heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int or None, got {head_dim!r}")
    return head_dim


def check_shaw(rel_k_shape, rel_v_shape, has_rel_ids: bool, max_distance, has_q_offset: bool, d: Dims,
               rel_q_shape=None, rel_bias_shape=None, positional: bool = False) -> None:
    """The Shaw form (``max_distance``): tables of 2 * max_distance + 1 rows, no rel_ids.

    Shapes are None for an absent term (rel_q and rel_bias are checked by ``check_query_terms``
    first; here only their rows). ``q_offset`` only makes sense with positions: ``max_distance``,
    or (``positional``) ``scheme=`` or ``alibi_slopes``.
    """
    if max_distance is None:
        if has_q_offset and not positional:
            raise ValueError("q_offset describes relative positions and needs max_distance, scheme= or "
                             "alibi_slopes; got none of them")
        return
    if has_rel_ids:
        raise ValueError("pass either rel_ids or max_distance (implied Shaw ids), not both")
    check_positions(d.T, d.S, max_distance)
    named = (("rel_k", rel_k_shape), ("rel_v", rel_v_shape), ("rel_q", rel_q_shape), ("rel_bias", rel_bias_shape))
    if all(shape is None for _, shape in named):
        raise ValueError("max_distance was given but both rel_k and rel_v are None (and rel_q, rel_bias); "
                         "pass at least one relation table")
    for name, shape in named:
        if shape is not None:
            if name in ("rel_k", "rel_v"):
                table_layout(name, tuple(shape), d)
            if shape[0] != 2 * max_distance + 1:
                raise ValueError(
                    f"{name} must have R = 2 * max_distance + 1 = {2 * max_distance + 1} rows for "
                    f"max_distance={max_distance}, got shape {fmt(shape)}"
                )


def dense_t_axis(rank: int) -> int:
    """Axis of T in a dense edge tensor of that rank ([T, S, H], [T, S, N, H], [B, T, S, N, H])."""
    return _DENSE_LAYOUTS[rank].index("T")


def check_dropout(p) -> None:
    """A module's dropout must be a real number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p!r}")


def check_model_input(name: str, shape: Shape, width: int, batch=None) -> None:
    """Module inputs are [B, L, width]."""
    if len(shape) != 3 or shape[-1] != width or (batch is not None and shape[0] != batch):
        b = "B" if batch is None else str(batch)
        raise ValueError(f"{name} must be [B, L, E] = [{b}, L, {width}], got shape {fmt(shape)}")
