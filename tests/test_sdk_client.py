"""Roboflow's own client, inference-sdk, against the local server: every call unchanged.

The SDK lives in its own venv (CLIP_SDK_PYTHON, made by `make test`), so its pins cannot change ours.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, shape_png

pytestmark = pytest.mark.sdk

SDK_PYTHON = os.environ.get("CLIP_SDK_PYTHON", str(REPO / ".venv-sdk" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(tiny_model_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    full_env = {**os.environ, "CLIP_MODEL_DIR": str(tiny_model_path), "CLIP_CACHE": "on", **env}
    proc = subprocess.Popen([sys.executable, "-m", "clip_serverless.api.local", "--port", str(port)],
                            env=full_env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with urllib.request.urlopen(url + "/", timeout=1) as response:
                if response.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start within 30 s")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("sdk")
    red, blue = folder / "red_circle.png", folder / "blue_square.png"
    red.write_bytes(shape_png("circle", "red"))
    blue.write_bytes(shape_png("square", "blue"))
    return str(red), str(blue)


@pytest.fixture(scope="module")
def server(tiny_model_path: Path) -> Iterator[str]:
    proc, url = start_server(tiny_model_path)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def run_sdk(*args: str) -> dict[str, Any]:
    """run_sdk_calls.py's JSON summary (values as JSON made them: lists, dicts, numbers, strings)."""
    assert Path(SDK_PYTHON).exists(), f"{SDK_PYTHON} missing: `make test` creates the SDK venv"
    out = subprocess.run([SDK_PYTHON, str(REPO / "tests" / "sdk" / "run_sdk_calls.py"), *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_inference_sdk_works_unchanged(server: str, images: tuple[str, str]) -> None:
    r = run_sdk(server, *images)
    dim = r["text_str"][1][0]
    assert r["image_path"] == r["image_numpy"] == r["image_pil"] == [[1], [dim]]
    assert r["image_list"] == [[1, 1, 1], [dim] * 3]
    assert r["image_keys"] == ["embeddings", "frame_id", "inference_id", "time"]
    assert r["text_list"] == [[3], [dim]]
    assert r["text_keys"] == ["embeddings", "frame_id", "inference_id", "time"]
    sims = r["compare_image_text"]
    assert isinstance(sims, list) and len(sims) == 3 and max(range(3), key=sims.__getitem__) == 0
    text_images = r["compare_text_images"]
    assert isinstance(text_images, list) and text_images[1] > text_images[0]
    as_dict = r["compare_image_dict"]
    assert isinstance(as_dict, dict) and list(as_dict) == ["circle", "square"] and as_dict["square"] > as_dict["circle"]
    text_text = r["compare_text_text"]
    assert isinstance(text_text, list) and text_text[0] == pytest.approx(1.0, abs=1e-6)
    assert r["compare_keys"] == ["frame_id", "inference_id", "parent_id", "similarity", "time"]
    assert r["async_image"] == [[1], [dim]] and r["async_images"] == [[1, 1], [dim, dim]]
    assert r["async_text"] == [[3], [dim]]
    assert r["async_compare"] == pytest.approx(sims, abs=1e-6)
    status, message = r["unknown_version"]
    assert status == 404 and "ViT-L-14" in message


def test_inference_sdk_with_an_api_key(tiny_model_path: Path, images: tuple[str, str]) -> None:
    proc, url = start_server(tiny_model_path, CLIP_API_KEY="sdk-secret")
    try:
        r = run_sdk(url, *images, "sdk-secret")
        assert r["text_list"][0] == [3]
        refused = subprocess.run(
            [SDK_PYTHON, "-c", "import sys; from inference_sdk import InferenceHTTPClient as C; "
             "from inference_sdk.http.errors import HTTPCallErrorError as E\n"
             "try:\n C(api_url=sys.argv[1], api_key='wrong').get_clip_text_embeddings(text='x')\n"
             "except E as e: print(e.status_code)", url], capture_output=True, text=True, timeout=60)
        assert refused.stdout.strip() == "401", refused.stderr
    finally:
        proc.terminate()
        proc.wait(10)
