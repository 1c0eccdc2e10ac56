"""Build CLIP's ``tokenizer.json`` (for ``tokenizers.Tokenizer.from_file``) from OpenAI's BPE merges file.

The result reproduces OpenAI's ``clip/simple_tokenizer.py`` (``SimpleTokenizer.encode``) on text that has been
through ``clip_serverless.engine.tokenizer.clean_text`` (ftfy, HTML unescape, whitespace collapse, lower-case,
which this file cannot express exactly and which therefore stays in Python):

* Vocabulary, in id order, exactly as ``SimpleTokenizer.__init__`` builds it: the 256 byte symbols of
  ``bytes_to_unicode``, the same 256 with ``</w>``, one token per merge of ``merges[1:49152-256-2+1]``, then
  ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407 (49,408 in all).
* Pre-tokenisation: CLIP's regex (kept pieces = matches, everything between them dropped), then the GPT-2
  byte to unicode mapping. OpenAI compiles the regex with the ``regex`` package and ``re.IGNORECASE``.
  Oniguruma (the engine of ``tokenizers``) differs from it in two ways that change tokens: its Unicode tables
  are older (17,480 code points are letters or digits to ``regex`` 2026.11 and unassigned to the Oniguruma
  of ``tokenizers`` 0.23), and case-insensitive ``regex`` treats U+0345 COMBINING GREEK YPOGEGRAMMENI (whose
  case-fold is a letter) as neither letter nor non-letter, so it is dropped like whitespace. So the pattern
  written here has no ``\\p{..}``, no ``\\s`` and no case-insensitive flag: every class is an explicit list of
  code-point ranges computed from the ``regex`` package at build time (the package OpenAI's tokenizer uses),
  and each literal letter is widened to its case-insensitive equivalents (``s`` also matches U+017F LONG S).
  The translation is exact for the installed ``regex`` version; tests/test_tokenizer.py checks it code point
  by code point.
* BPE with ``end_of_word_suffix="</w>"``, no unknown token (every byte has a symbol).
* Post-processor ``<|startoftext|> $A <|endoftext|>``; decoder: ``</w>`` -> space, then bytes (OpenAI's
  ``decode``).

The two special tokens are deliberately *not* ``added_tokens``: ``tokenizers`` would cut them out of any
text, while OpenAI's regex only sees them where no punctuation run swallows their ``<|``
(``"!<|endoftext|>"`` is three ordinary pieces). The pre-tokenizer already isolates them exactly where
OpenAI does; ``ClipTokenizer`` maps such a piece to its id.

The JSON is written by hand (not ``Tokenizer.to_str``, whose maps have no fixed order), so the same merges
file and ``regex`` version give the same bytes on every run.

Usage: ``python -m clip_export.build_tokenizer --out PATH [--bpe PATH]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import regex

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# Packages that ship OpenAI's merges file, in order of preference.
BPE_PACKAGES = ("clip", "open_clip")
# simple_tokenizer.py: merges = merges[1:49152-256-2+1]
MERGES_STOP = 49152 - 256 - 2 + 1
SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
END_OF_WORD = "</w>"
# simple_tokenizer.py, SimpleTokenizer.__init__ (compiled there with re.IGNORECASE)
CLIP_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# The literal alternatives of CLIP_PATTERN (each matched case-insensitively) and its three classes, in order.
LITERALS = (SOT_TOKEN, EOT_TOKEN, "'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
LETTERS = r"[\p{L}]"
NUMBERS = r"[\p{N}]"
OTHERS = r"[^\s\p{L}\p{N}]"
MAX_CODE_POINT = 0x10FFFF
SURROGATES = range(0xD800, 0xE000)  # never in a Rust string, so left out of every class


def bytes_to_unicode() -> dict[int, str]:
    """OpenAI's (and GPT-2's) reversible byte -> printable character table, byte order preserved."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def find_bpe_file() -> Path:
    """OpenAI's merges file as shipped in an installed package (``clip-anytorch`` or ``open_clip_torch``).

    The packages are located by path, not imported (importing them needs torch and torchvision).
    """
    roots = [Path(p) for p in sys.path if p] + [Path(sysconfig.get_paths()["purelib"])]
    for package in BPE_PACKAGES:
        for root in roots:
            candidate = root / package / BPE_FILE_NAME
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"{BPE_FILE_NAME} not found under {' or '.join(BPE_PACKAGES)}/ in {len(roots)} import paths; "
        "install clip-anytorch (pip install --no-deps clip-anytorch) or pass --bpe PATH"
    )


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The 48,894 merges OpenAI uses, in rank order."""
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")[1:MERGES_STOP]
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, start=2):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{bpe_path}: line {number} is not a merge of two symbols: {line!r}")
        merges.append((parts[0], parts[1]))
    if len(merges) != MERGES_STOP - 1:
        raise ValueError(f"{bpe_path}: {len(merges)} merges, expected {MERGES_STOP - 1}")
    return merges


def build_vocab(merges: Sequence[tuple[str, str]]) -> dict[str, int]:
    """Token -> id, in id order, as ``SimpleTokenizer.__init__`` builds ``self.encoder``."""
    symbols = list(bytes_to_unicode().values())
    tokens = (
        symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    )
    vocab = {token: i for i, token in enumerate(tokens)}
    # A repeated token would make OpenAI's dict keep the last id and this one disagree; the file has none.
    if len(vocab) != VOCAB_SIZE or vocab[SOT_TOKEN] != SOT_ID or vocab[EOT_TOKEN] != EOT_ID:
        raise ValueError(f"vocabulary has {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab


CodePointRange = tuple[int, int]  # inclusive


def oniguruma_class(ranges: Sequence[CodePointRange]) -> str:
    """A bracket expression (or one escape) for exactly these code points.

    ``\\x{..}`` escapes only: the pattern is ASCII and nothing needs quoting.
    """
    if not ranges:
        raise ValueError("empty character class")
    if len(ranges) == 1 and ranges[0][0] == ranges[0][1]:
        return f"\\x{{{ranges[0][0]:X}}}"
    parts = [f"\\x{{{a:X}}}" if a == b else f"\\x{{{a:X}}}-\\x{{{b:X}}}" for a, b in ranges]
    return "[" + "".join(parts) + "]"


class CodePointMatcher:
    """Which code points a one-character ``regex`` pattern matches, under ``re.IGNORECASE`` like OpenAI's."""

    def __init__(self) -> None:
        # Every code point a str handed to tokenizers can hold, in order. Position p is code point p below the
        # surrogates and p + 0x800 above them. One regex pass over it beats a million fullmatch calls.
        self._text = "".join(map(chr, range(SURROGATES.start))) + "".join(
            map(chr, range(SURROGATES.stop, MAX_CODE_POINT + 1))
        )

    def ranges(self, pattern: str) -> list[CodePointRange]:
        """The code points ``pattern`` matches, as sorted inclusive ranges (none inside the surrogates)."""
        gap, skip = SURROGATES.start, len(SURROGATES)
        out: list[CodePointRange] = []
        for m in regex.finditer(f"(?:{pattern})+", self._text, flags=regex.IGNORECASE):
            first, last = m.start(), m.end() - 1
            if first < gap <= last:
                out += [(first, gap - 1), (gap + skip, last + skip)]
            else:
                out.append((first + skip, last + skip) if first >= gap else (first, last))
        return out

    def literal(self, text: str) -> str:
        """``text`` as IGNORECASE matches it: each character widened to its case equivalents."""
        return "".join(oniguruma_class(self.ranges(regex.escape(ch))) for ch in text)


def split_pattern() -> str:
    """CLIP_PATTERN as an Oniguruma regex with the ``regex`` package's IGNORECASE semantics made explicit."""
    matcher = CodePointMatcher()
    alternatives = [matcher.literal(lit) for lit in LITERALS]
    alternatives += [
        oniguruma_class(matcher.ranges(LETTERS)) + "+",
        oniguruma_class(matcher.ranges(NUMBERS)),
        oniguruma_class(matcher.ranges(OTHERS)) + "+",
    ]
    return "|".join(alternatives)


def tokenizer_config(
    vocab: dict[str, int], merges: Sequence[tuple[str, str]], pattern: str
) -> dict[str, Any]:
    """The ``tokenizers`` JSON schema (version 1.0) with every field written explicitly, in a fixed order."""

    def special(token: str) -> dict[str, Any]:
        return {"SpecialToken": {"id": token, "type_id": 0}}

    def sequence(name: str, type_id: int) -> dict[str, Any]:
        return {"Sequence": {"id": name, "type_id": type_id}}

    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],  # see the module docstring: the special tokens must not be cut out of raw text
        "normalizer": None,  # clean_text() does it in Python: ftfy has no tokenizers equivalent
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Removed", "invert": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [special(SOT_TOKEN), sequence("A", 0), special(EOT_TOKEN)],
            # CLIP has no sentence pairs; this only keeps the schema complete.
            "pair": [special(SOT_TOKEN), sequence("A", 0), sequence("B", 1), special(EOT_TOKEN)],
            "special_tokens": {
                token: {"id": token, "ids": [vocab[token]], "tokens": [token]}
                for token in (SOT_TOKEN, EOT_TOKEN)
            },
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                # "</w>" becomes the byte symbol of a space, so that the byte-level step turns it into " ".
                {
                    "type": "Replace",
                    "pattern": {"String": END_OF_WORD},
                    "content": bytes_to_unicode()[ord(" ")],
                },
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": END_OF_WORD,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            # "a b" strings: the format every tokenizers version reads (no symbol contains a space).
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def build_tokenizer_json(bpe_path: Path) -> str:
    """The ``tokenizer.json`` text for OpenAI's merges file ``bpe_path``; identical bytes on every run."""
    merges = read_merges(bpe_path)
    vocab = build_vocab(merges)
    config = tokenizer_config(vocab, merges, split_pattern())
    return json.dumps(config, ensure_ascii=False, separators=(",", ":")) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="tokenizer.json to write")
    parser.add_argument(
        "--bpe", type=Path, help=f"OpenAI's {BPE_FILE_NAME} (default: from clip or open_clip)"
    )
    args = parser.parse_args(argv)
    bpe_path: Path = args.bpe or find_bpe_file()
    text = build_tokenizer_json(bpe_path)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out} ({len(text.encode('utf-8')):,} bytes) from {bpe_path}")


if __name__ == "__main__":
    main()
