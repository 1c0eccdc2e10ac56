"""Our CLIP tokenizer against OpenAI's ``clip/simple_tokenizer.py`` from the installed clip-anytorch package.

The reference is loaded by file path (the ``clip`` package imports torch); it needs only ftfy and regex.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import subprocess
import sys
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import regex
from clip_export import build_tokenizer
from clip_serverless.engine import tokenizer as tokenizer_module
from clip_serverless.engine.tokenizer import EOT_ID, SOT_ID, ClipTokenizer, clean_text
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from tests.tokenizer_cases import all_cases, near_ascii_cases

CONTEXT = 77
MIN_CASES = 5000
MAX_CODE_POINT = 0x10FFFF


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def reference_module() -> ModuleType:
    spec = importlib.util.find_spec("clip")  # locates the package without importing it (it needs torch)
    assert spec is not None and spec.submodule_search_locations, "clip-anytorch is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference(reference_module: ModuleType) -> Any:
    return reference_module.SimpleTokenizer()


@pytest.fixture(scope="session")
def tokenizer_path(tokenizer_json: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    path.write_text(tokenizer_json, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def clip_tokenizer(tokenizer_path: Path) -> ClipTokenizer:
    return ClipTokenizer.from_file(tokenizer_path)


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return all_cases()


@pytest.fixture(scope="session")
def reference_rows(reference: Any, corpus: list[str]) -> list[list[int]]:
    """OpenAI's untruncated ``[SOT] + encode(text) + [EOT]`` for every corpus text."""
    return [[SOT_ID, *reference.encode(text), EOT_ID] for text in corpus]


# ---------------------------------------------------------------- helpers


def expected_row(reference_row: Sequence[int], context_length: int = CONTEXT) -> list[int]:
    """OpenAI's ``clip.tokenize(truncate=True)``: the first ``context_length`` ids, the last forced to EOT,
    zero padding."""
    if len(reference_row) > context_length:
        return [*reference_row[: context_length - 1], EOT_ID]
    return [*reference_row, *[0] * (context_length - len(reference_row))]


def mismatches(
    tok: ClipTokenizer, texts: Sequence[str], reference_rows: Sequence[Sequence[int]]
) -> list[str]:
    """One line per text whose ids, length or truncation flag differ from OpenAI's."""
    batch = tok.encode(texts)
    out = []
    for i, (text, ref) in enumerate(zip(texts, reference_rows, strict=True)):
        want = expected_row(ref, tok.context_length)
        got = batch.ids[i].tolist()
        want_length = want.index(EOT_ID) + 1
        want_truncated = len(ref) > tok.context_length
        if got != want or batch.lengths[i] != want_length or batch.truncated[i] != want_truncated:
            out.append(
                f"{text!r}: got {got} (length {batch.lengths[i]}, truncated {batch.truncated[i]}), "
                f"OpenAI {want} (length {want_length}, truncated {want_truncated})"
            )
    return out


def sweep_texts(context: str, code_points: Sequence[int], chunk: int = 256) -> list[str]:
    """Every code point in ``context`` (``{c}`` placeholders), concatenated in chunks."""
    return [
        "".join(context.format(c=chr(cp)) for cp in code_points[k : k + chunk])
        for k in range(0, len(code_points), chunk)
    ]


def split_differences(pre_tokenizer: Any, reference: Any, texts: Sequence[str]) -> list[str]:
    """Texts where ``pre_tokenizer`` (a ``tokenizers`` Split) cuts other pieces than OpenAI's ``findall``."""
    out = []
    for text in texts:
        if [piece for piece, _ in pre_tokenizer.pre_tokenize_str(text)] != reference.pat.findall(text):
            out.append(text)
    return out


def clip_split(pattern: str) -> Any:
    return pre_tokenizers.Split(Regex(pattern), behavior="removed", invert=True)


def all_code_points() -> list[int]:
    return [cp for cp in range(MAX_CODE_POINT + 1) if not 0xD800 <= cp < 0xE000]


# ---------------------------------------------------------------- the build


def test_vocabulary_and_merges_are_openais(tokenizer_json: str, reference: Any) -> None:
    model = json.loads(tokenizer_json)["model"]
    assert list(model["vocab"].items()) == sorted(reference.encoder.items(), key=lambda item: item[1])
    ranked = sorted(reference.bpe_ranks.items(), key=lambda item: item[1])
    assert model["merges"] == [f"{a} {b}" for (a, b), _ in ranked]
    assert model["vocab"]["<|startoftext|>"] == SOT_ID and model["vocab"]["<|endoftext|>"] == EOT_ID


def test_cli_output_is_byte_identical_to_a_second_build(
    tokenizer_json: str, bpe_path: Path, tmp_path: Path
) -> None:
    out = tmp_path / "sub" / "tokenizer.json"
    build_tokenizer.main(["--out", str(out), "--bpe", str(bpe_path)])
    assert out.read_bytes() == tokenizer_json.encode("utf-8")
    assert out.read_text(encoding="utf-8").isascii() is False  # byte symbols kept as UTF-8, not \u escapes


def test_find_bpe_file_finds_openais_merges() -> None:
    path = build_tokenizer.find_bpe_file()
    assert path.name == "bpe_simple_vocab_16e6.txt.gz" and path.parent.name in ("clip", "open_clip")


def test_truncated_merges_file_is_rejected(tmp_path: Path) -> None:
    short = tmp_path / "short.txt.gz"
    short.write_bytes(gzip.compress(b"#version: 0.2\ni n\nt h\n"))
    with pytest.raises(ValueError, match="merge"):
        build_tokenizer.build_tokenizer_json(short)


def test_malformed_merge_line_is_rejected(tmp_path: Path, bpe_path: Path) -> None:
    with gzip.open(bpe_path) as f:
        lines = f.read().decode("utf-8").split("\n")[:20]
    lines[10] = "only-one-symbol"
    bad = tmp_path / "bad.txt.gz"
    bad.write_bytes(gzip.compress("\n".join(lines).encode("utf-8")))
    with pytest.raises(ValueError, match="line 11"):
        build_tokenizer.build_tokenizer_json(bad)


# ---------------------------------------------------------------- cleaning and pre-tokenisation


def test_whitespace_class_is_the_regex_packages_backslash_s() -> None:
    text = "".join(map(chr, all_code_points()))
    want = [m.start() for m in regex.finditer(r"\s", text)]
    got = [m.start() for m in re.finditer(tokenizer_module.WHITESPACE_CLASS, text)]
    assert got == want


def test_clean_text_is_openais(corpus: list[str], reference_module: ModuleType) -> None:
    ref = reference_module
    texts = corpus[:1500]
    different = [t for t in texts if clean_text(t) != ref.whitespace_clean(ref.basic_clean(t)).lower()]
    assert different == []


# ftfy 6's fixers with the default configuration (TextFixerConfig), each checked below on the characters
# for which clean_text skips ftfy; a new fixer in a later ftfy fails the first test until it is checked too.
FTFY_STEPS = {
    "unescape_html", "remove_terminal_escapes", "fix_encoding", "restore_byte_a0", "replace_lossy_sequences",
    "decode_inconsistent_utf8", "fix_c1_controls", "fix_latin_ligatures", "fix_character_width", "uncurl_quotes",
    "fix_line_breaks", "fix_surrogates", "remove_control_chars", "normalization", "max_decode_length", "explain",
}


def test_every_ftfy_fixer_leaves_the_skipped_characters_alone() -> None:
    """Each step of ``ftfy.fix_text`` returns unchanged a text of the characters ``needs_ftfy`` lets through:
    printable ASCII but "&", tab and line feed (all of them at once, and each next to itself and "<")."""
    import ftfy
    from ftfy import chardata

    assert set(ftfy.TextFixerConfig._fields) == FTFY_STEPS
    characters = (chr(cp) for cp in range(MAX_CODE_POINT + 1) if not 0xD800 <= cp < 0xE000)
    skipped = [c for c in characters if not tokenizer_module.needs_ftfy(c)]
    assert skipped == sorted(["\t", "\n", *(chr(cp) for cp in range(0x20, 0x7F) if chr(cp) != "&")])
    texts = ["".join(skipped), "".join(skipped[::-1]), *(c + c + "<" + c for c in skipped)]
    for text in texts:
        assert not tokenizer_module.needs_ftfy(text)
        for name, fixer in ftfy.FIXERS.items():
            if name in ("restore_byte_a0", "replace_lossy_sequences"):  # on bytes, inside fix_encoding only
                assert fixer(text.encode("ascii")) == text.encode("ascii"), name
            else:
                assert fixer(text) == text, name
        assert ftfy.fix_encoding(text) == text
        assert chardata.possible_encoding(text, "ascii")  # fix_encoding's first test: ASCII is never mojibake
        assert unicodedata.normalize("NFC", text) == text
        assert ftfy.fix_text(text) == text
    for table in (chardata.LIGATURES, chardata.WIDTH_MAP, chardata.CONTROL_CHARS):
        assert not {ord(c) for c in skipped} & set(table)


def test_clean_text_skips_ftfy_only_where_it_changes_nothing(reference_module: ModuleType) -> None:
    """On every pair of ASCII characters and 20,000 random near-ASCII texts (entities, markup, CR, terminal
    escapes, controls): ``ftfy.fix_text`` is the identity wherever ``needs_ftfy`` is False, and ``clean_text``
    is OpenAI's everywhere."""
    import ftfy

    ref = reference_module
    texts = near_ascii_cases(20_000)
    skipped = [t for t in texts if not tokenizer_module.needs_ftfy(t)]
    assert 10_000 < len(skipped) < len(texts) - 10_000  # both paths well exercised
    assert [t for t in skipped if ftfy.fix_text(t) != t] == []
    assert [t for t in texts if clean_text(t) != ref.whitespace_clean(ref.basic_clean(t)).lower()] == []
    for odd in ("&", "\r", "\x1b", "\x00", "\x0b", "\x0c", "\x7f", "\x85", "\xa0", "\u2028", "\uff2c"):
        assert tokenizer_module.needs_ftfy(f"a photo{odd}of a cat")


def test_token_ids_match_openai_on_near_ascii_texts(clip_tokenizer: ClipTokenizer, reference: Any) -> None:
    texts = near_ascii_cases(3_000)[-3_000:]
    rows = [[SOT_ID, *reference.encode(text), EOT_ID] for text in texts]
    different = mismatches(clip_tokenizer, texts, rows)
    assert different == [], f"{len(different)} of {len(texts)} differ, e.g.\n" + "\n".join(different[:5])


def test_plain_ascii_texts_never_import_ftfy(tokenizer_path: Path) -> None:
    """Loading the tokenizer and encoding ASCII captions leaves ftfy (and wcwidth) unimported; the first text
    that needs it imports it."""
    code = (
        "import sys\n"
        "from clip_serverless.engine.tokenizer import ClipTokenizer\n"
        f"tok = ClipTokenizer.from_file({str(tokenizer_path)!r})\n"
        "tok.encode(['a photo of a red circle.', 'A <b>bold</b> \"dog\"\\n\\ton a mat!'])\n"
        "assert 'ftfy' not in sys.modules and 'wcwidth' not in sys.modules, 'ftfy imported'\n"
        "tok.encode(['caf\\u00e9 &amp; cr\\u00e8me'])\n"
        "assert 'ftfy' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)


def test_build_uses_openais_pattern(reference: Any) -> None:
    assert reference.pat.pattern == build_tokenizer.CLIP_PATTERN
    assert reference.pat.flags & regex.IGNORECASE


def test_pre_tokenizer_splits_every_code_point_like_openai(tokenizer_json: str, reference: Any) -> None:
    """Every code point's class (letter, number, other, dropped) and every case variant of the literals.

    In ``!{c}{c}`` a letter gives one piece "cc", a number two, an "other" joins the "!" run and a dropped
    character (whitespace, U+0345) splits the run. ``a'{c}`` catches a contraction letter's case variants (all
    in the BMP). The byte-level step and BPE that follow are covered by the token id tests.
    """
    split, byte_level = json.loads(tokenizer_json)["pre_tokenizer"]["pretokenizers"]
    assert (split["type"], split["behavior"], split["invert"]) == ("Split", "Removed", True)
    assert byte_level == {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    code_points = all_code_points()
    texts = sweep_texts("!{c}{c}", code_points) + sweep_texts(
        "a'{c}", [cp for cp in code_points if cp < 0x10000]
    )
    assert split_differences(clip_split(split["pattern"]["Regex"]), reference, texts) == []


def test_code_point_sweep_detects_the_plain_pattern_on_oniguruma(reference: Any) -> None:
    """Sanity check of the sweep: CLIP's pattern as written, run by Oniguruma, is *not* OpenAI's split."""
    plain = clip_split("(?i)" + build_tokenizer.CLIP_PATTERN)
    # U+0345 (dropped by OpenAI's case-insensitive classes) and letters newer than Oniguruma's Unicode tables.
    texts = sweep_texts("!{c}{c}", [0x345, 0x558, 0x10940], chunk=1)
    assert len(split_differences(plain, reference, texts)) == 3


# ---------------------------------------------------------------- token ids against OpenAI


def test_token_ids_match_openai(
    clip_tokenizer: ClipTokenizer, corpus: list[str], reference_rows: list[list[int]]
) -> None:
    assert len(corpus) >= MIN_CASES
    # The corpus must exercise what it claims to: over-long texts, literal special tokens, empty texts.
    assert sum(len(row) > CONTEXT for row in reference_rows) >= 100
    assert sum(row.index(EOT_ID) < len(row) - 1 for row in reference_rows) >= 100
    assert sum(SOT_ID in row[1:] for row in reference_rows) >= 100
    assert sum(row == [SOT_ID, EOT_ID] for row in reference_rows) >= 3
    different = mismatches(clip_tokenizer, corpus, reference_rows)
    assert different == [], f"{len(different)} of {len(corpus)} differ, e.g.\n" + "\n".join(different[:5])


def test_tokenizer_json_alone_matches_openai_on_cleaned_text_without_special_tokens(
    tokenizer_path: Path, corpus: list[str], reference_rows: list[list[int]]
) -> None:
    """``Tokenizer.from_file(...).encode(clean_text(t))`` (its post-processor adds SOT/EOT) works alone."""
    tok = Tokenizer.from_file(str(tokenizer_path))
    cleaned = [(clean_text(t), r) for t, r in zip(corpus[:2000], reference_rows[:2000], strict=True)]
    pairs = [(t, r) for t, r in cleaned if "<|" not in t]
    assert len(pairs) >= 1000
    encodings = tok.encode_batch([t for t, _ in pairs])
    assert [e.ids for e in encodings] == [r for _, r in pairs]


def test_decoder_is_openais_decode(
    tokenizer_path: Path, reference: Any, reference_rows: list[list[int]]
) -> None:
    tok = Tokenizer.from_file(str(tokenizer_path))
    rows = reference_rows[:500]
    assert tok.decode_batch(rows, skip_special_tokens=False) == [reference.decode(row) for row in rows]


def test_mismatch_detector_catches_a_wrong_lower_casing(
    clip_tokenizer: ClipTokenizer,
    corpus: list[str],
    reference_rows: list[list[int]],
    reference_module: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = reference_module
    monkeypatch.setattr(tokenizer_module, "clean_text", lambda t: ref.whitespace_clean(ref.basic_clean(t)))
    assert len(mismatches(clip_tokenizer, corpus[:500], reference_rows[:500])) > 50


def test_mismatch_detector_catches_missing_special_token_handling(
    clip_tokenizer: ClipTokenizer,
    corpus: list[str],
    reference_rows: list[list[int]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tokenizer_module, "_merge_special_pieces", lambda text, encoding: encoding.ids)
    with_specials = [
        i
        for i, row in enumerate(reference_rows)
        if len(row) <= CONTEXT and (SOT_ID in row[1:] or EOT_ID in row[1:-1])
    ]
    texts = [corpus[i] for i in with_specials]
    assert len(mismatches(clip_tokenizer, texts, [reference_rows[i] for i in with_specials])) == len(texts)


# ---------------------------------------------------------------- behaviour


def test_empty_text_is_sot_eot_then_padding(clip_tokenizer: ClipTokenizer) -> None:
    batch = clip_tokenizer.encode(["", "   \n\t"])
    assert batch.ids.tolist() == [[SOT_ID, EOT_ID, *[0] * (CONTEXT - 2)]] * 2
    assert batch.lengths.tolist() == [2, 2]
    assert batch.truncated == (False, False)


def test_batch_shapes_dtypes_padding_and_lengths(clip_tokenizer: ClipTokenizer, corpus: list[str]) -> None:
    texts = corpus[:400]
    batch = clip_tokenizer.encode(texts)
    assert batch.ids.shape == (len(texts), CONTEXT) and batch.ids.dtype == np.int64
    assert batch.lengths.shape == (len(texts),) and batch.lengths.dtype == np.int64
    assert len(batch.truncated) == len(texts)
    for row, length, truncated in zip(batch.ids, batch.lengths, batch.truncated, strict=True):
        assert row[0] == SOT_ID
        assert length == int(np.argmax(row == EOT_ID)) + 1  # the first EOT: where the text tower pools
        last = int(np.flatnonzero(row)[-1])
        assert row[last] == EOT_ID  # the real last token is EOT, only zeros after it
        assert not row[last + 1 :].any()
        if truncated:
            assert last == CONTEXT - 1  # a truncated row fills the context


def test_literal_end_of_text_sets_length_at_the_first_eot(
    clip_tokenizer: ClipTokenizer, reference: Any
) -> None:
    text = "a photo <|endoftext|> of a cat"
    batch = clip_tokenizer.encode([text])
    assert batch.lengths[0] == 4  # SOT, "a", "photo", EOT
    ref_row = [SOT_ID, *reference.encode(text), EOT_ID]
    assert batch.ids[0, : len(ref_row)].tolist() == ref_row  # the tokens after it are kept, like OpenAI
    assert ref_row.count(EOT_ID) == 2


def test_over_long_text_keeps_sot_first_75_tokens_and_eot(
    clip_tokenizer: ClipTokenizer, reference: Any
) -> None:
    texts = ["word " * 75, "word " * 76, "the quick brown fox jumps over the lazy dog " * 20]
    batch = clip_tokenizer.encode(texts)
    assert batch.truncated == (False, True, True)
    assert batch.lengths.tolist() == [CONTEXT] * 3
    for row, text in zip(batch.ids, texts, strict=True):
        ref = reference.encode(text)
        assert row.tolist() == [SOT_ID, *ref[: CONTEXT - 2], EOT_ID]


def test_batch_equals_one_by_one(clip_tokenizer: ClipTokenizer, corpus: list[str]) -> None:
    texts = corpus[:150] + corpus[-150:]
    batch = clip_tokenizer.encode(texts)
    for i, text in enumerate(texts):
        single = clip_tokenizer.encode([text])
        assert single.ids[0].tolist() == batch.ids[i].tolist()
        assert single.lengths[0] == batch.lengths[i] and single.truncated[0] == batch.truncated[i]


def test_empty_batch(clip_tokenizer: ClipTokenizer) -> None:
    batch = clip_tokenizer.encode([])
    assert batch.ids.shape == (0, CONTEXT) and batch.lengths.shape == (0,) and batch.truncated == ()


def test_rejects_a_bare_string_and_non_strings(clip_tokenizer: ClipTokenizer) -> None:
    with pytest.raises(TypeError, match="not a single str"):
        clip_tokenizer.encode("a photo of a cat")
    with pytest.raises(TypeError, match=r"texts\[1\] is bytes"):
        clip_tokenizer.encode(["ok", b"bytes"])  # type: ignore[list-item]


def test_custom_context_length(tokenizer_path: Path, reference: Any) -> None:
    tok = ClipTokenizer.from_file(tokenizer_path, context_length=8)
    assert tok.context_length == 8
    text = "one two three four five six seven"
    batch = tok.encode([text, "cat"])
    assert batch.ids.shape == (2, 8)
    assert batch.ids[0].tolist() == [SOT_ID, *reference.encode(text)[:6], EOT_ID]
    assert batch.truncated == (True, False)
    with pytest.raises(ValueError, match="at least 2"):
        ClipTokenizer.from_file(tokenizer_path, context_length=1)


def test_from_file_rejects_other_files(tmp_path: Path, tokenizer_json: str) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"garbage\.json"):
        ClipTokenizer.from_file(garbage)
    with pytest.raises(ValueError, match=r"missing\.json"):
        ClipTokenizer.from_file(tmp_path / "missing.json")

    with_added = json.loads(tokenizer_json)
    with_added["added_tokens"] = [
        {
            "id": EOT_ID,
            "content": "<|endoftext|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    ]
    hugging_face_style = tmp_path / "hf.json"
    hugging_face_style.write_text(json.dumps(with_added), encoding="utf-8")
    with pytest.raises(ValueError, match="not built by clip_export"):
        ClipTokenizer.from_file(hugging_face_style)

    other = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "<unk>": 1}, unk_token="<unk>"))
    other_path = tmp_path / "other.json"
    other.save(str(other_path))
    with pytest.raises(ValueError, match=r"other\.json: not a CLIP tokenizer"):
        ClipTokenizer.from_file(other_path)
