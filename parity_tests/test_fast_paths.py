"""The fast paths (``shaw``, ``blockwise``, ``auto``) against the float64 oracle and across frameworks.

Outputs are compared with ``oracle.relative_attention``; gradients with the same framework's
``einsum`` path (itself checked against the oracle in test_core) and between frameworks.
Block sizes are lowered so that small inputs still cross several band / query blocks. The Shaw
paths' own pieces (torch's chunks and tail calls, jax's expand / reduce) are tested in
``test_shaw_internals.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

from . import oracle
from .backends import backend
from .numerics import allowed_error
from .shaw_cases import B, FRAMEWORKS, H, N, SCALE, SHAW_CASES, check_path, oracle_shaw, shaw_inputs
from .shaw_cases import small_blocks  # noqa: F401 (autouse fixture)


def _shaw_grid():
    """Every case on torch's banded path and jax's Shaw path; the rest of the cross product is slow."""
    for i, case in enumerate(SHAW_CASES):
        for fw in FRAMEWORKS:
            for impl in ("shaw", "blockwise", "auto"):
                quick = impl == "shaw" or (fw == "torch" and impl == "auto") or i in (1, 2, 10)
                marks = () if quick else (pytest.mark.slow,)
                yield pytest.param(fw, impl, case, marks=marks, id=f"{fw}-{impl}-{case.id}")


@pytest.mark.parametrize("fw, impl, case", list(_shaw_grid()))
def test_shaw_paths_match_oracle_and_einsum_grads(fw, impl, case):
    be = backend(fw)
    x = case.inputs(7)
    ref = oracle_shaw(x, case.K, case.offset, case.T, case.S, is_causal=case.causal)
    kw = dict(max_distance=case.K, q_offset=case.q_offset, is_causal=case.causal, scale=SCALE)
    check_path(be, x, np.random.default_rng(1).normal(size=ref.shape), ref, impl, **kw)


@pytest.mark.parametrize("case", [SHAW_CASES[i] for i in (1, 3, 5)], ids=lambda c: c.id)
def test_shaw_path_same_in_both_frameworks(case):
    x = case.inputs(11)
    kw = dict(max_distance=case.K, q_offset=case.q_offset, is_causal=case.causal, scale=SCALE, implementation="shaw")
    cot = np.random.default_rng(2).normal(size=(B, case.T, N, H))
    out_t, g_t = backend("torch").attention_grads(x, cot, **kw)
    out_j, g_j = backend("jax").attention_grads(x, cot, **kw)
    assert np.abs(out_t - out_j).max() <= allowed_error(out_t)
    for name in g_t:
        assert np.abs(g_t[name] - g_j[name]).max() <= allowed_error(g_t[name]), name


def _masks():
    keep = np.ones((B, 1, 1, 6), bool)
    keep[1, ..., 4:] = False  # padding of example 1
    rows = np.random.default_rng(3).random((B, N, 5, 6)) < 0.6
    rows[0, 1, 2] = False  # a fully masked row
    return {"padding": keep, "random_with_empty_row": rows, "all_masked": np.zeros((1, 1, 5, 6), bool)}


def _mask_grid():
    for name in _masks():
        for fw in FRAMEWORKS:
            for impl in ("blockwise", "auto", "shaw"):
                quick = fw == "torch" or impl == "shaw" or name == "random_with_empty_row"
                yield pytest.param(fw, impl, name, marks=() if quick else (pytest.mark.slow,), id=f"{fw}-{impl}-{name}")


@pytest.mark.parametrize("fw, impl, mask_name", list(_mask_grid()))
def test_masked_shaw(fw, impl, mask_name):
    """Masks go to an exact path: the torch banded path takes key-padding masks only ('auto' falls
    back from it for the others), jax 'shaw' takes any."""
    be = backend(fw)
    mask = _masks()[mask_name]
    x = shaw_inputs(5, 5, 6, 2)
    kw = dict(max_distance=2, mask=mask, scale=SCALE)
    if fw == "torch" and impl == "shaw" and mask_name != "padding":
        with pytest.raises(ValueError, match=r"implementation='shaw' needs no mask or a key-padding mask \[B, 1, 1, S\]"):
            be.attention(x, implementation=impl, **kw)
        return
    ref = oracle_shaw(x, 2, 1, 5, 6, mask=mask)
    out = check_path(be, x, np.random.default_rng(4).normal(size=ref.shape), ref, impl, **kw)
    vis = oracle.visibility(B, N, 5, 6, mask)
    empty = ~vis.any(-1)  # [B, N, T]
    assert np.all(out.transpose(0, 2, 1, 3)[empty] == 0.0)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("case", SHAW_CASES, ids=lambda c: c.id)
def test_key_padding_on_the_shaw_paths(fw, case):
    """A key-padding mask [B, 1, 1, S] on every Shaw geometry (band blocks, tail rectangles and
    triangles, reversed calls): example 0 has random padding, example 1 is all padding."""
    be = backend(fw)
    x = case.inputs(13)
    valid = np.random.default_rng(case.T * 31 + case.S).random((B, case.S)) < 0.6
    valid[1] = False
    mask = valid[:, None, None, :]
    ref = oracle_shaw(x, case.K, case.offset, case.T, case.S, is_causal=case.causal, mask=mask)
    kw = dict(max_distance=case.K, q_offset=case.q_offset, is_causal=case.causal, scale=SCALE, mask=mask)
    out = check_path(be, x, np.random.default_rng(1).normal(size=ref.shape), ref, "shaw", **kw)
    assert np.all(out[1] == 0.0)  # no key to see


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_torch_banded_path_in_half_precision(dtype):
    """Half inputs take the banded path and lose no more than the einsum path: output and every
    gradient against float64 on the same (rounded) inputs, with a key-padding mask and causal."""
    torch = pytest.importorskip("torch")
    from relattn_torch import relative_attention

    rng = np.random.default_rng(8)
    T, S, K = 40, 40, 3
    x = shaw_inputs(8, T, S, K, shared=False)
    x = {n: torch.from_numpy(2 * a).to(getattr(torch, dtype)) for n, a in x.items()}
    mask = torch.from_numpy(rng.random((B, 1, 1, S)) < 0.7)
    cot = torch.from_numpy(rng.normal(size=(B, T, N, H)))

    def run(inputs, impl):
        inputs = {n: t.clone().requires_grad_() for n, t in inputs.items()}
        out = relative_attention(**inputs, max_distance=K, mask=mask, is_causal=True, scale=SCALE, implementation=impl)
        grads = torch.autograd.grad((out.double() * cot).sum(), list(inputs.values()))
        assert out.dtype == inputs["q"].dtype and all(g.dtype == out.dtype for g in grads)
        return [out.double()] + [g.double() for g in grads]

    exact = run({n: t.double() for n, t in x.items()}, "einsum")
    banded, einsum = run(x, "shaw"), run(x, "einsum")
    for name, e, got, ref in zip(["out", *x], exact, banded, einsum):
        assert (got - e).abs().max() <= 1.5 * (ref - e).abs().max() + 1e-3, name


def _table_and_dense_inputs(form, T=7, S=5):
    rng = np.random.default_rng(9)
    x = {"q": rng.normal(size=(B, T, N, H)), "k": rng.normal(size=(B, S, N, H)), "v": rng.normal(size=(B, S, N, H))}
    kw = {}
    if form == "table":
        x["rel_k"], x["rel_v"] = rng.normal(size=(4, N, H)), rng.normal(size=(4, H))
        kw["rel_ids"] = rng.integers(0, 4, size=(B, T, S))
    elif form == "dense":
        x["rel_k"], x["rel_v"] = rng.normal(size=(T, S, N, H)), rng.normal(size=(T, 1, H))
    else:  # dense per example with broadcast N
        x["rel_k"], x["rel_v"] = rng.normal(size=(B, T, S, 1, H)), None
    return x, kw


def _form_grid():
    for form in ("table", "dense", "dense5"):
        for causal in (False, True):
            for fw in FRAMEWORKS:
                quick = fw == "torch" or (form, causal) in (("table", True), ("dense", False))
                name = f"{fw}-{form}" + ("-causal" if causal else "")
            yield pytest.param(fw, form, causal, marks=() if quick else (pytest.mark.slow,), id=name)


@pytest.mark.parametrize("fw, form, causal", list(_form_grid()))
def test_blockwise_tables_and_dense_edges(fw, form, causal):
    be = backend(fw)
    x, kw = _table_and_dense_inputs(form)
    mask = np.random.default_rng(6).random((1, N, 7, 5)) < 0.7
    kw.update(is_causal=causal, mask=mask, scale=SCALE)
    ref = oracle.relative_attention(x["q"], x["k"], x["v"], x.get("rel_k"), x.get("rel_v"), **kw)
    check_path(be, x, np.random.default_rng(8).normal(size=ref.shape), ref, "blockwise", **kw)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_auto_switches_to_blockwise_above_threshold(fw, monkeypatch):
    be = backend(fw)
    attention = be.lib.attention  # relative_attention looks its paths up here at call time
    calls = []
    real = attention.blockwise_attention

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(attention, "blockwise_attention", spy)
    x, kw = _table_and_dense_inputs("table")
    ref = oracle.relative_attention(x["q"], x["k"], x["v"], x["rel_k"], x["rel_v"], scale=SCALE, **kw)
    be.attention(x, scale=SCALE, **kw)
    assert calls == []  # below the threshold: the einsum path
    monkeypatch.setattr(be.lib.choice, "LONG_SEQUENCE_THRESHOLD", B * N * 7 * 5)
    out = be.attention(x, scale=SCALE, **kw)
    assert len(calls) == 1
    assert np.abs(out - ref).max() <= allowed_error(ref)


def test_torch_auto_picks_banded_shaw_path(monkeypatch):
    pytest.importorskip("torch")
    import relattn_torch.attention as attention

    import relattn_torch.choice as choice

    monkeypatch.setattr(choice, "_SHAW_MIN_LOGITS", dict.fromkeys(choice._SHAW_MIN_LOGITS, 0))  # any size
    be = backend("torch")
    calls = []
    real = attention.shaw_attention
    monkeypatch.setattr(attention, "shaw_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = shaw_inputs(1, 6, 6, 2)
    be.attention(x, max_distance=2, scale=SCALE)
    assert calls == [1]
    be.attention(x, max_distance=2, scale=SCALE, mask=np.ones((6, 6), bool))  # a mask over T falls back
    assert calls == [1]
    be.attention(x, max_distance=2, scale=SCALE, mask=np.ones((B, 1, 1, 6), bool))  # key padding stays
    assert calls == [1, 1]


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_module_matches_oracle_on_fast_path(fw):
    be = backend(fw)
    m = be.module("RelativeMultiHeadAttention", 12, 3, max_distance=2, share_relative_heads=False)
    params = be.params(m)
    x = np.random.default_rng(3).normal(size=(2, 7, 12))
    for causal in (False, True):
        ref = oracle.multi_head_attention(params, x, max_distance=2, is_causal=causal)
        out = be.call(m, x, is_causal=causal)
        assert np.abs(out - ref).max() <= allowed_error(ref)


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_shaw_argument_errors(fw):
    be = backend(fw)
    x = shaw_inputs(0, 4, 4, 2)
    with pytest.raises(ValueError, match=r"rel_k must have R = 2 \* max_distance \+ 1 = 7 rows.*got shape \[5, 4\]"):
        be.attention(x, max_distance=3)
    with pytest.raises(ValueError, match="either rel_ids or max_distance"):
        be.attention(x, max_distance=2, rel_ids=np.zeros((4, 4), np.int64))
    with pytest.raises(ValueError, match="q_offset .* needs max_distance"):
        be.attention({**x, "rel_k": None, "rel_v": None}, q_offset=1)
    with pytest.raises(ValueError, match="max_distance must be a non-negative int, got -1"):
        be.attention(x, max_distance=-1)
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        be.attention(x, max_distance=2, implementation="fast")
    with pytest.raises(ValueError, match="both rel_k and rel_v are None"):
        be.attention({**x, "rel_k": None, "rel_v": None}, max_distance=2)
    with pytest.raises(ValueError, match="implementation='shaw' needs max_distance"):
        be.attention(x, implementation="shaw", rel_ids=np.zeros((4, 4), np.int64))


def test_torch_shaw_rejects_unsupported_causal_offset():
    be = backend("torch")
    x = shaw_inputs(0, 4, 4, 1)
    with pytest.raises(ValueError, match="q_offset \\+ max\\(max_distance, 1\\) > S - T"):
        be.attention(x, max_distance=1, q_offset=-3, is_causal=True, implementation="shaw")
    ref = oracle_shaw(x, 1, -3, 4, 4, is_causal=True)  # 'auto' falls back and stays exact
    out = be.attention(x, max_distance=1, q_offset=-3, is_causal=True, scale=SCALE)
    assert np.abs(out - ref).max() <= allowed_error(ref)
