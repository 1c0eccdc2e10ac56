"""Is the embedding cache a win? Cache paths and compute side by side in one run, and the per-modality choice.

Measures (medians) for a 512-d vector:
  * key hashing (sha256 of an encoded JPEG; of a caption's token ids),
  * a memory hit through ``embed_cached`` (lookup + assembly),
  * the codec (encode / verify + decode),
  * S3 against moto's HTTP server on 127.0.0.1 (``ThreadedMotoServer``), through the cache's own ``S3Tier``:
    GET hit, GET miss (404), PUT, for 1 key and for a batch of 8 (concurrent),
  * compute with a full-size model directory, when present: decode + preprocess + visual encode of a
    640x480 JPEG; tokenize + text encode of a caption, alone and in batches of 4 and 8,
  * import costs in fresh processes: boto3, a boto3 S3 client, Powertools Metrics, this cache package,
and prints the decision for each modality. moto over loopback is a lower bound for S3: in AWS, add the
network (a GET of a small object in-region: ~10-30 ms median, "tens of milliseconds" in AWS's S3 performance
guidelines; a PUT usually more) and a TLS handshake on a container's first call.

    python bench/bench_cache.py [--model-dir build/models/ViT-B-32-synthetic] [--threads 1] [--repeats 20]

Figures taken on a shared machine drift; ratios within one run are what hold.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import logging
import math
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "layers" / "core"))

from clip_serverless.cache import EmbeddingCache, Entry, ModelIdentity, codec, embed_cached  # noqa: E402
from clip_serverless.cache.memory import MemoryTier  # noqa: E402
from clip_serverless.cache.s3 import S3Tier  # noqa: E402

DIM = 512
CAPTIONS = ["a photo of a cat", "a photo of a dog", "a diagram of a bridge", "a red sports car",
            "two people on a beach", "a bowl of ramen", "a city at night", "a handwritten note"]
# What AWS would take for one small-object GET in-region (the figure; AWS: "tens of milliseconds").
AWS_GET_MS = (10.0, 30.0)


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def sample_jpeg(width: int = 640, height: int = 480) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], axis=-1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# -- cache paths ------------------------------------------------------------------------------------
@contextlib.contextmanager
def moto_endpoint(in_process: bool) -> Iterator[str]:
    """moto's S3 over HTTP on 127.0.0.1: its own process by default, so that its request handling does not
    share this process's GIL (in-process, concurrent calls are serialised by moto's CPU time)."""
    if in_process:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def fake_aws_environment() -> None:
    """Fake credentials and region, no profile: boto3 talks to moto only, never with real credentials."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        os.environ[name] = "testing"
    os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
    os.environ.pop("AWS_PROFILE", None)


def bench_cache_paths(repeats: int, moto_in_process: bool) -> dict[str, float]:
    fake_aws_environment()

    model = ModelIdentity("clip/ViT-B-32", "ab" * 32, DIM)
    jpeg = sample_jpeg()
    vector = np.random.default_rng(1).standard_normal(DIM).astype(np.float32)
    out: dict[str, float] = {}

    memory = MemoryTier(64 << 20)
    cache = EmbeddingCache(model, [memory])
    label = f"key: sha256 of a {len(jpeg) // 1024} KB JPEG"
    out[label] = median_ms(lambda: cache.key("image", jpeg), repeats)
    ids = np.array([49406, 320, 1125, 539, 320, 2368, 49407], dtype="<i8").tobytes()
    out["key: caption token ids"] = median_ms(lambda: cache.key("text", ids), repeats)

    key = cache.key("image", jpeg)
    blob = codec.encode(key, model.model_id, vector)
    out["codec encode"] = median_ms(lambda: codec.encode(key, model.model_id, vector), repeats)
    out["codec verify + decode"] = median_ms(lambda: codec.decode(blob, key=key, model_id=model.model_id,
                                                                  dim=DIM), repeats)
    memory.put(key, vector)
    out["memory hit via embed_cached"] = median_ms(
        lambda: embed_cached(cache, [key], lambda idx: np.zeros((len(idx), DIM), np.float32),
                             modality="image"), repeats)

    with moto_endpoint(moto_in_process) as url:
        tier = S3Tier("bench-cache", "embeddings/", endpoint_url=url, region="us-east-1",
                      policy={"image": 1, "text": 1})
        tier.client.create_bucket(Bucket="bench-cache")
        keys = [cache.key("image", jpeg + bytes([i])) for i in range(8)]
        tier.put_many({k: Entry(vector, codec.encode(k, model.model_id, vector)) for k in keys})
        missing = [cache.key("image", jpeg + b"missing" + bytes([i])) for i in range(8)]
        counter = iter(range(10**9))

        def fresh(n: int) -> dict[str, Entry]:
            i = next(counter)
            return {cache.key("image", b"put%d-%d" % (i, j)): Entry(vector, blob) for j in range(n)}

        out["S3 (moto HTTP) GET hit, 1 key"] = median_ms(lambda: tier.get_many(keys[:1]), repeats)
        out["S3 (moto HTTP) GET hit, 8 keys concurrently"] = median_ms(lambda: tier.get_many(keys), repeats)
        out["S3 (moto HTTP) GET miss (404), 1 key"] = median_ms(lambda: tier.get_many(missing[:1]), repeats)
        out["S3 (moto HTTP) PUT, 1 key"] = median_ms(lambda: tier.put_many(fresh(1)), repeats)
        out["S3 (moto HTTP) PUT, 8 keys concurrently"] = median_ms(lambda: tier.put_many(fresh(8)), repeats)
        s3_cache = EmbeddingCache(model, [tier])
        out["S3 (moto HTTP) hit via embed_cached, 1 key"] = median_ms(
            lambda: embed_cached(s3_cache, keys[:1], lambda idx: np.zeros((len(idx), DIM), np.float32),
                                 modality="image"), repeats)
        tier.close()
    return out


# -- compute ----------------------------------------------------------------------------------------
def bench_compute(model_dir: Path, threads: int, repeats: int) -> dict[str, float]:
    from clip_serverless.engine.encoder import ImageEncoder, TextEncoder
    from clip_serverless.engine.model_dir import TOKENIZER_FILE, ModelDir
    from clip_serverless.engine.preprocessing import decode_image, preprocess_batch
    from clip_serverless.engine.tokenizer import ClipTokenizer

    md = ModelDir.open(model_dir)
    m = md.manifest
    tag = f"{m.precision}, {threads} thread{'s' if threads > 1 else ''}"
    jpeg = sample_jpeg()
    out: dict[str, float] = {}

    def decode() -> np.ndarray:
        return preprocess_batch([decode_image(jpeg)], m.image_size, m.mean, m.std)

    out["image: decode + preprocess 640x480 JPEG"] = median_ms(decode, repeats)
    if md.has("visual.onnx"):
        image = ImageEncoder(md, threads=threads)
        image.load()
        pixels = decode()
        out[f"image: visual encode, batch 1 ({tag})"] = median_ms(lambda: image.encode(pixels), repeats)
    if md.has("textual.onnx"):
        tokenizer = ClipTokenizer.from_file(md.file(TOKENIZER_FILE), context_length=m.context_length)
        text = TextEncoder(md, threads=threads)
        text.load()
        def embed_texts(captions: Sequence[str]) -> np.ndarray:
            batch = tokenizer.encode(captions)
            return text.encode(batch.ids, batch.lengths)

        for n in (1, 4, 8):
            label = f"text: tokenize + encode {n} caption{'s' if n > 1 else ''} ({tag})"
            out[label] = median_ms(functools.partial(embed_texts, CAPTIONS[:n]), repeats)
    return out


# -- import costs -----------------------------------------------------------------------------------
def import_ms(statement: str, runs: int = 7) -> float | None:
    code = f"import time; t = time.perf_counter(); {statement}; print((time.perf_counter() - t) * 1000)"
    env = dict(os.environ, PYTHONPATH=str(REPO / "layers" / "core"))
    times = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            return None
        times.append(float(proc.stdout.strip()))
    return statistics.median(times)


def bench_imports() -> dict[str, float | None]:
    stdlib = "import json, logging, hashlib, threading, concurrent.futures"
    return {
        "import boto3": import_ms(f"{stdlib}; t = time.perf_counter(); import boto3"),
        "import boto3 + create an S3 client": import_ms(
            f"{stdlib}; t = time.perf_counter(); import boto3; "
            "boto3.session.Session().client('s3', region_name='us-east-1')"),
        "from aws_lambda_powertools.metrics import Metrics": import_ms(
            f"{stdlib}; t = time.perf_counter(); from aws_lambda_powertools.metrics import Metrics"),
        "import clip_serverless.cache (whole package)": import_ms(
            f"{stdlib}; import numpy; t = time.perf_counter(); import clip_serverless.cache"),
    }


# -- report -----------------------------------------------------------------------------------------
def table(title: str, rows: dict[str, float | None]) -> None:
    print(f"\n{title}")
    width = max(len(k) for k in rows) + 2
    for name, value in rows.items():
        shown = "n/a (not installed)" if value is None else f"{value:9.3f} ms"
        print(f"  {name:<{width}}{shown}")


def decide(cache: dict[str, float], computes: dict[str, dict[str, float]]) -> None:
    """Per modality and model: from how many misses does one S3 round trip cost less than computing?"""
    low, high = AWS_GET_MS
    moto_get = cache["S3 (moto HTTP) GET hit, 1 key"]
    print(f"\nDecision: S3 pays when computing the misses takes longer than one GET round trip "
          f"({moto_get:.1f} ms to moto here; {low:.0f}-{high:.0f} ms in AWS; a list's GETs run concurrently)")
    for name, compute in computes.items():
        def find(prefix: str, figures: dict[str, float] = compute) -> float | None:
            return next((v for k, v in figures.items() if k.startswith(prefix)), None)

        decode, visual = find("image: decode"), find("image: visual encode")
        if decode is not None and visual is not None:
            image = decode + visual
            verdict = "from 1 miss" if image > high else f"from {math.ceil(high / image)} misses"
            print(f"  {name} image: decode+preprocess+encode {image:.1f} ms -> S3 pays {verdict}")
        t1, t8 = find("text: tokenize + encode 1 caption"), find("text: tokenize + encode 8 captions")
        if t1 is not None and t8 is not None:
            # n captions are one ONNX batch: t(n) ~ a + b*n.
            b = max((t8 - t1) / 7, 1e-6)
            a = t1 - b
            needed = ", ".join(f"{max(1, math.ceil((get - a) / b))} at {get:.0f} ms"
                               for get in (low, 20.0, high))
            print(f"  {name} text: 1 caption {t1:.1f} ms, 8 captions {t8:.1f} ms (~{a:.1f} + {b:.1f} ms each)"
                  f" -> S3 pays from N misses per GET time: {needed}")
    print("  Shipped policy (CLIP_CACHE_S3_POLICY): image=1 (an image never computes faster than a GET);"
          " text=4 (a single prompt never gains from S3; lists do). Memory hit"
          f" {cache['memory hit via embed_cached']:.3f} ms: always on.")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default_dir = next((p for p in (REPO / "build/models/ViT-B-32-synthetic", REPO / "models/clip-tiny")
                        if (p / "manifest.json").exists()), None)
    parser.add_argument("--model-dir", type=Path, nargs="*", default=[default_dir] if default_dir else [],
                        help="one or more model directories")
    parser.add_argument("--threads", type=int, default=1, help="ORT threads (Lambda < 1,769 MB has one vCPU)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--skip-imports", action="store_true")
    parser.add_argument("--moto-in-process", action="store_true",
                        help="ThreadedMotoServer in this process instead of a moto server process")
    args = parser.parse_args(argv)

    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, model dirs: "
          f"{', '.join(map(str, args.model_dir)) or 'none'}")
    cache = bench_cache_paths(max(args.repeats, 30), args.moto_in_process)
    where = "in-process ThreadedMotoServer" if args.moto_in_process else "a moto server process"
    table(f"Cache paths (512-d float32 vector; S3 = {where} on 127.0.0.1)", dict(cache))
    computes: dict[str, dict[str, float]] = {}
    for model_dir in args.model_dir:
        computes[model_dir.name] = bench_compute(model_dir, args.threads, args.repeats)
        table(f"Compute ({model_dir.name})", dict(computes[model_dir.name]))
    if not args.model_dir:
        print("\nNo model directory: compute figures from /work/shared/reference/facts.md "
              "(ORT fp32, 2 threads): image 33 ms + decode 6.5 ms; text 77 tokens 22 ms, "
              "16 tokens 13.2 ms (1 thread).")
    if not args.skip_imports:
        table("Import cost in a fresh process (after json/logging/threading; median of 7)", bench_imports())
    decide(cache, computes)


if __name__ == "__main__":
    main()
