"""``from_hf_bert_attention`` against the real transformers 4.x ``BertAttention`` (relative_key and
relative_key_query exist only there). Skipped under transformers 5.x; ``make test-hf4`` runs it with
requirements/hf4.txt and fails if anything here skipped.

Same method and tolerance as test_importers.py: a tiny random float64 module in eval mode, the
reference is ``attention.output.dense(attention.self(x, additive_mask)[0])``, output and input
gradient within 1e-12 (relative to the reference's max) on the rows that see a key.
"""

from __future__ import annotations

import pytest

from .test_importers import (B, E, N, TOL, WRONG, additive, assert_jax_matches, compare, inputs, mapped, padding_mask,
                             run_page_snippets)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import relattn_torch as rt  # noqa: E402
from relattn_torch import importers  # noqa: E402

pytestmark = [
    pytest.mark.hf4,
    pytest.mark.skipif(int(transformers.__version__.split(".")[0]) >= 5,
                       reason="BERT relative_key(_query) exists only in transformers 4.x: make test-hf4"),
]
P = 9  # max_position_embeddings: 2 P - 1 = 17 rows, distances up to P - 1 = 8


def bert(kind, decoder=False, seed=0):
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertAttention

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=E, num_attention_heads=N, max_position_embeddings=P, position_embedding_type=kind,
                        attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0, is_decoder=decoder,
                        attn_implementation="eager")
    attention = BertAttention(config).to(torch.float64).eval()
    with torch.no_grad():  # transformers initialises the biases to 0: make them count
        for name, p in attention.named_parameters():
            if name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return attention


def bert_reference(attention, mask):
    def run(x):
        return attention.output.dense(attention.self(x, attention_mask=additive(mask))[0])
    return run


@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query"])
@pytest.mark.parametrize("causal", [False, True], ids=["encoder", "decoder-causal"])
def test_bert_matches_transformers(kind, causal):
    attention = bert(kind, decoder=causal)
    m = rt.from_hf_bert_attention(attention)
    x, _ = inputs(P)
    mask = padding_mask(P, P, causal=causal)
    errors = compare(lambda a: m(a, mask=mask), bert_reference(attention, mask), mask, (x,))
    assert max(errors) <= TOL, errors
    assert m.scheme == rt.BertBuckets(P) and m.rel_k.shape == (2 * P - 1, E // N)
    assert (m.rel_q is not None) == (kind == "relative_key_query")
    assert_jax_matches(m, x, None, mask)


@pytest.mark.parametrize("kind", ["relative_key", "relative_key_query"])
def test_bert_negative_controls_miss(kind):
    """BERT's table read as Shaw rows (ShawBuckets(P - 1): BERT's rows mirrored), or mirrored in
    place, or read with a wrong position count (BertBuckets(P - 1)), misses."""
    attention = bert(kind)
    mapping = importers._bert(attention)
    x, _ = inputs(P)
    mask = padding_mask(P, P)
    reference = bert_reference(attention, mask)
    assert max(compare(lambda a: mapped(mapping)(a, mask=mask), reference, mask, (x,))) <= TOL
    tables = tuple(n for n in ("rel_k", "rel_q") if n in mapping.tensors)
    for wrong in (mapped(mapping, scheme=rt.ShawBuckets(P - 1)), mapped(mapping, flip=tables)):
        assert compare(lambda a: wrong(a, mask=mask), reference, mask, (x,))[0] > WRONG
    wrong_count = mapped(mapping, scheme=rt.BertBuckets(P - 1))  # the full table read as P - 1 positions
    assert compare(lambda a: wrong_count(a, mask=mask), reference, mask, (x,))[0] > WRONG


def test_bert_absolute_is_refused():
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key' or 'relative_key_query', got 'absolute'"):
        rt.from_hf_bert_attention(bert("absolute"))
    assert B == 2  # the shared sizes (test_importers.py) this file relies on


def test_bert_page_snippet_runs(tmp_path, monkeypatch):
    """docs/schemes/bert.md's example runs as written and asserts its module equals BertAttention."""
    assert run_page_snippets("bert.md", tmp_path, monkeypatch) == 1
