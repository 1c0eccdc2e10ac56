"""The opt-in draft JPEG decode (``CLIP_IMAGE_DECODE=draft``): off by default, close to the exact path but not
equal to it, so its vectors never share cache keys or bulk shards with exact ones. How close it stays on real
photos is measured by bench/bench_draft_decode.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clip_serverless.bulk.layout import JobSpec, S3Uri
from clip_serverless.bulk.shard import ShardRunner
from clip_serverless.cache.keys import ModelIdentity, image_key
from clip_serverless.engine import EngineSettings
from clip_serverless.engine.model_dir import ModelDir
from clip_serverless.engine.preprocessing import decode_and_preprocess, decode_image, preprocess
from clip_serverless.envparse import SettingsError
from clip_serverless.service import ClipService
from clip_serverless.settings import Settings

from tests import images
from tests.conftest import image_obj

BIG_JPEG = images.encode(images.sized(2048, 1536), "JPEG", quality=90)


def service(path: Path, decode: str) -> ClipService:
    return ClipService(ModelDir.open(path), engine=EngineSettings(image_decode=decode))


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_the_setting_defaults_to_exact_and_refuses_anything_else() -> None:
    assert Settings.from_env({"CLIP_MODEL_DIR": "m"}).engine.image_decode == "exact"
    assert Settings.from_env({"CLIP_MODEL_DIR": "m", "CLIP_IMAGE_DECODE": " Draft "}).engine.image_decode == "draft"
    with pytest.raises(SettingsError, match="CLIP_IMAGE_DECODE must be one of exact, draft"):
        Settings.from_env({"CLIP_MODEL_DIR": "m", "CLIP_IMAGE_DECODE": "fast"})
    with pytest.raises(ValueError, match="image_decode"):
        EngineSettings(image_decode="fast")


def test_decode_and_preprocess_drafts_only_when_asked() -> None:
    exact = decode_and_preprocess([BIG_JPEG])[0]
    drafted = decode_and_preprocess([BIG_JPEG], draft=True)[0]
    np.testing.assert_array_equal(exact, preprocess(decode_image(BIG_JPEG)))
    np.testing.assert_array_equal(drafted, preprocess(decode_image(BIG_JPEG, draft=True)))
    assert not np.array_equal(exact, drafted)
    # the draft keeps both sides at least the model's input size: 336 asks for a larger scale than 224
    assert min(decode_image(BIG_JPEG, draft=True, draft_size=336).size) >= 336


def test_draft_vectors_are_close_to_exact_ones_and_other_formats_are_untouched(tiny_model_path: Path) -> None:
    exact, draft = service(tiny_model_path, "exact"), service(tiny_model_path, "draft")
    a = exact.embed_images([BIG_JPEG], use_cache=False).vectors[0]
    b = draft.embed_images([BIG_JPEG], use_cache=False).vectors[0]
    assert not np.array_equal(a, b)
    assert cosine(a, b) > 0.999
    # A PNG, and a JPEG whose short side is under twice the input size (chelsea: 451x300), decode exactly.
    png = images.encode(images.sized(2048, 1536), "PNG")
    small = images.encode(images.photo("chelsea"), "JPEG", quality=90)
    np.testing.assert_array_equal(exact.embed_images([png, small], use_cache=False).vectors,
                                  draft.embed_images([png, small], use_cache=False).vectors)


def test_draft_through_the_api(make_app: Any) -> None:
    from fastapi.testclient import TestClient

    body = {"image": image_obj(BIG_JPEG)}
    with TestClient(make_app()) as exact, TestClient(make_app(CLIP_IMAGE_DECODE="draft")) as draft:
        a = exact.post("/clip/embed_image", json=body)
        b = draft.post("/clip/embed_image", json=body)
    assert a.status_code == b.status_code == 200
    va, vb = a.json()["embeddings"][0], b.json()["embeddings"][0]
    assert va != vb and cosine(va, vb) > 0.999


def test_draft_vectors_get_their_own_cache_keys(tiny_model_path: Path) -> None:
    manifest = ModelDir.open(tiny_model_path).manifest
    exact = ModelIdentity.from_manifest(manifest)
    assert ModelIdentity.from_manifest(manifest, image_decode="exact") == exact  # exact keys are unchanged
    draft = ModelIdentity.from_manifest(manifest, image_decode="draft")
    assert image_key(draft, BIG_JPEG) != image_key(exact, BIG_JPEG)
    settings = Settings.from_env({"CLIP_MODEL_DIR": str(tiny_model_path), "CLIP_CACHE_MEMORY_MB": "8",
                                  "CLIP_IMAGE_DECODE": "draft"})
    cache = ClipService.from_settings(settings).cache
    assert cache is not None and cache.model == draft


def test_a_bulk_shard_done_with_one_decode_is_redone_with_the_other(tiny_model_path: Path) -> None:
    spec = JobSpec(src=S3Uri.parse("s3://src/photos/"), dst=S3Uri.parse("s3://dst/out/"))
    exact = ShardRunner(service(tiny_model_path, "exact"), s3=None)  # type: ignore[arg-type]
    draft = ShardRunner(service(tiny_model_path, "draft"), s3=None)  # type: ignore[arg-type]
    manifest = exact.manifest
    record = {"batch": "b", "model_digest": manifest.digest, "dtype": "float32", "embedded": 3, "errors": 0}
    assert exact._finished(record, spec, "b")  # a record from before the setting existed: exact
    assert not draft._finished(record, spec, "b")
    assert draft._finished({**record, "image_decode": "draft"}, spec, "b")
    assert not exact._finished({**record, "image_decode": "draft"}, spec, "b")
    texts = JobSpec(src=S3Uri.parse("s3://src/captions.csv"), dst=spec.dst, modality="text", source="captions")
    assert draft._finished(record, texts, "b")  # texts are not decoded: the setting does not matter
