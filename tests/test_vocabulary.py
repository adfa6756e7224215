"""The compact vocabulary of the from-scratch text tower (clipbench.models.vocabulary): captions
tokenise as CLIP's tokenizer does (mapped to compact ids) and decode to the same text, unknown words
are spelled with vocabulary pieces, and a model trained with ``vocabulary: captions`` checkpoints,
reloads and resumes with the same compact shapes."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import compose_config
from open_clip.tokenizer import SimpleTokenizer

from clipbench.data.datamodule import CLIPDataModule
from clipbench.data.pairs import PairsDataModule
from clipbench.data.templates import TEMPLATE_SETS, captions, resolve_templates
from clipbench.models.checkpoint import load_clipbench
from clipbench.models.scratch import ScratchCLIP, UnresolvedVocabulary
from clipbench.models.towers import cifar_resnet
from clipbench.models.vocabulary import BASE_PIECES, CompactTokenizer, vocabulary_ids
from clipbench.modules.contrastive import CLIPTrainingModule
from clipbench.training import build_module

CONTEXT = 32
CLASS_NAMES = {  # as the datamodules name them: torchvision's CIFAR-10 classes, clipbench's digits
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "digits": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
}
TINY = [
    "model.backbone.embed_dim=32",
    "model.backbone.text_width=32",
    "model.backbone.text_layers=1",
    "model.backbone.image_tower.widths=[16,32,32]",
]


@pytest.fixture(scope="module")
def full() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=CONTEXT)


def every_caption(dataset: str) -> list[str]:
    """Every caption the named template sets and the dataset's own shipped prompts make of its classes."""
    sets = [*TEMPLATE_SETS.values(), resolve_templates("dataset", dataset)]
    return [text for templates in sets for row in captions(templates, CLASS_NAMES[dataset]) for text in row]


def as_bpe(tokenizer: CompactTokenizer, tokens: torch.Tensor) -> torch.Tensor:
    return torch.tensor(tokenizer.bpe_ids)[tokens]


@pytest.mark.parametrize("dataset", sorted(CLASS_NAMES))
def test_every_template_caption_tokenises_as_clip_and_round_trips(dataset, full):
    texts = every_caption(dataset)
    compact = CompactTokenizer(vocabulary_ids(texts), CONTEXT)
    tokens, reference = compact(texts), full(texts)
    assert torch.equal(as_bpe(compact, tokens), reference)  # same tokens, padding and end, mapped to compact ids
    for row, expected in zip(tokens, reference):  # padding (0) left out
        assert compact.decode(row[row != 0].tolist()) == full.decode(expected[expected != 0].tolist())
    # The vocabulary a default training run resolves (the train templates) still spells every other template's captions.
    trained = CompactTokenizer(vocabulary_ids(every_caption(dataset)[: 5 * 10]), CONTEXT)
    assert trained.vocab_size < compact.vocab_size
    for text in texts:
        assert trained.decode(trained.encode(text)) == full.decode(full.encode(text))


def test_the_vocabulary_keeps_padding_first_and_end_of_text_last(full):
    ids = vocabulary_ids(["a photo of a cat."])
    assert ids[:BASE_PIECES] == list(range(BASE_PIECES)) and ids[-2:] == [full.sot_token_id, full.eot_token_id]
    compact = CompactTokenizer(ids, CONTEXT)
    assert compact.decoder[0] == full.decoder[0] == "!" and compact.eot_token_id == len(ids) - 1
    assert compact.encoder["cat</w>"] == ids.index(full.encoder["cat</w>"])


def test_an_unknown_word_is_spelled_with_the_longest_vocabulary_pieces(full):
    compact = CompactTokenizer(vocabulary_ids(captions(["a photo of a {}."], ["birdhouse"])[0]), CONTEXT)
    # "ahouse" is one BPE token outside the vocabulary: "a" (a byte piece), then "house</w>" (a caption's).
    assert [full.decoder[i] for i in full.encode("ahouse")] == ["ahouse</w>"]
    text = "a photo of ahouse next to a xylophone."
    pieces = [compact.decoder[i] for i in compact.encode(text)]
    assert pieces[3:5] == ["a", "house</w>"] and pieces[-2:] == ["e</w>", ".</w>"]
    assert "".join(pieces) == "".join(full.decoder[i] for i in full.encode(text))
    assert compact.decode(compact.encode(text)) == full.decode(full.encode(text)) == "a photo of ahouse next to a xylophone . "
    assert compact.decode(compact.encode("Zürich 2024, café ☕")) == full.decode(full.encode("Zürich 2024, café ☕"))


def test_a_compact_model_embeds_its_vocabulary_pools_at_end_of_text_and_flags_truncation(full):
    texts = captions(TEMPLATE_SETS["train"], CLASS_NAMES["cifar10"])
    ids = vocabulary_ids(t for row in texts for t in row)
    torch.manual_seed(0)
    model = ScratchCLIP(
        cifar_resnet(32, widths=(8, 16, 16)), embed_dim=32, text_width=32, text_heads=2, text_layers=1, vocabulary=ids
    ).eval()
    assert model.text.token_embedding.num_embeddings == len(ids)
    custom = ["a photo of a cat.", "a xylophone, a zeppelin and a quokka."]
    tokens = model.tokenize(custom)
    eot = (tokens == len(ids) - 1).int().argmax(dim=-1)
    assert torch.equal(model.text_pool_positions(tokens), eot) and eot[1] > (full(custom[1])[0] == full.eot_token_id).int().argmax()
    assert model.token_strings(tokens[0, :4].tolist()) == ["<start_of_text>", "a</w>", "photo</w>", "of</w>"]
    with torch.no_grad():
        pooled = model.encode_text(tokens)
        model.text.pool_type, model.text.eos_id = "eos", len(ids) - 1  # read where the end token is, by its id
        torch.testing.assert_close(model.encode_text(tokens), pooled, rtol=0, atol=0)
    # Spelled letter by letter, unknown words need more positions than CLIP's own tokens.
    long = "a quokka, a zeppelin, a xylophone and a kookaburra near a photo of a cat."
    assert len(full.encode(long)) + 2 <= CONTEXT < len(model._tokenizer.encode(long)) + 2
    assert model.truncates([long, custom[0]]) == [True, False]
    assert model.tokenize([long])[0, -1] == len(ids) - 1  # cut as open_clip cuts: the end token kept last


def test_an_unresolved_or_wrong_vocabulary_says_what_to_set():
    tower = cifar_resnet(32, widths=(8, 16, 16))
    unresolved = ScratchCLIP(tower, embed_dim=32, text_width=32, text_heads=2, text_layers=1, vocabulary="captions")
    with pytest.raises(UnresolvedVocabulary, match=r"model\.backbone\.vocabulary"):
        unresolved.tokenize(["a cat"])
    assert not hasattr(unresolved, "text")
    with pytest.raises(ValueError, match=r"model\.backbone\.vocabulary must be null"):
        ScratchCLIP(tower, vocabulary="full")
    with pytest.raises(ValueError, match=r"model\.backbone\.vocabulary: .*missing \[0, 1, 2"):
        ScratchCLIP(tower, vocabulary=[320, 49406, 49407])


def test_the_tower_resolved_later_is_drawn_when_the_model_is_built():
    """DDP re-seeds every rank between building the model and ``setup``; one process does not. The
    text tower built at resolution must not depend on the global generator's state then."""
    towers = []
    for seed_at_setup in (1, 2):
        torch.manual_seed(0)
        model = ScratchCLIP(
            cifar_resnet(32, widths=(8, 16, 16)), embed_dim=32, text_width=32, text_heads=2, text_layers=1, vocabulary="captions"
        )
        torch.manual_seed(seed_at_setup)
        next_draw = torch.rand(())
        torch.manual_seed(seed_at_setup)  # a DDP rank's re-seeding
        model.resolve_vocabulary(["a photo of a cat."])
        assert torch.rand(()) == next_draw  # and the global stream goes on as if nothing was drawn
        towers.append(model.text.state_dict())
    for name, value in towers[0].items():
        assert torch.equal(towers[1][name], value), name


def test_a_checkpoint_without_a_vocabulary_loads_the_full_one(tmp_path):
    """Checkpoints written before the compact vocabulary existed carry no ``vocabulary`` key."""
    config = {"_target_": "clipbench.models.scratch.ScratchCLIP", "embed_dim": 32, "text_width": 32, "text_heads": 2, "text_layers": 1}
    config["image_tower"] = {"_target_": "clipbench.models.towers.cifar_resnet", "embed_dim": 32, "widths": [8, 16, 16]}
    model = ScratchCLIP(cifar_resnet(32, widths=(8, 16, 16)), embed_dim=32, text_width=32, text_heads=2, text_layers=1)
    state = {f"backbone.{k}": v for k, v in model.state_dict().items()}
    torch.save({"hyper_parameters": {"backbone": config}, "state_dict": state}, tmp_path / "old.ckpt")
    loaded = load_clipbench(tmp_path / "old.ckpt")
    assert loaded.text.token_embedding.num_embeddings == 49408 and torch.equal(
        loaded.tokenize(["a cat"]), SimpleTokenizer(context_length=32)(["a cat"])
    )


def _fit(module: CLIPTrainingModule, steps: int, ckpt_path=None) -> L.Trainer:
    datamodule = CLIPDataModule("digits", module.backbone.image_spec, batch_size=64, val_fraction=0.0)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_a_captions_model_trains_saves_reloads_and_resumes_with_its_compact_vocabulary(tmp_path, cache_dir):
    cfg = compose_config("train", ["experiment=quickstart", *TINY], tmp_path, cache_dir)
    assert cfg.model.backbone.vocabulary == "captions"
    L.seed_everything(0)
    module = build_module(cfg.model)
    trainer = _fit(module, steps=2)
    ids = module.hparams.backbone["vocabulary"]
    protocol = resolve_templates("dataset", dataset="digits")  # evaluate.py's default templates
    texts = [
        t
        for templates in (module.train_templates, module.eval_templates, protocol)
        for row in captions(templates, module.class_names)
        for t in row
    ]
    assert ids == module.backbone.vocabulary == vocabulary_ids(texts) and len(ids) < 600
    embedding = module.backbone.text.token_embedding.weight
    assert len(embedding) == len(ids) and any(p is embedding for group in trainer.optimizers[0].param_groups for p in group["params"])
    trainer.save_checkpoint(tmp_path / "model.ckpt")

    probe = module.backbone.tokenize(["a photo of a seven.", "a picture of an unseen zeppelin."])
    with torch.no_grad():
        trained = module.backbone.eval().encode_text(probe)
        for loaded in (
            load_clipbench(tmp_path / "model.ckpt"),
            CLIPTrainingModule.load_from_checkpoint(tmp_path / "model.ckpt", weights_only=True).backbone.eval(),
        ):
            assert loaded.vocabulary == ids and torch.equal(
                loaded.tokenize(["a photo of a seven.", "a picture of an unseen zeppelin."]), probe
            )
            torch.testing.assert_close(loaded.encode_text(probe), trained, rtol=0, atol=0)

    resumed = build_module(cfg.model)  # vocabulary: captions again, resolved to the same ids before the weights load
    assert _fit(resumed, steps=3, ckpt_path=tmp_path / "model.ckpt").global_step == 3
    assert resumed.backbone.vocabulary == ids


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")  # pairs alone
def test_captions_vocabulary_on_image_caption_pairs_fails_at_setup_naming_the_key(tmp_path, cache_dir):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "pairs.csv").write_text(f"id,image,caption\na,{tmp_path / 'a.png'},a photo of a cat\n")
    module = build_module(compose_config("train", ["experiment=quickstart", *TINY], tmp_path, cache_dir).model)
    datamodule = PairsDataModule(
        str(tmp_path / "pairs.csv"), module.backbone.image_spec, tokenize=module.backbone.tokenize, batch_size=1, num_workers=0
    )
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    with pytest.raises(ValueError, match=r"image-caption pairs: set model\.backbone\.vocabulary=null"):
        trainer.fit(module, datamodule=datamodule)
