"""Decode throughput: KV cache vs recomputing the full forward for every new token.

For each framework and prompt length P, a ``DecoderLM`` (relative positions) generates
``--new`` greedy tokens after a prompt of P tokens, two ways:

* cache: prefill once, then one cached step per token (``model(token, cache=...)``);
  JAX runs a jitted step (compiled once, cache donated), PyTorch runs eagerly or, with
  ``--frameworks torch-compile``, a ``torch.compile``d step; one warm-up step untimed.
* recompute: the full causal forward over the whole sequence for every token. PyTorch
  runs the growing prefix [1, t]; JAX runs a fixed [1, P + new] buffer (one compile,
  row t - 1 read; at most new/P more work than the exact prefix) because a new length
  per step would recompile every step.

Reports decode tokens/s (prefill excluded) and the speed-up, as JSON and a Markdown
table under ``runs/``. Usage::

    python -m bench.decode            # P = 512 and 2048
    python -m bench.decode --quick    # P = 64 and 128, a smoke run
    python -m bench.decode --threads 2 --frameworks jax --prompt-lengths 512

Threads: ``--threads`` sets ``torch.set_num_threads`` and, before JAX is imported,
XLA's CPU thread pool via ``XLA_FLAGS``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class BenchConfig:
    prompt_lengths: tuple[int, ...] = (512, 2048)
    new_tokens: int = 32
    recompute_tokens: int = 8  # recompute is slow: time fewer steps, report per-token rate
    vocab_size: int = 256
    embed_dim: int = 256
    num_heads: int = 4
    num_layers: int = 2
    mlp_dim: int = 1024
    max_distance: int = 64
    frameworks: tuple[str, ...] = ("torch", "jax")
    threads: int = 1  # CPU threads per framework; 1 is steadier on a shared machine
    out: str = "runs/decode_bench"


def bench_torch(cfg: BenchConfig, P: int, compile: bool = False) -> dict:
    import torch

    from relattn_torch.decoder import DecoderConfig, DecoderLM

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    model = DecoderLM(DecoderConfig(**_model_fields(cfg))).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, P))
    step = lambda token, cache: model(token[:, None], cache=cache)  # noqa: E731
    step = torch.compile(step, fullgraph=True) if compile else step
    with torch.no_grad():
        cache = model.init_cache(1, P + cfg.new_tokens + 1)  # + 1: the warm-up step
        logits, cache = model(prompt, cache=cache)
        logits, cache = step(logits[:, -1].argmax(-1), cache)  # warm-up (compiles once when compiling)
        token = logits[:, -1].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(cfg.new_tokens):
            logits, cache = step(token, cache)
            token = logits[:, -1].argmax(-1)
        cached_s = time.perf_counter() - t0
        seq = torch.cat([prompt, token[:, None]], 1)
        model(seq)  # warm-up
        t0 = time.perf_counter()
        for _ in range(cfg.recompute_tokens):
            token = model(seq)[:, -1].argmax(-1)
            seq = torch.cat([seq, token[:, None]], 1)
        recompute_s = time.perf_counter() - t0
    name = "torch (compiled step)" if compile else "torch"
    return _row(name, P, cfg, cached_s, recompute_s, f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def bench_jax(cfg: BenchConfig, P: int) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from relattn_jax.decoder import DecoderConfig, DecoderLM

    model = DecoderLM(DecoderConfig(**_model_fields(cfg)), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    total = P + cfg.new_tokens

    @functools.partial(jax.jit, donate_argnums=(2,))  # donated: the cache is updated in place, not copied
    def step(state, token, cache):
        logits, cache = nnx.merge(graphdef, state)(token[:, None], cache=cache)
        return jnp.argmax(logits[:, -1], -1), cache

    @jax.jit
    def recompute(state, seq, t):
        logits = nnx.merge(graphdef, state)(seq)
        return jnp.argmax(jax.lax.dynamic_index_in_dim(logits, t - 1, axis=1, keepdims=False), -1)

    prompt = jax.random.randint(jax.random.key(0), (1, P), 0, cfg.vocab_size)
    prefill = jax.jit(lambda state, prompt, cache: nnx.merge(graphdef, state)(prompt, cache=cache))
    logits, cache = prefill(state, prompt, model.init_cache(1, total + 1))  # + 1: the warm-up step
    token = jnp.argmax(logits[:, -1], -1)
    token, cache = step(state, token, cache)  # compile (this token is not timed)
    jax.block_until_ready(token)
    t0 = time.perf_counter()
    for _ in range(cfg.new_tokens):
        token, cache = step(state, token, cache)
    jax.block_until_ready(token)
    cached_s = time.perf_counter() - t0
    seq = jnp.zeros((1, total), jnp.int32).at[:, :P].set(prompt)
    jax.block_until_ready(recompute(state, seq, P))  # compile
    t0 = time.perf_counter()
    for t in range(P, P + cfg.recompute_tokens):
        seq = seq.at[:, t].set(recompute(state, seq, t))
    jax.block_until_ready(seq)
    recompute_s = time.perf_counter() - t0
    return _row("jax", P, cfg, cached_s, recompute_s, f"jax {jax.__version__}, {jax.devices()[0].platform}")


def _limit_xla_threads(n: int) -> None:
    """Size XLA's CPU thread pool (only effective before jax is first imported)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "intra_op_parallelism_threads" not in flags:
        extra = "--xla_cpu_multi_thread_eigen=false " if n == 1 else ""
        os.environ["XLA_FLAGS"] = f"{flags} {extra}intra_op_parallelism_threads={n}".strip()


def _model_fields(cfg: BenchConfig) -> dict:
    return dict(
        vocab_size=cfg.vocab_size, embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, num_layers=cfg.num_layers,
        mlp_dim=cfg.mlp_dim, max_distance=cfg.max_distance, max_len=max(cfg.prompt_lengths) + cfg.new_tokens,
    )


def _row(framework, P, cfg, cached_s, recompute_s, runtime) -> dict:
    cached = cfg.new_tokens / cached_s
    recompute = cfg.recompute_tokens / recompute_s
    return dict(framework=framework, prompt_length=P, cached_tok_s=cached, recompute_tok_s=recompute,
                speedup=cached / recompute, runtime=runtime)


def markdown(rows: list[dict], cfg: BenchConfig, machine: str) -> str:
    lines = [
        f"Decode, batch 1, float32, greedy; DecoderLM E={cfg.embed_dim} N={cfg.num_heads} "
        f"layers={cfg.num_layers} MLP={cfg.mlp_dim} V={cfg.vocab_size} max_distance={cfg.max_distance}; "
        f"{cfg.new_tokens} cached / {cfg.recompute_tokens} recomputed tokens timed, {cfg.threads} CPU thread(s) "
        f"per framework. Machine: {machine}.",
        "",
        "| framework | prompt | cache tok/s | recompute tok/s | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['framework']} | {r['prompt_length']} | {r['cached_tok_s']:.1f} | "
            f"{r['recompute_tok_s']:.2f} | {r['speedup']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="P = 64, 128 and fewer tokens (smoke run)")
    parser.add_argument("--prompt-lengths", type=int, nargs="+")
    parser.add_argument("--frameworks", nargs="+", choices=("torch", "jax", "torch-compile"),
                        help="torch-compile: the cached step under torch.compile (inductor; compile time excluded)")
    parser.add_argument("--new", type=int, help="tokens timed with the cache")
    parser.add_argument("--threads", type=int, default=BenchConfig.threads, help="CPU threads per framework")
    parser.add_argument("--out", default=BenchConfig.out)
    args = parser.parse_args(argv)
    cfg = BenchConfig(prompt_lengths=(64, 128), new_tokens=8, recompute_tokens=4, out=args.out) if args.quick \
        else BenchConfig(out=args.out)
    overrides = dict(prompt_lengths=tuple(args.prompt_lengths or ()), frameworks=tuple(args.frameworks or ()),
                     new_tokens=args.new, threads=args.threads)
    cfg = BenchConfig(**{**asdict(cfg), **{k: v for k, v in overrides.items() if v}})
    _limit_xla_threads(cfg.threads)
    machine = f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs".replace("  ", " ")
    runners = {"torch": bench_torch, "jax": bench_jax, "torch-compile": functools.partial(bench_torch, compile=True)}
    rows = []
    for fw in cfg.frameworks:
        for P in cfg.prompt_lengths:
            rows.append(runners[fw](cfg, P))
            print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
    with open(cfg.out + ".json", "w") as f:
        json.dump(dict(config=asdict(cfg), machine=machine, rows=rows), f, indent=2)
    table = markdown(rows, cfg, machine)
    with open(cfg.out + ".md", "w") as f:
        f.write(table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
