"""Tiny random Hugging Face CLIP and SigLIP models, saved with ``save_pretrained`` the way a user saves
one, so every test loads them through the real ``from_pretrained`` path (no hub here)."""

from __future__ import annotations

from pathlib import Path

import torch
from open_clip.tokenizer import SimpleTokenizer
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
SIGLIP_WORDS = ["<pad>", "</s>", "<unk>", "▁a", "▁photo", "▁of", "▁cat", "▁dog"]


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE tokenizer built from the vocabulary bundled with open_clip (no download)."""
    simple = SimpleTokenizer()
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(token, token): index for token, index in simple.encoder.items()}
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def siglip_tokenizer() -> PreTrainedTokenizerFast:
    """A stand-in for SigLIP's SentencePiece tokenizer (``sentencepiece`` is not installed here): a
    word-level ``tokenizers`` model with the same conventions (lower case, "▁" word prefix, "</s>"
    appended, "</s>" as padding)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SIGLIP_WORDS)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>", unk_token="<unk>")


def save_tiny_clip(path: Path, patch_size: int = 16) -> str:
    """A 2-layer CLIP on 32 px images (patch 16: a 2x2 grid; patch 8: 4x4), embed 16."""
    vision = dict(TOWER, image_size=32, patch_size=patch_size)
    config = CLIPConfig(text_config=dict(TOWER, vocab_size=49408), vision_config=vision, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    clip_tokenizer().save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)


def save_tiny_siglip(path: Path) -> str:
    """A 2-layer SigLIP on 32 px images, its logit bias and scale moved off their initial values so a
    test notices either one missing."""
    special = dict(pad_token_id=1, eos_token_id=1, bos_token_id=None)  # "</s>", as in the tokenizer
    text = dict(TOWER, vocab_size=len(SIGLIP_WORDS), max_position_embeddings=64, **special)
    torch.manual_seed(0)
    model = SiglipModel(SiglipConfig(text_config=text, vision_config=dict(TOWER, image_size=32, patch_size=16)))
    with torch.no_grad():
        model.logit_bias.fill_(-1.7)
        model.logit_scale.fill_(1.3)
    model.save_pretrained(path)
    siglip_tokenizer().save_pretrained(path)
    SiglipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return str(path)
