"""Completes a model directory at init from the content of other Lambda layers.

Why: a function plus all its layers may hold 250 MiB unzipped. ``compare`` needs both CLIP towers
(int8 ViT-B/32: 89 + 65 MB) beside ~124 MiB of runtime packages, which does not fit. It ships the
visual tower in a layer and takes the text tower from the layer that ``embed_text`` already uses:
``GetLayerVersionByArn`` answers with a pre-signed S3 URL of that layer's zip, which is read with
parallel ranged GETs and unpacked into ``/tmp`` (so the deployment stays one ``sam deploy``, with no
separate model upload, and the function only needs ``lambda:GetLayerVersion`` on that layer).

Run by ``/opt/bin/clip-fetch-model`` (the function's ``AWS_LAMBDA_EXEC_WRAPPER``) before the runtime
starts, so the API code sees an ordinary model directory. Environment:

| variable | meaning |
|---|---|
| ``CLIP_MODEL_DIR`` | the directory to complete (``/tmp/clip-model``) |
| ``CLIP_FETCH_BASE`` | a model directory already present whose files are linked first (``/opt/model``) |
| ``CLIP_FETCH_LAYERS`` | comma-separated layer version ARNs; the ``model/`` files of their zips are added |

Every fetched file listed in ``manifest.json`` is checked against its size and sha256. Files already
complete (a re-init in the same sandbox) are not fetched again. Tests point boto3 at a stand-in with
its standard ``AWS_ENDPOINT_URL_LAMBDA``. Standard library and boto3 only: the
script runs in a bare ``python3`` of the Lambda runtime, before the layers are on ``sys.path``.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import sys
import time
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
LAYER_PREFIX = "model/"
CHUNK_BYTES = 8 * 1024 * 1024
WORKERS = 8
ATTEMPTS = 3
TIMEOUT_S = 20.0


class FetchError(RuntimeError):
    pass


def _get_range(url: str, start: int, end: int) -> tuple[int, dict[str, str], bytes]:
    if not url.startswith(("https://", "http://")):
        raise FetchError(f"not an HTTP(S) URL: {url[:40]}")
    request = urllib.request.Request(url, headers={"Range": f"bytes={start}-{end}"})  # noqa: S310 (checked above)
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:  # noqa: S310 (checked above)
                return response.status, dict(response.headers.items()), response.read()
        except OSError as exc:
            if attempt == ATTEMPTS:
                raise FetchError(f"GET bytes {start}-{end} failed {ATTEMPTS} times: {exc}") from None
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def download(url: str, chunk: int = CHUNK_BYTES, workers: int = WORKERS) -> bytes:
    """The whole object at ``url``, read as concurrent ranged GETs (one stream from S3 tops out far
    below what a Lambda's network allows)."""
    status, headers, first = _get_range(url, 0, chunk - 1)
    if status == 200:  # the server ignored the range: that was the whole object
        return first
    content_range = {k.lower(): v for k, v in headers.items()}.get("content-range", "")
    try:
        total = int(content_range.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        raise FetchError(f"no usable Content-Range in a 206 answer: {content_range!r}") from None
    buffer = bytearray(total)
    buffer[: len(first)] = first
    ranges = [(start, min(start + chunk, total) - 1) for start in range(len(first), total, chunk)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for (start, end), (_, _, body) in zip(ranges, pool.map(lambda r: _get_range(url, *r), ranges), strict=True):
            if len(body) != end - start + 1:
                raise FetchError(f"bytes {start}-{end}: got {len(body)} bytes")
            buffer[start : end + 1] = body
    return bytes(buffer)


def layer_location(arn: str) -> str:
    import boto3  # in the Lambda runtime; imported here so that the rest stays stdlib

    client = boto3.client("lambda")
    location: str = client.get_layer_version_by_arn(Arn=arn)["Content"]["Location"]
    return location


def _manifest_files(manifest: dict[str, Any]) -> dict[str, tuple[int, str]]:
    return {name: (int(e["bytes"]), str(e["sha256"])) for name, e in manifest.get("files", {}).items()}


def _complete(path: Path, expected: tuple[int, str] | None) -> bool:
    return path.exists() and (expected is None or path.stat().st_size == expected[0])


def _write_checked(path: Path, data: bytes, expected: tuple[int, str] | None) -> None:
    if expected is not None:
        size, sha256 = expected
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha256:
            raise FetchError(f"{path.name}: size or sha256 does not match {MANIFEST}")
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    partial.replace(path)


def complete_model_dir(dest: Path, base: Path | None, layer_arns: list[str]) -> list[str]:
    """Link ``base``'s files into ``dest``, then add the ``model/`` files of each layer not yet there.

    Returns the names fetched. Raises FetchError when a fetched file does not match the manifest.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if base is not None and base.is_dir():
        for source in base.iterdir():
            target = dest / source.name
            if not target.exists():
                target.symlink_to(source)
    manifest_path = dest / MANIFEST
    listed = _manifest_files(json.loads(manifest_path.read_text())) if manifest_path.exists() else {}
    fetched: list[str] = []
    for arn in layer_arns:
        names = [n for n in listed if n != MANIFEST and not _complete(dest / n, listed[n])]
        if listed and not names:
            break  # everything the manifest lists is already here
        with zipfile.ZipFile(io.BytesIO(download(layer_location(arn)))) as archive:
            members = [m for m in archive.namelist() if m.startswith(LAYER_PREFIX) and not m.endswith("/")]
            if not listed and LAYER_PREFIX + MANIFEST in members:
                listed = _manifest_files(json.loads(archive.read(LAYER_PREFIX + MANIFEST)))
            for member in members:
                name = member.removeprefix(LAYER_PREFIX)
                if "/" in name or _complete(dest / name, listed.get(name)):
                    continue
                _write_checked(dest / name, archive.read(member), listed.get(name))
                fetched.append(name)
    return fetched


def main() -> int:
    start = time.perf_counter()
    dest = Path(os.environ.get("CLIP_MODEL_DIR", "/tmp/clip-model"))  # noqa: S108 (Lambda's only writable dir)
    base_raw = os.environ.get("CLIP_FETCH_BASE", "/opt/model")
    arns = [a.strip() for a in os.environ.get("CLIP_FETCH_LAYERS", "").split(",") if a.strip()]
    try:
        fetched = complete_model_dir(dest, Path(base_raw) if base_raw else None, arns)
    except Exception as exc:  # the runtime has not started: say why on stderr (CloudWatch) and fail init
        print(f"clip-fetch-model: could not complete {dest}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    size = sum((dest / name).stat().st_size for name in fetched)
    print(f"clip-fetch-model: {dest}: fetched {', '.join(fetched) or 'nothing'} "
          f"({size / 1e6:.1f} MB) in {time.perf_counter() - start:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
