"""Framework-free rules of the relative-position family: the bucket schemes' arguments
(``buckets.py``), ``scheme=`` and ``alibi_slopes`` (``attention.py``).

Byte-identical in ``relattn_torch`` and ``relattn_jax`` (a test enforces it), beside ``_spec.py``,
whose shape rules and scalar checks it builds on; plain ints and tuples only, no framework.

Dimension legend as in ``_spec.py``: N query heads, R relation ids.
"""

from __future__ import annotations

from ._spec import MAX_DISTANCE_LIMIT, Dims, Shape, check_bool, check_int, check_max_distance, fmt, table_layout


# --- bucket schemes (buckets.py) --------------------------------------------------------------------

def check_shaw_buckets(max_distance) -> None:
    check_max_distance(max_distance)


def check_t5_buckets(num_buckets, max_distance, bidirectional) -> None:
    """T5's buckets: exact distances below max_exact, log-spaced up to max_distance.

    max_exact = num_buckets // 4 (bidirectional) or num_buckets // 2 (causal) must be >= 1, and
    max_distance > max_exact (T5 divides by log(max_distance / max_exact)).
    """
    check_bool("bidirectional", bidirectional)
    check_int("num_buckets", num_buckets)
    check_int("max_distance", max_distance)
    max_exact = num_buckets // 4 if bidirectional else num_buckets // 2
    if max_exact < 1:
        raise ValueError(f"num_buckets must be >= {4 if bidirectional else 2} "
                         f"({'bidirectional' if bidirectional else 'causal'} T5 buckets), got {num_buckets}")
    if max_distance <= max_exact or max_distance > MAX_DISTANCE_LIMIT:
        raise ValueError(f"max_distance must be an int in ({max_exact}, {MAX_DISTANCE_LIMIT}] (greater than the "
                         f"{max_exact} exact buckets for num_buckets={num_buckets}), got {max_distance!r}")


def check_bert_buckets(max_position_embeddings) -> None:
    """BERT's distance_embedding has 2 * max_position_embeddings - 1 rows."""
    check_int("max_position_embeddings", max_position_embeddings)
    if max_position_embeddings > MAX_DISTANCE_LIMIT:
        raise ValueError(f"max_position_embeddings must be an int in [1, {MAX_DISTANCE_LIMIT}], "
                         f"got {max_position_embeddings!r}")


def check_deberta_buckets(position_buckets, max_relative_positions) -> None:
    """DeBERTa-v2's positions: log buckets when position_buckets > 0, else plain distances.

    max_relative_positions is what DeBERTa's attention uses after resolving its -1 default
    (config.max_position_embeddings); with log buckets it must exceed position_buckets // 2 + 1
    (DeBERTa divides by log((max_relative_positions - 1) / (position_buckets // 2))).
    """
    check_int("position_buckets", position_buckets, minimum=0)
    check_int("max_relative_positions", max_relative_positions)
    if max_relative_positions > MAX_DISTANCE_LIMIT:
        raise ValueError(f"max_relative_positions must be an int in [1, {MAX_DISTANCE_LIMIT}], "
                         f"got {max_relative_positions!r}")
    if position_buckets == 1:
        raise ValueError("position_buckets must be 0 (no log buckets) or >= 2, got 1")
    if position_buckets and max_relative_positions - 1 <= position_buckets // 2:
        raise ValueError(f"max_relative_positions must be > position_buckets // 2 + 1 = {position_buckets // 2 + 1} "
                         f"with log buckets (position_buckets={position_buckets}), got {max_relative_positions}")


# --- scheme= and alibi_slopes ------------------------------------------------------------------------

def check_scheme_args(has_rel_ids: bool, max_distance) -> None:
    """scheme= gives the ids: it excludes rel_ids and max_distance (which is scheme=ShawBuckets(max_distance))."""
    if has_rel_ids:
        raise ValueError("pass either scheme= (ids from a bucket scheme) or rel_ids, not both")
    if max_distance is not None:
        raise ValueError("pass either scheme= or max_distance (the Shaw ids, scheme=ShawBuckets(max_distance)), "
                         "not both")


def check_scheme_tables(scheme_repr: str, num_ids: int, named_shapes, d: Dims) -> None:
    """Every table given with scheme= has scheme.num_ids rows; rel_k / rel_v are tables [R, H] or [R, N, H]."""
    given = [(name, tuple(shape)) for name, shape in named_shapes if shape is not None]
    if not given:
        raise ValueError("scheme= was given but rel_k, rel_v, rel_q and rel_bias are all None; "
                         "pass at least one relation table")
    for name, shape in given:
        if name in ("rel_k", "rel_v"):
            table_layout(name, shape, d)
        if shape[0] != num_ids:
            raise ValueError(f"{name} must have R = scheme.num_ids = {num_ids} rows for {scheme_repr}, "
                             f"got shape {fmt(shape)} ({shape[0]} rows)")


def check_alibi(shape: Shape, finite: bool | None, d: Dims) -> None:
    """alibi_slopes is [N], one slope per query head, finite (``finite`` None: not known, e.g. traced)."""
    if tuple(shape) != (d.N,):
        raise ValueError(f"alibi_slopes must be [N] = [{d.N}] (one slope per query head), got shape {fmt(shape)}")
    if finite is False:
        raise ValueError("alibi_slopes must be finite, got a NaN or inf slope")
