"""The weight file: byte-identical from both frameworks, exact round trips, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import safetensors

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from torch import nn  # noqa: E402

import relattn_jax as rj  # noqa: E402
import relattn_torch as rt  # noqa: E402

from .backends import backend, param_name  # noqa: E402
from .numerics import allowed_error  # noqa: E402

MHA_NAMES = ["b_k", "b_o", "b_q", "b_v", "rel_k", "rel_v", "w_k", "w_o", "w_q", "w_v"]


class TorchToy(nn.Module):
    """A nested model: a list of blocks, each holding our attention layers."""

    def __init__(self, dtype):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(5, 8, dtype=dtype))
        self.blocks = nn.ModuleList([TorchBlock(dtype) for _ in range(2)])


class TorchBlock(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.attn = rt.RelativeMultiHeadAttention(8, 2, max_distance=2, share_relative_heads=False, dtype=dtype)
        self.rel = rt.RelationAwareAttention(2, 4, dtype=dtype)


class JaxToy(nnx.Module):
    def __init__(self, dtype, rngs):
        self.emb = nnx.Param(jax.random.normal(rngs.params(), (5, 8), dtype))
        self.blocks = nnx.List([JaxBlock(dtype, rngs) for _ in range(2)])


class JaxBlock(nnx.Module):
    def __init__(self, dtype, rngs):
        self.attn = rj.RelativeMultiHeadAttention(8, 2, max_distance=2, share_relative_heads=False,
                                                  param_dtype=dtype, rngs=rngs)
        self.rel = rj.RelationAwareAttention(2, 4, param_dtype=dtype, rngs=rngs)


def torch_mha(dtype="float64", **kw):
    torch.manual_seed(0)
    m = rt.RelativeMultiHeadAttention(8, 2, max_distance=2, dtype=getattr(torch, dtype), **kw)
    with torch.no_grad():  # non-zero biases, so a swapped bias would show
        for p in m.parameters():
            p.normal_()
    return m


def jax_mha(dtype="float64", seed=1, **kw):
    return rj.RelativeMultiHeadAttention(8, 2, max_distance=2, param_dtype=getattr(jnp, dtype),
                                         rngs=nnx.Rngs(seed), **kw)


def params(module) -> dict:
    """{canonical name: values as float64 NumPy} (exact for every dtype used here)."""
    if isinstance(module, nn.Module):
        return {n: p.detach().double().numpy() for n, p in module.named_parameters()}
    return {n: np.asarray(v, np.float64) for n, v in backend("jax").params(module).items()}


def dtypes(module) -> dict:
    if isinstance(module, nn.Module):
        return {n: str(p.dtype).removeprefix("torch.") for n, p in module.named_parameters()}
    return {n: np.dtype(v.dtype).name for n, v in backend("jax").params(module).items()}


def assert_same_params(a, b):
    pa, pb = params(a), params(b)
    assert sorted(pa) == sorted(pb)
    assert dtypes(a) == dtypes(b)
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_round_trip_is_exact_and_files_are_byte_identical(tmp_path, dtype):
    """torch -> file -> jax -> file -> torch: same bytes, same values, both ways."""
    src = torch_mha(dtype)
    rt.save_weights(src, tmp_path / "t.safetensors")
    j = jax_mha(dtype)
    rj.load_weights(j, tmp_path / "t.safetensors")
    rj.save_weights(j, tmp_path / "j.safetensors")
    back = torch_mha(dtype)
    with torch.no_grad():
        for p in back.parameters():
            p.zero_()
    rt.load_weights(back, tmp_path / "j.safetensors")
    assert (tmp_path / "t.safetensors").read_bytes() == (tmp_path / "j.safetensors").read_bytes()
    assert_same_params(src, j)
    assert_same_params(src, back)
    for name, p in back.named_parameters():
        assert torch.equal(p, dict(src.named_parameters())[name]), name


def test_file_layout_names_dtypes_and_metadata(tmp_path):
    m = torch_mha("bfloat16", share_relative_heads=False)
    rt.save_weights(m, tmp_path / "w.safetensors")
    with safetensors.safe_open(tmp_path / "w.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "relattn-v1"}
        assert sorted(f.keys()) == MHA_NAMES
        assert f.get_tensor("rel_k").dtype == torch.bfloat16
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}
    assert shapes == {"b_k": (2, 4), "b_o": (8,), "b_q": (2, 4), "b_v": (2, 4), "rel_k": (5, 2, 4),
                      "rel_v": (5, 2, 4), "w_k": (8, 2, 4), "w_o": (2, 4, 8), "w_q": (8, 2, 4), "w_v": (8, 2, 4)}


@pytest.mark.parametrize("dtype", ["float64", "bfloat16"])
def test_nested_modules_round_trip(tmp_path, dtype):
    """A model nesting both layers in a list of blocks: names like blocks.1.attn.w_q."""
    torch.manual_seed(0)
    t = TorchToy(getattr(torch, dtype))
    j = JaxToy(getattr(jnp, dtype), nnx.Rngs(0))
    assert sorted(params(t)) == sorted(params(j))
    assert "blocks.1.attn.rel_v" in params(t) and "blocks.0.rel.w_k" in params(t)
    rt.save_weights(t, tmp_path / "t.safetensors")
    rj.load_weights(j, tmp_path / "t.safetensors")
    rj.save_weights(j, tmp_path / "j.safetensors")
    assert (tmp_path / "t.safetensors").read_bytes() == (tmp_path / "j.safetensors").read_bytes()
    assert_same_params(t, j)


def test_abstract_jax_module_loads(tmp_path):
    """An ``nnx.eval_shape`` module (no initialisation cost) can be filled from a file."""
    src = torch_mha()
    rt.save_weights(src, tmp_path / "w.safetensors")
    j = nnx.eval_shape(lambda: jax_mha())
    rj.load_weights(j, tmp_path / "w.safetensors")
    assert_same_params(src, j)


def test_floating_dtypes_are_cast_to_the_parameter_dtype(tmp_path):
    src = torch_mha("bfloat16")
    rt.save_weights(src, tmp_path / "w.safetensors")
    t64, j32 = torch_mha("float64"), jax_mha("float32")
    rt.load_weights(t64, tmp_path / "w.safetensors")
    rj.load_weights(j32, tmp_path / "w.safetensors")
    assert t64.w_q.dtype == torch.float64 and j32.w_q[...].dtype == jnp.float32
    exact = params(src)  # bf16 values are exact in float32 and float64
    for name, value in params(t64).items():
        np.testing.assert_array_equal(value, exact[name])
    for name, value in params(j32).items():
        np.testing.assert_array_equal(value, exact[name])


def _write(path, tensors: dict):
    from safetensors.numpy import save_file

    save_file(tensors, str(path))


def test_strict_error_lists_every_offender_and_leaves_module_unchanged(tmp_path):
    ref = params(torch_mha())
    bad = {n: v for n, v in ref.items() if n not in ("b_q", "w_o")}  # two missing
    bad["rel_k"] = np.zeros((7, 4))  # mis-shaped: expected [5, 4]
    bad["w_v"] = np.zeros((8, 2, 4), np.int32)  # non-floating
    bad["extra.weight"] = np.zeros(3)  # unexpected
    _write(tmp_path / "bad.safetensors", bad)
    for m in (torch_mha(), jax_mha()):
        before = params(m)
        loader = rt.load_weights if isinstance(m, nn.Module) else rj.load_weights
        with pytest.raises(ValueError) as err:
            loader(m, tmp_path / "bad.safetensors")
        msg = str(err.value)
        assert "missing: b_q: expected shape [2, 4], found nothing" in msg
        assert "missing: w_o: expected shape [2, 4, 8]" in msg
        assert "mismatched: rel_k: expected shape [5, 4] (floating), found [7, 4] F64" in msg
        assert "mismatched: w_v: expected shape [8, 2, 4] (floating), found [8, 2, 4] I32" in msg
        assert "unexpected: extra.weight: expected nothing, found shape [3] F64" in msg
        after = params(m)
        for name in before:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_non_strict_loads_what_matches_and_reports_the_rest(tmp_path):
    ref = params(torch_mha())
    partial = {n: v for n, v in ref.items() if n != "b_q"}
    partial["rel_v"] = np.zeros((3, 4))
    partial["extra"] = np.zeros(2)
    _write(tmp_path / "partial.safetensors", partial)
    for m in (torch_mha(dtype="float64"), jax_mha()):
        before = params(m)
        loader = rt.load_weights if isinstance(m, nn.Module) else rj.load_weights
        with torch.no_grad():
            if isinstance(m, nn.Module):
                for p in m.parameters():
                    p.zero_()
                before = params(m)
        result = loader(m, tmp_path / "partial.safetensors", strict=False)
        assert result.missing == ["b_q"] and result.unexpected == ["extra"]
        assert [(x.name, x.expected, x.found) for x in result.mismatched] == [("rel_v", (5, 4), (3, 4))]
        after = params(m)
        for name in after:
            want = before[name] if name in ("b_q", "rel_v") else ref[name]
            np.testing.assert_array_equal(after[name], want, err_msg=name)


def test_complete_load_returns_empty_lists(tmp_path):
    rt.save_weights(torch_mha(), tmp_path / "w.safetensors")
    assert tuple(rj.load_weights(jax_mha(), tmp_path / "w.safetensors")) == ([], [], [])


@pytest.mark.parametrize("damage", ["truncated", "not-safetensors", "empty"])
def test_unreadable_file_is_a_clear_error_and_module_unchanged(tmp_path, damage):
    rt.save_weights(torch_mha(), tmp_path / "w.safetensors")
    data = (tmp_path / "w.safetensors").read_bytes()
    broken = {"truncated": data[: len(data) - 10], "not-safetensors": b"PK\x03\x04 a zip, not weights" * 4,
              "empty": b""}[damage]
    (tmp_path / "bad.safetensors").write_bytes(broken)
    for m, loader in ((torch_mha("float32"), rt.load_weights), (jax_mha(), rj.load_weights)):
        before = params(m)
        with pytest.raises(ValueError, match=r"bad\.safetensors' is not a readable safetensors file"):
            loader(m, tmp_path / "bad.safetensors")
        for name, value in params(m).items():
            np.testing.assert_array_equal(value, before[name])


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        rt.load_weights(torch_mha(), tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        rj.load_weights(jax_mha(), tmp_path / "nope.safetensors")


def test_save_overwrites_atomically_without_leftovers(tmp_path):
    path = tmp_path / "w.safetensors"
    rt.save_weights(torch_mha("float32"), path)
    rj.save_weights(jax_mha("float32"), path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]
    j = jax_mha("float32", seed=5)
    rj.load_weights(j, path)
    assert_same_params(j, jax_mha("float32"))


def test_relattn_jax_weights_never_import_torch():
    import subprocess
    import sys

    code = "import sys, relattn_jax.weights, relattn_jax.interop; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    code = "import sys, relattn_torch.weights, relattn_torch.interop; assert 'jax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("position", ["relative", "absolute"])
def test_decoder_lm_round_trip_and_same_logits(tmp_path, position):
    """The training issue's toy model: one file, byte-identical both ways, same logits."""
    from relattn_jax import decoder as jd
    from relattn_torch import decoder as td

    kw = dict(vocab_size=11, embed_dim=8, num_heads=2, num_layers=2, mlp_dim=16, max_distance=3, max_len=16,
              position=position)
    torch.manual_seed(0)
    t = td.DecoderLM(td.DecoderConfig(**kw), dtype=torch.float64)
    with torch.no_grad():  # non-zero biases and LayerNorm offsets, so a swap would show
        for p in t.parameters():
            p.add_(0.1 * torch.randn_like(p))
    j = nnx.eval_shape(lambda: jd.DecoderLM(jd.DecoderConfig(**kw), param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    jax_names = [param_name(path) for path, _ in nnx.to_flat_state(nnx.state(j, nnx.Param))]
    assert sorted(params(t)) == sorted(jax_names)
    rt.save_weights(t, tmp_path / "t.safetensors")
    rj.load_weights(j, tmp_path / "t.safetensors")
    rj.save_weights(j, tmp_path / "j.safetensors")
    assert (tmp_path / "t.safetensors").read_bytes() == (tmp_path / "j.safetensors").read_bytes()
    tokens = np.random.default_rng(0).integers(0, 11, size=(2, 7))
    with torch.no_grad():
        ref = t(torch.from_numpy(tokens)).numpy()
    got = np.asarray(j(jnp.asarray(tokens)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=allowed_error(ref))


def test_framework_free_helpers_are_identical_in_the_twins():
    """The serializer, reader, comparison and messages are one text in both packages."""
    from pathlib import Path

    import relattn_jax.weights as jw
    import relattn_torch.weights as tw
    from relattn_torch._weightfile import FLOAT_DTYPES

    root = Path(__file__).resolve().parents[1]
    texts = [(root / pkg / "_weightfile.py").read_text() for pkg in ("relattn_torch", "relattn_jax")]
    assert texts[0] == texts[1]
    # each package maps exactly the floating dtypes the shared half accepts
    assert set(tw._DTYPES) == set(jw._DTYPES) == set(FLOAT_DTYPES)
