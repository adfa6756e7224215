"""Generate the default concept vocabulary, ``clipbench/sparse/concepts.txt`` (committed; this script
says how it was made and remakes it byte for byte)::

    apt-get install wordnet-base          # WordNet 3.0's database files, in /usr/share/wordnet
    python -m clipbench.sparse.make_vocabulary

SpLiCE ranks its vocabulary by word frequency in LAION captions, which cannot be downloaded here.
This script uses sources installed on the machine instead:

- **frequency order**: CLIP's BPE vocabulary, which open_clip ships. Its merges are learnt most
  frequent pair first on CLIP's image-text training data, so the rank of the merge that completes a
  word (a token ending in ``</w>``) orders words roughly by how often captions use them;
- **which words are concepts**: WordNet nouns whose first or second sense is something one can see
  (animals, artifacts, food, plants, people, places, natural objects, substances, shapes, body
  parts, phenomena, acts, events, groups, attributes) and adjectives; a word used mostly as a verb
  or adverb in WordNet's sense-tagged corpus ("need", "just") is left out, and so are stop words
  and short fragments that CLIP's BPE also uses inside words (a word of at most four letters must
  occur in the sense-tagged corpus);
- **two-word concepts**: WordNet's two-word noun collocations ("ice cream", "fire truck") whose
  first sense is a concrete thing, that occur in the sense-tagged corpus, and whose words are both in
  CLIP's vocabulary, ranked by their rarer word;
- **benchmark class names**: ImageNet's 1,000 (open_clip's readable names), CIFAR-10 and CIFAR-100,
  and the readable names clipbench ships for its datasets (``clipbench/data/prompts``), ranked by
  their rarest word, so the file's first N lines are not biased towards any benchmark.

Every concept appears once, lower case, most frequent first: ``task.vocab_size=N`` takes the first N.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from collections.abc import Iterable
from pathlib import Path

from open_clip.tokenizer import default_bpe
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

HERE = Path(__file__).resolve().parent
OUTPUT = HERE / "concepts.txt"
PROMPTS = HERE.parent / "data" / "prompts"
WORDNET = Path("/usr/share/wordnet")

# WordNet lexicographer files (the lex_filenum of data.noun / data.adj) of things one can see.
VISUAL_NOUNS = {4, 5, 6, 7, 8, 11, 13, 14, 15, 17, 18, 19, 20, 25, 27}  # act, animal, artifact, attribute, body, event,
# food, group, location, object, person, phenomenon, plant, shape, substance
CONCRETE_NOUNS = {5, 6, 8, 13, 15, 17, 18, 19, 20, 25, 27}  # for two-word collocations: no acts, events, groups, attributes
ADJECTIVES = {0, 44}  # adj.all, adj.ppl (participial: "broken", "frozen")

CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100 = [
    "apple",
    "aquarium_fish",
    "baby",
    "bear",
    "beaver",
    "bed",
    "bee",
    "beetle",
    "bicycle",
    "bottle",
    "bowl",
    "boy",
    "bridge",
    "bus",
    "butterfly",
    "camel",
    "can",
    "castle",
    "caterpillar",
    "cattle",
    "chair",
    "chimpanzee",
    "clock",
    "cloud",
    "cockroach",
    "couch",
    "crab",
    "crocodile",
    "cup",
    "dinosaur",
    "dolphin",
    "elephant",
    "flatfish",
    "forest",
    "fox",
    "girl",
    "hamster",
    "house",
    "kangaroo",
    "keyboard",
    "lamp",
    "lawn_mower",
    "leopard",
    "lion",
    "lizard",
    "lobster",
    "man",
    "maple_tree",
    "motorcycle",
    "mountain",
    "mouse",
    "mushroom",
    "oak_tree",
    "orange",
    "orchid",
    "otter",
    "palm_tree",
    "pear",
    "pickup_truck",
    "pine_tree",
    "plain",
    "plate",
    "poppy",
    "porcupine",
    "possum",
    "rabbit",
    "raccoon",
    "ray",
    "road",
    "rocket",
    "rose",
    "sea",
    "seal",
    "shark",
    "shrew",
    "skunk",
    "skyscraper",
    "snail",
    "snake",
    "spider",
    "squirrel",
    "streetcar",
    "sunflower",
    "sweet_pepper",
    "table",
    "tank",
    "telephone",
    "television",
    "tiger",
    "tractor",
    "train",
    "trout",
    "tulip",
    "turtle",
    "wardrobe",
    "whale",
    "willow_tree",
    "wolf",
    "woman",
    "worm",
]


def bpe_word_ranks() -> dict[str, int]:
    """Word -> the rank of the BPE merge that first completes it as a whole token (lower: more frequent)."""
    with gzip.open(default_bpe()) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the merges open_clip's SimpleTokenizer uses
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        token = "".join(merge.split())
        if token.endswith("</w>"):
            ranks.setdefault(token[: -len("</w>")], rank)
    return ranks


def lexicographer_files(wordnet: Path, pos: str) -> dict[str, int]:
    """Synset offset -> its lexicographer file number, from ``data.<pos>``."""
    files = {}
    with (wordnet / f"data.{pos}").open() as handle:
        for line in handle:
            if not line.startswith(" "):  # the licence header is indented
                offset, lex_file = line.split()[:2]
                files[offset] = int(lex_file)
    return files


def index(wordnet: Path, pos: str) -> dict[str, tuple[int, list[str]]]:
    """Lemma -> (senses tagged in WordNet's semantic concordance, synset offsets most frequent first)."""
    entries = {}
    with (wordnet / f"index.{pos}").open() as handle:
        for line in handle:
            if line.startswith(" "):
                continue
            fields = line.split()
            pointers = int(fields[3])
            tagged, offsets = int(fields[5 + pointers]), fields[6 + pointers :]
            entries[fields[0]] = (tagged, offsets)
    return entries


def benchmark_class_names() -> list[str]:
    names = [*IMAGENET_CLASSNAMES, *CIFAR10, *CIFAR100]
    for path in sorted(PROMPTS.glob("*.json")):
        names += list(json.loads(path.read_text()).get("classnames", {}).values())
    return [name.replace("_", " ") for name in names]


def vocabulary(wordnet: Path) -> list[str]:
    ranks = bpe_word_ranks()
    nouns, adjectives = index(wordnet, "noun"), index(wordnet, "adj")
    verbs, adverbs = index(wordnet, "verb"), index(wordnet, "adv")
    noun_files, adj_files = lexicographer_files(wordnet, "noun"), lexicographer_files(wordnet, "adj")

    def tagged(entries: dict, word: str) -> int:
        return entries[word][0] if word in entries else 0

    def first_senses_in(entries: dict, files: dict, word: str, keep: set[int]) -> bool:
        return word in entries and any(files[offset] in keep for offset in entries[word][1][:2])

    def is_concept(word: str) -> bool:
        if not re.fullmatch(r"[a-z]{3,}", word) or word in ENGLISH_STOP_WORDS:
            return False
        as_concept = tagged(nouns, word) + tagged(adjectives, word)
        if len(word) <= 4 and as_concept == 0:
            return False
        if as_concept < tagged(verbs, word) + tagged(adverbs, word):
            return False
        return first_senses_in(nouns, noun_files, word, VISUAL_NOUNS) or first_senses_in(adjectives, adj_files, word, ADJECTIVES)

    ranked: list[tuple[int, str]] = [(rank, word) for word, rank in ranks.items() if is_concept(word)]
    for lemma, (tag_count, offsets) in nouns.items():
        words = lemma.split("_")
        if len(words) == 2 and tag_count > 0 and noun_files[offsets[0]] in CONCRETE_NOUNS and all(w in ranks for w in words):
            ranked.append((max(ranks[w] for w in words), " ".join(words)))
    unknown = max(ranks.values()) + 1  # a word outside CLIP's BPE vocabulary ranks last
    for name in benchmark_class_names():
        words = re.findall(r"[a-z0-9]+", name.lower())
        ranked.append((max(ranks.get(w, unknown) for w in words), name.lower().strip()))
    return list(dict.fromkeys(word for _, word in sorted(ranked)))


def write(concepts: Iterable[str], path: Path) -> None:
    path.write_text("".join(f"{concept}\n" for concept in concepts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, default=WORDNET, help="WordNet 3.0 database directory (Debian: wordnet-base)")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args()
    if not (args.wordnet / "index.noun").is_file():
        raise SystemExit(f"no WordNet database in {args.wordnet}: apt-get install wordnet-base, or pass --wordnet <dir>")
    concepts = vocabulary(args.wordnet)
    write(concepts, args.out)
    print(f"{len(concepts)} concepts -> {args.out}")


if __name__ == "__main__":
    main()
