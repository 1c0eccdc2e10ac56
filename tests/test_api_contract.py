"""The wire contract of Roboflow's CLIP routes, through the combined app."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import TINY_MODEL, b64, image_obj, shape_png

EMBED_KEYS = ["inference_id", "frame_id", "time", "embeddings"]
COMPARE_KEYS = ["inference_id", "frame_id", "time", "similarity", "parent_id"]


def post(client: Any, route: str, body: Any, **kwargs: Any) -> Any:
    return client.post(f"/clip/{route}", json=body, **kwargs)


def test_embed_text_single_and_list_shapes(client: Any) -> None:
    one = post(client, "embed_text", {"text": "a photo of a red circle."})
    assert one.status_code == 200
    assert one.headers["content-type"] == "application/json"
    body = one.json()
    assert list(body) == EMBED_KEYS
    assert body["inference_id"] is None and body["frame_id"] is None and body["time"] > 0
    assert np.array(body["embeddings"]).shape == (1, 32) or len(body["embeddings"]) == 1
    many = post(client, "embed_text", {"text": ["a red circle", "a blue square", "a red circle"]}).json()
    rows = np.array(many["embeddings"])
    assert rows.shape[0] == 3
    np.testing.assert_array_equal(rows[0], rows[2])
    assert not np.allclose(rows[0], rows[1])


def test_embed_text_is_raw_not_normalised(client: Any) -> None:
    rows = np.array(post(client, "embed_text", {"text": ["a red circle", "a green star"]}).json()["embeddings"])
    norms = np.linalg.norm(rows, axis=1)
    assert not np.allclose(norms, 1.0, atol=1e-3)


def test_embed_text_matches_the_core(client: Any, tiny_model_path: Any) -> None:
    from clip_serverless.engine.encoder import TextEncoder
    from clip_serverless.engine.model_dir import ModelDir
    from clip_serverless.engine.tokenizer import ClipTokenizer

    model = ModelDir.open(tiny_model_path)
    batch = ClipTokenizer.from_file(model.file("tokenizer.json")).encode(["a yellow triangle"])
    expected = TextEncoder(model).encode(batch.ids, batch.lengths)
    got = np.array(post(client, "embed_text", {"text": "a yellow triangle"}).json()["embeddings"], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_embed_image_single_object_and_list_in_order(client: Any, red_circle: bytes, blue_square: bytes) -> None:
    single = post(client, "embed_image", {"image": image_obj(red_circle)})
    assert single.status_code == 200
    assert list(single.json()) == EMBED_KEYS
    a = np.array(single.json()["embeddings"])
    assert a.shape[0] == 1
    listed = np.array(post(client, "embed_image", {"image": [image_obj(blue_square), image_obj(red_circle)]})
                      .json()["embeddings"])
    assert listed.shape[0] == 2
    np.testing.assert_allclose(listed[1], a[0], atol=1e-5)
    assert not np.allclose(listed[0], a[0])


def test_embed_image_accepts_data_url_prefix_and_unknown_fields(client: Any, red_circle: bytes) -> None:
    plain = post(client, "embed_image", {"image": image_obj(red_circle)}).json()["embeddings"]
    prefixed = post(client, "embed_image", {
        "image": {"type": "BASE64", "value": "data:image/png;base64," + b64(red_circle)},
        "api_key": None, "usage_billable": True, "disable_model_monitoring": True, "some_future_field": [1, 2],
        "clip_version_id": "tiny-shapes", "model_id": "clip/tiny-shapes",
    })
    assert prefixed.status_code == 200, prefixed.text
    np.testing.assert_array_equal(np.array(prefixed.json()["embeddings"]), np.array(plain))


def test_compare_image_vs_text_picks_the_right_caption(client: Any, red_circle: bytes) -> None:
    prompts = ["a photo of a red circle.", "a photo of a blue square.", "a photo of a green star."]
    r = post(client, "compare", {"subject": image_obj(red_circle), "prompt": prompts})
    assert r.status_code == 200
    body = r.json()
    assert list(body) == COMPARE_KEYS
    sims = body["similarity"]
    assert len(sims) == 3 and all(-1 <= s <= 1 for s in sims)
    assert int(np.argmax(sims)) == 0


def test_compare_defaults_and_a_str_prompt_gives_one_element_list(client: Any, red_circle: bytes) -> None:
    r = post(client, "compare", {"subject": image_obj(red_circle), "prompt": "a red circle"})
    assert r.status_code == 200 and len(r.json()["similarity"]) == 1


def test_compare_dict_prompt_keeps_keys_in_order(client: Any, blue_square: bytes) -> None:
    prompt = {"z-square": "a photo of a blue square.", "a-circle": "a photo of a red circle."}
    sims = post(client, "compare", {"subject": image_obj(blue_square), "prompt": prompt}).json()["similarity"]
    assert list(sims) == ["z-square", "a-circle"]
    assert sims["z-square"] > sims["a-circle"]


def test_compare_lone_image_object_prompt_is_one_image(client: Any, red_circle: bytes, blue_square: bytes) -> None:
    r = post(client, "compare", {"subject": image_obj(red_circle), "prompt": image_obj(red_circle),
                                 "subject_type": "image", "prompt_type": "image"})
    assert r.status_code == 200
    assert r.json()["similarity"] == [pytest.approx(1.0, abs=1e-5)]
    two = post(client, "compare", {"subject": image_obj(red_circle), "prompt_type": "image",
                                   "prompt": [image_obj(blue_square), image_obj(red_circle)]}).json()["similarity"]
    assert two[1] == pytest.approx(1.0, abs=1e-5) and two[0] < two[1]


def test_compare_text_vs_image_and_text_vs_text(client: Any, red_circle: bytes, blue_square: bytes) -> None:
    r = post(client, "compare", {"subject": "a photo of a blue square.", "subject_type": "text",
                                 "prompt_type": "image", "prompt": [image_obj(red_circle), image_obj(blue_square)]})
    assert r.status_code == 200
    sims = r.json()["similarity"]
    assert sims[1] > sims[0]
    tt = post(client, "compare", {"subject": "a red circle", "subject_type": "text", "prompt_type": "text",
                                  "prompt": ["a red circle", "a blue square"]}).json()["similarity"]
    assert tt[0] == pytest.approx(1.0, abs=1e-6) and tt[1] < tt[0]


def test_compare_similarity_is_cosine_of_the_embeddings(client: Any, red_circle: bytes) -> None:
    image = np.array(post(client, "embed_image", {"image": image_obj(red_circle)}).json()["embeddings"][0])
    texts = ["a red circle", "a green triangle"]
    rows = np.array(post(client, "embed_text", {"text": texts}).json()["embeddings"])
    expected = rows @ image / (np.linalg.norm(rows, axis=1) * np.linalg.norm(image))
    got = post(client, "compare", {"subject": image_obj(red_circle), "prompt": texts}).json()["similarity"]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_compare_untyped_string_subject_is_base64(client: Any, red_circle: bytes) -> None:
    typed = post(client, "compare", {"subject": image_obj(red_circle), "prompt": ["a red circle"]}).json()
    bare = post(client, "compare", {"subject": b64(red_circle), "prompt": ["a red circle"]}).json()
    assert bare["similarity"] == pytest.approx(typed["similarity"], abs=1e-7)


def test_clip_version_id_of_the_deployed_model_and_a_404_otherwise(client: Any) -> None:
    ok = post(client, "embed_text", {"text": "x", "clip_version_id": "tiny-shapes"})
    assert ok.status_code == 200
    assert ok.headers["x-model-id"] == "clip/tiny-shapes"
    missing = post(client, "embed_text", {"text": "x", "clip_version_id": "ViT-L-14"})
    assert missing.status_code == 404
    assert "ViT-L-14" in missing.json()["message"] and "clip/tiny-shapes" in missing.json()["message"]


def test_over_long_text_is_truncated_visibly(client: Any) -> None:
    long_text = "red circle " * 60
    r = post(client, "embed_text", {"text": ["short", long_text]})
    assert r.status_code == 200
    assert r.headers["x-clip-truncated-texts"] == "1"
    assert len(r.json()["embeddings"]) == 2
    assert "x-clip-truncated-texts" not in post(client, "embed_text", {"text": "short"}).headers


def test_over_long_text_is_a_400_when_truncation_is_off(make_app: Any) -> None:
    from fastapi.testclient import TestClient

    with TestClient(make_app(CLIP_TRUNCATE_TEXT="false")) as c:
        r = post(c, "embed_text", {"text": ["ok", "red circle " * 60]})
    assert r.status_code == 400
    assert "index 1" in r.json()["message"] and "77 tokens" in r.json()["message"]


def test_long_text_lists_are_not_capped(client: Any) -> None:
    texts = [f"a photo of {i} red circles" for i in range(70)]
    rows = post(client, "embed_text", {"text": texts}).json()["embeddings"]
    assert len(rows) == 70
    again = post(client, "embed_text", {"text": texts[40]}).json()["embeddings"][0]
    np.testing.assert_allclose(rows[40], again, atol=1e-6)


def test_batch_limit_is_configurable(make_app: Any, red_circle: bytes) -> None:
    from fastapi.testclient import TestClient

    with TestClient(make_app(CLIP_MAX_BATCH_SIZE="2")) as c:
        assert post(c, "embed_image", {"image": [image_obj(red_circle)] * 2}).status_code == 200
        r = post(c, "embed_image", {"image": [image_obj(red_circle)] * 3})
        assert r.status_code == 400 and "2" in r.json()["message"]
        r = post(c, "compare", {"subject": image_obj(red_circle), "prompt": ["a", "b", "c"]})
        assert r.status_code == 400 and "prompts" in r.json()["message"]


def test_health_info_and_openapi(client: Any) -> None:
    health = client.get("/healthz").json()
    assert health["model_id"] == "clip/tiny-shapes" and health["status"] == "ok"
    assert set(client.get("/info").json()) == {"name", "version", "uuid"}
    assert client.get("/").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/clip/embed_image", "/clip/embed_text", "/clip/compare"} <= set(paths)


def test_health_says_when_the_model_is_a_demo(client: Any, tmp_path: Path) -> None:
    health = client.get("/healthz").json()
    assert health["demo"] is True and "not OpenAI's CLIP" in health["warning"]
    from clip_serverless.api.app import create_app
    from clip_serverless.engine.model_dir import ModelDir
    from clip_serverless.service import ClipService
    from clip_serverless.settings import Settings
    from fastapi.testclient import TestClient

    shutil.copytree(TINY_MODEL, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    manifest["provenance"] = {"source": "pretrained", "weights": "openai/clip-vit-base-patch32"}
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest))
    service = ClipService(ModelDir.open(tmp_path / "m"))
    with TestClient(create_app(service, Settings(model_dir=tmp_path / "m"))) as real:
        health = real.get("/healthz").json()
    assert health["demo"] is False and "warning" not in health


def test_api_key_off_by_default_and_required_when_configured(make_app: Any) -> None:
    from fastapi.testclient import TestClient

    body = {"text": "a red circle"}
    with TestClient(make_app(CLIP_API_KEY="s3cret")) as c:
        assert post(c, "embed_text", body).status_code == 401
        assert post(c, "embed_text", {**body, "api_key": None}).json() == {"message": "Unauthorized api_key"}
        assert post(c, "embed_text", {**body, "api_key": "wrong"}).status_code == 401
        assert post(c, "embed_text", {**body, "api_key": "s3cret"}).status_code == 200
        assert post(c, "embed_text", body, params={"api_key": "s3cret"}).status_code == 200
        assert post(c, "embed_text", body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert post(c, "embed_text", body, headers={"Authorization": "bearer s3cret"}).status_code == 200
        # Precedence: query, then header, then body; the first present is the one checked.
        assert post(c, "embed_text", {**body, "api_key": "s3cret"}, params={"api_key": "wrong"}).status_code == 401
        assert post(c, "embed_text", {**body, "api_key": "wrong"},
                    headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_cache_opt_out_header_and_stats_header(make_app: Any) -> None:
    from fastapi.testclient import TestClient

    with TestClient(make_app(CLIP_CACHE="on")) as c:
        first = post(c, "embed_text", {"text": ["a red circle", "a blue square"]})
        second = post(c, "embed_text", {"text": ["a red circle", "a blue square"]})
        bypass = post(c, "embed_text", {"text": ["a red circle"]}, headers={"Cache-Control": "no-cache"})
    assert "misses=2" in first.headers["x-clip-cache"]
    assert "misses=0" in second.headers["x-clip-cache"]
    assert first.json()["embeddings"] == second.json()["embeddings"]
    assert "misses=1" in bypass.headers["x-clip-cache"]


def test_every_shape_colour_round_trip(client: Any) -> None:
    """Zero-shot through the API over all classes: the demo model must know its shapes."""
    from clip_export.shapes import caption, classes

    labels = classes()
    prompts = {f"{s}/{c}": caption(s, c) for s, c in labels}
    correct = 0
    chosen = labels[::3]
    for i, (shape, color) in enumerate(chosen):
        # prompts are capped at 8: compare against the true caption and 7 others.
        others = [k for k in prompts if k != f"{shape}/{color}"][i % 5 :: 3][:7]
        keys = [f"{shape}/{color}", *others]
        sims = post(client, "compare", {"subject": image_obj(shape_png(shape, color, seed=2_000_000_000 + i)),
                                        "prompt": {k: prompts[k] for k in keys}}).json()["similarity"]
        correct += max(sims, key=sims.__getitem__) == f"{shape}/{color}"
    assert correct >= len(chosen) - 1
