"""Unit tests of the contrastive loss, on-device batching and augmentation."""

import torch
import torch.nn.functional as F

from clipbench.data.device_batches import Augment, DeviceBatches
from clipbench.losses import clip_loss
from clipbench.models.backbone import ImageSpec


def _features(n=8, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1)


def test_clip_loss_is_symmetric_infonce():
    img, txt = _features()
    scale = torch.tensor(10.0)
    logits = scale * img @ txt.T
    by_hand = -(logits.log_softmax(1).diag().mean() + logits.log_softmax(0).diag().mean()) / 2
    assert torch.allclose(clip_loss(img, txt, scale), by_hand, atol=1e-6)


def test_distinct_labels_reduce_to_clip_loss():
    img, txt = _features()
    scale = torch.tensor(10.0)
    assert torch.allclose(clip_loss(img, txt, scale, torch.arange(8)), clip_loss(img, txt, scale), atol=1e-6)


def test_same_class_captions_are_positives_not_negatives():
    # Samples 0 and 1 share a class and have two different captions of it (two templates), each
    # image equally close to both: the label-aware loss is at its optimum (zero gradient), while
    # CLIP's loss pushes each image away from the other's equally correct caption.
    img = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]]), dim=-1).requires_grad_()
    txt = F.normalize(torch.tensor([[1.0, 0.2], [1.0, -0.2], [-1.0, 0.0]]), dim=-1)
    scale, labels = torch.tensor(20.0), torch.tensor([0, 0, 1])
    (grad_aware,) = torch.autograd.grad(clip_loss(img, txt, scale, labels), img)
    (grad_clip,) = torch.autograd.grad(clip_loss(img, txt, scale), img)
    assert grad_aware.abs().max() < 1e-6
    assert grad_clip.abs().max() > 1e-2


def _batches(world_size, rank, n=50, batch=4, shuffle=True, drop_last=True):
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous()
    spec = ImageSpec(size=2, mean=(0, 0, 0), std=(1 / 255, 1 / 255, 1 / 255))  # normalised value == index
    return DeviceBatches(
        images, torch.arange(n), batch, spec, shuffle=shuffle, drop_last=drop_last, rank=rank, world_size=world_size, seed=3
    )


def test_ranks_together_see_the_single_process_global_batches():
    single = [labels for _, labels in _batches(world_size=1, rank=0, batch=8)]
    ranks = [[labels for _, labels in _batches(world_size=2, rank=r, batch=4)] for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 50 // 8
    for whole, a, b in zip(single, *ranks):
        assert torch.equal(whole, torch.cat([a, b]))


def test_evaluation_counts_every_sample_exactly_once_across_ranks():
    seen = torch.cat([labels for r in range(3) for _, labels in _batches(3, r, n=50, batch=4, shuffle=False, drop_last=False)])
    assert sorted(seen.tolist()) == list(range(50))


def test_images_follow_their_labels_through_batching():
    for images, labels in _batches(world_size=1, rank=0):
        assert torch.allclose(images[:, 0, 0, 0], labels.float())


def test_augment_flips_some_samples_and_only_flips():
    x = torch.arange(64.0).view(1, 1, 8, 8).repeat(16, 3, 1, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(Augment(crop_padding=0, hflip=False)(x, g), x)
    flipped = Augment(crop_padding=0, hflip=True)(x, g)
    mirrored = [torch.equal(s, x[0].flip(-1)) for s in flipped]
    assert all(m or torch.equal(s, x[0]) for s, m in zip(flipped, mirrored, strict=True))
    assert 0 < sum(mirrored) < 16  # drawn per sample (crop offsets: tests/test_protocol.py)


def test_batch_transform_resamples_only_when_sizes_differ():
    spec = ImageSpec(size=6)
    images = torch.randint(0, 256, (2, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    # Random pixels: any resampling (even a same-size bicubic pass) would change some of them.
    assert torch.equal(spec.resize_batch(images), images.float() / 255)
    assert spec.batch_transform(images[..., :2, :2]).shape == (2, 3, 6, 6)


def test_normalisation_round_trips_to_pixels():
    spec = ImageSpec(size=4)
    pixels = torch.rand(2, 3, 4, 4)
    normalised = spec.normalize_batch(pixels)
    assert not torch.allclose(normalised, pixels)
    torch.testing.assert_close(spec.denormalize_batch(normalised), pixels)
