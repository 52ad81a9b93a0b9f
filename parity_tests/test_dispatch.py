"""Which path ``implementation="auto"`` picks: both packages' rule tables against one literal table.

The rules see a call as a ``choice._Case`` (sizes, dtype, device, the form of the arguments), so
the grid below runs them on plain values, accelerators included, without any accelerator; the
CPU rows also go through the public ``choose_implementation`` with real arrays. The rules and a
summary of this table are on docs/implementations.md.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

import numpy as np
import pytest

FRAMEWORKS = ["torch", "jax"]
ACCELERATOR = {"torch": "cuda", "jax": "gpu"}  # what each framework calls the accelerator device
K = 2  # max_distance of the Shaw rows
H = 64  # head dim of every row
CPU_KERNEL = "the fused kernel needs an accelerator here"  # stand-in for fused.unavailable on CPU
SIZES = {  # B, T, S, N; LONG_SEQUENCE_THRESHOLD = 2**27 = B * N * T * S at "at"
    "tiny": (2, 64, 64, 4),
    "small": (2, 512, 512, 8),
    "below": (1, 4096, 4095, 8),
    "at": (1, 4096, 4096, 8),
}

# form: none (no relation terms), dense (edge tensors), table (rel_ids), shaw (max_distance).
# q_offset (Shaw rows): default (S - T), an int, or array (a tensor / jax array). accel: the
# accelerator ("cuda" for torch, "gpu" for jax); tpu: jax's TPU backend ("-": torch has none).
# The fused kernel (fused.py) can run on the accelerator rows (kernel=None) and not on the CPU
# rows (kernel=CPU_KERNEL, as fused.unavailable says without an interpreter switch); "auto"
# takes it on accelerators only, for the Shaw form in float32/float16/bfloat16 without dropout.
# mask: "mask" is a mask with a T dim, "pad" a key-padding mask [B, 1, 1, S].
# form "scheme": scheme=BertBuckets(3) with rel_k (its shaw_width is K = 2, so its rows run as Shaw's
# on the torch banded path). Flags after the form: "+qb" rel_q / rel_bias given (only the fused,
# einsum and blockwise paths take them), "+gqa" grouped key/value heads (N_kv = N / 2, the fused kernel
# and the Shaw paths take them), "+alibi" alibi_slopes (only the einsum and blockwise paths).
# The torch banded Shaw path needs CPU tensors (half ones run in float32),
# no mask or a key-padding one, no dropout, an int q_offset and, when causal, q_offset + max(K, 1) > S - T;
# the jax Shaw path takes any of those, but leaves B * N * T * S >= 2**27 to blockwise.
TABLE = """
form   mask  causal  dropout  dtype     device  size   q_offset | torch      jax
shaw   -     -       -        float32   cpu     small  default  | shaw       shaw
shaw   -     -       -        float32   cpu     tiny   default  | einsum     shaw
shaw   -     causal  -        float32   cpu     tiny   default  | einsum     shaw
shaw   -     -       -        float64   cpu     small  default  | shaw       shaw
shaw   -     -       -        bfloat16  cpu     small  default  | shaw       shaw
shaw   -     -       -        float16   cpu     small  default  | shaw       shaw
shaw   -     -       -        float32   accel   small  default  | fused      fused
shaw   -     -       -        bfloat16  accel   small  default  | fused      fused
shaw   mask  causal  -        bfloat16  accel   small  array    | fused      fused
shaw   -     -       -        float16   accel   small  -3       | fused      fused
shaw   -     -       dropout  bfloat16  accel   small  default  | einsum     einsum
shaw   -     -       -        float64   accel   small  default  | einsum     shaw
shaw   -     -       -        float32   tpu     small  default  | -          fused
shaw   mask  -       -        float32   cpu     small  default  | einsum     shaw
shaw   pad   -       -        float32   cpu     small  default  | shaw       shaw
shaw   pad   causal  -        float64   cpu     small  default  | shaw       shaw
shaw   pad   causal  -        float32   cpu     at     default  | shaw       blockwise
shaw   pad   -       -        bfloat16  cpu     small  default  | shaw       shaw
shaw   -     -       dropout  float32   cpu     small  default  | einsum     einsum
shaw   -     causal  -        float32   cpu     small  default  | shaw       shaw
shaw   -     causal  -        float32   cpu     small  -3       | einsum     shaw
shaw   -     -       -        float32   cpu     small  -3       | shaw       shaw
shaw   -     causal  -        float32   cpu     small  array    | einsum     shaw
shaw   -     -       -        float32   cpu     below  default  | shaw       shaw
shaw   -     -       -        float32   cpu     at     default  | shaw       blockwise
shaw   -     causal  -        float32   cpu     at     default  | shaw       blockwise
shaw   mask  -       -        float32   cpu     at     default  | blockwise  blockwise
shaw   -     -       dropout  float32   cpu     at     default  | blockwise  blockwise
shaw   -     -       -        float32   accel   at     default  | fused      fused
shaw   -     -       dropout  float32   accel   at     default  | blockwise  blockwise
table  -     -       -        float32   cpu     small  -        | einsum     einsum
table  mask  causal  dropout  float32   cpu     small  -        | einsum     einsum
table  -     -       -        bfloat16  accel   below  -        | einsum     einsum
table  -     -       -        float32   cpu     at     -        | blockwise  blockwise
dense  -     -       -        float64   cpu     small  -        | einsum     einsum
dense  mask  causal  -        float32   accel   small  -        | einsum     einsum
dense  -     -       -        float32   cpu     at     -        | blockwise  blockwise
none   -     causal  -        float32   cpu     small  -        | einsum     einsum
none   -     -       -        float32   accel   at     -        | blockwise  blockwise
shaw+qb  -   -       -        float32   cpu     small  default  | einsum     einsum
shaw+qb  -   -       -        bfloat16  accel   small  default  | fused      fused
shaw+qb  pad causal  -        float32   cpu     small  default  | einsum     einsum
shaw+qb  -   -       -        float32   cpu     at     default  | blockwise  blockwise
table+qb -   -       -        float32   cpu     small  -        | einsum     einsum
table+qb -   -       -        float32   accel   at     -        | blockwise  blockwise
scheme   -     -       -        float32   cpu     small  default  | shaw       einsum
scheme   -     -       -        float32   cpu     tiny   default  | einsum     einsum
scheme   pad   causal  -        float64   cpu     small  default  | shaw       einsum
scheme   -     causal  -        float32   cpu     small  array    | einsum     einsum
scheme   -     -       -        float32   accel   small  default  | fused      fused
scheme   -     -       -        float32   cpu     at     default  | shaw       blockwise
scheme+qb -    -       -        float32   cpu     small  default  | einsum     einsum
shaw+gqa  -    -       -        float32   cpu     small  default  | shaw       shaw
shaw+gqa  -    -       -        float32   accel   small  default  | fused      fused
shaw+gqa  pad  causal  -        float32   cpu     at     default  | shaw       blockwise
table+gqa -    -       -        float32   cpu     small  -        | einsum     einsum
shaw+alibi -   -       -        float32   cpu     small  default  | einsum     einsum
shaw+alibi -   -       -        float32   accel   small  default  | einsum     einsum
shaw+alibi -   -       -        float32   accel   at     default  | blockwise  blockwise
none+alibi -   causal  -        float32   cpu     small  -        | einsum     einsum
"""


@dataclass(frozen=True)
class Row:
    form: str
    masked: bool
    key_padding: bool
    is_causal: bool
    dropout: bool
    dtype: str
    device: str  # "cpu" or "accel"
    size: str
    q_offset: str  # "default", an int, "array", or "-" (not the Shaw form)
    expected: dict  # framework -> path
    query_terms: bool = False  # rel_q / rel_bias given ("+qb" after the form)
    gqa: bool = False  # grouped key/value heads, N_kv = N / 2 ("+gqa")
    alibi: bool = False  # alibi_slopes given ("+alibi")

    @property
    def id(self) -> str:
        flags = [f for f, on in (("pad" if self.key_padding else "mask", self.masked), ("causal", self.is_causal),
                                 ("dropout", self.dropout)) if on]
        offset = [] if self.q_offset in ("-", "default") else [f"off{self.q_offset}"]
        form = self.form + "".join(f"+{f}" for f, on in (("qb", self.query_terms), ("gqa", self.gqa),
                                                         ("alibi", self.alibi)) if on)
        return "-".join([form, *flags, self.dtype, self.device, self.size, *offset])

    def clip(self, q_offset):
        """The rules' max_distance: K in the Shaw form; a scheme's shaw_width (K) where q_offset is an int."""
        return K if self.form == "shaw" or (self.form == "scheme" and q_offset is not None) else None

    def case(self, choice, fw):
        """The rules' view of this row in framework ``fw`` (its ``choice._Case``)."""
        B, T, S, N = SIZES[self.size]
        if self.q_offset in ("array", "-"):
            q_offset = None  # a tensor / array, or not the Shaw form
        else:
            q_offset = S - T if self.q_offset == "default" else int(self.q_offset)
        device = {"accel": ACCELERATOR[fw], "tpu": "tpu", "cpu": "cpu"}[self.device]
        return choice._Case(B=B, T=T, S=S, N=N, H=H, dtype=self.dtype, device=device, form=self.form,
                            kernel=CPU_KERNEL if device == "cpu" else None, masked=self.masked,
                            key_padding=self.key_padding, is_causal=self.is_causal, dropout=self.dropout,
                            max_distance=self.clip(q_offset), q_offset=q_offset,
                            query_terms=self.query_terms, N_kv=N // 2 if self.gqa else None, alibi=self.alibi)


def _parse(table: str) -> list[Row]:
    lines = [line.split() for line in table.strip().splitlines()[1:]]
    return [Row(form.split("+")[0], mask in ("mask", "pad"), mask == "pad", causal == "causal",
                dropout == "dropout", dtype, device, size, off, {"torch": torch_path, "jax": jax_path},
                query_terms="qb" in form.split("+"), gqa="gqa" in form.split("+"), alibi="alibi" in form.split("+"))
            for form, mask, causal, dropout, dtype, device, size, off, _, torch_path, jax_path in lines]


ROWS = _parse(TABLE)


def _choice(fw):
    pytest.importorskip(fw)
    import importlib

    return importlib.import_module(f"relattn_{fw}.choice")


def test_the_table_parses_into_every_form_and_both_sides_of_the_threshold():
    assert len(ROWS) == len(TABLE.strip().splitlines()) - 1
    assert {r.form for r in ROWS} == {"none", "dense", "table", "shaw", "scheme"}
    assert {r.size for r in ROWS} == set(SIZES)
    B, T, S, N = SIZES["at"]
    assert B * N * T * S == 2**27 and np.prod(SIZES["below"]) < 2**27


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_rule_table_matches_the_literal_table(row, fw):
    if row.expected[fw] == "-":
        pytest.skip(f"{fw} has no {row.device} device")
    choice = _choice(fw)
    assert choice.LONG_SEQUENCE_THRESHOLD == 2**27
    got = choice._choose(row.case(choice, fw))
    assert got.name == row.expected[fw], got
    assert got.reason and "\n" not in got.reason


def test_torch_banded_path_from_the_measured_crossover():
    """Below _SHAW_MIN_LOGITS (by backward, causal) "auto" takes the einsum path, which is faster there;
    a call that will be differentiated has the higher crossover. On real arrays too (requires_grad)."""
    torch = pytest.importorskip("torch")
    choice = _choice("torch")
    assert choice._SHAW_MIN_LOGITS == {(False, True): 9 << 16, (False, False): 2**22, (True, True): 2**20,
                                      (True, False): 9 << 20}

    def pick(S, causal, backward):
        case = choice._Case(B=2, T=S, S=S, N=8, H=64, dtype="float32", device="cpu", form="shaw", kernel=CPU_KERNEL,
                            is_causal=causal, max_distance=16, q_offset=0, backward=backward)
        return choice._choose(case).name

    assert [pick(S, False, False) for S in (384, 512)] == ["einsum", "shaw"]  # 2**21.2, 2**22
    assert [pick(S, False, True) for S in (704, 768)] == ["einsum", "shaw"]  # 16 * 704**2 < 9 << 20 = 16 * 768**2
    assert [pick(S, True, False) for S in (176, 192)] == ["einsum", "shaw"]  # 9 << 16 = 16 * 192**2
    assert [pick(S, True, True) for S in (192, 256)] == ["einsum", "shaw"]  # 2**20 = 16 * 256**2
    from relattn_torch import choose_implementation
    from relattn_torch.einsum import AttentionArgs

    q = torch.zeros(2, 512, 8, 1)
    args = AttentionArgs(rel_k=torch.zeros(5, 1), max_distance=2, q_offset=0)
    assert choose_implementation(q, q, q, args).name == "shaw"
    assert choose_implementation(q.clone().requires_grad_(), q, q, args).name == "einsum"
    with torch.no_grad():
        assert choose_implementation(q.clone().requires_grad_(), q, q, args).name == "shaw"


def test_both_packages_try_the_same_rules_in_the_same_order():
    torch_rules = [r.name for r in _choice("torch")._RULES]
    jax_rules = [r.name for r in _choice("jax")._RULES]
    assert torch_rules == jax_rules == ["fused", "shaw", "blockwise", "einsum"]
    assert _choice("torch").IMPLEMENTATIONS == _choice("jax").IMPLEMENTATIONS == ("auto", *torch_rules)


def _arrays(fw, row):
    """Real CPU inputs for ``choose_implementation``: q, k, v [B, T or S, N, 1] and the AttentionArgs.

    The choice reads only shapes, dtype, device and which arguments are given, so the relation
    terms and the mask are small stand-ins."""
    B, T, S, N = SIZES[row.size]
    if fw == "torch":
        import torch

        from relattn_torch.einsum import AttentionArgs

        dt, ints = getattr(torch, row.dtype), torch.int64
        arr = lambda *shape, dtype=dt: torch.zeros(shape, dtype=dtype)  # noqa: E731
    else:
        import jax.numpy as jnp

        from relattn_jax.einsum import AttentionArgs

        dt, ints = getattr(jnp, row.dtype), jnp.int32
        arr = lambda *shape, dtype=dt: jnp.zeros(shape, dtype=dtype)  # noqa: E731
    N_kv = N // 2 if row.gqa else N
    q, k, v = arr(B, T, N, 1), arr(B, S, N_kv, 1), arr(B, S, N_kv, 1)
    mask = arr(B, 1, 1, S, dtype=bool) if row.key_padding else arr(1, 1, T, 1, dtype=bool)
    kw = dict(mask=mask if row.masked else None, is_causal=row.is_causal,
              dropout_p=0.1 if row.dropout else 0.0)
    if row.form != "none":
        kw["rel_k"] = arr(2 * K + 1, 1)
    if row.query_terms:
        kw["rel_q"], kw["rel_bias"] = arr(2 * K + 1, 1), arr(2 * K + 1, N)
    if row.alibi:
        kw["alibi_slopes"] = arr(N)
    if row.form == "table":
        kw["rel_ids"] = arr(T, 1, dtype=ints)
    if row.form == "scheme":
        kw["scheme"] = __import__(f"relattn_{fw}").BertBuckets(K + 1)  # 2K + 1 rows, shaw_width K
    if row.form in ("shaw", "scheme"):
        kw["max_distance"] = K if row.form == "shaw" else None
        if row.q_offset == "array":
            kw["q_offset"] = arr(dtype=ints)
        elif row.q_offset != "default":
            kw["q_offset"] = int(row.q_offset)
    return q, k, v, AttentionArgs(**kw)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("row", [r for r in ROWS if r.device == "cpu"], ids=lambda r: r.id)
def test_choose_implementation_on_real_cpu_arrays(row, fw):
    pytest.importorskip(fw)
    lib = __import__(f"relattn_{fw}")
    got = lib.choose_implementation(*_arrays(fw, row))
    assert isinstance(got, lib.Choice) and got.name == row.expected[fw], got


# implementation= forced: a path that cannot run says why; the torch banded path is narrower.
FORCED = [
    # implementation, row of TABLE (by id), torch, jax  (an error is "ValueError: <message part>")
    ("fused", "shaw-float32-accel-small", "fused", "fused"),
    ("fused", "shaw-mask-causal-bfloat16-accel-small-offarray", "fused", "fused"),
    ("fused", "shaw-float32-cpu-small", f"ValueError: {CPU_KERNEL}", f"ValueError: {CPU_KERNEL}"),
    ("fused", "table-float32-cpu-small", "ValueError: needs max_distance", "ValueError: needs max_distance"),
    ("fused", "shaw-dropout-bfloat16-accel-small", "ValueError: needs dropout_p=0", "ValueError: needs dropout_p=0"),
    ("fused", "shaw-float64-accel-small", "ValueError: needs float32/float16/bfloat16", "ValueError: needs float32/float16/bfloat16"),
    ("shaw", "table-float32-cpu-small", "ValueError: needs max_distance", "ValueError: needs max_distance"),
    ("shaw", "shaw-mask-float32-cpu-small", "ValueError: needs no mask", "shaw"),
    ("shaw", "shaw-float32-accel-small", "ValueError: needs CPU tensors", "shaw"),
    ("shaw", "shaw-bfloat16-cpu-small", "shaw", "shaw"),
    ("shaw", "shaw-pad-float32-cpu-small", "shaw", "shaw"),
    ("shaw", "shaw-causal-float32-cpu-small-off-3", "ValueError: q_offset + max(max_distance, 1) > S - T", "shaw"),
    ("shaw", "shaw-dropout-float32-cpu-small", "ValueError: needs dropout_p=0", "ValueError: needs dropout_p=0"),
    ("shaw", "shaw-float32-cpu-at", "shaw", "shaw"),
    ("blockwise", "table-float32-cpu-small", "blockwise", "blockwise"),
    ("einsum", "shaw-float32-cpu-at", "einsum", "einsum"),
    ("shaw", "scheme-float32-cpu-small", "shaw", "ValueError: needs max_distance (the Shaw form)"),
    ("shaw", "scheme-causal-float32-cpu-small-offarray", "ValueError: needs an int q_offset", "ValueError: needs max_distance"),
    ("shaw", "shaw+alibi-float32-cpu-small", "ValueError: needs alibi_slopes=None", "ValueError: needs alibi_slopes=None"),
    ("shaw", "shaw+gqa-float32-cpu-small", "shaw", "shaw"),
    ("fused", "shaw+alibi-float32-accel-small", "ValueError: needs alibi_slopes=None", "ValueError: needs alibi_slopes=None"),
    ("fused", "shaw+gqa-float32-accel-small", "fused", "fused"),
    ("fused", "scheme-float32-accel-small", "fused", "fused"),
    ("fused", "shaw+qb-bfloat16-accel-small", "fused", "fused"),
    ("blockwise", "none+alibi-causal-float32-cpu-small", "blockwise", "blockwise"),
]
BY_ID = {r.id: r for r in ROWS}


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("impl, row_id, torch_expected, jax_expected", FORCED, ids=[f"{f[0]}-{f[1]}" for f in FORCED])
def test_forced_implementation(impl, row_id, torch_expected, jax_expected, fw):
    choice = _choice(fw)
    expected = {"torch": torch_expected, "jax": jax_expected}[fw]
    case = BY_ID[row_id].case(choice, fw)
    if expected.startswith("ValueError: "):
        with pytest.raises(ValueError, match=f"implementation='{impl}' .*" + re.escape(expected.split(": ", 1)[1])):
            choice._choose(case, impl)
    else:
        assert choice._choose(case, impl).name == expected


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_reference_is_a_deprecated_alias_of_einsum(fw):
    choice = _choice(fw)
    case = BY_ID["shaw-float32-cpu-small"].case(choice, fw)
    with pytest.warns(DeprecationWarning, match="'reference' is deprecated"):
        assert choice._choose(case, "reference").name == "einsum"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choice._choose(case, "einsum").name == "einsum"
    with pytest.raises(ValueError, match="implementation must be None or one of"):
        choice._choose(case, "fast")


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_relative_attention_runs_einsum_for_the_deprecated_name(fw):
    """The warning points at the caller of relative_attention, and the result is the einsum path's."""
    from .backends import backend

    be = backend(fw)
    rng = np.random.default_rng(0)
    x = {n: rng.normal(size=(1, 4, 2, 3)) for n in ("q", "k", "v")}
    x["rel_k"] = rng.normal(size=(5, 3))
    with pytest.warns(DeprecationWarning, match="'reference' is deprecated") as record:
        old = be.attention(x, max_distance=2, implementation="reference")
    assert record[0].filename.endswith("backends.py")  # TorchBackend / JaxBackend.attention called it
    np.testing.assert_array_equal(old, be.attention(x, max_distance=2, implementation="einsum"))


@pytest.mark.parametrize("fw", FRAMEWORKS)
def test_fused_steps_aside_where_its_kernel_cannot_run(fw):
    """An accelerator without the kernel (no triton; a backend it does not lower for) keeps the old
    choice; the kernel's own reason is the error when it is asked for by name; heads wider than
    FUSED_MAX_HEAD_DIM never reach it."""
    import dataclasses

    choice = _choice(fw)
    row = BY_ID["shaw-float32-accel-small"]
    case = dataclasses.replace(row.case(choice, fw), kernel="triton is not installed")
    assert choice._choose(case).name == {"torch": "einsum", "jax": "shaw"}[fw]
    with pytest.raises(ValueError, match="implementation='fused' triton is not installed"):
        choice._choose(case, "fused")
    wide = dataclasses.replace(row.case(choice, fw), H=choice.FUSED_MAX_HEAD_DIM + 1)
    assert choice._choose(wide).name != "fused"
    with pytest.raises(ValueError, match=f"needs head dim H <= {choice.FUSED_MAX_HEAD_DIM}"):
        choice._choose(wide, "fused")
