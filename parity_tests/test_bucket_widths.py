"""Every bucket scheme is the Shaw form with a clip K and expanded tables (``saturation``,
``shaw_width``, ``shaw_rows``): what the fused kernels and the banded path rely on."""

from __future__ import annotations

import numpy as np
import pytest

from .backends import backend
from .test_buckets import SCHEMES, scheme

EXTRA = {  # name -> (class, arguments, saturation worked out by hand)
    "shaw-0": ("ShawBuckets", dict(max_distance=0), 0),
    "bert-1": ("BertBuckets", dict(max_position_embeddings=1), 0),
    "t5-8-20-bidir": ("T5Buckets", dict(num_buckets=8, max_distance=20, bidirectional=True), 7),
    "deberta-2-40": ("DebertaBuckets", dict(position_buckets=2, max_relative_positions=40), 1),
}
SIZES = [(5, 7, None), (40, 300, 0), (300, 300, None), (3, 1000, 900), (1, 1, 0), (9, 4, -6), (0, 5, None)]


def all_schemes(bk):
    out = {name: scheme(bk, name) for name in SCHEMES}
    out.update({name: getattr(bk.lib, cls)(**kw) for name, (cls, kw, _) in EXTRA.items()})
    return out


def test_literal_saturations(bk):
    """Shaw K and BERT P - 1 by definition; T5 (8, 20) and DeBERTa (2, 40) worked out by hand:
    T5 bidirectional with 4 buckets a side reaches its last bucket (3) at log(n / 2) / log(10) * 2 >= 1,
    n >= 2 sqrt(10) = 6.3, so at 7; DeBERTa with bucket_size 2 (mid 1) maps every |delta| >= 1 to
    +-1 and 0 to 0."""
    got = {name: s.saturation for name, s in all_schemes(bk).items()}
    assert got["shaw-3"] == 3 and got["shaw-0"] == 0 and got["bert-8"] == 7 and got["bert-1"] == 0
    assert got["t5-8-20-bidir"] == 7 and got["deberta-2-40"] == 1
    assert got["deberta-plain-6"] == 6


@pytest.mark.parametrize("name", list(SCHEMES) + list(EXTRA))
def test_saturation_is_the_smallest_constant_tail(bk, name):
    s = all_schemes(bk)[name]
    W = s.saturation
    d = np.arange(-4000, 4001)
    ids = bk.numpy(s.bucket(bk.array(d)))
    assert (ids[d >= W] == ids[-1]).all() and (ids[d <= -W] == ids[0]).all()
    if W > 0:  # one less is not enough on some side
        assert not ((ids[d >= W - 1] == ids[-1]).all() and (ids[d <= -(W - 1)] == ids[0]).all())


@pytest.mark.parametrize("name", list(SCHEMES) + list(EXTRA))
def test_shaw_rows_at_shaw_width_give_the_scheme_ids(bk, name):
    s = all_schemes(bk)[name]
    for T, S, q_offset in SIZES:
        K = bk.lib.buckets.shaw_width(s, T, S, q_offset)
        assert 0 <= K <= s.saturation
        offset = S - T if q_offset is None else q_offset
        d = np.arange(S)[None, :] - np.arange(T)[:, None] - offset  # [T, S]
        rows = bk.numpy(bk.lib.buckets.shaw_rows(s, K))
        assert rows.shape == (2 * K + 1,)
        np.testing.assert_array_equal(rows[np.clip(d, -K, K) + K], bk.numpy(s.ids(T, S, offset)))
        if T and S and K < s.saturation:  # narrower than the saturation only where no |d| reaches it
            assert np.abs(d).max() <= K


def test_shaw_width_with_an_array_offset_is_the_saturation(bk):
    s = bk.lib.T5Buckets(32, 128, True)
    offset = bk.array(np.int32(3))
    assert bk.lib.buckets.shaw_width(s, 4, 5, offset) == s.saturation == 91


def test_a_wrong_scheme_gives_other_rows(bk):
    """Negative control: the rows depend on the scheme (a check built on them can fail)."""
    a = bk.numpy(bk.lib.buckets.shaw_rows(bk.lib.T5Buckets(32, 128, True), 40))
    b = bk.numpy(bk.lib.buckets.shaw_rows(bk.lib.T5Buckets(16, 128, True), 40))
    assert (a != b).sum() > 40


def test_shaw_rows_checks_k(bk):
    with pytest.raises((TypeError, ValueError), match="K"):
        bk.lib.buckets.shaw_rows(bk.lib.ShawBuckets(2), -1)


def test_saturation_is_the_same_in_both_frameworks():
    torch_b, jax_b = backend("torch"), backend("jax")
    for name in list(SCHEMES) + list(EXTRA):
        assert all_schemes(torch_b)[name].saturation == all_schemes(jax_b)[name].saturation, name
