"""Text -> CLIP token ids, equal to OpenAI's ``clip.tokenize`` (``clip/simple_tokenizer.py``) id for id.

OpenAI's pipeline, and where each step runs here:

1. ``clean_text`` (Python, OpenAI's code paths): ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse
   whitespace runs to one space, strip, lower-case. The whitespace class is the ``regex`` package's ``\\s``
   (Unicode White_Space), written out because the standard ``re`` module's ``\\s`` also matches U+001C-U+001F.
2. ``tokenizer.json`` (Rust, built by ``clip_export.build_tokenizer``): CLIP's pre-tokenisation regex, the
   byte-to-unicode mapping and BPE with ``</w>``.
3. Special tokens (Python): OpenAI's regex isolates a literal ``<|startoftext|>`` / ``<|endoftext|>``
   unless a punctuation run swallows its ``<|`` (``"!<|endoftext|>"`` stays text), and the tokenizer then maps
   the piece to id 49406 / 49407. ``tokenizer.json`` isolates the same pieces; ``_merge_special_pieces``
   swaps their BPE ids for the special id.
4. ``[SOT] + ids + [EOT]``, zero-padded to ``context_length``; longer rows keep SOT, the first
   ``context_length - 2`` tokens and EOT (OpenAI's ``clip.tokenize(..., truncate=True)``), flagged in
   ``TokenBatch.truncated``.

The text tower pools at the *first* EOT (OpenAI: ``text.argmax(dim=-1)``, 49407 being the largest id), so a
literal ``<|endoftext|>`` ends the caption as far as the model is concerned; ``TokenBatch.lengths`` is that
position + 1, and ``ids[:, :lengths.max()]`` gives the same embeddings as the full row (the tower is causal).

Importing this module is cheap (numpy aside); ``ClipTokenizer.from_file`` imports ``tokenizers`` and parses
the JSON (~0.1 s), so the cost lands in a Lambda function's init phase rather than in its first request.
``ftfy`` is imported by the first text it could change (``needs_ftfy``): plain ASCII captions never need it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..types import Int64Array

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

# https://github.com/openai/CLIP/blob/main/clip/clip.py (tokenize) and simple_tokenizer.py
CONTEXT_LENGTH = 77
SOT_ID = 49406
EOT_ID = 49407
PAD_ID = 0
SPECIAL_TOKENS = {"<|startoftext|>": SOT_ID, "<|endoftext|>": EOT_ID}
SPECIAL_MARK = "<|"

# The `regex` package's \s (Unicode White_Space), which OpenAI's whitespace_clean uses. Checked code point by
# code point against `regex` in tests/test_tokenizer.py.
WHITESPACE_CLASS = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
_WHITESPACE_RUN = re.compile(WHITESPACE_CLASS + "+")


# Text that ftfy.fix_text (6.x, default configuration) returns unchanged, as each of its fixers does: printable
# ASCII, tab and line feed, without "&". ASCII is never mojibake (fix_encoding returns ASCII text as it is) nor
# changed by fix_c1_controls (U+0080-U+009F), fix_latin_ligatures, fix_character_width, uncurl_quotes (their
# tables and patterns hold no ASCII), fix_surrogates or NFC normalisation; without "&" unescape_html finds no
# entity; without ESC (U+001B) remove_terminal_escapes finds no escape sequence; without CR fix_line_breaks
# has nothing to convert; and remove_control_chars keeps tab and line feed. tests/test_tokenizer.py checks
# each fixer's tables on these characters, and fix_text itself on random texts of them.
_FTFY_UNCHANGED = re.compile("[\t\n\x20-\x25\x27-\x7e]*")


def needs_ftfy(text: str) -> bool:
    """Whether ``ftfy.fix_text`` could change ``text``; False only where it provably returns it as it is."""
    return _FTFY_UNCHANGED.fullmatch(text) is None


def clean_text(text: str) -> str:
    """OpenAI's ``whitespace_clean(basic_clean(text)).lower()``, step for step.

    ``ftfy.fix_text`` runs (and ftfy, ~30 ms of a cold start with wcwidth, is imported) only for a text that
    it could change (:func:`needs_ftfy`): an ordinary caption never pays for it."""
    if needs_ftfy(text):
        import ftfy  # imported on the first text that needs it, not at init

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    text = text.strip()
    text = _WHITESPACE_RUN.sub(" ", text)
    text = text.strip()
    return text.lower()


@dataclass(frozen=True)
class TokenBatch:
    """Token ids for N texts.

    ids: (N, context_length) int64, ``[SOT, tokens..., EOT, 0, ...]``.
    lengths: (N,) int64, index of the first EOT + 1: the positions the text tower reads (it pools there).
    truncated: per text, True when ``[SOT] + tokens + [EOT]`` was longer than ``context_length`` and was cut
        to SOT, the first ``context_length - 2`` tokens and EOT.
    """

    ids: Int64Array
    lengths: Int64Array
    truncated: tuple[bool, ...]


class ClipTokenizer:
    """OpenAI CLIP's tokenizer on top of a ``tokenizers`` ``tokenizer.json``."""

    def __init__(self, tokenizer: Tokenizer, context_length: int = CONTEXT_LENGTH) -> None:
        """Wrap a ``clip_export.build_tokenizer`` tokenizer (whose truncation and padding get turned off)."""
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (SOT and EOT), got {context_length}")
        for token, expected in SPECIAL_TOKENS.items():
            found = tokenizer.token_to_id(token)
            if found != expected:
                raise ValueError(f"not a CLIP tokenizer: {token} has id {found}, expected {expected}")
        # Hugging Face's CLIP tokenizer.json has the same vocabulary but a normalizer and added special
        # tokens, and differs from OpenAI's tokenizer on some texts (no ftfy; specials cut out of any text).
        if tokenizer.normalizer is not None or tokenizer.get_added_tokens_decoder():
            raise ValueError(
                "not built by clip_export.build_tokenizer: it has a normalizer or added tokens, which would "
                "change the ids (rebuild it with python -m clip_export.build_tokenizer)"
            )
        tokenizer.no_truncation()  # encode() truncates itself, keeping EOT last, and must see the full length
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._context_length = context_length

    @classmethod
    def from_file(cls, path: str | Path, context_length: int = CONTEXT_LENGTH) -> ClipTokenizer:
        """Load ``tokenizer.json``; raises ``ValueError`` naming the file if it is not a CLIP tokenizer."""
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for unreadable or malformed files
            raise ValueError(f"{path}: not a tokenizers JSON file: {exc}") from None
        try:
            return cls(tokenizer, context_length)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @property
    def context_length(self) -> int:
        return self._context_length

    def encode(self, texts: Sequence[str]) -> TokenBatch:
        """Tokenize N texts into a (N, context_length) batch; see ``TokenBatch``."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of texts, not a single str")
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        cleaned = [clean_text(text) for text in texts]
        encodings = self._tokenizer.encode_batch(cleaned, add_special_tokens=False)

        n, width = len(cleaned), self._context_length
        ids = np.zeros((n, width), dtype=np.int64)  # PAD_ID is 0
        lengths = np.empty(n, dtype=np.int64)
        truncated: list[bool] = []
        for row, (text, encoding) in enumerate(zip(cleaned, encodings, strict=True)):
            tokens = encoding.ids
            if SPECIAL_MARK in text:
                tokens = _merge_special_pieces(text, encoding)
            full = [SOT_ID, *tokens, EOT_ID]
            cut = len(full) > width
            if cut:
                full = [*full[: width - 1], EOT_ID]
            ids[row, : len(full)] = full
            lengths[row] = full.index(EOT_ID) + 1
            truncated.append(cut)
        return TokenBatch(ids=ids, lengths=lengths, truncated=tuple(truncated))


def _merge_special_pieces(text: str, encoding: Encoding) -> list[int]:
    """The ids of ``encoding`` with each pre-tokenised piece that *is* a special token replaced by its id.

    The pre-tokenizer only emits a piece equal to ``<|startoftext|>`` or ``<|endoftext|>`` where OpenAI's
    regex matched it as a special token (a punctuation piece never contains letters), so comparing a piece's
    text is enough. Offsets are character offsets into ``text``.
    """
    ids, words, offsets = encoding.ids, encoding.word_ids, encoding.offsets
    out: list[int] = []
    i = 0
    while i < len(ids):
        j = i + 1
        while j < len(ids) and words[j] == words[i]:
            j += 1
        special = SPECIAL_TOKENS.get(text[offsets[i][0] : offsets[j - 1][1]])
        if special is None:
            out.extend(ids[i:j])
        else:
            out.append(special)
        i = j
    return out
