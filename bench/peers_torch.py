"""The PyTorch contestants. Each ``make_*`` returns (step, inputs) for one benchmark case.

All take the same float32 inputs: q, k, v [B, T, N, H] (our layout), Shaw tables [2K+1, H].
``step()`` runs the forward (mode "fwd") or forward + backward of sum(out * cotangent) ("fwdbwd").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import relattn_torch


def _inputs(cfg, dense=False):
    g = torch.Generator().manual_seed(0)
    B, T, N, H, K = cfg["B"], cfg["S"], cfg["N"], cfg["H"], cfg["K"]
    x = {n: torch.randn(B, T, N, H, generator=g) for n in ("q", "k", "v")}
    x["rel_k"] = torch.randn(2 * K + 1, H, generator=g) / H**0.5
    x["rel_v"] = torch.randn(2 * K + 1, H, generator=g) / H**0.5
    if dense:  # seed-1 inputs: X [B, S, N, H], W [N, H, H], edges [S, S, N, H]
        x = {"X": x["q"], **{w: torch.randn(N, H, H, generator=g) / H**0.5 for w in ("W_Q", "W_K", "W_V")}}
        x["a_K"] = torch.randn(T, T, N, H, generator=g) / H**0.5
        x["a_V"] = torch.randn(T, T, N, H, generator=g) / H**0.5
    return x


def _step(fn, x, mode, grad_names):
    for n in grad_names:
        x[n].requires_grad_(mode == "fwdbwd")
    cot = None

    def step():
        nonlocal cot
        if mode == "fwd":
            with torch.no_grad():
                return fn(**x)
        for n in grad_names:
            x[n].grad = None
        out = fn(**x)
        cot = torch.ones_like(out) if cot is None else cot
        (out * cot).sum().backward()
        return out

    return step


def ours(q, k, v, rel_k, rel_v, *, K, causal):
    return relattn_torch.relative_attention(q, k, v, rel_k, rel_v, max_distance=K, is_causal=causal)


def floor(q, k, v, rel_k=None, rel_v=None, *, K=None, causal):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def _shaw_ids(T, S, K, device):
    i = torch.arange(T, device=device)[:, None] + (S - T)
    return (torch.arange(S, device=device)[None, :] - i).clamp(-K, K) + K  # [T, S]


def naive_shaw(q, k, v, rel_k, rel_v, *, K, causal):
    """The obvious Shaw attention: gather q.a^K into [B, N, T, S], scatter probabilities into 2K+1 buckets."""
    B, T, N, H = q.shape
    S = k.shape[1]
    ids = _shaw_ids(T, S, K, q.device).expand(B, N, T, S)
    logits = torch.einsum("BTNH,BSNH->BNTS", q, k)
    logits = logits + torch.gather(torch.einsum("BTNH,RH->BNTR", q, rel_k), -1, ids)
    logits = logits * H**-0.5
    if causal:
        logits = logits.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), torch.finfo(q.dtype).min)
    probs = torch.softmax(logits, -1)
    out = torch.einsum("BNTS,BSNH->BTNH", probs, v)
    buckets = probs.new_zeros(B, N, T, 2 * K + 1).scatter_add(-1, ids, probs)
    return out + torch.einsum("BNTR,RH->BTNH", buckets, rel_v)


def hf_relative_key(q, k, v, rel_k, rel_v=None, *, K, causal):
    """HF BERT ``relative_key`` style: materialise the [T, S, H] distance embedding, key side only."""
    B, T, N, H = q.shape
    S = k.shape[1]
    pe = rel_k[_shaw_ids(T, S, K, q.device)]  # [T, S, H]
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [B, N, L, H]
    scores = qt @ kt.transpose(-1, -2) + torch.einsum("bhld,lrd->bhlr", qt, pe)
    scores = scores / H**0.5
    if causal:
        scores = scores.masked_fill(~torch.ones(T, S, dtype=torch.bool).tril(S - T), torch.finfo(q.dtype).min)
    return (torch.softmax(scores, -1) @ vt).transpose(1, 2)


def make_flex(cfg, causal):
    """FlexAttention with a score_mod that looks up the captured q . a^K per (query, relative id)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    K, H = cfg["K"], cfg["H"]
    compiled = torch.compile(flex_attention, dynamic=False)

    def fn(q, k, v, rel_k, rel_v=None):
        qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
        qa = torch.einsum("BNTH,RH->BNTR", qt, rel_k) * H**-0.5  # scale folded in

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + qa[b, h, q_idx, (kv_idx - q_idx).clamp(-K, K) + K]

        T = q.shape[1]
        mask = None
        if causal:
            mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, T, T, device="cpu")
        return compiled(qt, kt, vt, score_mod=score_mod, block_mask=mask).transpose(1, 2)

    return fn


def ours_dense(X, W_Q, W_K, W_V, a_K, a_V):
    q, k, v = (torch.einsum("BSNI,NIH->BSNH", X, w) for w in (W_Q, W_K, W_V))
    return relattn_torch.relative_attention(q, k, v, a_K, a_V)


def seed1(X, W_Q, W_K, W_V, a_K, a_V):
    from parity_tests.seeds import seed1_answer

    return seed1_answer(X, W_Q, W_K, W_V, a_K, a_V)


def key_padding(B, S, device=None):
    """[B, 1, 1, S] bool: example 0 unpadded, every other example with its last max(1, S // 8) keys padded."""
    valid = torch.ones(B, S, dtype=torch.bool, device=device)
    valid[1:, S - max(1, S // 8) :] = False
    return valid[:, None, None, :]


def ours_padded(q, k, v, rel_k, rel_v, *, K, causal):
    mask = key_padding(q.shape[0], k.shape[1], q.device)
    return relattn_torch.relative_attention(q, k, v, rel_k, rel_v, max_distance=K, is_causal=causal, mask=mask)


def floor_padded(q, k, v, rel_k=None, rel_v=None, *, K=None, causal):
    T, S = q.shape[1], k.shape[1]
    mask = key_padding(q.shape[0], S, q.device)
    if causal:  # SDPA takes attn_mask or is_causal, not both
        mask = mask & torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def make_layers(cfg, causal):
    """Our layer and torch.nn.MultiheadAttention of the same width E = N * H, on x [B, S, E]."""
    E, N, K, S = cfg["N"] * cfg["H"], cfg["N"], cfg["K"], cfg["S"]
    ours_layer = relattn_torch.RelativeMultiHeadAttention(E, N, max_distance=K)
    torch_layer = torch.nn.MultiheadAttention(E, N, batch_first=True)
    causal_mask = torch.ones(S, S, dtype=torch.bool).triu(1) if causal else None  # True = masked, as MHA takes it

    def layer(x):
        return ours_layer(x, is_causal=causal)

    def layer_floor(x):
        return torch_layer(x, x, x, need_weights=False, attn_mask=causal_mask, is_causal=causal)[0]

    return {"layer": (layer, ours_layer), "layer_floor": (layer_floor, torch_layer)}


IMPLS = ["ours", "ours_compile", "floor", "naive_shaw", "hf_relative_key", "flex", "ours_dense", "seed1",
         "ours_padded", "floor_padded", "ours_bf16", "floor_bf16", "layer", "layer_floor"]


def make(impl, cfg, mode, causal):
    """(step, description) for one contestant; raises if it does not apply."""
    if impl in ("ours_dense", "seed1"):
        if causal:
            raise NotImplementedError("dense-edge rows are non-causal only")
        x = _inputs(cfg, dense=True)
        fn = ours_dense if impl == "ours_dense" else seed1
        return _step(fn, x, mode, ["X", "W_Q", "W_K", "W_V", "a_K", "a_V"])
    if impl in ("layer", "layer_floor"):
        fn, module = make_layers(cfg, causal)[impl]
        x = {"x": torch.randn(cfg["B"], cfg["S"], cfg["N"] * cfg["H"], generator=torch.Generator().manual_seed(0))}
        step = _step(fn, x, mode, ["x"])
        if mode == "fwd":
            return step

        def with_params():  # the parameters' gradients are part of a layer's backward
            module.zero_grad(set_to_none=True)
            return step()

        return with_params
    x = _inputs(cfg)
    grads = ["q", "k", "v", "rel_k", "rel_v"]
    K = cfg["K"]
    if impl.endswith("_bf16"):
        x = {n: t.to(torch.bfloat16) for n, t in x.items()}
        impl = impl.removesuffix("_bf16")
    if impl == "ours":
        fn = lambda **a: ours(**a, K=K, causal=causal)  # noqa: E731
    elif impl == "ours_compile":
        fn = torch.compile(lambda **a: ours(**a, K=K, causal=causal), dynamic=False)
    elif impl == "floor":
        fn, grads = (lambda q, k, v, **_: floor(q, k, v, causal=causal)), ["q", "k", "v"]
    elif impl == "ours_padded":
        fn = lambda **a: ours_padded(**a, K=K, causal=causal)  # noqa: E731
    elif impl == "floor_padded":
        fn, grads = (lambda q, k, v, **_: floor_padded(q, k, v, causal=causal)), ["q", "k", "v"]
    elif impl == "naive_shaw":
        fn = lambda **a: naive_shaw(**a, K=K, causal=causal)  # noqa: E731
    elif impl == "hf_relative_key":
        fn, grads = (lambda q, k, v, rel_k, **_: hf_relative_key(q, k, v, rel_k, K=K, causal=causal)), ["q", "k", "v", "rel_k"]
    elif impl == "flex":
        if mode != "fwd":
            raise NotImplementedError("FlexAttention backward does not run on CPU (inference only)")
        fn, grads = make_flex(cfg, causal), []
        fn = (lambda f: lambda q, k, v, rel_k, **_: f(q, k, v, rel_k))(fn)
    else:
        raise ValueError(impl)
    return _step(fn, x, mode, grads)
