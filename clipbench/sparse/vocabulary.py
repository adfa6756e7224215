"""Concept vocabularies: one concept per line, most useful first.

``task.vocab``: ``default`` (the shipped ``concepts.txt``, made by :mod:`clipbench.sparse.make_vocabulary`),
``classes`` (the dataset's class names: the seed project's dictionary), or the path of a user's
file (e.g. SpLiCE's ``laion.txt``, which lists its most frequent concept *last*: ``task.vocab_reverse=true``).

A line that cannot be a concept is reported with its line number and dropped, never silently
re-indexed: an empty line, a repeat of an earlier line, or a line longer than the text tower's context
(``tokenize`` would cut it short, so its embedding would be another concept's).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

DEFAULT_FILE = Path(__file__).resolve().parent / "concepts.txt"
DEFAULT, CLASSES = "default", "classes"


class VocabularyError(ValueError):
    """The vocabulary cannot be used at all (no such file, nothing left after dropping bad lines)."""


@dataclass(frozen=True)
class Dropped:
    line: int  # 1-based line number in the source (class index + 1 for vocab=classes)
    text: str
    reason: str


@dataclass
class Vocabulary:
    concepts: list[str]
    lines: list[int]  # each concept's line in the source
    source: str  # the file, or "classes"
    dropped: list[Dropped] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.concepts)

    def dropped_table(self) -> pd.DataFrame:
        return pd.DataFrame([vars(d) for d in self.dropped], columns=["line", "text", "reason"])


def parse_lines(numbered: Sequence[tuple[int, str]], source: str) -> Vocabulary:
    """Concepts from (line number, raw line) pairs, in the order given, surrounding white space
    stripped: empty lines and repeats (compared case-insensitively, as CLIP's tokenizers lower-case)
    are dropped and reported."""
    concepts, lines, dropped = [], [], []
    seen: dict[str, int] = {}
    for number, raw in numbered:
        text = raw.strip()
        if not text:
            dropped.append(Dropped(number, raw, "empty"))
        elif text.lower() in seen:
            dropped.append(Dropped(number, text, f"duplicate of line {seen[text.lower()]}"))
        else:
            seen[text.lower()] = number
            concepts.append(text)
            lines.append(number)
    return Vocabulary(concepts, lines, source, dropped)


def readable(spec: str) -> bool:
    """Whether ``task.vocab`` names a vocabulary there is: checked at start-up, before any encoding."""
    return spec in (DEFAULT, CLASSES) or Path(spec).expanduser().is_file()


def load_vocabulary(spec: str, class_names: Sequence[str], reverse: bool = False) -> Vocabulary:
    """``task.vocab`` -> the vocabulary, bad lines dropped and reported (not yet cut to a size).
    ``reverse``: the file lists its most useful concept last (SpLiCE's files)."""
    if spec == CLASSES:
        return parse_lines(list(enumerate(class_names, start=1)), CLASSES)
    if not readable(spec):
        raise VocabularyError(f"task.vocab={spec!r} is invalid: expected {DEFAULT!r}, {CLASSES!r} or the path of a text file")
    path = DEFAULT_FILE if spec == DEFAULT else Path(spec).expanduser()
    numbered = list(enumerate(path.read_text(encoding="utf-8").splitlines(), start=1))
    return parse_lines(numbered[::-1] if reverse else numbered, str(path))


def select(vocabulary: Vocabulary, size: int | None, truncates: Callable[[Sequence[str]], list[bool]]) -> Vocabulary:
    """The first ``size`` concepts (all with None) that fit the text tower's context; longer ones are
    dropped and reported (``truncates``: the backbone's check, :meth:`CLIPBackbone.truncates`)."""
    dropped = list(vocabulary.dropped)
    concepts, lines = [], []
    for concept, line, long in zip(vocabulary.concepts, vocabulary.lines, truncates(vocabulary.concepts)):
        if long:
            dropped.append(Dropped(line, concept, "longer than the text encoder's context"))
        elif size is None or len(concepts) < size:
            concepts.append(concept)
            lines.append(line)
    dropped.sort(key=lambda d: d.line)
    if not concepts:
        raise VocabularyError(f"task.vocab={vocabulary.source}: no usable concept left ({len(dropped)} lines dropped)")
    if dropped:
        first = "; ".join(f"line {d.line} ({d.reason})" for d in dropped[:5])
        log.warning("vocabulary %s: %d lines dropped, first: %s", vocabulary.source, len(dropped), first)
    return Vocabulary(concepts, lines, vocabulary.source, dropped)
