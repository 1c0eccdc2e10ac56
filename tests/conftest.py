"""Shared fixtures: the committed demo model, apps built on it, test images."""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "models" / "clip-tiny"

# No test may reach AWS: fake credentials and region for boto3/moto, set before anything imports boto3.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_SESSION_TOKEN", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(autouse=True)
def fresh_aws_session() -> Iterator[None]:
    """Every test's AWS clients come from a new botocore session: ``clip_serverless.aws_clients`` keeps one per
    process, and a session made before moto (``mock_aws``) started would send its calls to AWS."""
    from clip_serverless.aws_clients import forget_session

    forget_session()
    yield
    forget_session()


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    assert (TINY_MODEL / "manifest.json").exists(), "models/clip-tiny is missing: run python -m clip_export.train_tiny"
    return TINY_MODEL


@pytest.fixture(scope="module")
def tiny_service(tiny_model_path: Path) -> Any:
    """A ClipService on the demo model, no cache: the local towers' reference answers."""
    from clip_serverless.engine.model_dir import ModelDir
    from clip_serverless.service import ClipService

    return ClipService(ModelDir.open(tiny_model_path))


def shape_png(shape: str = "circle", color: str = "red", seed: int = 1_000_000_007, fmt: str = "PNG") -> bytes:
    from clip_export.shapes import render_shape

    buffer = io.BytesIO()
    render_shape(shape, color, seed).save(buffer, format=fmt)
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def image_obj(data: bytes) -> dict[str, str]:
    return {"type": "base64", "value": b64(data)}


@pytest.fixture(scope="session")
def red_circle() -> bytes:
    return shape_png("circle", "red")


@pytest.fixture(scope="session")
def blue_square() -> bytes:
    return shape_png("square", "blue")


@pytest.fixture
def make_app(tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    """Build the combined app from environment overrides (as a deployment would configure it)."""

    def build(**env: str) -> Any:
        from clip_serverless.api.app import build as build_app

        monkeypatch.setenv("CLIP_MODEL_DIR", str(tiny_model_path))
        monkeypatch.setenv("CLIP_CACHE", env.pop("CLIP_CACHE", "off"))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return build_app()

    return build


@pytest.fixture
def client(make_app: Callable[..., Any]) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(make_app(), raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A real HTTP S3/SSM endpoint (moto) on 127.0.0.1, shared by the tests; each module makes its own buckets."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def fake_aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials and region, and no profile, config file or endpoint override from the environment:
    boto3 reads nothing real and reaches only the endpoints a test names (moto)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)


# Fixtures shared by a few modules, each file on its own topic (AWS stand-ins, the CLIP tokenizer).
pytest_plugins = ["tests.fixtures_aws", "tests.fixtures_tokenizer"]
