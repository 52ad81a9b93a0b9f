"""Run the README's Python snippets against an installed relattn, as a user would (issue 14).

Usage: python readme_snippets.py README.md torch|jax|all

Run it from outside the source tree with the venv's python: the packages must come from the
installed wheel, which this checks. "torch" runs the PyTorch quick start, "jax" the JAX one,
"all" both and then the weight-file snippet, with ``torch_module`` / ``jax_module`` the two
quick-start layers; it checks that the JAX layer then gives the PyTorch layer's numbers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path


def snippets(readme: Path) -> dict[str, str]:
    """The README's ```python blocks, keyed "torch", "jax" and "weights" by what they import."""
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    named = {}
    for code in blocks:
        key = "weights" if "save_weights" in code else "torch" if "relattn_torch" in code else "jax"
        assert key not in named, f"two README snippets look like the {key} one"
        named[key] = code
    assert set(named) == {"torch", "jax", "weights"}, sorted(named)
    return named


def run(code: str, namespace: dict, name: str) -> dict:
    exec(compile(code, f"README.md ({name} snippet)", "exec"), namespace)
    package = sys.modules[f"relattn_{name}"] if name in ("torch", "jax") else None
    if package is not None:
        assert "site-packages" in package.__file__, f"{package.__name__} came from {package.__file__}, not the wheel"
        print(f"{name} snippet ok: {package.__name__} {package.__version__} from {package.__file__}")
    return namespace


def main(readme: str, which: str) -> None:
    code = snippets(Path(readme))
    names = ["torch", "jax"] if which == "all" else [which]
    spaces = {name: run(code[name], {}, name) for name in names}
    if which != "all":
        return
    import numpy as np
    import relattn_jax
    import relattn_torch

    torch_module, jax_module = spaces["torch"]["attn"], spaces["jax"]["attn"]
    run(code["weights"], dict(relattn_torch=relattn_torch, relattn_jax=relattn_jax, torch_module=torch_module,
                              jax_module=jax_module), "weights")
    x = np.random.default_rng(0).standard_normal((2, 9, 256)).astype(np.float32)
    y_torch = torch_module(spaces["torch"]["torch"].from_numpy(x), is_causal=True).detach().numpy()
    y_jax = np.asarray(jax_module(spaces["jax"]["jnp"].asarray(x), is_causal=True))
    err = float(np.abs(y_torch - y_jax).max())
    assert err < 1e-4, f"the weight-file snippet: JAX differs from PyTorch by {err}"
    print(f"weights snippet ok: PyTorch and JAX layers agree to {err:.1e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
