"""The scoring path's fast preprocessing gives what the slow one gave: JPEGs decoded by torchvision equal
PIL's pixels (and a bad JPEG keeps PIL's reason), Hugging Face tokenizers called through their Rust
backend equal the tokenizer's own call, and trimmed caption padding leaves the text embedding as it was."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipbench.data.image_loading import SMALL_JPEG, BadRow, Reason, decode, decode_all, decode_pixels, jpeg_pixels
from clipbench.models.hf import HFCLIP, HFSigLIP

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
CAPTIONS = ["a photo of a cat", "", "  spaced   out  ", "Ünïcödé café 東京 🐱", "A" * 300, " ".join(["word"] * 100), "it's a dog's life!"]


def _jpeg(mode: str, size: tuple[int, int] = (45, 31), **save) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, "JPEG", **save)
    return buffer.getvalue()


def _pil_pixels(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(decode(data))).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_jpegs_decode_to_pils_pixels(mode):
    for data in (_jpeg(mode), _jpeg(mode, quality=60, subsampling=2), _jpeg(mode, progressive=True)):
        assert jpeg_pixels(data) == 45 * 31
        assert torch.equal(decode_pixels(data), _pil_pixels(data))
    files = sorted((CIFAR10 / "test").glob("*/*.jpg"))[::1000]
    for path in files:  # real files, when the shared data is there
        data = path.read_bytes()
        assert torch.equal(decode_pixels(data), _pil_pixels(data))


def test_other_formats_and_bad_jpegs_keep_pils_pixels_and_reasons(monkeypatch):
    buffer = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(buffer, "PNG")
    assert torch.equal(decode_pixels(buffer.getvalue()), _pil_pixels(buffer.getvalue()))
    data = _jpeg("RGB")
    for bad, reason in ((data[: len(data) // 2], Reason.TRUNCATED), (data[:3] + b"\0" * 50, Reason.UNREADABLE)):
        with pytest.raises(BadRow) as caught:
            decode_pixels(bad)
        assert caught.value.reason == reason
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 45x31 is then over twice PIL's bomb limit
    with pytest.raises(BadRow) as caught:
        decode_pixels(data)
    assert caught.value.reason == Reason.TOO_LARGE


def test_a_batch_decodes_as_each_image_alone_bad_ones_included():
    good, png = _jpeg("RGB"), io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(png, "PNG")
    large = _jpeg("RGB", size=(300, 250))  # over SMALL_JPEG: decoded on its own
    assert jpeg_pixels(large) > SMALL_JPEG
    for batch in (
        [good, large, png.getvalue(), _jpeg("L")],
        [good, good[:-40], png.getvalue(), large],
    ):  # the second fails libjpeg's batch call
        out = list(decode_all([(data, f"image {i}") for i, data in enumerate(batch)]))
        assert len(out) == len(batch)
        for data, decoded in zip(batch, out):
            if data == good[:-40]:
                assert isinstance(decoded, BadRow) and decoded.reason == Reason.TRUNCATED
            else:
                assert torch.equal(decoded, _pil_pixels(data))


@pytest.mark.parametrize("source", [HFCLIP, HFSigLIP])
def test_rust_tokenizer_path_equals_the_tokenizers_own_call(source, hf_clip_dir, hf_siglip_dir):
    backbone = source(hf_clip_dir if source is HFCLIP else hf_siglip_dir)
    assert backbone._encoder is not None  # the fast path is the one under test
    reference = backbone._tokenizer(
        CAPTIONS, padding="max_length", max_length=backbone.context_length, truncation=True, return_tensors="pt"
    )
    assert torch.equal(backbone.tokenize(CAPTIONS), reference.input_ids)
    assert backbone.tokenize([]).shape == (0, backbone.context_length)
    # the flags of the one-pass call equal the length check's, at the context's edge too
    lengths = [len(ids) for ids in backbone._tokenizer(["cat " * n for n in range(1, 90)], truncation=False)["input_ids"]]
    edge = ["cat " * n for n, length in zip(range(1, 90), lengths) if abs(length - backbone.context_length) <= 1]
    tokens, flags = backbone.tokenize_flagged(CAPTIONS + edge)
    assert torch.equal(tokens, backbone.tokenize(CAPTIONS + edge))
    assert flags == backbone.truncates(CAPTIONS + edge) and True in flags and False in flags[len(CAPTIONS) :]


def test_trimmed_padding_leaves_text_embeddings_unchanged(hf_clip_dir, hf_siglip_dir):
    clip, siglip = HFCLIP(hf_clip_dir).eval(), HFSigLIP(hf_siglip_dir).eval()
    short = [c for c in CAPTIONS if len(c) < 40]
    tokens = clip.tokenize(short)
    trimmed = clip.trim_text_padding(tokens)
    assert trimmed.shape[1] == int(clip.text_pool_positions(tokens).max()) + 1 < tokens.shape[1]
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(trimmed), clip.encode_text(tokens), atol=1e-5, rtol=0)
    tokens = siglip.tokenize(short)  # SigLIP pools the last position: its padding stays
    assert torch.equal(siglip.trim_text_padding(tokens), tokens)
