"""Synthetic captions: web-style captions at any size (benchmarks, tests), and captions for the images
of a class-folder tree such as CIFAR-10 (the misalignment study's real run).

**Web-style captions** (:func:`synthetic_captions`).

Captions imitate the statistics that make TF-IDF neighbours costly or cheap to find in web
alt-text (CC3M): short sentences mixing stop words with content words whose frequencies follow a
Zipf-Mandelbrot law (p(rank r) proportional to 1 / (r + 10)), so that the commonest content word is
in about 1-2% of captions and most words are rare, as in CC3M, plus near-duplicates (stock-photo
captions repeated with one word changed).

* Vocabularies: pronounceable pseudo-words made of 2-4 consonant-vowel syllables (never an English
  stop word): 6,000 nouns, 1,200 adjectives, 400 verbs, 1,500 places, and 24 frame words
  ("portrait", "view", "illustration", ...) that open some templates.
* Each caption draws one of 8 templates (e.g. ``"{frame} of a {adj} {noun} in the {place}"``,
  ``"{noun} {verb} the {noun} during the festival"``) and fills each slot independently from its
  vocabulary. 5% of captions copy an earlier caption with one word replaced by a fresh draw.

Everything comes from one ``numpy`` generator seeded by ``seed``: the same seed gives the same list.

**Captions for a class-folder tree** (:func:`folder_caption_table`): each image gets a caption built
from its class and attributes drawn independently per image (they describe no real property of the
image: they give the captions the variety of real ones, so that TF-IDF neighbours are not simply
"every caption of the same class"): one of 8 phrasings, one of 3-4 names of the class, and, each
present with probability 0.7, a size (7), a colour (14) and a setting (16), e.g. "a photo of a small
red lorry on a street" or "jet above the clouds, photographed from afar".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

CONSONANTS = [*"bcdfghklmnprstvz", "br", "ch", "sh", "st", "tr"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
FRAMES = [
    "portrait", "view", "illustration", "photo", "image", "closeup", "silhouette", "drawing",
    "painting", "poster", "sketch", "background", "pattern", "texture", "scene", "landscape",
    "cartoon", "icon", "logo", "banner", "card", "vector", "collage", "panorama",
]  # fmt: skip
TEMPLATES = [
    "{frame} of a {adj} {noun} in the {place}",
    "{noun} {verb} the {noun} during the {place} festival",
    "a {adj} {noun} and a {noun} at the {place}",
    "{adj} {noun} {verb} on a {adj} {noun}",
    "the {place} at night with {adj} {noun}",
    "{noun} of the {noun} {verb} in {place}",
    "{frame} : {adj} {noun} on {adj} {frame}",
    "person {verb} a {noun} near the {place}",
]
PHRASINGS = [  # {thing}: "[size] [colour] name"; {setting} may be empty
    "a photo of {a} {thing} {setting}",
    "{a} {thing} {setting}",
    "close-up of {a} {thing} {setting}",
    "a blurry picture of the {thing} {setting}",
    "low resolution image of {a} {thing}",
    "there is {a} {thing} {setting} in this picture",
    "{thing} {setting}, photographed from afar",
    "my {thing} {setting}",
]
CLASS_NAMES = {
    "airplane": ["airplane", "plane", "jet", "aircraft"],
    "automobile": ["car", "automobile", "sedan", "hatchback"],
    "bird": ["bird", "songbird", "little bird"],
    "cat": ["cat", "kitten", "house cat"],
    "deer": ["deer", "fawn", "stag"],
    "dog": ["dog", "puppy", "hound"],
    "frog": ["frog", "toad", "tree frog"],
    "horse": ["horse", "pony", "stallion"],
    "ship": ["ship", "boat", "vessel", "cargo ship"],
    "truck": ["truck", "lorry", "pickup truck", "fire truck"],
}
COLOURS = ["red", "blue", "green", "white", "black", "grey", "brown", "yellow", "orange", "silver", "golden", "dark", "pale", "spotted"]
SIZES_WORDS = ["small", "large", "tiny", "big", "huge", "young", "distant"]
SETTINGS = [
    "on the grass", "in the sky", "on a street", "in the water", "in a field", "near some trees", "in the snow", "indoors",
    "at night", "in the desert", "above the clouds", "at the harbour", "on a farm", "in a forest", "by the river", "in the city",
]  # fmt: skip
ATTRIBUTE_RATE = 0.7
SIZES = {"noun": 6000, "adj": 1200, "verb": 400, "place": 1500}
DUPLICATE_RATE = 0.05
ZIPF_OFFSET = 10


def _pseudo_words(rng: np.random.Generator, count: int, taken: set[str]) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        syllables = rng.integers(2, 5)
        word = "".join(CONSONANTS[rng.integers(len(CONSONANTS))] + VOWELS[rng.integers(len(VOWELS))] for _ in range(syllables))
        if word not in taken and word not in ENGLISH_STOP_WORDS:
            taken.add(word)
            words.append(word)
    return words


def _zipf(rng: np.random.Generator, size: int, draws: int) -> np.ndarray:
    weights = 1.0 / (np.arange(1, size + 1) + ZIPF_OFFSET)
    return rng.choice(size, draws, p=weights / weights.sum())


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` captions (see the module docstring)."""
    rng = np.random.default_rng(seed)
    taken: set[str] = set(FRAMES)
    vocab = {slot: np.array(_pseudo_words(rng, size, taken), dtype=object) for slot, size in SIZES.items()}
    vocab["frame"] = np.array(FRAMES, dtype=object)
    slots = max(t.count("{") for t in TEMPLATES)  # each slot of a template gets its own draw
    draws = {slot: words[_zipf(rng, len(words), n * slots).reshape(n, slots)] for slot, words in vocab.items()}
    templates = rng.integers(len(TEMPLATES), size=n)
    captions = []
    for i, t in enumerate(templates):
        counters = dict.fromkeys(vocab, 0)

        def fill(slot: str, i: int = i, counters: dict = counters) -> str:
            word = draws[slot][i, counters[slot]]
            counters[slot] += 1
            return word

        captions.append(" ".join(fill(part[1:-1]) if part.startswith("{") else part for part in TEMPLATES[t].split()))
    duplicates = np.flatnonzero(rng.random(n) < DUPLICATE_RATE)
    duplicates = duplicates[duplicates > 0]
    originals = (rng.random(len(duplicates)) * duplicates).astype(np.int64)  # an earlier caption
    fresh = vocab["noun"][_zipf(rng, SIZES["noun"], len(duplicates))]
    for i, j, word in zip(duplicates, originals, fresh):
        words = captions[j].split()
        words[rng.integers(len(words))] = word
        captions[i] = " ".join(words)
    return captions


def folder_caption(class_name: str, rng: np.random.Generator) -> str:
    """One caption for an image of ``class_name`` (module docstring); unknown classes use their folder name."""
    names = CLASS_NAMES.get(class_name, [class_name.replace("_", " ")])
    name = names[rng.integers(len(names))]
    size = SIZES_WORDS[rng.integers(len(SIZES_WORDS))] if rng.random() < ATTRIBUTE_RATE else ""
    colour = COLOURS[rng.integers(len(COLOURS))] if rng.random() < ATTRIBUTE_RATE else ""
    setting = SETTINGS[rng.integers(len(SETTINGS))] if rng.random() < ATTRIBUTE_RATE else ""
    thing = " ".join(word for word in (size, colour, name) if word)
    text = PHRASINGS[rng.integers(len(PHRASINGS))].format(a="an" if thing[0] in "aeiou" else "a", thing=thing, setting=setting)
    return " ".join(text.split()).replace(" ,", ",")


def folder_caption_table(root: str | Path, per_class: int | None = None, seed: int = 0) -> pd.DataFrame:
    """An image-caption table (``id``, ``image``: the path relative to ``root``, ``label``, ``caption``)
    of the images of ``root/<class>/*`` (at most ``per_class`` per class, the first in name order)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for image in sorted(class_dir.iterdir())[:per_class]:
            rows.append({"id": f"{class_dir.name}/{image.stem}", "image": str(image.relative_to(root)), "label": class_dir.name})
    for row in rows:
        row["caption"] = folder_caption(row["label"], rng)
    return pd.DataFrame(rows)
