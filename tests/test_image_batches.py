"""A batch of images through the API: every vector is the one its image gets alone, bit for bit, whatever
its neighbours, at both precisions (fp32 and per-token int8 run the batch in one ONNX run, per-tensor int8
row by row), and whatever order the parallel decode and resize finish in."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clip_export.quantize import quantize_model_dir
from clip_serverless.engine.encoder import ImageEncoder
from clip_serverless.engine.model_dir import ModelDir
from fastapi.testclient import TestClient

from tests import images
from tests.conftest import TINY_MODEL, b64


def _quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def int8_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The demo model at int8, activations quantised per tensor (run row by row) and per token (in one run)."""
    out = {}
    for per_token in (False, True):
        name = "int8-per-token" if per_token else "int8"
        out[name] = tmp_path_factory.mktemp(name) / "model"
        # force: the demo model's thresholds aside
        quantize_model_dir(TINY_MODEL, out[name], force=True, progress=_quiet, per_token_activations=per_token)
        assert ImageEncoder(ModelDir.open(out[name])).per_row is not per_token
    return out


@pytest.fixture(params=["fp32", "int8", "int8-per-token"])
def precision_client(request: pytest.FixtureRequest, make_app: Callable[..., Any], int8_tiny: dict[str, Path]
                     ) -> Iterator[tuple[str, Any]]:
    env = {"CLIP_MODEL_DIR": str(int8_tiny[request.param])} if request.param in int8_tiny else {}
    with TestClient(make_app(**env), raise_server_exceptions=False) as client:
        yield request.param, client


def photos() -> list[bytes]:
    """Eight real photos of different shapes, one of them high contrast (it would widen a shared range)."""
    shapes = [(1024, 768, "coffee"), (480, 640, "astronaut"), (300, 300, "chelsea"), (225, 900, "coffee"),
              (50, 40, "astronaut"), (800, 600, "chelsea"), (640, 480, "rocket"), (333, 500, "hubble_deep_field")]
    out = []
    for w, h, name in shapes:
        image = np.asarray(images.sized(w, h, name))
        if name == "rocket":
            image = np.where(image > 128, 255, 0).astype(np.uint8)
        out.append(images.encode(image, "JPEG", quality=90))
    return out


def embed(client: Any, blobs: list[bytes]) -> np.ndarray[Any, np.dtype[np.float64]]:
    response = client.post("/clip/embed_image", json={"image": [{"type": "base64", "value": b64(b)} for b in blobs]})
    assert response.status_code == 200, response.text
    return np.asarray(response.json()["embeddings"])


def test_each_vector_of_a_batch_is_the_vector_of_its_image_alone(precision_client: tuple[str, Any]) -> None:
    precision, client = precision_client
    blobs = photos()
    alone = np.stack([embed(client, [blob])[0] for blob in blobs])
    batch = embed(client, blobs)
    np.testing.assert_array_equal(batch, alone, err_msg=precision)
    reversed_batch = embed(client, blobs[::-1])
    np.testing.assert_array_equal(reversed_batch[::-1], alone, err_msg=precision)
    pairs = embed(client, [blobs[3], blobs[3], blobs[6]])
    np.testing.assert_array_equal(pairs, alone[[3, 3, 6]], err_msg=precision)
    assert len({row.tobytes() for row in alone}) == len(blobs)  # distinct images, distinct vectors


def test_a_bad_image_in_a_batch_is_named_whatever_finishes_first(precision_client: tuple[str, Any]) -> None:
    _, client = precision_client
    blobs = photos()
    blobs[5] = b"not an image at all"
    response = client.post("/clip/embed_image", json={"image": [{"type": "base64", "value": b64(b)} for b in blobs]})
    assert response.status_code == 400
    assert "not an image" in response.json()["message"].lower()
