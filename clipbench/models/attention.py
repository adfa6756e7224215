"""Record a transformer's attention internals (q, k, v, weights, context, output) with the autograd graph intact.

Fused attention kernels never materialise the attention weights, so gradients with respect to them
(Grad-ECLIP, attention rollout with gradients) are impossible without help. While
:class:`record_attention` is active, each attention module's output is *replaced* by an explicit
recomputation from its own weights: the returned output is numerically the module's output, and the
recorded weights are on the path from the input to the embedding, so ``autograd.grad`` of a score with
respect to ``record.weights`` (or ``record.context``) is the true gradient.

Each library's attention module has its own parameter layout; one function per module type, registered
in :data:`ATTENTION_PARTS`, says how that module computes its queries, keys and values and how it turns
the attention context into its output. The recorder does the attention itself, so it can also recompute
a block differently on request (``modes``): as one head over the full width (the official Grad-ECLIP
recomputation), or with each token attending only to itself (MaskCLIP's value path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttentionRecord:
    """One attention module's internals for one forward pass. Shapes are batch-first:
    q, k, v, context (B, heads, N, head_dim), where ``context = weights @ v``; weights (B, heads, N, N);
    output (B, N, width) == ``project(merge_heads(context))``."""

    q: Tensor
    k: Tensor
    v: Tensor
    weights: Tensor
    context: Tensor
    output: Tensor
    project: Callable[[Tensor], Tensor] = field(repr=False)


@dataclass
class AttentionParts:
    """What a source's attention module computes around the softmax attention, for one call.

    q, k, v: (B, heads, N, head_dim); mask: boolean (True = may not attend) or additive, or None;
    project: the merged context (B, N, width) -> the module's output (output projection, any norm or
    gate); returns: the output -> what the module's ``forward`` returns (a tuple for some libraries).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None
    project: Callable[[Tensor], Tensor]
    returns: Callable[[Tensor], object] = lambda out: out


def explicit_attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Softmax attention with the weights materialised. Returns (per-head context, weights)."""
    logits = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    if attn_mask is not None:
        logits = logits.masked_fill(attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else logits + attn_mask
    weights = logits.softmax(dim=-1)
    return weights @ v, weights


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(B, N, width) -> (B, heads, N, head_dim)."""
    b, n, width = x.shape
    return x.view(b, n, heads, width // heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, N, head_dim) -> (B, N, width)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _torch_mha(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> AttentionParts:
    """nn.MultiheadAttention in self-attention use (open_clip and clipbench ViTs and text towers)."""
    x = args[0] if args else kwargs["query"]
    if not module.batch_first:
        x = x.transpose(0, 1)
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (split_heads(t, module.num_heads) for t in (q, k, v))
    mask = kwargs.get("attn_mask")
    if kwargs.get("is_causal") and mask is None:
        mask = causal_mask(x.shape[1], x.device)

    def returns(out: Tensor) -> tuple[Tensor, None]:
        return (out if module.batch_first else out.transpose(0, 1)), None

    return AttentionParts(q, k, v, mask, module.out_proj, returns)


def causal_mask(n: int, device: torch.device) -> Tensor:
    """Boolean (n, n) mask of the positions a causal token may not attend (those after it)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu_(1)


PartsFn = Callable[[nn.Module, tuple, dict], AttentionParts]
ATTENTION_PARTS: dict[type, PartsFn] = {nn.MultiheadAttention: _torch_mha}

# How the recorder may recompute a module instead of as the model does (``modes`` of record_attention).
MULTI_HEAD = "multi_head"  # as the model computes it
SINGLE_HEAD = "single_head"  # one head over the full width (the official Grad-ECLIP recomputation)
SELF_ONLY = "self"  # each token attends only to itself: its output is its projected value (MaskCLIP)
MODES = (MULTI_HEAD, SINGLE_HEAD, SELF_ONLY)


def register_attention(module_type: type, fn: PartsFn) -> None:
    """Teach the recorder a new attention module type (each backbone source registers its own)."""
    ATTENTION_PARTS[module_type] = fn


def attend(parts: AttentionParts, mode: str = MULTI_HEAD) -> AttentionRecord:
    """The attention of ``parts`` computed explicitly in ``mode``, as a record."""
    q, k, v = parts.q, parts.k, parts.v
    if mode == SINGLE_HEAD:
        q, k, v = (merge_heads(t).unsqueeze(1) for t in (q, k, v))
    if mode == SELF_ONLY:
        n = v.shape[-2]
        context, weights = v, torch.eye(n, dtype=v.dtype, device=v.device).expand(*v.shape[:2], n, n)
    else:
        context, weights = explicit_attention(q, k, v, parts.mask)
    output = parts.project(merge_heads(context))
    return AttentionRecord(q, k, v, weights, context, output, parts.project)


class record_attention:
    """Context manager: ``with record_attention(backbone) as records: backbone.encode_image(x)``.

    ``records`` is a list with one :class:`AttentionRecord` per attention module of the ``tower``
    ("image": :meth:`~clipbench.models.backbone.CLIPBackbone.vision_attention_modules`, "text":
    ``text_attention_modules``), in forward order; it is cleared at each ``__enter__``. ``modes`` maps
    module indices (negative ones count from the end) to a mode of :data:`MODES`; the others are
    recomputed as the model computes them. ``indices``: record only these modules (the others run
    their own, possibly fused, attention untouched); default all.
    """

    def __init__(
        self, backbone, tower: str = "image", modes: Mapping[int, str] | None = None, indices: Iterable[int] | None = None
    ) -> None:
        if tower not in ("image", "text"):
            raise ValueError(f"tower must be 'image' or 'text', not {tower!r}")
        modules = backbone.vision_attention_modules() if tower == "image" else backbone.text_attention_modules()
        kept = sorted({index % len(modules) for index in indices}) if indices is not None else range(len(modules))
        self.modules = [modules[index] for index in kept]
        self.modes = {modules[index % len(modules)]: mode for index, mode in (modes or {}).items()}
        bad = sorted(set(self.modes.values()) - set(MODES))
        if bad:
            raise ValueError(f"unknown attention modes {bad}; known: {MODES}")
        self.records: list[AttentionRecord] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, _output: object) -> object:
        parts_fn = ATTENTION_PARTS.get(type(module))
        if parts_fn is None:
            raise TypeError(f"no attention recompute registered for {type(module).__name__}")
        parts = parts_fn(module, args, kwargs)
        record = attend(parts, self.modes.get(module, MULTI_HEAD))
        self.records.append(record)
        return parts.returns(record.output)

    def __enter__(self) -> list[AttentionRecord]:
        self.records.clear()
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self.records

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
