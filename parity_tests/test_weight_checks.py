"""Weight files holding non-finite values, or values a cast turns into Inf (issue 13).

``load_weights`` in both frameworks: a tensor with NaN/Inf is refused by default, naming
every such tensor (``allow_non_finite=True`` loads it); a cast to the parameter's dtype that
turns a finite value into Inf (1e300 into float32) is always refused, naming the tensor. On
every refusal the module is unchanged, and both twins give the same message for one file.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("jax")

import relattn_torch as rt  # noqa: E402
from relattn_torch._weightfile import count_non_finite  # noqa: E402

from .backends import backend  # noqa: E402

BACKENDS = ["torch", "jax"]
DTYPES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def write_file(path, dtype: str, values: dict) -> None:
    """Save a torch module of ``dtype`` after setting {name: {flat index: value}}."""
    m = rt.RelativeMultiHeadAttention(4, 2, max_distance=1, dtype=getattr(torch, dtype))
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, entries in values.items():
            for i, v in entries.items():
                params[name].view(-1)[i] = torch.tensor(v, dtype=torch.float64)  # rounds as a cast would
    rt.save_weights(m, path)


def target(name: str, dtype: str):
    b = backend(name)
    return b, b.module("RelativeMultiHeadAttention", 4, 2, max_distance=1, dtype=dtype)


def load_error(name, module_dtype, path, **kw) -> str:
    """The ValueError message of load_weights, after checking the module was left unchanged."""
    b, m = target(name, module_dtype)
    before = b.params(m)
    with pytest.raises(ValueError) as err:
        b.lib.load_weights(m, path, **kw)
    after = b.params(m)
    assert all(np.array_equal(before[n], after[n], equal_nan=True) for n in before)
    return str(err.value).replace(str(path), "PATH")


def test_count_non_finite_reads_the_exponent_bits_literal():
    """[1, inf, nan, -inf, max, -0, subnormal] -> 3 in every floating dtype."""
    for dtype, code in DTYPES.items():
        t = getattr(torch, dtype)
        info = torch.finfo(t)
        x = torch.tensor([1.0, float("inf"), float("nan"), float("-inf"), info.max, -0.0, info.smallest_normal / 4], dtype=t)
        assert count_non_finite(code, x.view(torch.uint8).numpy().tobytes()) == 3, dtype


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("stored, module_dtype, value", [
    ("float64", "float32", 1e300), ("float64", "float32", -1e39), ("float32", "float16", 7e4), ("float64", "float16", 1e5),
    ("bfloat16", "float16", 1e6),
])
def test_a_cast_that_overflows_is_refused_naming_the_tensor(name, stored, module_dtype, value, tmp_path):
    path = tmp_path / "w.safetensors"
    write_file(path, stored, {"w_k": {3: value}})
    for kw in ({}, {"allow_non_finite": True}, {"strict": False}):  # no opt-out: it is not in the file
        msg = load_error(name, module_dtype, path, **kw)
        assert (
            f"tensor w_k stored as {DTYPES[stored]} does not fit its parameter's dtype {module_dtype}: "
            f"the cast turns 1 finite value(s) into Inf" in msg
        ), msg


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("stored", list(DTYPES))
def test_non_finite_values_are_refused_naming_every_tensor(name, stored, tmp_path):
    path = tmp_path / "w.safetensors"
    write_file(path, stored, {"w_q": {0: float("nan"), 5: float("inf")}, "rel_v": {1: float("-inf")}})
    module_dtype = "float64" if stored == "float64" else "float32"
    for kw in ({}, {"strict": False}):
        msg = load_error(name, module_dtype, path, **kw)
        assert "holds non-finite values (NaN or Inf); nothing was loaded" in msg, msg
        assert "allow_non_finite=True" in msg
        assert "  rel_v: 1 of 6 values" in msg and "  w_q: 2 of 16 values" in msg, msg
        assert "w_k" not in msg


@pytest.mark.parametrize("name", BACKENDS)
def test_allow_non_finite_loads_them(name, tmp_path):
    path = tmp_path / "w.safetensors"
    write_file(path, "float32", {"w_q": {0: float("nan"), 5: float("inf")}})
    b, m = target(name, "float32")
    assert not any(b.lib.load_weights(m, path, allow_non_finite=True))
    w_q = b.params(m)["w_q"].reshape(-1)
    assert np.isnan(w_q[0]) and w_q[5] == np.inf and np.isfinite(np.delete(w_q, [0, 5])).all()


@pytest.mark.parametrize("name", BACKENDS)
def test_finite_values_near_the_limit_still_load(name, tmp_path):
    """Positive control: float32's max stored as float64, and tiny values, load exactly."""
    path = tmp_path / "w.safetensors"
    big = float(np.finfo(np.float32).max)
    write_file(path, "float64", {"w_k": {3: big, 4: -big, 5: 1e-300}})
    b, m = target(name, "float32")
    assert not any(b.lib.load_weights(m, path))
    w_k = b.params(m)["w_k"].reshape(-1)
    assert w_k[3] == np.float32(big) and w_k[4] == -np.float32(big) and w_k[5] == 0.0


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("flag", ["strict", "allow_non_finite"])
def test_switches_must_be_bools(name, flag, tmp_path):
    """"False" is a truthy string: refused before the file is read."""
    b, m = target(name, "float32")
    with pytest.raises(TypeError, match=f"{flag} must be a bool, got 'False'"):
        b.lib.load_weights(m, tmp_path / "missing.safetensors", **{flag: "False"})


def test_both_frameworks_refuse_one_file_with_one_message(tmp_path):
    path = tmp_path / "w.safetensors"
    write_file(path, "float64", {"w_o": {2: float("nan")}, "b_o": {0: 1e300}})
    assert load_error("torch", "float64", path) == load_error("jax", "float64", path)
    write_file(path, "float64", {"b_o": {0: 1e300}})
    assert load_error("torch", "float32", path) == load_error("jax", "float32", path)


from hypothesis import example, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

F32_MAX, F32_ULP = float(np.finfo(np.float32).max), 2.0**104  # the spacing at float32's max


@pytest.mark.parametrize("name", BACKENDS)
@example(value=F32_MAX + F32_ULP / 2, stored="float64", module_dtype="float32")  # the tie rounds to Inf
@example(value=F32_MAX + F32_ULP / 2 - 2.0**80, stored="float64", module_dtype="float32")  # rounds to max
@example(value=65520.0, stored="float32", module_dtype="float16")  # float16: the tie past 65504 is Inf
@example(value=65519.0, stored="float32", module_dtype="float16")
@example(value=F32_MAX, stored="float32", module_dtype="bfloat16")  # past bfloat16's max: Inf
@given(
    value=st.floats(allow_nan=True, allow_infinity=True, width=64),
    stored=st.sampled_from(list(DTYPES)),
    module_dtype=st.sampled_from(list(DTYPES)),
)
def test_value_checks_sweep(name, value, stored, module_dtype, tmp_path_factory):
    """Any value, any stored and parameter dtype: refused iff the file holds NaN/Inf or the
    cast makes Inf; otherwise loaded as torch casts it."""
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    write_file(path, stored, {"b_v": {1: value}})
    in_file = torch.tensor(value, dtype=torch.float64).to(getattr(torch, stored))
    loaded = in_file.to(getattr(torch, module_dtype))
    if not torch.isfinite(in_file):
        assert "  b_v: 1 of 4 values" in load_error(name, module_dtype, path)
    elif not torch.isfinite(loaded):
        assert "tensor b_v stored as" in load_error(name, module_dtype, path)
    else:
        b, m = target(name, module_dtype)
        assert not any(b.lib.load_weights(m, path))
        got = b.params(m)["b_v"].reshape(-1)[1]
        assert got == loaded.double().item() or (got == 0 and loaded == 0)
