"""Where one ``embed_image`` request's time goes: each stage alone, then the whole request two ways.

Stages (each timed alone, in this process, on the same 1024x768 JPEG q=90 photo that
``../shared/tools/peer-bench`` sends): JSON parse of the request body, pydantic validation, base64
decode, JPEG decode, EXIF orientation, resize + centre crop, normalisation, the ONNX run, and the
response (``tolist`` + JSON encoding). Whole requests: the Lambda handler (Mangum over FastAPI) given an
API Gateway HTTP API v2 event, and the local server (uvicorn, as ``make serve`` runs it) over loopback
HTTP, client wall time and the server's own ``time`` field.

"Overhead" is the whole request minus the unavoidable work measured in the same run (decode, the resize on
one thread, the ONNX run as embed_image runs it, spinning): what the request path adds around it; the
resize in bands on two threads makes it negative where the function has two vCPUs.

    .venv/bin/python bench/bench_request_path.py [--model build/models/ViT-B-32-synthetic-int8] [--rounds 40]

Needs the full-size model (`make models-b32`) for representative figures; any model directory works.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "build" / "models" / "ViT-B-32-synthetic-int8"


def photo_jpeg(name: str = "coffee", *, mirror: bool = False) -> bytes:
    """A 1024x768 JPEG (q=90) from a scikit-image photo, made as peer-bench makes its image."""
    import skimage.data
    from PIL import Image

    pixels = getattr(skimage.data, name)()
    h, w = pixels.shape[:2]
    cw, ch = (h * 4 // 3, h) if w * 3 > h * 4 else (w, w * 3 // 4)
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    image = Image.fromarray(pixels[y0 : y0 + ch, x0 : x0 + cw]).convert("RGB")
    image = image.resize((1024, 768), Image.Resampling.LANCZOS)
    if mirror:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def timed(fn: Callable[[], Any], rounds: int, warmup: int = 3) -> float:
    """Median milliseconds of ``fn`` over ``rounds`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return statistics.median(samples)


def http_api_event(body: str, path: str = "/clip/embed_image") -> dict[str, Any]:
    return {
        "version": "2.0", "routeKey": f"POST {path}", "rawPath": path, "rawQueryString": "",
        "headers": {"content-type": "application/json", "host": "example.execute-api.us-east-1.amazonaws.com"},
        "requestContext": {"http": {"method": "POST", "path": path, "protocol": "HTTP/1.1",
                                    "sourceIp": "203.0.113.1", "userAgent": "bench"},
                           "requestId": "bench", "stage": "$default", "domainName": "example.com",
                           "accountId": "123456789012", "apiId": "example", "timeEpoch": 0},
        "body": body, "isBase64Encoded": False,
    }


class Context:
    function_name = "bench"
    aws_request_id = "bench"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stages(model: Path, jpeg: bytes, body: str, rounds: int) -> dict[str, float]:
    from clip_serverless.api.images import decode_base64_image
    from clip_serverless.api.schemas import ClipImageEmbeddingRequest
    from clip_serverless.engine import SessionTuning
    from clip_serverless.engine.encoder import ImageEncoder
    from clip_serverless.engine.model_dir import ModelDir
    from clip_serverless.engine.preprocessing import (
        _normalisation_table,
        _normalise_into,
        decode_image,
        resize_center_crop,
    )
    from PIL import Image, ImageOps

    model_dir = ModelDir.open(model)
    m = model_dir.manifest
    encoder = ImageEncoder(model_dir, tuning=SessionTuning(spinning=False))
    encoder.load()
    spinning = ImageEncoder(model_dir, tuning=SessionTuning(spinning=True))  # as embed_image's function runs
    spinning.load()
    parsed = json.loads(body)
    image = decode_image(jpeg)
    crop = resize_center_crop(image, m.image_size)
    table = _normalisation_table(tuple(m.mean), tuple(m.std))
    out = np.empty((3, m.image_size, m.image_size), dtype=np.float32)
    pixels = out[None]
    vector = encoder.encode(pixels)

    def decode_only() -> None:
        im = Image.open(io.BytesIO(jpeg))
        im.load()

    loaded = Image.open(io.BytesIO(jpeg))
    loaded.load()
    return {
        "JSON parse of the body": timed(lambda: json.loads(body), rounds),
        "pydantic validation": timed(lambda: ClipImageEmbeddingRequest.model_validate(parsed), rounds),
        "base64 decode": timed(lambda: decode_base64_image(parsed["image"]["value"]), rounds),
        "JPEG decode (Image.open + load)": timed(decode_only, rounds),
        "EXIF orientation": timed(lambda: ImageOps.exif_transpose(loaded, in_place=True), rounds),
        "decode_image (all of the above three)": timed(lambda: decode_image(jpeg), rounds),
        "resize + centre crop, 1 thread": timed(lambda: resize_center_crop(image, m.image_size), rounds),
        "resize + centre crop, bands on 2 threads": timed(
            lambda: resize_center_crop(image, m.image_size, workers=2), rounds),
        "normalise": timed(lambda: _normalise_into(out, crop, table), rounds),
        "ONNX run, no spinning": timed(lambda: encoder.encode(pixels), rounds),
        "ONNX run, spinning (as embed_image runs)": timed(lambda: spinning.encode(pixels), rounds),
        "response: tolist + JSON": timed(lambda: json.dumps({"embeddings": vector.tolist()}), rounds),
    }


def lambda_handler_ms(model: Path, body: str, rounds: int) -> float:
    os.environ.update({"CLIP_MODEL_DIR": str(model), "CLIP_CACHE": "off", "CLIP_API_KEY_SOURCE": "none"})
    from clip_serverless.aws_lambda.entry import handler_for

    handler = handler_for("embed_image")
    event = http_api_event(body)

    def call() -> None:
        response = handler(event, Context())
        assert response["statusCode"] == 200, response

    return timed(call, rounds)


def local_server_ms(model: Path, body: str, rounds: int) -> tuple[float, float]:
    import httpx

    port = free_port()
    env = {**os.environ, "CLIP_MODEL_DIR": str(model), "CLIP_CACHE": "off", "PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "clip_serverless.api.local", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if client.get("/healthz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the local server did not start")
                time.sleep(0.1)
            headers = {"content-type": "application/json"}
            server_times: list[float] = []

            def call() -> None:
                response = client.post("/clip/embed_image", content=body, headers=headers)
                assert response.status_code == 200, response.text
                server_times.append(response.json()["time"] * 1000)

            wall = timed(call, rounds)
            return wall, statistics.median(server_times[3:])
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--photo", default="coffee", choices=["coffee", "astronaut"])
    args = parser.parse_args()
    jpeg = photo_jpeg(args.photo)
    body = json.dumps({"image": {"type": "base64", "value": base64.b64encode(jpeg).decode()}})
    print(f"model {args.model.name}; {args.photo} 1024x768 JPEG q=90, {len(jpeg)} bytes; body {len(body)} bytes; "
          f"{os.cpu_count()} CPUs; median of {args.rounds}")
    parts = stages(args.model, jpeg, body, args.rounds)
    for name, ms in parts.items():
        print(f"  {name:42s} {ms:7.2f} ms")
    unavoidable = (parts["decode_image (all of the above three)"] + parts["resize + centre crop, 1 thread"]
                   + parts["ONNX run, spinning (as embed_image runs)"])
    label = "unavoidable: decode + resize + ONNX run"
    print(f"  {label:42s} {unavoidable:7.2f} ms   (resize on 1 thread, ONNX spinning)")
    handler = lambda_handler_ms(args.model, body, args.rounds)
    print(f"  {'Lambda handler, HTTP API v2 event':42s} {handler:7.2f} ms   overhead {handler - unavoidable:6.2f} ms")
    wall, server = local_server_ms(args.model, body, args.rounds)
    print(f"  {'local server, server time field':42s} {server:7.2f} ms   overhead {server - unavoidable:6.2f} ms")
    print(f"  {'local server, client wall time':42s} {wall:7.2f} ms   overhead {wall - unavoidable:6.2f} ms")


if __name__ == "__main__":
    main()
