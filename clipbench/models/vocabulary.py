"""A compact vocabulary over CLIP's BPE, for a text tower trained from scratch.

CLIP's tokenizer has 49,408 ids; the captions of a labelled dataset use about a hundred of them. A text
tower that embeds all of them carries dense gradients and AdamW state for rows no caption reaches, and
~50 MB of checkpoint. A compact vocabulary is a sorted list of the BPE ids the tower embeds:

- always the 512 byte-level base pieces (each of the 256 byte characters, alone and ending a word) and
  the start and end tokens, so that any text can still be encoded;
- the BPE tokens of the texts it is made from (:func:`vocabulary_ids`).

Sorting by BPE id keeps two invariants open_clip relies on: padding (id 0, "!") is compact id 0, and
end-of-text (49407, the largest BPE id) stays the largest, so ``TextTransformer``'s argmax pooling and
:func:`clipbench.models.openclip.pool_positions` still find it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, SimpleTokenizer

BASE_PIECES = 512  # BPE ids 0..511: the 256 byte characters, then the same with "</w>" (word end)
WORD_END = "</w>"


def vocabulary_ids(texts: Iterable[str]) -> list[int]:
    """The compact vocabulary of ``texts``: the sorted BPE ids of the base pieces, start and end,
    and every BPE token of the texts."""
    tokenizer = SimpleTokenizer()
    ids = set(range(BASE_PIECES)) | {tokenizer.sot_token_id, tokenizer.eot_token_id}
    for text in texts:
        ids.update(tokenizer.encode(text))
    return sorted(ids)


class CompactTokenizer(SimpleTokenizer):
    """open_clip's SimpleTokenizer with its id space narrowed to the BPE ids ``bpe_ids``: compact id
    ``i`` is BPE id ``bpe_ids[i]``.

    The cleaning, BPE merges, truncation (end token kept last), padding (0) and decoding are
    SimpleTokenizer's own: only its piece <-> id tables are replaced, and :meth:`bpe` replaces a
    piece outside the vocabulary by its split into the longest pieces inside it, so every text still
    encodes and decodes to what the full tokenizer decodes. Code written for a SimpleTokenizer
    (``encode`` lengths, ``decoder`` pieces) works on compact ids unchanged.
    """

    def __init__(self, bpe_ids: Sequence[int], context_length: int | None = DEFAULT_CONTEXT_LENGTH) -> None:
        super().__init__(context_length=context_length)
        full_decoder = self.decoder
        ids = sorted({int(i) for i in bpe_ids})
        required = set(range(BASE_PIECES)) | set(self.all_special_ids)
        missing, unknown = sorted(required - set(ids)), [i for i in ids if i not in full_decoder]
        if missing or unknown:
            raise ValueError(
                "model.backbone.vocabulary: a compact vocabulary lists CLIP BPE ids (0.."
                f"{len(full_decoder) - 1}) including the {BASE_PIECES} byte pieces 0..{BASE_PIECES - 1} and start/end "
                f"{self.all_special_ids}; missing {missing[:10]}{'...' if len(missing) > 10 else ''}, unknown {unknown[:10]}"
            )
        self.bpe_ids = ids
        self.decoder = {compact: full_decoder[bpe] for compact, bpe in enumerate(ids)}
        self.encoder = {piece: compact for compact, piece in self.decoder.items()}
        self.vocab_size = len(ids)
        self.all_special_ids = [ids.index(bpe) for bpe in self.all_special_ids]
        self.sot_token_id, self.eot_token_id = self.all_special_ids[:2]
        self._splits: dict[str, str] = {}

    def bpe(self, token: str) -> str:
        """CLIP's BPE pieces of ``token`` (space-separated, as SimpleTokenizer's ``encode`` reads them),
        each one outside the vocabulary replaced by its :meth:`split`."""
        if token not in self._splits:
            self._splits[token] = " ".join(part for piece in super().bpe(token).split(" ") for part in self.split(piece))
        return self._splits[token]

    def split(self, piece: str) -> list[str]:
        """``piece`` if the vocabulary has it, else ``piece`` cut left to right into the longest pieces it
        has (the word end "</w>" stays on the last part). Always possible: every byte character is a
        piece, with and without "</w>"."""
        if piece in self.encoder:
            return [piece]
        end = WORD_END if piece.endswith(WORD_END) else ""
        body = piece[: len(piece) - len(end)]
        parts, start = [], 0
        while start < len(body):
            stop = next(s for s in range(len(body), start, -1) if body[start:s] + (end if s == len(body) else "") in self.encoder)
            parts.append(body[start:stop] + (end if stop == len(body) else ""))
            start = stop
        return parts
