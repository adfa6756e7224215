"""Grad-ECLIP's image map computed as the official code does, one image at a time, on an open_clip ViT.

A transcription of ``clip_encode_dense`` and ``grad_eclip`` in Cyang-Zhao/Grad-Eclip's
``generate_emap.py`` (OpenAI CLIP modules there, open_clip's here: the same parameters): the image embedded
with the positional embedding bicubically resized to its grid, every block but the last run as the model
does, the last block recomputed by hand, the cosine with the text differentiated with respect to the
attention context, and map = ReLU(sum over channels of grad at the class token x value x min-max
normalised query-key cosine). Written without clipbench, as the independent reference of
``clipbench.explain.image.grad_eclip`` (tests) and the one-image-at-a-time baseline of its latency
(``benchmarks/explain_latency.py``).

``heads=1`` is the official recomputation (one head over the full width, the query-key cosine taken after
the output projection); ``heads=None`` keeps the model's heads and compares each head's own query and
keys, which is clipbench's default variant.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn


def dense_tokens(visual: VisionTransformer, image: Tensor) -> tuple[Tensor, tuple[int, int]]:
    """The tokens (1, N, width) entering the last block for one image (1, 3, H, W), and its patch grid."""
    x = visual.conv1(image)
    feah, feaw = x.shape[-2:]
    x = x.reshape(1, x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([visual.class_embedding.reshape(1, 1, -1).to(x), x], dim=1)
    tok_pos, img_pos = visual.positional_embedding[:1], visual.positional_embedding[1:]
    pos_h, pos_w = visual.grid_size
    img_pos = img_pos.reshape(1, pos_h, pos_w, -1).permute(0, 3, 1, 2)
    img_pos = F.interpolate(img_pos, size=(feah, feaw), mode="bicubic", align_corners=False)
    img_pos = img_pos.reshape(1, img_pos.shape[1], -1).permute(0, 2, 1)
    x = visual.ln_pre(x + torch.cat((tok_pos[None], img_pos), dim=1))
    if not visual.transformer.batch_first:
        x = x.transpose(0, 1)
    x = nn.Sequential(*visual.transformer.resblocks[:-1])(x)
    return (x if visual.transformer.batch_first else x.transpose(0, 1)), (feah, feaw)


def grad_eclip_map(visual: VisionTransformer, image: Tensor, text: Tensor, heads: int | None = 1) -> tuple[Tensor, Tensor]:
    """Grad-ECLIP on the last block for one image (1, 3, H, W) and one text embedding (D,): the map on
    the patch grid and the cosine it differentiates."""
    x_in, grid = dense_tokens(visual, image)
    block = visual.transformer.resblocks[-1]
    attn = block.attn
    heads = attn.num_heads if heads is None else heads
    q, k, v = F.linear(block.ln_1(x_in)[0], attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)  # (N, width)
    n, width = q.shape
    qh, kh, vh = (t.reshape(n, heads, width // heads).transpose(0, 1) for t in (q, k, v))  # (heads, N, d)
    weights = (qh @ kh.transpose(1, 2) * (width // heads) ** -0.5).softmax(-1)
    attn_output = weights @ vh  # (heads, N, d): what the gradient is taken with respect to
    x = x_in[0] + attn.out_proj(attn_output.transpose(0, 1).reshape(n, width))
    x = x + block.mlp(block.ln_2(x))
    embedding = visual.ln_post(x[:1]) @ visual.proj
    cosine = F.cosine_similarity(embedding, text[None], dim=-1)[0]
    (grad,) = torch.autograd.grad(cosine, attn_output)
    if heads == 1:  # the official code compares query and keys after the output projection
        q_cmp, k_cmp = attn.out_proj(q)[None], attn.out_proj(k)[None]
    else:
        q_cmp, k_cmp = qh, kh
    cosine_qk = (F.normalize(q_cmp[:, :1], dim=-1) * F.normalize(k_cmp[:, 1:], dim=-1)).sum(-1)  # (heads, patches)
    low, high = cosine_qk.amin(-1, keepdim=True), cosine_qk.amax(-1, keepdim=True)
    cosine_qk = (cosine_qk - low) / (high - low)
    emap = F.relu((grad[:, :1] * vh[:, 1:]).sum(-1).mul(cosine_qk).sum(0))
    return emap.detach().reshape(grid), cosine.detach()
