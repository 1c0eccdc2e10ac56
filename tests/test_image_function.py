"""Image vectors from another function through Lambda Invoke: embed_image's side (serve_images, and its handler
answering direct invocations) and the caller's (ImageFunction: calls split by payload and batch size, errors).
What /v1/embeddings does with them is in test_openai_api.py; the built functions in test_built_functions.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from clip_serverless.aws_lambda.tower_function import (
    IMAGE_KEY,
    ImageFunction,
    TowerFunctionError,
    is_image_request,
    serve_images,
)
from clip_serverless.service import ClipService

from tests.conftest import b64, shape_png
from tests.handlers import load_function
from tests.lambda_events import FakeContext, invoke_payload


class EmbedImageStandIn:
    """A Lambda client whose invoke runs serve_images on a local service, as the embed_image function does."""

    def __init__(self, service: ClipService, max_images: int = 8) -> None:
        self.service = service
        self.max_images = max_images
        self.payload_sizes: list[int] = []

    def invoke(self, FunctionName: str, Payload: bytes) -> dict[str, Any]:
        self.payload_sizes.append(len(Payload))
        event = json.loads(Payload)
        assert is_image_request(event)
        answer = serve_images(event, self.service, max_images=self.max_images)
        return {"StatusCode": 200, "Payload": invoke_payload(answer)}


def test_image_vectors_through_another_function_are_the_local_towers(tiny_service: ClipService) -> None:
    blobs = [shape_png("circle", "red"), shape_png("square", "blue"), shape_png("triangle", "green")]
    stand_in = EmbedImageStandIn(tiny_service)
    remote = ImageFunction("EmbedImageFunction", tiny_service.manifest, client=stand_in)
    vectors, counts = remote.embed(blobs)
    assert np.array_equal(vectors, tiny_service.embed_images(blobs, use_cache=False).vectors)
    assert len(stand_in.payload_sizes) == 1 and counts == {}  # one call; no cache in this service
    # Calls are split to stay within the Invoke payload and the batch size, in order.
    small = ImageFunction("EmbedImageFunction", tiny_service.manifest, client=stand_in, max_images=2,
                          max_payload_bytes=2 * 4 * len(blobs[0]) // 3 + 64)
    stand_in.payload_sizes.clear()
    assert np.array_equal(small.embed(blobs)[0], vectors)
    assert len(stand_in.payload_sizes) == 3
    tiny = ImageFunction("EmbedImageFunction", tiny_service.manifest, client=stand_in, max_payload_bytes=100)
    with pytest.raises(TowerFunctionError) as caught:
        tiny.embed(blobs)
    assert caught.value.status == 413 and "Image 0" in caught.value.message


def test_the_image_function_refuses_what_it_cannot_embed(tiny_service: ClipService) -> None:
    remote = ImageFunction("EmbedImageFunction", tiny_service.manifest, client=EmbedImageStandIn(tiny_service))
    with pytest.raises(TowerFunctionError) as caught:
        remote.embed([b"not an image"])
    assert caught.value.status == 400 and caught.value.message.startswith("Could not load input image. Cause: ")

    def status(request: Any) -> int:
        return int(serve_images({IMAGE_KEY: request}, tiny_service, max_images=2)[IMAGE_KEY]["error"]["status"])

    good = {"v": 1, "model": tiny_service.manifest.digest, "images": [b64(shape_png())]}
    assert "vectors" in serve_images({IMAGE_KEY: good}, tiny_service, max_images=2)[IMAGE_KEY]
    assert status({**good, "v": 2}) == 400
    assert status({**good, "model": "0" * 64}) == 503  # another model: a deployment in progress
    assert status({**good, "images": []}) == 400
    assert status({**good, "images": [b64(shape_png())] * 3}) == 400  # over its batch size
    assert status({**good, "images": ["%%%"]}) == 400
    assert status({**good, "images": [3]}) == 400


@pytest.fixture(scope="module")
def embed_image_handler(tiny_model_path: Path) -> Any:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIP_MODEL_DIR", str(tiny_model_path))
        mp.setenv("CLIP_CACHE", "off")
        return load_function("embed_image").handler


def test_embed_image_answers_direct_invocations_for_image_vectors(embed_image_handler: Any,
                                                                  tiny_service: ClipService) -> None:
    red = shape_png("circle", "red")
    event = {IMAGE_KEY: {"v": 1, "model": tiny_service.manifest.digest, "images": [b64(red)], "cache": True}}
    answer = embed_image_handler(event, FakeContext())[IMAGE_KEY]
    vectors = np.frombuffer(base64.b64decode(answer["vectors"]), dtype="<f4").reshape(answer["count"], answer["dim"])
    assert np.array_equal(vectors, tiny_service.embed_images([red], use_cache=False).vectors)


