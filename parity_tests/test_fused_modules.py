"""The layers reach the fused kernels with no change to user code, and agree across frameworks.

On an accelerator, ``implementation="auto"`` takes the fused rule. Here the rule tables are run
as on an accelerator: the fused rule's ``wanted`` answers yes, the kernels run in their CPU
interpreters (``TRITON_INTERPRET=1``, set for the session by conftest.py;
``RELATTN_PALLAS_INTERPRET=1``). A ``DecoderLM`` with a padding mask, one weight file for both
frameworks, then runs its forward, backward and a KV-cache prefill and decode step through the
kernels; every attention call is spied on to prove it took the fused path. The results must
match the same model on the CPU choice (the einsum / Shaw paths) and the other framework.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("triton")
pytest.importorskip("jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import relattn_jax as rj  # noqa: E402
import relattn_torch as rt  # noqa: E402
from relattn_jax import attention as jax_attention  # noqa: E402
from relattn_jax import choice as jax_choice  # noqa: E402
from relattn_torch import attention as torch_attention  # noqa: E402
from relattn_torch import choice as torch_choice  # noqa: E402

from .backends import param_name  # noqa: E402
from .numerics import assert_close  # noqa: E402

pytestmark = pytest.mark.fused

CFG = dict(vocab_size=23, embed_dim=32, num_heads=2, num_layers=2, mlp_dim=48, max_distance=5)
B, T = 2, 21
TOL = 2e-5  # float32, relative to max(1, |reference|)


def _as_on_an_accelerator(monkeypatch, choice, attention):
    """Make "auto" want the fused rule on CPU, and record every path that runs."""
    if attention is jax_attention:
        monkeypatch.setenv("RELATTN_PALLAS_INTERPRET", "1")
    fused_rule = choice._RULES[0]
    assert fused_rule.name == "fused"
    wanted = dataclasses.replace(fused_rule, wanted=lambda c: "as on an accelerator")
    monkeypatch.setattr(choice, "_RULES", (wanted, *choice._RULES[1:]))
    taken = []
    run = attention._run

    def spy(name, *args):
        taken.append(name)
        return run(name, *args)

    monkeypatch.setattr(attention, "_run", spy)
    return taken


def _close(got, want, what):
    try:
        assert_close(got, np.asarray(want, np.float64), rel=TOL)
    except AssertionError as e:
        raise AssertionError(f"{what}: {e}") from None


def _tokens_and_mask():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, CFG["vocab_size"], size=(B, T))
    keep = np.ones((B, 1, 1, T), bool)
    keep[1, ..., :4] = False  # example 1 is left-padded by 4 tokens
    return tokens, keep


@pytest.fixture(scope="module")
def weight_file(tmp_path_factory):
    torch.manual_seed(0)
    model = rt.DecoderLM(rt.DecoderConfig(**CFG)).float()
    path = tmp_path_factory.mktemp("fused") / "decoder.safetensors"
    rt.save_weights(model, path)
    return path


def _torch_run(path):
    model = rt.DecoderLM(rt.DecoderConfig(**CFG)).float()
    rt.load_weights(model, path)
    tokens, keep = _tokens_and_mask()
    tokens, keep = torch.as_tensor(tokens), torch.as_tensor(keep)
    logits = model(tokens, mask=keep)
    (logits.square().mean()).backward()
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    with torch.no_grad():  # prefill T - 1 tokens into a cache of T slots, then one decode step
        cache = model.init_cache(B, T)
        _, cache = model(tokens[:, :-1], cache=cache)
        step, _ = model(tokens[:, -1:], cache=cache)
    return logits.detach().numpy(), grads, step.numpy()


def _jax_run(path):
    model = rj.DecoderLM(rj.DecoderConfig(**CFG), rngs=nnx.Rngs(1))
    rj.load_weights(model, path)
    tokens, keep = (jnp.asarray(a) for a in _tokens_and_mask())

    @nnx.jit
    def loss_and_grads(model, tokens, keep):
        def loss(model):
            logits = model(tokens, mask=keep)
            return jnp.mean(jnp.square(logits)), logits

        (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
        return logits, grads

    logits, grads = loss_and_grads(model, tokens, keep)
    flat = {param_name(path): np.asarray(g) for path, g in nnx.to_flat_state(grads)}

    @nnx.jit
    def decode(model, tokens):
        cache = model.init_cache(B, T)
        _, cache = model(tokens[:, :-1], cache=cache)
        step, _ = model(tokens[:, -1:], cache=cache)
        return step

    return np.asarray(logits), flat, np.asarray(decode(model, tokens))


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_the_decoder_reaches_the_kernel_and_matches_the_cpu_choice(fw, weight_file, monkeypatch):
    run, choice, attention = {"torch": (_torch_run, torch_choice, torch_attention),
                              "jax": (_jax_run, jax_choice, jax_attention)}[fw]
    with monkeypatch.context() as patch:
        taken = _as_on_an_accelerator(patch, choice, attention)
        fused = run(weight_file)
    assert taken and set(taken) == {"fused"}, taken  # every attention call of every layer and step
    plain = run(weight_file)  # the CPU choice, untouched
    _close(fused[0], plain[0], "logits")
    assert fused[1].keys() == plain[1].keys()
    for name in plain[1]:
        _close(fused[1][name], plain[1][name], f"gradient of {name}")
    _close(fused[2], plain[2], "KV-cache decode step")


def test_one_weight_file_gives_the_same_numbers_through_both_kernels(weight_file, monkeypatch):
    taken = _as_on_an_accelerator(monkeypatch, torch_choice, torch_attention)
    taken += _as_on_an_accelerator(monkeypatch, jax_choice, jax_attention)
    from_torch, from_jax = _torch_run(weight_file), _jax_run(weight_file)
    assert set(taken) == {"fused"}
    _close(from_torch[0], from_jax[0], "logits")
    for name in from_jax[1]:
        _close(from_torch[1][name], from_jax[1][name], f"gradient of {name}")
    _close(from_torch[2], from_jax[2], "KV-cache decode step")


@pytest.mark.parametrize("fw", ["torch", "jax"])
def test_fused_by_name_runs_the_kernel_in_the_interpreter(fw, monkeypatch):
    """The public contract: with the interpreter switch set, implementation="fused" runs on CPU."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(1, n, 2, 16)).astype(np.float32) for n in (9, 13, 13))
    tk, tv = (rng.normal(size=(7, 16)).astype(np.float32) for _ in range(2))
    if fw == "torch":
        lib, attention, arr = rt, torch_attention, torch.as_tensor
    else:
        monkeypatch.setenv("RELATTN_PALLAS_INTERPRET", "1")
        lib, attention, arr = rj, jax_attention, jnp.asarray
    taken = []
    run = attention._run
    monkeypatch.setattr(attention, "_run", lambda name, *a: (taken.append(name), run(name, *a))[1])
    args = [arr(x) for x in (q, k, v, tk, tv)]
    got = lib.relative_attention(*args, max_distance=3, is_causal=True, implementation="fused")
    want = lib.relative_attention(*args, max_distance=3, is_causal=True, implementation="einsum")
    assert taken == ["fused", "einsum"]
    _close(np.asarray(got), np.asarray(want), "fused by name")
    monkeypatch.delenv("RELATTN_PALLAS_INTERPRET", raising=False)
    if fw == "jax":  # without the switch, on CPU, the kernel says why it cannot run
        with pytest.raises(ValueError, match="implementation='fused' .*RELATTN_PALLAS_INTERPRET"):
            lib.relative_attention(*args, max_distance=3, implementation="fused")
