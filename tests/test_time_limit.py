"""Text lists that cannot be embedded before a Lambda function's timeout: a 413 saying how many would fit, early,
instead of the timeout's bare 500 after the whole wait. Off Lambda there is no deadline."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from clip_serverless import service as service_module
from clip_serverless.api.deadline import RESERVE_S
from clip_serverless.service import FIT_MARGIN, ClipService, ModelDir, OutOfTime
from clip_serverless.types import Float32Array, Int64Array

from tests.lambda_events import FakeContext, http_api_event, response_json


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def monotonic(self) -> float:
        return self.t


class SteadyTower:
    """A text tower that takes a hundredth of a second of ``clock`` per token of each batch it embeds."""

    loaded = True

    def __init__(self, clock: Clock, dim: int) -> None:
        self.clock = clock
        self.dim = dim
        self.calls = 0

    def load(self) -> None:
        pass

    def encode(self, ids: Int64Array, lengths: npt.NDArray[np.integer] | None = None) -> Float32Array:
        assert lengths is not None
        self.calls += 1
        self.clock.t += float(np.sum(lengths)) / 100
        return np.ones((ids.shape[0], self.dim), dtype=np.float32)


@pytest.fixture
def steady(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ClipService, SteadyTower, Clock]:
    clock = Clock()
    monkeypatch.setattr(service_module, "time", SimpleNamespace(monotonic=clock.monotonic,
                                                                  perf_counter=time.perf_counter))
    model_dir = ModelDir.open(tiny_model_path)
    tower = SteadyTower(clock, model_dir.manifest.embed_dim)
    return ClipService(model_dir, text_tower=tower, text_batch_size=4), tower, clock


TEXTS = [f"a photo of {i} red circles" for i in range(40)]  # ten batches of four


def seconds_for_all(service: ClipService) -> float:
    return float(service.tokenizer.encode(TEXTS).lengths.sum()) / 100


def test_without_a_deadline_every_batch_runs(steady: tuple[ClipService, SteadyTower, Clock]) -> None:
    service, tower, _ = steady
    assert len(service.embed_texts(TEXTS, use_cache=False).vectors) == 40
    assert tower.calls == 10


def test_a_list_that_ends_in_time_is_embedded_whole(steady: tuple[ClipService, SteadyTower, Clock]) -> None:
    service, tower, clock = steady
    need = seconds_for_all(service)
    result = service.embed_texts(TEXTS, use_cache=False, deadline=clock.t + need + 0.01)
    assert len(result.vectors) == 40 and tower.calls == 10


def test_a_list_that_would_not_is_refused_after_its_first_batch(
        steady: tuple[ClipService, SteadyTower, Clock]) -> None:
    service, tower, clock = steady
    need = seconds_for_all(service)
    with pytest.raises(OutOfTime) as caught:
        service.embed_texts(TEXTS, use_cache=False, deadline=clock.t + need * 0.46)
    assert tower.calls == 1  # the rate of the first batch already says the rest cannot end in time
    assert caught.value.total == 40
    # 46% of the time the whole list needs: 18.4 of 40 texts like these, less the margin
    assert caught.value.fit == int(FIT_MARGIN * 18.4) == 15
    assert "Send at most 15 per request" in str(caught.value)


def test_no_batch_starts_that_would_end_after_the_deadline(steady: tuple[ClipService, SteadyTower, Clock]) -> None:
    service, tower, clock = steady
    per_batch = seconds_for_all(service) / 10
    # Slower batches than the first: the projection is renewed before each, so the work stops in time.
    original = tower.encode

    def slowing(ids: Int64Array, lengths: npt.NDArray[np.integer] | None = None) -> Float32Array:
        if tower.calls >= 1:
            clock.t += per_batch * tower.calls
        return original(ids, lengths)

    tower.encode = slowing  # type: ignore[method-assign]
    deadline = clock.t + per_batch * 10.5
    with pytest.raises(OutOfTime):
        service.embed_texts(TEXTS, use_cache=False, deadline=deadline)
    assert 1 < tower.calls < 10
    assert clock.t <= deadline


def test_the_first_batch_runs_even_past_the_deadline(steady: tuple[ClipService, SteadyTower, Clock]) -> None:
    service, tower, clock = steady
    with pytest.raises(OutOfTime):
        service.embed_texts(TEXTS, use_cache=False, deadline=clock.t - 1)
    assert tower.calls == 1
    assert len(service.embed_texts(TEXTS[:4], use_cache=False, deadline=clock.t - 1).vectors) == 4  # one batch


# -- through a Lambda function's app (Mangum, the real tiny model) ----------------------------------------

class ContextWithTime(FakeContext):
    def __init__(self, remaining_ms: int) -> None:
        self.remaining_ms = remaining_ms

    def get_remaining_time_in_millis(self) -> int:
        return self.remaining_ms


MANY = [f"a photo of {i} blue squares" for i in range(100)]  # four batches of the default 32


@pytest.fixture
def lambda_handler(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], Any]:
    def make(endpoint: str) -> Any:
        from clip_serverless.api.app import build
        from mangum import Mangum

        monkeypatch.setenv("CLIP_MODEL_DIR", str(tiny_model_path))
        monkeypatch.setenv("CLIP_CACHE", "off")
        return Mangum(build(endpoints=(endpoint,)), lifespan="off")

    return make


def test_embed_text_out_of_time_is_413_saying_how_many_fit(lambda_handler: Callable[[str], Any]) -> None:
    handler = lambda_handler("embed_text")
    event = http_api_event("POST", "/clip/embed_text", {"text": MANY})
    # No time left beyond the reserve for the response: the first batch runs, then the request is refused.
    refused = handler(event, ContextWithTime(int(RESERVE_S * 1000)))
    assert refused["statusCode"] == 413
    message = response_json(refused)["message"]
    assert "100 texts like these cannot be embedded within this function's time limit" in message
    assert "Send at most" in message
    done = handler(event, ContextWithTime(30_000))
    assert done["statusCode"] == 200 and len(response_json(done)["embeddings"]) == 100


def test_openai_embeddings_out_of_time_is_413_in_openais_shape(lambda_handler: Callable[[str], Any]) -> None:
    handler = lambda_handler("embeddings")
    event = http_api_event("POST", "/v1/embeddings", {"input": MANY})
    refused = handler(event, ContextWithTime(int(RESERVE_S * 1000)))
    assert refused["statusCode"] == 413
    error = response_json(refused)["error"]
    assert error["param"] == "input" and "Send at most" in error["message"]
    done = handler(event, ContextWithTime(30_000))
    assert done["statusCode"] == 200 and len(response_json(done)["data"]) == 100


def test_off_lambda_there_is_no_deadline(make_app: Callable[..., Any]) -> None:
    from fastapi.testclient import TestClient

    with TestClient(make_app()) as client:
        response = client.post("/clip/embed_text", json={"text": MANY})
    assert response.status_code == 200 and len(response.json()["embeddings"]) == 100
