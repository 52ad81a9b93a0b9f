"""The importers against the real transformers modules: T5 and DeBERTa-v2 (BERT: test_importers_hf4.py).

Every transformers module here is a tiny randomly initialised one built from a config on the spot
(no download), in float64 and eval mode. The reference is the transformers layer up to and
including its output projection (T5's ``o``; DeBERTa's ``output.dense`` applied to ``.self``'s
output), given the additive (T5) or bool (DeBERTa) form of our bool mask. Compared: the output and
the gradient of <output, cotangent> with respect to the inputs, on the query rows that see at least
one key (the cotangent is 0 on the others: there transformers averages every value, we return 0).
Tolerance: max |ours - reference| / max |reference| <= 1e-12 (``TOL``), each tensor (transformers
4.x T5: 1e-6, its softmax runs in float32). The negative
controls (the table mirrored, a wrong bucket count) must miss by more than 1e-2 (``WRONG``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import relattn_torch as rt  # noqa: E402
from relattn_torch import importers  # noqa: E402

from .numerics import relative_error  # noqa: E402

TOL = 1e-12
WRONG = 1e-2
HF_MAJOR = int(transformers.__version__.split(".")[0])
# transformers 4.x T5 takes its softmax in float32 (``softmax(scores.float())``), 5.x in the input dtype.
T5_TOL = TOL if HF_MAJOR >= 5 else 1e-6
# The JAX twin of the T5 and DeBERTa modules is checked under the dev pin (make test); make test-hf4
# reruns these files under 4.x for the importers alone (BERT's JAX check runs there).
JAX_TWIN = HF_MAJOR >= 5
B, T, S, E, N = 2, 11, 9, 12, 3


def inputs(T=T, S=None, seed=0, width=E):
    """x [B, T, E] (and kv [B, S, E] for cross-attention), float64, requiring grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, width, generator=g, dtype=torch.float64, requires_grad=True)
    kv = None if S is None else torch.randn(B, S, width, generator=g, dtype=torch.float64, requires_grad=True)
    return x, kv


def padding_mask(T, S, causal=False, cross=False):
    """bool [B, 1, T, S]: batch 1 pads its last 3 keys (and, self-attention, its last 3 queries, which
    then see no key: DeBERTa's own padded-mask form); causal adds the lower triangle."""
    keys = torch.ones(B, S, dtype=torch.bool)
    keys[1, -3:] = False
    mask = keys[:, None, None, :].expand(B, 1, T, S)
    if not cross:
        mask = mask & keys[:, None, :T, None]
    if causal:
        mask = mask & torch.ones(T, S, dtype=torch.bool).tril(S - T)
    return mask.contiguous()


def additive(mask):
    """The additive float mask transformers' T5 and BERT take (0 = attend, a large negative = masked;
    float32's min, so that 4.x T5's float32 softmax sees a finite number)."""
    return torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, torch.finfo(torch.float32).min)


def compare(ours, reference, mask, args):
    """Max relative errors of the output and of each input gradient, on the rows that see a key."""
    seen = mask.any(-1).any(1)  # [B, T]
    g = torch.Generator().manual_seed(7)
    got, ref = ours(*args), reference(*args)
    cot = torch.randn(ref.shape, generator=g, dtype=ref.dtype) * seen[..., None]
    got_grads = torch.autograd.grad(got, args, cot)
    ref_grads = torch.autograd.grad(ref, args, cot)
    errors = [relative_error(got.detach()[seen], ref.detach()[seen])]
    errors += [relative_error(a, b) for a, b in zip(got_grads, ref_grads)]
    return errors


def mapped(mapping, scheme=None, flip=()):
    """The importer's mapping run through ``relative_attention`` directly (negative controls change
    the scheme or mirror tables), [B, T, E] -> [B, T, E]."""
    t = {n: (v.flip(0) if n in flip else v) for n, v in mapping.tensors.items()}
    scheme = mapping.scheme if scheme is None else scheme

    def run(x, kv=None, mask=None):
        kv = x if kv is None else kv
        q, k, v = (torch.einsum("BTE,ENH->BTNH", y, t[w]) + t.get(b, 0)
                   for y, w, b in ((x, "w_q", "b_q"), (kv, "w_k", "b_k"), (kv, "w_v", "b_v")))
        Tq, Sk = q.shape[1], k.shape[1]
        ids = None if scheme is None else scheme.ids(Tq, Sk, Sk - Tq)
        z = rt.relative_attention(q, k, v, t.get("rel_k"), rel_ids=ids, rel_q=t.get("rel_q"),
                                  rel_bias=t.get("rel_bias"), mask=mask, scale=mapping.scale)
        return torch.einsum("BTNH,NHE->BTE", z, t["w_o"]) + t.get("b_o", 0)

    return run


def jax_twin(m):
    """The same module in relattn_jax, filled from m's weight file."""
    import tempfile
    from pathlib import Path

    pytest.importorskip("jax")
    from flax import nnx

    import jax.numpy as jnp
    import relattn_jax as rj

    scheme = getattr(rj, type(m.scheme).__name__)(**dataclasses.asdict(m.scheme))
    twin = rj.RelativeMultiHeadAttention(
        m.embed_dim, m.num_heads, head_dim=m.head_dim, scheme=scheme, scale=m.scale, bias=m.b_q is not None,
        relative_keys=m.rel_k is not None, relative_values=False, relative_queries=m.rel_q is not None,
        relative_bias=m.rel_bias is not None,
        share_relative_heads=next((t.dim() == 2 for t in (m.rel_k, m.rel_q) if t is not None), True),
        param_dtype=jnp.float64, deterministic=True, rngs=nnx.Rngs(0))
    with tempfile.TemporaryDirectory() as tmp:
        rt.save_weights(m, Path(tmp) / "w.safetensors")
        rj.load_weights(twin, Path(tmp) / "w.safetensors")
    return twin


def assert_jax_matches(m, x, kv, mask):
    """m's weight file in the JAX twin gives m's output (1e-12) on the rows that see a key."""
    import jax.numpy as jnp

    twin = jax_twin(m)
    with torch.no_grad():
        want = m(x, kv, mask=mask).numpy()
    got = np.asarray(twin(jnp.asarray(x.detach().numpy()), None if kv is None else jnp.asarray(kv.detach().numpy()),
                          mask=jnp.asarray(mask.numpy())))
    seen = mask.any(-1).any(1).numpy()
    assert relative_error(got[seen], want[seen]) <= TOL


# --- T5 -------------------------------------------------------------------------------------------

def t5_layer(decoder=False, bias=True, seed=0):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    torch.manual_seed(seed)
    config = T5Config(d_model=E, d_kv=4, num_heads=N, relative_attention_num_buckets=8,
                      relative_attention_max_distance=12, dropout_rate=0.0, is_decoder=decoder)
    config._attn_implementation = "eager"
    return T5Attention(config, has_relative_attention_bias=bias, layer_idx=0).to(torch.float64).eval()


def t5_reference(layer, mask, position_bias=None):
    if position_bias is not None and HF_MAJOR < 5:  # 4.x: a given bias carries the mask, as the stack passes it
        position_bias = position_bias + additive(mask)

    def run(x, kv=None):
        extra = {} if HF_MAJOR >= 5 else {"cache_position": torch.arange(x.shape[1])}  # 4.x needs it
        return layer(x, mask=additive(mask), key_value_states=kv, position_bias=position_bias, **extra)[0]
    return run


T5_CASES = {  # name: (decoder, T, S or None (self-attention), causal)
    "encoder": (False, T, None, False),
    "decoder-causal": (True, T, None, True),
    "cross": (True, T, S, False),
}


@pytest.mark.parametrize("case", list(T5_CASES))
def test_t5_matches_transformers(case):
    decoder, Tq, Sk, causal = T5_CASES[case]
    layer = t5_layer(decoder, bias=Sk is None)
    m = rt.from_hf_t5_attention(layer)
    x, kv = inputs(Tq, Sk)
    mask = padding_mask(Tq, Sk or Tq, causal=causal, cross=Sk is not None)
    args = (x,) if kv is None else (x, kv)
    errors = compare(lambda *a: m(*a, mask=mask), t5_reference(layer, mask), mask, args)
    assert max(errors) <= T5_TOL, errors
    assert m.scale == 1.0 and m.b_q is None and (m.rel_bias is None) == (Sk is not None)
    if Sk is None:
        assert m.scheme == rt.T5Buckets(8, 12, bidirectional=not decoder)
    if Sk is None and JAX_TWIN:
        assert_jax_matches(m, x, kv, mask)


def test_t5_later_layer_takes_the_first_layers_table():
    """A later self-attention layer has no table: transformers hands it the first layer's position bias."""
    first, later = t5_layer(bias=True, seed=0), t5_layer(bias=False, seed=1)
    x, _ = inputs()
    mask = padding_mask(T, T)
    bias = first.compute_bias(T, T)  # [1, N, T, T], what the stack passes to later layers
    for table in (first.relative_attention_bias, first.relative_attention_bias.weight):
        m = rt.from_hf_t5_attention(later, table)
        errors = compare(lambda a: m(a, mask=mask), t5_reference(later, mask, bias), mask, (x,))
        assert max(errors) <= T5_TOL, errors
    with pytest.raises(ValueError, match=r"relative_attention_bias must be \[num_buckets, num_heads\]"):
        rt.from_hf_t5_attention(later, first.relative_attention_bias.weight[:-1])


def test_t5_negative_controls_miss():
    layer = t5_layer()
    mapping = importers._t5(layer)
    x, _ = inputs()
    mask = padding_mask(T, T)
    reference = t5_reference(layer, mask)
    assert max(compare(lambda a: mapped(mapping)(a, mask=mask), reference, mask, (x,))) <= T5_TOL
    mirrored = mapped(mapping, flip=("rel_bias",))
    assert compare(lambda a: mirrored(a, mask=mask), reference, mask, (x,))[0] > WRONG
    fewer = dataclasses.replace(mapping, tensors={**mapping.tensors, "rel_bias": mapping.tensors["rel_bias"][:6]})
    wrong_count = mapped(fewer, scheme=rt.T5Buckets(6, 12))
    assert compare(lambda a: wrong_count(a, mask=mask), reference, mask, (x,))[0] > WRONG


# --- DeBERTa-v2 -----------------------------------------------------------------------------------

DEBERTA_CASES = {  # name: config overrides
    "c2p-p2c-log-buckets": dict(pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=24),
    "c2p-shared-key-clipped": dict(pos_att_type=["c2p"], share_att_key=True, position_buckets=-1,
                                   max_relative_positions=4),
    "p2c-shared-key": dict(pos_att_type=["p2c"], share_att_key=True, position_buckets=6, max_relative_positions=16),
    "no-relative": dict(relative_attention=False, pos_att_type=["p2c", "c2p"]),
}


def deberta(case, seed=0):
    """A one-layer DebertaV2Encoder (it owns rel_embeddings and their LayerNorm) and its attention."""
    from transformers import DebertaV2Config
    from transformers.models.deberta_v2.modeling_deberta_v2 import DebertaV2Encoder

    torch.manual_seed(seed)
    options = dict(relative_attention=True, share_att_key=False, norm_rel_ebd="layer_norm")
    config = DebertaV2Config(hidden_size=E, num_attention_heads=N, intermediate_size=16, num_hidden_layers=1,
                             max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                             **{**options, **DEBERTA_CASES[case]})
    encoder = DebertaV2Encoder(config).to(torch.float64).eval()
    with torch.no_grad():  # transformers initialises these to 0 / 1: make every bias and the norm count
        for name, p in encoder.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.3 * torch.randn_like(p))
    rel = encoder.get_rel_embedding() if config.relative_attention else None
    return encoder.layer[0].attention, rel


def deberta_reference(attention, rel, mask):
    def run(x):
        return attention.output.dense(attention.self(x, mask, rel_embeddings=rel)[0])
    return run


@pytest.mark.parametrize("case", list(DEBERTA_CASES))
def test_deberta_matches_transformers(case):
    attention, rel = deberta(case)
    m = rt.from_hf_deberta_attention(attention, rel)
    x, _ = inputs(T)
    mask = padding_mask(T, T)
    errors = compare(lambda a: m(a, mask=mask), deberta_reference(attention, rel, mask), mask, (x,))
    assert max(errors) <= TOL, errors
    terms = attention.self.pos_att_type if attention.self.relative_attention else []
    assert (m.rel_k is not None) == ("c2p" in terms) and (m.rel_q is not None) == ("p2c" in terms)
    if terms and JAX_TWIN:
        assert_jax_matches(m, x, None, mask)


def test_deberta_negative_controls_miss():
    attention, rel = deberta("c2p-p2c-log-buckets")
    mapping = importers._deberta(attention, rel)
    x, _ = inputs(T)
    mask = padding_mask(T, T)
    reference = deberta_reference(attention, rel, mask)
    assert max(compare(lambda a: mapped(mapping)(a, mask=mask), reference, mask, (x,))) <= TOL
    for flip in (("rel_k",), ("rel_q",)):
        mirrored = mapped(mapping, flip=flip)
        assert compare(lambda a: mirrored(a, mask=mask), reference, mask, (x,))[0] > WRONG, flip
    rows = {n: mapping.tensors[n][:12] for n in ("rel_k", "rel_q")}  # 6 buckets instead of 8
    fewer = dataclasses.replace(mapping, tensors={**mapping.tensors, **rows})
    wrong_count = mapped(fewer, scheme=rt.DebertaBuckets(6, 24))
    assert compare(lambda a: wrong_count(a, mask=mask), reference, mask, (x,))[0] > WRONG


def test_deberta_rel_embeddings_are_checked():
    attention, rel = deberta("c2p-p2c-log-buckets")
    with pytest.raises(ValueError, match=r"rel_embeddings must be \[>= 16, 12\]"):
        rt.from_hf_deberta_attention(attention, rel[:15])
    with pytest.raises(TypeError, match="rel_embeddings must be a torch.Tensor"):
        rt.from_hf_deberta_attention(attention, None)


def test_importers_name_what_they_expect():
    layer = t5_layer()
    with pytest.raises(TypeError, match="expected a transformers T5Attention, got Linear"):
        rt.from_hf_t5_attention(layer.q)
    with pytest.raises(TypeError, match="expected a transformers BertAttention, got T5Attention"):
        rt.from_hf_bert_attention(layer)
    with pytest.raises(TypeError, match="expected a transformers DebertaV2Attention, got T5Attention"):
        rt.from_hf_deberta_attention(layer, None)


# --- the scheme pages' snippets ---------------------------------------------------------------------

def run_page_snippets(name, tmp_path, monkeypatch) -> int:
    """Run docs/schemes/<name>'s Python blocks in order, in one scope, in tmp_path; return how many."""
    page = Path(__file__).resolve().parent.parent / "docs" / "schemes" / name
    snippets = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for code in snippets:
        exec(compile(code, str(page), "exec"), scope)
    return len(snippets)


@pytest.mark.parametrize(("name", "blocks"), [("t5.md", 2), ("deberta.md", 1)])
def test_scheme_page_snippets_run(name, blocks, tmp_path, monkeypatch):
    """The pages' examples run as written; each asserts its module equals the transformers layer."""
    assert run_page_snippets(name, tmp_path, monkeypatch) == blocks
