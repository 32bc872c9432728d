"""An offline CLIP BPE tokenizer for the built-in random-weight models.

The real SD 2.1 tokenizer needs a download. Built-in models get a small byte-level vocabulary
instead: every byte on its own (so any text tokenizes), plus whole-word tokens for the words
our prompts use, so a prompt stays well inside the 77 positions.
"""

import itertools
import re
from collections import Counter

from transformers import CLIPTokenizer

from skindiff.data.fitzpatrick import CONDITIONS
from skindiff.diffusion.prompts import (
    IMAGENET_OBJECT_TEMPLATES,
    INITIALIZER_WORD,
    REFERENCE_TI_TEMPLATES,
    SKIN_MARKS,
    SKIN_PROMPT,
    SKIN_TYPE_PHRASES,
)

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Texts our prompts are made of; the offline vocabulary holds each of their words whole.
PROMPT_TEXTS = (
    *REFERENCE_TI_TEMPLATES,
    *IMAGENET_OBJECT_TEMPLATES,
    SKIN_PROMPT,
    *SKIN_TYPE_PHRASES.values(),
    *SKIN_MARKS.values(),
    INITIALIZER_WORD,
)


def _byte_alphabet() -> list[str]:
    """CLIP's printable stand-in for each of the 256 byte values (GPT-2 byte encoding)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Byte-pair merges learned on `words` until each is one token (most frequent pair first),
    so encoding any of them replays the same merges and ends in the whole word."""
    pieces = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges: list[tuple[str, str]] = []
    while True:
        counts = Counter(pair for seq in pieces.values() for pair in itertools.pairwise(seq))
        if not counts:
            return merges
        best = max(counts, key=lambda pair: (counts[pair], pair))
        merges.append(best)
        for word, seq in pieces.items():
            merged, i = [], 0
            while i < len(seq):
                if tuple(seq[i : i + 2]) == best:
                    merged.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            pieces[word] = merged


def build_offline_tokenizer(extra_words: tuple[str, ...] = ()) -> CLIPTokenizer:
    """A CLIPTokenizer with bytes + whole words of PROMPT_TEXTS, CONDITIONS and `extra_words`."""
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(char + "</w>" for char in alphabet)]
    # CLIP splits text into runs of letters before BPE, so words are learned the same way.
    texts = " ".join((*PROMPT_TEXTS, *CONDITIONS, *extra_words)).lower()
    merges = _learn_merges(sorted(set(re.findall(r"[a-z]+", texts))))
    tokens += [left + right for left, right in merges]
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*tokens, BOS, EOS]))}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=MAX_LENGTH,
    )
