"""The README's main command: relative attention vs a learned-absolute baseline on the toy task.

Trains both models (same size, data, steps and optimizer) with the JAX trainer at length
L, evaluates at L, 2L and 4L, writes ``table.md``, ``demo.png`` and ``demo.json`` under
the output directory, and shows greedy generations of the relative model on a 4L prompt.
Each run replaces the previous demo's runs in ``relative/`` and ``absolute/`` (``--overwrite``),
unless ``--resume`` continues them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from . import tasks
from .config import TrainConfig
from .report import format_table, plot_curves, read_jsonl


def run_demo(cfg: TrainConfig) -> dict:
    import jax

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from .jax_train import train

    results, curves, seconds = {}, {}, {}
    for position in ("relative", "absolute"):
        run = dataclasses.replace(cfg, position=position, out_dir=str(out / position), overwrite=not cfg.resume)
        t0 = time.perf_counter()
        summary = train(run)
        seconds[position] = time.perf_counter() - t0
        results[position], curves[position] = summary["eval"], read_jsonl(out / position / "metrics.jsonl")
    table = format_table(results)
    device = f"{len(jax.devices())} x {jax.devices()[0].device_kind} ({jax.default_backend()})"
    header = (f"task={cfg.task} L={cfg.length} steps={cfg.steps} batch={cfg.batch_size} "
              f"E={cfg.embed_dim} layers={cfg.num_layers} heads={cfg.num_heads} max_distance={cfg.max_distance} "
              f"precision={cfg.precision} devices={device}\n"
              f"train+eval seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + "\n\n")
    (out / "table.md").write_text(header + table)
    plot_curves(curves, out / "demo.png", title=f"{cfg.task}, trained at L={cfg.length}", eval_rows=results)
    samples = show_generations(cfg, out / "relative")
    twin = torch_twin_eval(cfg, out / "relative")
    if twin:
        header += twin + "\n\n"
        (out / "table.md").write_text(header + table)
    (out / "demo.json").write_text(json.dumps({"eval": results, "seconds": seconds, "samples": samples,
                                               "torch_twin": twin}, indent=1))
    print("\n" + header + table)
    print(f"wrote {out / 'table.md'}, {out / 'demo.png'}")
    return results


def show_generations(cfg: TrainConfig, run_dir: Path, n: int = 3) -> list[dict]:
    """Greedy continuations of ``SEP x_1..x_2L SEP`` by the trained relative model (copy task only)."""
    if cfg.task != "copy":
        return []
    import jax.numpy as jnp

    from relattn_jax import generate, load_weights

    from .jax_train import build_model

    model = build_model(dataclasses.replace(cfg, position="relative"))
    load_weights(model, run_dir / "weights.safetensors")
    L = 2 * cfg.length
    tokens, _, _ = tasks.batch("copy", seed=cfg.seed + 1, step=0, batch_size=n, length=L,
                               vocab_size=cfg.vocab_size, split="eval")
    prompt = tokens[:, : L + 2]  # SEP x_1..x_L SEP
    out = np.asarray(generate(model, jnp.asarray(prompt), L))
    rows = []
    for p, o in zip(prompt, out):
        ok = bool((o == p[1 : L + 1]).all())
        rows.append({"prompt": p[1 : L + 1].tolist(), "generated": o.tolist(), "exact": ok})
        print(f"greedy copy at L={L}: prompt {p[1 : L + 1].tolist()}\n{'':>21}generated {o.tolist()} "
              f"{'(exact)' if ok else '(differs)'}")
    return rows


def torch_twin_eval(cfg: TrainConfig, run_dir: Path) -> str:
    """Load the JAX-trained weight file into the PyTorch DecoderLM and evaluate it the same way."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return ""
    from relattn_torch import load_weights

    from .torch_train import Trainer

    run = dataclasses.replace(cfg, position="relative", precision="float32")
    trainer = Trainer(run)
    load_weights(trainer.model, run_dir / "weights.safetensors")
    rows = [trainer.evaluate(cfg.length * s) for s in cfg.eval_scales]
    accs = ", ".join(f"L={r['length']} {100 * r['token_acc']:.1f}%" for r in rows)
    return f"PyTorch DecoderLM loaded from relative/weights.safetensors: token accuracy {accs}"
