"""The CLIP tokenizer built from OpenAI's merges file, shared by the tokenizer, export and quantisation tests.

A pytest plugin (tests/conftest.py lists it in ``pytest_plugins``): session fixtures, built once per run.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def bpe_path() -> Path:
    """OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, from the reference packages that ship it."""
    from clip_export.build_tokenizer import find_bpe_file

    return find_bpe_file()


@pytest.fixture(scope="session")
def tokenizer_json(bpe_path: Path) -> str:
    """The tokenizer.json every exported model directory holds."""
    from clip_export.build_tokenizer import build_tokenizer_json

    return build_tokenizer_json(bpe_path)
