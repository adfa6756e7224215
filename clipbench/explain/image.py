"""Image heatmaps: why does an image match a text? One function per method, all on the backbone
interface (attention recording, dense encoding, the vision blocks and the per-token head).

Every function takes ``(backbone, images, targets, **options)`` and returns (B, h, w) maps on the patch
grid (attention methods) or the pixel grid (Grad-CAM, RISE). The score explained is the cosine between
the model's L2-normalised image embedding and the target text embedding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM
from torch import Tensor, nn

from clipbench.explain.base import Targets, cosine, grad_from, grid_of, minmax, on_grid, tap, with_graph
from clipbench.models.attention import SELF_ONLY, SINGLE_HEAD, AttentionRecord, explicit_attention, merge_heads, record_attention
from clipbench.models.backbone import CLIPBackbone

OURS, OFFICIAL = "ours", "official"
VARIANTS = (OURS, OFFICIAL)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; choose one of {VARIANTS}")


def query_key_similarity(record: AttentionRecord, query: int | Tensor, variant: str) -> tuple[Tensor, Tensor]:
    """Grad-ECLIP's spatial weights: the cosine between the query at position ``query`` ((B,) positions
    or one index) and every key, (B, heads, N), and the values (B, heads, N, head_dim).

    ``ours`` compares each head's query and keys (the model's multi-head attention). ``official`` (a
    single-head recomputation) compares them after the module's output projection, as the official
    code does."""
    q, k = record.q, record.k
    if variant == OFFICIAL:
        q, k = (record.project(merge_heads(t)).unsqueeze(1) for t in (q, k))
    rows = torch.arange(q.shape[0], device=q.device)
    positions = query if isinstance(query, Tensor) else torch.full_like(rows, query)
    q_at = q[rows, :, positions]  # (B, heads, d)
    similarity = (F.normalize(q_at, dim=-1).unsqueeze(2) * F.normalize(k, dim=-1)).sum(-1)
    return similarity, record.v


def grad_eclip_target(
    backbone: CLIPBackbone, images: Tensor, targets: Targets, layers: int, variant: str
) -> tuple[Tensor, list[AttentionRecord]]:
    """The score Grad-ECLIP differentiates (B,) and the records of the ``layers`` blocks it explains.

    ``ours``: the cosine the unmodified model reports. ``official``: those blocks recomputed as one head."""
    check_variant(variant)
    depth = len(backbone.vision_blocks())
    if not 1 <= layers <= depth:
        raise ValueError(f"grad_eclip layers={layers} is invalid: this model has {depth} vision blocks to explain (1 to {depth})")
    chosen = range(-layers, 0)
    modes = {index: SINGLE_HEAD for index in chosen} if variant == OFFICIAL else None
    with record_attention(backbone, modes=modes, indices=chosen) as records, grad_from(backbone.vision_blocks()[-layers]):
        score = cosine(backbone.encode_image_dense(images), targets.text)
    return score, records


def grad_eclip(backbone: CLIPBackbone, images: Tensor, targets: Targets, *, layers: int = 1, variant: str = OURS) -> Tensor:
    """Grad-ECLIP (Zhao et al., ICML 2024) on the last ``layers`` vision blocks.

    Channel weights: the gradient of the image-text cosine with respect to the attention context at the
    class token. Spatial weights: the query-key cosine between the class token and each patch, min-max
    normalised over the patches. Per block, map = ReLU(sum over channels of channel weight x patch value
    x spatial weight); blocks summed.

    ``ours`` runs the unmodified multi-head model, so the gradient is that of the cosine the model
    itself reports; each head's channels are weighted by that head's query-key cosine. ``official``
    recomputes the chosen blocks as one head over the full width (as the official code does for the
    last block): its target is the cosine of that modified model.
    """
    grid, prefix = grid_of(backbone, images), backbone.prefix_tokens
    score, picked = grad_eclip_target(backbone, images, targets, layers, variant)
    grads = torch.autograd.grad(score.sum(), [record.context for record in picked])
    total = 0
    for record, grad in zip(picked, grads):
        similarity, values = query_key_similarity(record, 0, variant)
        spatial = minmax(similarity[..., prefix:])  # (B, heads, patches)
        channel = grad[:, :, 0].unsqueeze(2)  # (B, heads, 1, d): at the class token
        total = total + F.relu(((channel * values[:, :, prefix:]).sum(-1) * spatial).sum(1))
    return on_grid(total, grid)


def grad_attn(backbone: CLIPBackbone, images: Tensor, targets: Targets) -> Tensor:
    """The project description's formulation: L = -log s with s = (1 + cosine) / 2 (the score mapped
    into (0, 1] so that the log exists); map = sum over layers and heads of |dL/dA| * A, the class
    token's row over the patches."""
    grid, prefix = grid_of(backbone, images), backbone.prefix_tokens
    with record_attention(backbone) as records:
        score = cosine(backbone.encode_image_dense(with_graph(images)), targets.text)
    loss = -torch.log((1 + score) / 2).sum()
    grads = torch.autograd.grad(loss, [record.weights for record in records])
    total = sum((grad.abs() * record.weights)[:, :, 0, prefix:].sum(1) for record, grad in zip(records, grads))
    return on_grid(total, grid)


class _Similarity(nn.Module):
    """An image batch -> each image's cosine with its own target text: the model pytorch-grad-cam sees."""

    def __init__(self, backbone: CLIPBackbone, text: Tensor) -> None:
        super().__init__()
        self.backbone, self.text = backbone, text

    def forward(self, images: Tensor) -> Tensor:
        return cosine(self.backbone.encode_image_dense(images), self.text)


def gradcam(backbone: CLIPBackbone, images: Tensor, targets: Targets) -> Tensor:
    """Grad-CAM (Selvaraju et al.) on the tokens entering the last vision block, by pytorch-grad-cam:
    channel weights are the gradient averaged over the patch tokens, map = ReLU(weighted sum of
    channels), upsampled to the pixel grid and min-max scaled per image (pytorch-grad-cam's output)."""
    blocks = backbone.vision_blocks()
    if len(blocks) < 2:
        raise ValueError("gradcam reads the tokens entering the last block: it needs at least two vision blocks")
    grid, prefix = grid_of(backbone, images), backbone.prefix_tokens

    def to_channels_first(tokens: Tensor) -> Tensor:  # (B, N, C) tokens -> (B, C, h, w) patches
        return tokens[:, prefix:].reshape(tokens.shape[0], *grid, -1).permute(0, 3, 1, 2)

    model = _Similarity(backbone, targets.text)
    with GradCAM(model, target_layers=[blocks[-2]], reshape_transform=to_channels_first) as cam:
        maps = cam(with_graph(images), targets=[lambda score: score] * len(images))
    backbone.zero_grad(set_to_none=True)  # pytorch-grad-cam calls backward(): drop the parameter grads
    return torch.from_numpy(np.asarray(maps, dtype=np.float32))


@torch.no_grad()
def raw_attention(backbone: CLIPBackbone, images: Tensor, targets: Targets) -> Tensor:
    """The class token's attention over the patches in the last block, averaged over heads (text-blind)."""
    grid, prefix = grid_of(backbone, images), backbone.prefix_tokens
    with record_attention(backbone) as records:
        backbone.encode_image_dense(images)
    return on_grid(records[-1].weights.mean(1)[:, 0, prefix:], grid)


@torch.no_grad()
def rollout(backbone: CLIPBackbone, images: Tensor, targets: Targets) -> Tensor:
    """Attention rollout (Abnar & Zuidema 2020) over all layers: head-averaged attention plus the
    residual identity, rows renormalised, multiplied from the first layer up (text-blind)."""
    grid, prefix = grid_of(backbone, images), backbone.prefix_tokens
    with record_attention(backbone) as records:
        backbone.encode_image_dense(images)
    joint = None
    for record in records:
        attention = record.weights.mean(1)
        attention = attention + torch.eye(attention.shape[-1], device=attention.device)
        attention = attention / attention.sum(-1, keepdim=True)
        joint = attention if joint is None else attention @ joint
    return on_grid(joint[:, 0, prefix:], grid)


def game(backbone: CLIPBackbone, images: Tensor, targets: Targets, *, start_layer: int = -1) -> Tensor:
    """GAME (Chefer et al., ICCV 2021): R <- R + mean over heads of clamp(grad x attention, min 0) @ R,
    from ``start_layer`` (negative: counted from the end; -1: the last layer only) to the last. As in
    GAME, the gradient is that of the logit (the scaled cosine): over several layers the identity's
    weight against the gradient terms depends on that scale."""
    grid, prefix = grid_of(backbone, images), backbone.prefix_tokens
    with record_attention(backbone) as records:
        score = cosine(backbone.encode_image_dense(with_graph(images)), targets.text) * backbone.similarity_scale().detach()
    picked = records[start_layer % len(records) :]
    grads = torch.autograd.grad(score.sum(), [record.weights for record in picked])
    n = records[0].weights.shape[-1]
    relevance = torch.eye(n, device=images.device).expand(len(images), n, n)
    for record, grad in zip(picked, grads):
        cam = (grad * record.weights).clamp(min=0).mean(1)
        relevance = relevance + cam @ relevance
    return on_grid(relevance[:, 0, prefix:], grid)


def _unit(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


@torch.no_grad()
def maskclip(backbone: CLIPBackbone, images: Tensor, targets: Targets) -> Tensor:
    """MaskCLIP (Zhou et al., ECCV 2022): in the last block each patch attends only to itself, so its
    value goes through the output projection, the residual and the MLP, then the final norm and the
    visual projection; map = cosine of each patch's embedding with the text."""
    grid, prefix = grid_of(backbone, images), backbone.prefix_tokens
    with record_attention(backbone, modes={-1: SELF_ONLY}), tap(backbone.vision_blocks()[-1]) as last:
        backbone.encode_image_dense(images)
    patches = backbone.vision_token_embeddings(last["x"])[:, prefix:]
    return on_grid((_unit(patches) @ _unit(targets.text).unsqueeze(-1)).squeeze(-1), grid)


def _value_value_path(records: list[AttentionRecord], start: Tensor) -> Tensor:
    """CLIP Surgery's architecture surgery: a second path that starts from the tokens entering the
    first surgery block and adds each block's value-value self-attention (its output projection
    applied, no MLP); the attention inputs come from the original path."""
    tokens = start
    for record in records:
        context, _ = explicit_attention(record.v, record.v, record.v)
        tokens = tokens + record.project(merge_heads(context))
    return tokens


@torch.no_grad()
def surgery(backbone: CLIPBackbone, images: Tensor, targets: Targets, *, architecture: bool = True, depth: int = 6) -> Tensor:
    """CLIP Surgery (Li et al., 2023). Feature surgery: each patch's similarity to the target text minus
    the mean over the prompt set of its (softmax-weighted) similarities to every prompt, which removes
    what all prompts share. ``architecture``: patch features come from the value-value attention path
    over the last ``depth`` blocks; otherwise from the last block's output tokens."""
    if targets.prompts is None or targets.index is None:
        raise ValueError("surgery contrasts the text with a prompt set: targets.prompts and targets.index are needed")
    grid, prefix = grid_of(backbone, images), backbone.prefix_tokens
    blocks = backbone.vision_blocks()
    depth = min(depth, len(blocks))
    with record_attention(backbone) as records, tap(blocks[-depth], "input") as start, tap(blocks[-1]) as last:
        image = _unit(backbone.encode_image_dense(images))
    tokens = _value_value_path(records[-depth:], start["x"]) if architecture else last["x"]
    patches = _unit(backbone.vision_token_embeddings(tokens)[:, prefix:])  # (B, patches, D)
    prompts = _unit(targets.prompts)
    weights = (2 * image @ prompts.T).softmax(-1)  # restrains prompts the whole image already matches
    weights = weights / weights.mean(-1, keepdim=True)  # (B, T)
    rows = torch.arange(len(images), device=images.device)
    target = weights[rows, targets.index].unsqueeze(-1) * prompts[targets.index]  # (B, D)
    redundant = weights @ prompts / prompts.shape[0]  # (B, D): mean over the prompt set
    return on_grid((patches @ (target - redundant).unsqueeze(-1)).squeeze(-1), grid)


def m2ib(
    backbone: CLIPBackbone,
    images: Tensor,
    targets: Targets,
    *,
    layer: int | None = None,
    beta: float = 0.1,
    steps: int = 10,
    lr: float = 1.0,
    samples: int = 10,
) -> Tensor:
    """M2IB (Wang et al., NeurIPS 2023): an information bottleneck on the tokens leaving vision block
    ``layer`` (default: three quarters of the depth, 9 of 12 as in M2IB). Each token channel is kept
    with weight lambda = sigmoid(alpha) and replaced by (1 - lambda) Gaussian noise; alpha is fitted
    with Adam for ``steps`` on ``samples`` noise draws per image to keep the image-text cosine while
    minimising the KL to N(0, 1); map = that KL summed over channels, per patch."""
    grid, prefix = grid_of(backbone, images), backbone.prefix_tokens
    blocks = backbone.vision_blocks()
    layer = int(0.75 * len(blocks)) if layer is None else layer
    block = blocks[min(layer, len(blocks) - 1)]
    with torch.no_grad(), tap(block) as clean:
        backbone.encode_image_dense(images)
    alpha = torch.full(clean["x"].shape, 5.0, device=images.device, requires_grad=True)
    optimizer = torch.optim.Adam([alpha], lr=lr)
    noisy_images = images.repeat_interleave(samples, 0)
    text = targets.text.repeat_interleave(samples, 0)
    state: dict = {}

    def bottleneck(tokens: Tensor) -> Tensor:
        keep = torch.sigmoid(alpha).repeat_interleave(samples, 0)
        mean, std = tokens * keep, 1 - keep
        variance = std.pow(2).clamp_min(1e-12)  # a saturated sigmoid would give log(0)
        state["kl"] = -0.5 * (1 + torch.log(variance) - mean**2 - variance)  # KL(N(mean, var) || N(0, 1))
        return mean + std * torch.randn_like(mean)

    with tap(block, replace=bottleneck):
        for _ in range(steps):
            fit = cosine(backbone.encode_image_dense(noisy_images), text).mean()
            loss = beta * state["kl"].mean() - fit
            (alpha.grad,) = torch.autograd.grad(loss, [alpha])
            optimizer.step()
    kl = state["kl"].detach().view(len(images), samples, *clean["x"].shape[1:]).mean(1)
    return on_grid(torch.nan_to_num(kl).sum(-1)[:, prefix:], grid)


def rise_masks(count: int, size: tuple[int, int], cells: int, p: float, generator: torch.Generator, device) -> Tensor:
    """RISE's random masks (count, 1, H, W): a cells x cells Bernoulli(p) grid, bilinearly upsampled to
    (cells + 1) cell sizes and randomly shifted by up to one cell, so the mask edges vary smoothly."""
    cell = (math.ceil(size[0] / cells), math.ceil(size[1] / cells))
    grid = (torch.rand(count, 1, cells, cells, generator=generator) < p).float()
    upsampled = F.interpolate(grid, size=((cells + 1) * cell[0], (cells + 1) * cell[1]), mode="bilinear", align_corners=False)
    shifts = torch.stack([torch.randint(0, c, (count,), generator=generator) for c in cell], dim=1).tolist()
    masks = torch.stack([m[:, dy : dy + size[0], dx : dx + size[1]] for m, (dy, dx) in zip(upsampled, shifts)])
    return masks.to(device)


@torch.no_grad()
def rise(
    backbone: CLIPBackbone,
    images: Tensor,
    targets: Targets,
    *,
    masks: int = 2000,
    cells: int = 8,
    p: float = 0.5,
    batch_size: int = 256,
    seed: int = 0,
) -> Tensor:
    """RISE (Petsiuk et al., 2018), no gradients, any backbone: the image is multiplied by ``masks``
    random smooth masks (0 in normalised space: the mean colour); map = the average of the masks
    weighted by the masked image's cosine with the text, / p."""
    generator = torch.Generator().manual_seed(seed)
    mask_set = rise_masks(masks, tuple(images.shape[-2:]), cells, p, generator, images.device)
    text = _unit(targets.text)
    saliency = torch.zeros(len(images), *images.shape[-2:], device=images.device)
    per_pass = max(1, batch_size // len(images))  # masks per forward pass, for all images at once
    for start in range(0, masks, per_pass):
        chunk = mask_set[start : start + per_pass]  # (m, 1, H, W)
        masked = (images.unsqueeze(1) * chunk.unsqueeze(0)).flatten(0, 1)  # (B*m, 3, H, W)
        scores = _unit(backbone.encode_image_dense(masked)).view(len(images), len(chunk), -1) @ text.unsqueeze(-1)
        saliency += (scores.squeeze(-1)[:, :, None, None] * chunk[:, 0].unsqueeze(0)).sum(1)
    return saliency / (masks * p)


def random_map(backbone: CLIPBackbone, images: Tensor, targets: Targets, *, seed: int = 0) -> Tensor:
    """The baseline every explanation must beat: uniform noise on the patch grid (8 x 8 cells for towers
    without one), seeded."""
    try:
        grid = grid_of(backbone, images)
    except NotImplementedError:
        grid = (8, 8)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(len(images), *grid, generator=generator)
