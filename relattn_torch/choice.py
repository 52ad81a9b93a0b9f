"""Which path ``relative_attention`` runs: a table of rules, read in order (PyTorch).

Why this twin differs: the rules are the same and in the same order in both packages, but the
Shaw path is a different algorithm in each, so its conditions differ. This package's banded
Shaw path runs torch's fused CPU flash kernel on the clipped tails: it needs CPU float32 /
float64 tensors, no mask or a key-padding mask ([B, 1, 1, S]), no dropout, an int q_offset and, when causal,
q_offset + max(max_distance, 1) > S - T. It never holds [B, N, T, S] logits, so "auto" takes it
at every size. The JAX Shaw path runs on any device and dtype, with masks and a traced
q_offset, but holds the [B, N, T, S] logits, so there "auto" leaves long sequences to the
blockwise path.

Dimension legend as in ``attention.py``: B T S N.

``_RULES`` lists the paths in the order "auto" tries them. Each rule says why its path cannot
run for a call (``blocked``: a one-line reason, or None when it can run) and why "auto" should
take it (``wanted``: a one-line reason, or None). "auto" takes the first rule that can run and
wants to; a forced ``implementation=`` runs its rule's path or raises with the ``blocked``
reason. The rules see a call only through ``_Case`` (sizes, dtype, device and the form of the
arguments, never the tensors), so a test runs them on a grid of plain values, accelerators
included, and compares the result with a literal table (docs/implementations.md prints it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from . import _flash_op, _spec, buckets, fused
from .einsum import AttentionArgs

# "auto" switches to the linear-memory blockwise path once B * N * T * S reaches this
# (2**27 float32 logits = 512 MiB per [B, N, T, S] tensor).
LONG_SEQUENCE_THRESHOLD = 2**27
# "auto" takes the banded Shaw path from these B * N * T * S on, by (backward, causal); below, the
# einsum path is faster. Measured crossovers (B N H K = 2 8 64 16, 1 and 2 threads, interleaved, on
# the idle machine, 2026-12-03; docs/implementations.md), at B * N = 16: forward S = 192 causal /
# 512 non-causal, forward + backward S = 256 causal / 768 non-causal.
_SHAW_MIN_LOGITS = {(False, True): 9 << 16, (False, False): 2**22, (True, True): 2**20, (True, False): 9 << 20}
# A bucket scheme runs banded with its shaw_width K (T5 (32, 128): 91; BERT (512): 511), far wider than
# the K = 16 of those crossovers: "auto" takes it only where S >= this many band widths 2K + 1 as well.
# Measured forward, B N H = 2 8 64, one thread, banded / einsum (2026-12-02, other jobs running):
# T5 K = 91: 1.23 at S = 512 (2.8 widths), 0.59 at 768, 0.55 at 1024; BERT(128) K = 127: 0.42 at 768
# (3.0 widths), 0.59 at 1024; BERT(512) K = 511: 1.6 at S = 512.
_SCHEME_MIN_BAND_WIDTHS = 3
# The widest head the fused kernels launch (their tile configurations stop there).
FUSED_MAX_HEAD_DIM = 256
_ALIASES = {"reference": "einsum"}  # deprecated name -> path


class Choice(NamedTuple):
    """The path that ``relative_attention`` runs for a call, and why.

    Attributes:
        name: the path: "fused", "shaw", "blockwise" or "einsum".
        reason: one line saying why this path.
    """

    name: str
    reason: str


@dataclass(frozen=True)
class _Case:
    """What the rules see of one call."""

    B: int
    T: int
    S: int
    N: int
    H: int
    dtype: str  # "float32", "float64", "bfloat16", "float16"
    device: str  # torch device type: "cpu", "cuda", ...
    form: str  # "none", "dense" (edge tensors), "table" (rel_ids), "shaw" (max_distance) or "scheme" (scheme=)
    kernel: str | None  # why fused.py's kernel cannot run on this device (fused.unavailable), or None
    masked: bool = False
    key_padding: bool = False  # the mask varies only along B and S (e.g. [B, 1, 1, S])
    is_causal: bool = False
    dropout: bool = False
    max_distance: int | None = None  # the Shaw clip; with a scheme, buckets.shaw_width (an int q_offset only)
    q_offset: int | None = None  # the Shaw form's offset if a Python int; None for a tensor
    query_terms: bool = False  # rel_q or rel_bias given
    N_kv: int | None = None  # key/value heads when grouped (fewer than N), else None
    alibi: bool = False  # alibi_slopes given: only the einsum and blockwise paths take them
    backward: bool = False  # a gradient will be taken: grad mode on and q, k or a table requiring grad

    @property
    def logits(self) -> int:
        return self.B * self.N * self.T * self.S

    @property
    def empty(self) -> str | None:
        """Why the call is empty (a size is 0), or None: only the einsum path takes it."""
        zero = [name for name in "BTSNH" if getattr(self, name) == 0]
        return f"needs non-empty inputs, got {', '.join(zero)} = 0" if zero else None


@dataclass(frozen=True)
class _Rule:
    name: str
    blocked: Callable[[_Case], str | None]  # why the path cannot run, or None
    wanted: Callable[[_Case], str | None]  # why "auto" should take it, or None


def _fused_blocked(c: _Case) -> str | None:
    if c.form not in ("shaw", "scheme"):
        return "needs max_distance or scheme= (the kernel computes the ids; no rel_ids, no dense edges)"
    if c.alibi:
        return _NO_ALIBI
    if c.empty:
        return c.empty
    if c.dropout:
        return "needs dropout_p=0"
    if c.dtype not in ("float32", "float16", "bfloat16"):
        return f"needs float32/float16/bfloat16 inputs, got {c.dtype}"
    if c.H > FUSED_MAX_HEAD_DIM:
        return f"needs head dim H <= {FUSED_MAX_HEAD_DIM}, got {c.H}"
    return c.kernel


def _fused_wanted(c: _Case) -> str | None:
    if c.device in ("cuda",):
        return "the Shaw form or a scheme on CUDA tensors: the fused Triton kernel holds no [B, N, T, S] tensor"
    return None  # the CPU choice: the interpreter runs the kernel only when asked for by name


_NO_QUERY_TERMS = "needs rel_q=None and rel_bias=None (the fused, einsum and blockwise paths take them)"
_NO_ALIBI = "needs alibi_slopes=None (the einsum and blockwise paths take them)"


def _shaw_blocked(c: _Case) -> str | None:
    if c.form not in ("shaw", "scheme"):
        return "needs max_distance or scheme= (the Shaw form; a scheme runs as Shaw with expanded tables)"
    if c.empty:
        return c.empty
    if c.masked and not c.key_padding:
        return "needs no mask or a key-padding mask [B, 1, 1, S] (this package's banded path)"
    if c.dropout:
        return "needs dropout_p=0"
    if c.dtype not in ("float32", "float64", "bfloat16", "float16"):
        return f"needs float32/float64/bfloat16/float16 tensors (this package's banded path), got {c.dtype}"
    if c.device != "cpu":
        return f"needs CPU tensors (this package's banded path), got {c.device}"
    if c.q_offset is None:
        return "needs an int q_offset (this package's banded path)"
    if c.is_causal and not c.q_offset + max(c.max_distance, 1) > c.S - c.T:
        return "needs, when causal, q_offset + max(max_distance, 1) > S - T"
    if c.query_terms:
        return _NO_QUERY_TERMS
    if c.alibi:
        return _NO_ALIBI
    return _flash_op.MISSING  # None where this torch has the fused CPU kernel


def _shaw_wanted(c: _Case) -> str | None:
    if c.logits < _SHAW_MIN_LOGITS[(c.backward, c.is_causal)]:
        return None  # below the measured crossover the einsum path is faster
    if c.form == "scheme" and c.S < _SCHEME_MIN_BAND_WIDTHS * (2 * c.max_distance + 1):
        return None  # the scheme's band spans most keys: the einsum path is faster
    return "the Shaw form on CPU: the banded path never holds [B, N, T, S] logits"


def _runs_anywhere(c: _Case) -> None:
    return None


def _blockwise_blocked(c: _Case) -> str | None:
    return c.empty


def _blockwise_wanted(c: _Case) -> str | None:
    if c.logits >= LONG_SEQUENCE_THRESHOLD:
        return f"B * N * T * S = {c.logits} >= LONG_SEQUENCE_THRESHOLD: query blocks keep memory linear in S"
    return None


def _einsum_wanted(c: _Case) -> str:
    return f"B * N * T * S = {c.logits} < LONG_SEQUENCE_THRESHOLD and no faster exact path fits"


# The rules in the order "auto" tries them, the same order in both packages. A new path is one
# _Rule placed where "auto" should try it, plus one branch in attention._run. The fused kernel
# goes first: where it can run and "auto" wants it (an accelerator), nothing else is faster.
_RULES = (
    _Rule("fused", _fused_blocked, _fused_wanted),
    _Rule("shaw", _shaw_blocked, _shaw_wanted),
    _Rule("blockwise", _blockwise_blocked, _blockwise_wanted),
    _Rule("einsum", _runs_anywhere, _einsum_wanted),
)
IMPLEMENTATIONS = ("auto", *(rule.name for rule in _RULES))


def choose_implementation(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: AttentionArgs, implementation: str | None = None
) -> Choice:
    """The path ``relative_attention`` runs for these inputs, with a one-line reason.

    Does not check the inputs (``relative_attention`` does that first). The rules, in the
    order "auto" tries them, are on the Implementations page of the docs.

    Args:
        q: queries [B, T, N, H].
        k: keys [B, S, N, H].
        v: values [B, S, N, H].
        args: the other arguments of the call (``relattn_torch.einsum.AttentionArgs``).
        implementation: None or "auto" for the rule table's choice, or a path name to force
            ("reference" is a deprecated alias of "einsum").

    Returns:
        ``Choice(name, reason)``.

    Raises:
        ValueError: for an unknown name, or a forced path that cannot run these inputs.
    """
    return _choose(_case(q, k, args), implementation)


def _choose(case: _Case, implementation: str | None = None) -> Choice:
    """The first rule that can run and that "auto" wants, or the forced one."""
    name = _resolve(implementation)
    for rule in _RULES:
        if name not in ("auto", rule.name):
            continue
        why_not = rule.blocked(case)
        if name == rule.name:
            if why_not is not None:
                raise ValueError(f"implementation={name!r} {why_not}; use 'auto' to fall back")
            return Choice(name, f"implementation={name!r} was asked for")
        why = None if why_not is not None else rule.wanted(case)
        if why is not None:
            return Choice(rule.name, why)
    raise AssertionError("the last rule (einsum) always runs")


def _resolve(implementation: str | None) -> str:
    name = "auto" if implementation is None else implementation
    if name in _ALIASES:
        # stacklevel 5: the caller of relative_attention (via choose_implementation, _choose)
        warnings.warn(f"implementation={name!r} is deprecated: it is the einsum path, "
                      f"implementation={_ALIASES[name]!r}", DeprecationWarning, stacklevel=5)
        return _ALIASES[name]
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be None or one of {IMPLEMENTATIONS}, got {implementation!r}")
    return name


def _case(q, k, args: AttentionArgs) -> _Case:
    """The rules' view of a call: sizes, dtype, device and the form of the arguments."""
    B, T, N, H = q.shape
    S = k.shape[1]
    form = _form(args)
    q_offset = args.q_offset
    if (args.max_distance is not None or args.scheme is not None) and q_offset is None:
        q_offset = S - T
    if not isinstance(q_offset, int) or isinstance(q_offset, bool):
        q_offset = None
    max_distance = args.max_distance
    if args.scheme is not None and q_offset is not None:  # the clip at which the scheme's ids run as Shaw's
        max_distance = buckets.shaw_width(args.scheme, T, S, q_offset)
    return _Case(B=B, T=T, S=S, N=N, H=H, dtype=str(q.dtype).removeprefix("torch."), device=q.device.type,
                 form=form, kernel=fused.unavailable(q) if form in ("shaw", "scheme") else None,
                 masked=args.mask is not None,
                 key_padding=_key_padding(args.mask, T, N), is_causal=bool(args.is_causal), dropout=args.dropout_p > 0.0,
                 max_distance=max_distance, q_offset=q_offset,
                 query_terms=args.rel_q is not None or args.rel_bias is not None,
                 N_kv=k.shape[2] if k.shape[2] != N else None, alibi=args.alibi_slopes is not None,
                 backward=torch.is_grad_enabled() and any(
                     t is not None and t.requires_grad for t in (q, k, args.rel_k, args.rel_v)))


def _key_padding(mask, T, N) -> bool:
    """Whether the mask is a key-padding mask the banded path takes. Not under torch.compile: there its
    masked band is refused by inductor's functionalization (a mutation through a skewed as_strided
    view), so a compiled padded call takes the einsum path in one graph, as before masks reached it."""
    return mask is not None and _spec.is_key_padding(tuple(mask.shape), T, N) and not torch.compiler.is_compiling()


def _form(args: AttentionArgs) -> str:
    if args.max_distance is not None:
        return "shaw"
    if args.scheme is not None:
        return "scheme"
    if args.rel_ids is not None:
        return "table"
    return "none" if args.rel_k is None and args.rel_v is None else "dense"
