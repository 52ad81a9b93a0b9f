"""Training parity: the JAX and PyTorch trainers from ONE weight file on the same batches.

``run_parity`` is what ``parity_tests/test_train.py`` checks in float64 (50 steps);
``python -m train.parity --precision float32 --steps 200`` reports the float32 drift
(JSON + plot) for the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from . import tasks
from .config import TrainConfig

TINY = dict(task="copy", length=4, vocab_size=12, embed_dim=16, num_heads=2, num_layers=2, mlp_dim=32,
            max_distance=2, batch_size=4, warmup_steps=5, lr=1e-2, eval_scales=(1,), progress=False)


def run_parity(cfg: TrainConfig, steps: int, weight_path) -> dict:
    """Train both twins ``steps`` steps from the JAX model's initial weights.

    Returns:
        {"jax_loss": [steps], "torch_loss": [steps], "weight_diff": {name: max |jax - torch|},
         "weight_scale": {name: max |torch|}}.
    """
    import torch
    from flax import nnx

    from relattn_jax.weights import save_weights
    from relattn_torch.weights import load_weights

    from . import jax_train, torch_train

    cfg = dataclasses.replace(cfg, steps=steps)
    jt = jax_train.Trainer(cfg)
    save_weights(jt.model, weight_path)
    tt = torch_train.Trainer(cfg)
    load_weights(tt.model, weight_path)
    jax_loss, torch_loss = [], []
    for step in range(steps):
        data = tasks.batch(cfg.task, seed=cfg.seed, step=step, batch_size=cfg.batch_size, length=cfg.length,
                           vocab_size=cfg.vocab_size)
        jax_loss.append(float(jax_train.train_step(jt.model, jt.optimizer, *jt.put_batch(*data))[0]))
        torch_loss.append(float(tt.step(step, data)[0]))
    jax_params = {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(jt.model, nnx.Param))}
    with torch.no_grad():
        torch_params = {n: p.detach().cpu().numpy() for n, p in tt.model.named_parameters()}
    if sorted(jax_params) != sorted(torch_params):
        raise AssertionError(f"parameter names differ: {sorted(set(jax_params) ^ set(torch_params))}")
    diff = {n: float(np.abs(jax_params[n] - torch_params[n]).max()) for n in torch_params}
    scale = {n: float(np.abs(torch_params[n]).max()) for n in torch_params}
    return {"jax_loss": jax_loss, "torch_loss": torch_loss, "weight_diff": diff, "weight_scale": scale}


def summarize(result: dict) -> dict:
    j, t = np.array(result["jax_loss"]), np.array(result["torch_loss"])
    rel = np.abs(j - t) / np.abs(t)
    return {"steps": len(j), "max_rel_loss_diff": float(rel.max()), "final_rel_loss_diff": float(rel[-1]),
            "max_weight_diff": max(result["weight_diff"].values()),
            "max_weight_diff_param": max(result["weight_diff"], key=result["weight_diff"].get),
            "final_loss_jax": float(j[-1]), "final_loss_torch": float(t[-1])}


def plot(result: dict, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    j, t = np.array(result["jax_loss"]), np.array(result["torch_loss"])
    steps = np.arange(1, len(j) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.2), dpi=90)
    axes[0].plot(steps, j, label="jax (nnx + optax)")
    axes[0].plot(steps, t, "--", label="torch (AdamW)")
    axes[0].set(xlabel="step", ylabel="train loss", yscale="log", title=title)
    axes[1].semilogy(steps, np.maximum(np.abs(j - t) / np.abs(t), 1e-17))
    axes[1].set(xlabel="step", ylabel="|loss_jax - loss_torch| / loss_torch")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.parity", description=__doc__)
    parser.add_argument("--precision", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="runs/parity")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    if args.precision == "float64":
        import jax

        jax.config.update("jax_enable_x64", True)
        jax.config.update("jax_default_matmul_precision", "highest")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(**TINY, precision=args.precision, out_dir=str(out))
    result = run_parity(cfg, args.steps, out / "init.safetensors")
    summary = summarize(result)
    (out / f"parity_{args.precision}.json").write_text(json.dumps({"summary": summary, **result}, indent=1))
    plot(result, out / f"parity_{args.precision}.png", f"{args.precision}, {args.steps} steps")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
