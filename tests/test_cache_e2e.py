"""The cache end to end through the Lambda handlers, S3 on a moto server: embed_text fills, compare hits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import image_obj
from tests.fixtures_aws import create_bucket, s3_keys
from tests.handlers import load_function
from tests.lambda_events import FakeContext, http_api_event, response_headers, response_json

BUCKET = "clip-cache-e2e"
CAPTIONS = ["a photo of a red circle.", "a photo of a blue square.", "a photo of a green star.",
            "a photo of a yellow triangle."]


@pytest.fixture(scope="module")
def moto_url(moto_server: str) -> str:
    create_bucket(BUCKET, moto_server)
    return moto_server


@pytest.fixture(scope="module")
def new_container(moto_url: str, tiny_model_path: Path) -> Callable[[str], Any]:
    """Cold-start a function: a fresh module, hence a fresh memory tier (on Lambda, a new container)."""
    env = {"CLIP_MODEL_DIR": str(tiny_model_path), "CLIP_CACHE": "on", "CLIP_CACHE_BUCKET": BUCKET,
           "CLIP_CACHE_S3_ENDPOINT_URL": moto_url, "CLIP_CACHE_S3_WRITE": "sync", "CLIP_CACHE_PREFIX": "e2e/"}

    def start(name: str) -> Any:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in env.items():
                mp.setenv(key, value)
            return load_function(name).handler

    return start


@pytest.fixture(scope="module")
def functions(new_container: Callable[[str], Any]) -> dict[str, Any]:
    return {name: new_container(name) for name in ("embed_text", "compare", "embed_image")}


def call(handler: Any, route: str, body: Any) -> tuple[Any, dict[str, str]]:
    response = handler(http_api_event("POST", f"/clip/{route}", body), FakeContext())
    assert response["statusCode"] == 200, response
    return response_json(response), response_headers(response)


def cache_stats(headers: dict[str, str]) -> dict[str, int]:
    return {k: int(v) for k, v in (part.split("=") for part in headers["x-clip-cache"].split(";"))}


def test_embed_text_fills_s3_and_compare_hits_it(functions: dict[str, Any], moto_url: str, red_circle: bytes,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _, headers = call(functions["embed_text"], "embed_text", {"text": CAPTIONS})
    assert cache_stats(headers)["misses"] == 4
    text_keys = [k for k in s3_keys(BUCKET, moto_url) if "/text/" in k]
    assert len(text_keys) == 4 and all(k.startswith("e2e/tiny-shapes/") for k in text_keys)

    # compare must not run the text tower for these prompts: count encoder calls.
    from clip_serverless.engine.encoder import TextEncoder

    calls: list[int] = []
    original = TextEncoder.encode

    def counting(self: TextEncoder, ids: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(ids))
        return original(self, ids, *args, **kwargs)

    monkeypatch.setattr(TextEncoder, "encode", counting)
    result, headers = call(functions["compare"], "compare", {"subject": image_obj(red_circle), "prompt": CAPTIONS})
    stats = cache_stats(headers)
    assert stats["s3_hits"] == 4, stats  # the four prompts, from the other function's entries
    assert calls == []
    assert int(np.argmax(result["similarity"])) == 0
    # The image was a miss and is now in S3 too: embed_image (another container) hits it.
    _, headers = call(functions["embed_image"], "embed_image", {"image": image_obj(red_circle)})
    assert cache_stats(headers)["s3_hits"] == 1


def test_cached_vectors_equal_computed_ones(functions: dict[str, Any], new_container: Callable[[str], Any]) -> None:
    first, _ = call(functions["embed_text"], "embed_text", {"text": CAPTIONS})
    fresh = new_container("embed_text")
    second, headers = call(fresh, "embed_text", {"text": CAPTIONS})
    assert cache_stats(headers)["s3_hits"] == 4
    assert first["embeddings"] == second["embeddings"]
