"""Each package imports and works with only its own framework; the twins stay twins."""

from __future__ import annotations

import ast
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


@pytest.mark.parametrize("name", ["_spec.py", "_cache_spec.py", "_scheme_spec.py", "_module_spec.py", "_weightfile.py"])
def test_framework_free_modules_are_byte_identical_in_both_packages(name):
    assert (ROOT / "relattn_torch" / name).read_bytes() == (ROOT / "relattn_jax" / name).read_bytes()


def _py_files(package: str) -> set[str]:
    return {p.name for p in (ROOT / package).glob("*.py")}


SHARED_FILES = sorted(_py_files("relattn_torch") & _py_files("relattn_jax"))
ONE_SIDED_FILES = sorted(
    [("relattn_torch", n) for n in _py_files("relattn_torch") - _py_files("relattn_jax")]
    + [("relattn_jax", n) for n in _py_files("relattn_jax") - _py_files("relattn_torch")]
)
# Framework-specific importers are the one allowed difference in public names.
ALLOWED_DIFFERENCES = {"interop.py": ({"from_torch_mha"}, {"from_nnx_mha"})}
# Public modules in one package only, with their public names (their docstrings say why: the
# transformers importers read PyTorch layers; the weight file is what reaches JAX).
ONE_SIDED_PUBLIC = {
    ("relattn_torch", "importers.py"): {"from_hf_bert_attention", "from_hf_deberta_attention", "from_hf_t5_attention"},
}
# Files whose algorithm differs from the twin's: both open with a "Why this twin differs" paragraph.
DIFFERENT_ALGORITHMS = ["blockwise.py", "choice.py", "dense.py", "generate.py", "shaw.py"]


def _public_names(path: pathlib.Path) -> set[str]:
    """Module-level names defined in the file (functions, classes, assignments) not starting with _."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_")}


def _docstring(path: pathlib.Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def test_public_names_helper_reads_definitions_only(tmp_path):
    path = tmp_path / "probe.py"
    lines = ["import os", "from x import y", "A = 1", "_b = 2", "def f(): pass", "class C: pass", "def _g(): pass",
             "z: int = 3"]
    path.write_text("\n".join(lines) + "\n")
    assert _public_names(path) == {"A", "f", "C", "z"}


@pytest.mark.parametrize("name", SHARED_FILES)
def test_same_named_files_define_the_same_public_names(name):
    torch_names = _public_names(ROOT / "relattn_torch" / name)
    jax_names = _public_names(ROOT / "relattn_jax" / name)
    torch_only, jax_only = ALLOWED_DIFFERENCES.get(name, (set(), set()))
    assert (torch_names - torch_only, jax_names - jax_only) == (torch_names & jax_names, torch_names & jax_names), (
        f"{name}: only in relattn_torch {sorted(torch_names - jax_names - torch_only)}, "
        f"only in relattn_jax {sorted(jax_names - torch_names - jax_only)}"
    )


def test_every_file_has_a_twin_or_says_why_not():
    """Public modules come in pairs; a private module in one package only says in its docstring's
    first lines why the other package has no twin of it."""
    assert all(name.startswith("_") or (p, name) in ONE_SIDED_PUBLIC for p, name in ONE_SIDED_FILES), ONE_SIDED_FILES
    for package, name in ONE_SIDED_FILES:
        other = "relattn_jax" if package == "relattn_torch" else "relattn_torch"
        first_lines = " ".join(_docstring(ROOT / package / name).split("\n\n")[:2])
        assert other in first_lines and "no twin" in first_lines, (
            f"{package}/{name} exists in one package only; its docstring's first lines must say why "
            f"{other} has no twin of it"
        )


@pytest.mark.parametrize("name", DIFFERENT_ALGORITHMS)
def test_files_that_differ_from_their_twin_say_why(name):
    """The paragraph opens the module docstring, right after its title line."""
    for package in ("relattn_torch", "relattn_jax"):
        paragraphs = _docstring(ROOT / package / name).split("\n\n")
        assert paragraphs[1].startswith("Why this twin differs:"), f"{package}/{name}"


def test_package_all_is_the_same_in_both_packages():
    pytest.importorskip("torch")
    pytest.importorskip("jax")
    import relattn_jax
    import relattn_torch

    torch_only, jax_only = ALLOWED_DIFFERENCES["interop.py"]
    torch_only = torch_only.union(*ONE_SIDED_PUBLIC.values())
    assert set(relattn_torch.__all__) - torch_only == set(relattn_jax.__all__) - jax_only


def test_einsum_strings_are_the_same_in_both_packages():
    import re

    pattern = re.compile(r'einsum\(\s*f?"([^"]+)"')
    for name in ("einsum.py", "modules.py"):
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


# -- the distribution: one version, tested floors (issue 14) -------------------------------------

PYPROJECT = ROOT / "pyproject.toml"


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads(PYPROJECT.read_text())


def _lower_bounds() -> dict[str, str]:
    """Every ``name>=X`` in pyproject's dependencies and extras (not the dev tools): {name: X}."""
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + [r for name in ("torch", "jax", "train", "fused") for r in extras[name]]
    bounds = {}
    for text in requirements:
        req = Requirement(text)
        for spec in req.specifier:
            if spec.operator == ">=":
                bounds[req.name] = spec.version
    return bounds


def _pins(path: pathlib.Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


@pytest.mark.parametrize("package", ["relattn_torch", "relattn_jax"])
def test_version_is_the_one_in_pyproject(package):
    """``__version__`` is read from the installed distribution, whose version is pyproject's (a stale
    install, or a copy of the version in the code, would differ after a bump)."""
    pytest.importorskip("torch" if package == "relattn_torch" else "jax")
    import importlib

    version = importlib.import_module(package).__version__
    assert version == _pyproject()["project"]["version"], f"{package}.__version__ is {version}: reinstall (make setup)"


def test_declared_jax_side_bounds_are_the_floor_venvs_pins():
    """The floor venv of .ci/packaging installs exactly the declared lower bounds of the jax side."""
    bounds = _lower_bounds()
    pins = _pins(ROOT / "requirements" / "floor-jax.txt")
    jax_side = ["numpy", "safetensors", "jax", "flax", "optax", "orbax-checkpoint", "matplotlib", "tqdm"]
    from packaging.version import Version

    assert {n: Version(bounds[n]) for n in jax_side} == {n: Version(pins[n]) for n in jax_side}
    assert pins["jaxlib"] == pins["jax"]


def test_declared_torch_bound_is_the_tested_torch():
    """torch's lower bound is the one torch CI installs (the pinned CPU build)."""
    pins = _pins(ROOT / "requirements" / "constraints.txt")
    assert _lower_bounds()["torch"] == ".".join(pins["torch"].split(".")[:2]), pins["torch"]


def test_both_packages_ship_py_typed():
    setuptools = _pyproject()["tool"]["setuptools"]
    for package in setuptools["packages"]:
        assert (ROOT / package / "py.typed").exists(), package
        assert "py.typed" in setuptools["package-data"][package], package
