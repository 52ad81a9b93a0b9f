"""Each package imports and works with only its own framework; the twins stay twins."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCK = "import sys; sys.modules.update({{m: None for m in {blocked!r}}}); "

TORCH_ONLY = """
import relattn_torch as rt, torch
m = rt.RelativeMultiHeadAttention(8, 2, max_distance=2)
assert m(torch.randn(1, 5, 8), is_causal=True).shape == (1, 5, 8)
assert not any(name == 'jax' or name.startswith(('jax.', 'flax')) for name in sys.modules if sys.modules[name])
print('ok')
"""

JAX_ONLY = """
import relattn_jax as rj, jax.numpy as jnp
from flax import nnx
m = rj.RelativeMultiHeadAttention(8, 2, max_distance=2, rngs=nnx.Rngs(0))
assert m(jnp.ones((1, 5, 8)), is_causal=True).shape == (1, 5, 8)
assert not any(name == 'torch' or name.startswith('torch.') for name in sys.modules if sys.modules[name])
print('ok')
"""


@pytest.mark.parametrize("script,blocked", [
    (TORCH_ONLY, ["jax", "jaxlib", "flax", "optax", "orbax"]),
    (JAX_ONLY, ["torch"]),
])
def test_package_imports_without_the_other_framework(script, blocked):
    pytest.importorskip("torch" if "torch" in script.split("\n")[1] else "jax")
    code = BLOCK.format(blocked=blocked) + script
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().endswith("ok")


def test_blocking_really_blocks():
    """The harness above would be vacuous if a None entry in sys.modules did not block imports."""
    code = BLOCK.format(blocked=["torch"]) + "import torch"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode != 0 and ("ModuleNotFoundError" in run.stderr or "ImportError" in run.stderr)


@pytest.mark.parametrize("name", ["_spec.py", "_weightfile.py"])
def test_framework_free_modules_are_byte_identical_in_both_packages(name):
    assert (ROOT / "relattn_torch" / name).read_bytes() == (ROOT / "relattn_jax" / name).read_bytes()


def test_twins_have_the_same_files_and_public_names():
    torch_files = sorted(p.name for p in (ROOT / "relattn_torch").glob("*.py"))
    jax_files = sorted(p.name for p in (ROOT / "relattn_jax").glob("*.py"))
    assert torch_files == jax_files
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    import relattn_jax
    import relattn_torch

    torch_only = {"from_torch_mha"}  # framework-specific importers are the one allowed difference
    jax_only = {"from_nnx_mha"}
    assert set(relattn_torch.__all__) - torch_only == set(relattn_jax.__all__) - jax_only


def test_einsum_strings_are_the_same_in_both_packages():
    import re

    pattern = re.compile(r'einsum\(\s*f?"([^"]+)"')
    for name in ("attention.py", "modules.py"):
        t = pattern.findall((ROOT / "relattn_torch" / name).read_text())
        j = pattern.findall((ROOT / "relattn_jax" / name).read_text())
        assert t and t == j, name


def test_decoder_configs_are_the_same_in_both_packages():
    """DecoderConfig is written twice (each package stands alone); its fields must not drift."""
    import dataclasses

    pytest.importorskip("torch")
    pytest.importorskip("jax")
    from relattn_jax.decoder import DecoderConfig as JaxConfig
    from relattn_torch.decoder import DecoderConfig as TorchConfig

    def fields(cls):
        return [(f.name, f.type, f.default) for f in dataclasses.fields(cls)]

    assert fields(TorchConfig) == fields(JaxConfig) and len(fields(TorchConfig)) >= 8
