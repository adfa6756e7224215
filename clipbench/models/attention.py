"""Record a ViT's attention internals (q, k, v, weights, output) with the autograd graph intact.

Fused attention kernels never materialise the attention weights, so gradients with respect to them
(Grad-ECLIP, attention rollout with gradients) are impossible without help. While
:class:`record_attention` is active, each vision attention module's output is *replaced* by an
explicit recomputation from its own weights: the returned output is numerically the module's output,
and the recorded weights are on the path from the input to the embedding, so ``autograd.grad`` of a
score with respect to ``record.weights`` is the true gradient.

Each library's attention module has its own parameter layout; one recompute function per module type
is registered in :data:`RECOMPUTE`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class AttentionRecord:
    """One attention module's internals for one forward pass. Shapes are batch-first:
    q, k, v (B, heads, N, head_dim); weights (B, heads, N, N); output (B, N, width)."""

    q: Tensor
    k: Tensor
    v: Tensor
    weights: Tensor
    output: Tensor


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


def _torch_mha(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple[object, AttentionRecord]:
    """nn.MultiheadAttention in self-attention use (open_clip and clipbench ViTs)."""
    x = args[0] if args else kwargs["query"]
    if not module.batch_first:
        x = x.transpose(0, 1)
    q, k, v = F.linear(x, module.in_proj_weight, module.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (split_heads(t, module.num_heads) for t in (q, k, v))
    context, weights = explicit_attention(q, k, v, kwargs.get("attn_mask"))
    out = module.out_proj(merge_heads(context))
    record = AttentionRecord(q, k, v, weights, out)
    returned = out if module.batch_first else out.transpose(0, 1)
    return (returned, None), record


RecomputeFn = Callable[[nn.Module, tuple, dict], tuple[object, AttentionRecord]]
RECOMPUTE: dict[type, RecomputeFn] = {nn.MultiheadAttention: _torch_mha}


def register_recompute(module_type: type, fn: RecomputeFn) -> None:
    """Teach the recorder a new attention module type (each backbone source registers its own)."""
    RECOMPUTE[module_type] = fn


class record_attention:
    """Context manager: ``with record_attention(backbone) as records: backbone.encode_image(x)``.

    ``records`` is a list with one :class:`AttentionRecord` per vision attention module, in forward
    order; it is cleared at each ``__enter__``.
    """

    def __init__(self, backbone) -> None:
        self.modules = backbone.vision_attention_modules()
        self.records: list[AttentionRecord] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, _output: object) -> object:
        recompute = RECOMPUTE.get(type(module))
        if recompute is None:
            raise TypeError(f"no attention recompute registered for {type(module).__name__}")
        returned, record = recompute(module, args, kwargs)
        self.records.append(record)
        return returned

    def __enter__(self) -> list[AttentionRecord]:
        self.records.clear()
        self._handles = [m.register_forward_hook(self._hook, with_kwargs=True) for m in self.modules]
        return self.records

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
