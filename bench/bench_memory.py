"""Peak resident memory of each function, fp32 (the container image) and int8 (the zip flavour), per request.

Each function starts cold in a fresh python3.12 process under AWS's runtime client, as bench_cost.py
and bench_cold_start.py run them: fp32 is the container image's layout assembled from the Dockerfile
(``lambda_runtime.image_layout``) with build/models/ViT-B-32-synthetic and template.image.yaml's
per-function environment; int8 is the ``sam build`` output of template.yaml with the int8 model. The
functions that others invoke (embed_text for compare, embed_image for embeddings) run warm behind a local
Lambda Invoke API, in the same flavour. Cache off (``CLIP_CACHE=off``).

Per function: the peak resident set (``VmHWM`` in /proc/PID/status) at the end of init (when the runtime
first asks for an event), then before each request the peak is reset to the current resident set
(``echo 5 > /proc/PID/clear_refs``) and read again after it: each request's own peak. The requests, as
API Gateway HTTP API events (JSON bodies as text), a realistic one first, then the largest the API takes:

- embed_image: a 1024x768 JPEG photo; 8 photos of 12 MP (4032x3024) in one request, JPEG quality chosen
  so that the body fits ``CLIP_MAX_BODY_BYTES`` (what a Lambda event carries); one 12 MP photo of ~4 MB;
- embed_text: 8 captions; 490 texts of 77 tokens (the most whose answer fits Lambda's 6 MB response);
- compare: the 1024x768 photo vs 8 captions; the ~4 MB photo vs 8 captions;
- embeddings: 8 captions; 2,048 captions as base64 (OpenAI's limit; 2,048 texts of 77 tokens take longer
  than Lambda's timeout, fp32 or int8); 8 photos as data: URIs;
- ``--stress``: embed_image with as many 64 MP images (``CLIP_MAX_IMAGE_PIXELS``) as fit the body (4, as
  JPEGs of quality 5): not realistic, within the API's limits.

``--ort-options`` also loads each fp32 and int8 tower alone, in a fresh process of the image layout's
packages, under ONNX Runtime session options (the engine's, then each variant: no pre-packing, no CPU
memory arena, no memory pattern, initialisers through the device allocator), and reports the peak resident
set after the session is created and after its largest batch, with the times of one item and of that batch
(``--ort-repeats`` processes each, interleaved; the engine's options are in
layers/core/clip_serverless/engine/encoder.py, which this script does not change).

    .venv/bin/python bench/bench_memory.py [--flavours fp32,int8] [--ort-options] [--stress] \
        [--json build/bench-lambda/memory.json]
    .venv/bin/python bench/bench_memory.py --flavours fp32 --env CLIP_ORT_MEM_PATTERN=false   # try a setting
    .venv/bin/python bench/bench_memory.py --flavours "" --ort-options --ort-repeats 9       # ORT probe only

Needs build/models/ViT-B-32-synthetic{,-int8} (`make models-b32`), Python 3.12 and the SAM CLI in .venv-sam.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "infra"))

from bench_cache import CAPTIONS  # noqa: E402
from bench_cold_start import FP32, INT8, NO_CACHE  # noqa: E402
from bench_cost import BUILD, PHOTO, MeasuredLambda, Request, build, photo_jpeg, proc_status_kb  # noqa: E402
from clip_serverless.api.endpoints import REGISTRY  # noqa: E402
from clip_serverless.api.endpoints import endpoint as endpoint_spec  # noqa: E402
from clip_serverless.api.openai_routes import max_inputs  # noqa: E402
from clip_serverless.engine import DEFAULT_MAX_IMAGE_PIXELS  # noqa: E402
from clip_serverless.settings import (  # noqa: E402
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    max_embeddings_per_response,
)
from lambda_runtime import BuiltApp, FunctionSpec, LambdaService, built_function, find_python  # noqa: E402
from lambda_runtime.image_layout import Dockerfile, assemble, image_function  # noqa: E402
from PIL import Image  # noqa: E402

from tests.images import encode, sized  # noqa: E402

GOAL_MB = 700  # fp32 peak resident set per function (performance issue 10)
FLAVOURS = ("fp32", "int8")
# Leave room in the body for the JSON around the images (keys, quotes, commas).
BODY_MARGIN = 16 * 1024


# -- requests ----------------------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def jpeg_at_most(image: Image.Image | np.ndarray[Any, Any], max_bytes: int, qualities: Sequence[int]) -> bytes:
    """The JPEG of ``image`` at the first of ``qualities`` (highest first) that is at most ``max_bytes``."""
    for quality in qualities:
        data = encode(image, "JPEG", quality=quality)
        if len(data) <= max_bytes:
            return data
    raise ValueError(f"no JPEG quality in {list(qualities)} makes the image {max_bytes} bytes or less")


def distinct(jpeg: bytes, count: int) -> list[str]:
    """``count`` base64 copies of ``jpeg``, each with its own bytes after the end-of-image marker (decoders
    ignore them): the same pixels, but distinct inputs, which no cache or de-duplication can merge."""
    return [b64(jpeg + f"copy {i}".encode()) for i in range(count)]


def long_text(i: int) -> str:
    """A caption well over 77 tokens (truncated to CLIP's context), distinct per ``i``."""
    return f"photo {i}: " + ", ".join(CAPTIONS * 4)


def noisy(image: Image.Image, sigma: float = 6.0) -> np.ndarray[Any, Any]:
    """A photo with sensor-like noise: its JPEG is as large as a phone's at the same pixel count."""
    pixels = np.asarray(image).astype(np.float32)
    rng = np.random.default_rng(0)
    return np.clip(pixels + rng.normal(0, sigma, pixels.shape), 0, 255).astype(np.uint8)


def memory_requests(stress: bool) -> dict[str, list[Request]]:
    """Each endpoint's requests for the memory run: a realistic one first, then the largest the API takes."""
    twelve_mp = sized(4032, 3024, PHOTO)
    per_image = (DEFAULT_MAX_BODY_BYTES - BODY_MARGIN) // 8 * 3 // 4  # raw bytes whose base64 fits 8 to a body
    batch_jpeg = jpeg_at_most(twelve_mp, per_image, range(95, 9, -5))
    big_jpeg = jpeg_at_most(noisy(twelve_mp), 4_200_000, range(97, 49, -1))
    photo_b64 = {"type": "base64", "value": b64(photo_jpeg())}
    big = {"type": "base64", "value": b64(big_jpeg)}
    captions = list(CAPTIONS[:8])
    max_texts = max_embeddings_per_response(512, DEFAULT_MAX_RESPONSE_BYTES)
    max_openai = max_inputs(512, "base64", json.loads((FP32 / "manifest.json").read_text())["model_id"],
                            DEFAULT_MAX_RESPONSE_BYTES)
    data_uris = ["data:image/jpeg;base64," + v for v in distinct(photo_jpeg(), 8)]
    out = {
        "embed_image": [
            Request("1 photo 1024x768", "embed_image", {"image": photo_b64}, 0),
            Request(f"8 photos 4032x3024 ({len(batch_jpeg) // 1024} KB each)", "embed_image",
                    {"image": [{"type": "base64", "value": v} for v in distinct(batch_jpeg, 8)]}, 0),
            Request(f"1 photo 4032x3024 ({len(big_jpeg) / 1e6:.1f} MB)", "embed_image", {"image": big}, 0),
        ],
        "embed_text": [
            Request("8 captions", "embed_text", {"text": captions}, 0),
            Request(f"{max_texts} texts of 77 tokens", "embed_text",
                    {"text": [long_text(i) for i in range(max_texts)]}, 0),
        ],
        "compare": [
            Request("photo 1024x768 vs 8 captions", "compare",
                    {"subject": photo_b64, "subject_type": "image", "prompt": captions, "prompt_type": "text"}, 0),
            Request(f"photo 4032x3024 ({len(big_jpeg) / 1e6:.1f} MB) vs 8 captions", "compare",
                    {"subject": big, "subject_type": "image", "prompt": captions, "prompt_type": "text"}, 0),
        ],
        "embeddings": [
            Request("8 captions", "embeddings", {"input": captions, "encoding_format": "base64"}, 0),
            Request(f"{max_openai} captions", "embeddings",
                    {"input": [f"{CAPTIONS[i % len(CAPTIONS)]} #{i}" for i in range(max_openai)],
                     "encoding_format": "base64"}, 0),
            Request("8 photos 1024x768 (data: URIs)", "embeddings",
                    {"input": data_uris, "modality": "image", "encoding_format": "base64"}, 0),
        ],
    }
    if stress:
        side = int(DEFAULT_MAX_IMAGE_PIXELS**0.5)
        huge = encode(sized(side, side, PHOTO), "JPEG", quality=5)  # ~1 MB: the fewest bytes for the most pixels
        count = min(8, (DEFAULT_MAX_BODY_BYTES - BODY_MARGIN) // (len(b64(huge)) + 32))
        out["embed_image"].append(
            Request(f"stress: {count} images {side}x{side} ({len(huge) // 1024} KB each)", "embed_image",
                    {"image": [{"type": "base64", "value": v} for v in distinct(huge, count)]}, 0))
    for requests in out.values():
        for request in requests:
            if request.body_bytes > DEFAULT_MAX_BODY_BYTES:
                raise ValueError(f"{request.endpoint} {request.name}: {request.body_bytes} bytes, over the "
                                 f"{DEFAULT_MAX_BODY_BYTES} that a Lambda event carries")
    return out


# -- the functions -----------------------------------------------------------------------------------------
def image_layout(app: BuiltApp) -> Path:
    """The container image's file system for the fp32 model, assembled afresh (hard links: fast)."""
    dockerfile = Dockerfile.parse(REPO / "Dockerfile", {"MODEL_DIR": str(FP32.relative_to(REPO))})
    root = BUILD / "image-fp32"
    if root.exists():
        shutil.rmtree(root)
    assemble(dockerfile, root, app.layers["DepsAllLayer"].path / "python")
    return root


def image_spec(root: Path, endpoint: str) -> FunctionSpec:
    """A function of the image, with template.image.yaml's environment (the function it invokes, by name)."""
    dockerfile = Dockerfile.parse(REPO / "Dockerfile", {"MODEL_DIR": str(FP32.relative_to(REPO))})
    entry = endpoint_spec(endpoint)
    env = {"CLIP_MAX_BATCH_SIZE": "8"}
    if entry.invokes is not None:
        env[entry.invokes.env] = endpoint_spec(entry.invokes.endpoint).function
    return image_function(dockerfile, root, entry.function, command=f"functions/{endpoint}/app.handler",
                          environment=env)


def specs(flavour: str, app: BuiltApp, root: Path | None) -> dict[str, FunctionSpec]:
    if flavour == "fp32":
        assert root is not None
        return {entry.name: image_spec(root, entry.name) for entry in REGISTRY}
    return {entry.name: built_function(app, entry.function, resources={"CacheBucket": ""}) for entry in REGISTRY}


@dataclass
class Peaks:
    endpoint: str
    flavour: str
    init_mb: float = 0.0
    requests: dict[str, float] = field(default_factory=dict)  # request name -> its peak resident set, MB
    seconds: dict[str, float] = field(default_factory=dict)  # request name -> its duration (no CPU share)
    after_mb: float = 0.0  # resident set after the last request

    @property
    def peak_mb(self) -> float:
        return max([self.init_mb, *self.requests.values()])


def reset_peak(pid: int) -> None:
    """Set VmHWM to the current resident set (Linux 4.0+: ``5`` in ``clear_refs``)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def measure(spec: FunctionSpec, endpoint: str, requests: Sequence[Request], python: str,
            env: Mapping[str, str]) -> Peaks:
    peaks = Peaks(endpoint, "")
    with tempfile.TemporaryDirectory(prefix="memory-") as workdir, \
            MeasuredLambda(spec, Path(workdir), python=python, env=env, timeout_s=600) as fn:
        fn.start()
        if not fn.timed.polled.wait(timeout=120):
            raise RuntimeError(f"{endpoint}: no poll of the Runtime API within 120 s\n{fn.output()}")
        assert fn.process is not None
        pid = fn.process.pid
        peaks.init_mb = proc_status_kb(pid, "VmHWM") / 1024
        for request in requests:
            reset_peak(pid)
            response = fn.invoke_json(request.event())
            if response["statusCode"] != 200:
                raise RuntimeError(f"{endpoint} {request.name}: {str(response)[:2000]}")
            peaks.requests[request.name] = proc_status_kb(pid, "VmHWM") / 1024
            peaks.seconds[request.name] = fn.durations[-1]
            print(f"  {endpoint} {request.name}: {peaks.requests[request.name]:.0f} MB, {fn.durations[-1]:.2f} s",
                  file=sys.stderr)
        peaks.after_mb = proc_status_kb(pid, "VmRSS") / 1024
    return peaks


def measure_flavour(flavour: str, app: BuiltApp, root: Path | None, endpoints: Sequence[str],
                    catalogue: Mapping[str, list[Request]], python: str, extra_env: Mapping[str, str]) -> list[Peaks]:
    functions = specs(flavour, app, root)
    out = []
    with ExitStack() as stack:
        service = stack.enter_context(LambdaService())
        for lender in {e.invokes.endpoint for e in REGISTRY if e.invokes is not None and e.name in endpoints}:
            pool = service.register(functions[lender], python=python, env={**NO_CACHE, **extra_env}, max_concurrency=1)
            pool.prestart(1)
        env = {**NO_CACHE, **extra_env, "AWS_ENDPOINT_URL_LAMBDA": service.endpoint_url}
        for endpoint in endpoints:
            print(f"{flavour}: {endpoint}", file=sys.stderr)
            peaks = measure(functions[endpoint], endpoint, catalogue[endpoint], python, env)
            peaks.flavour = flavour
            out.append(peaks)
    return out


# -- ONNX Runtime session options, one tower alone -----------------------------------------------------------
ORT_VARIANTS: dict[str, dict[str, Any]] = {
    "engine (encoder.py)": {},
    "disable_prepacking": {"config": {"session.disable_prepacking": "1"}},
    "no mem pattern": {"enable_mem_pattern": False},
    "no CPU arena": {"enable_cpu_mem_arena": False},
    "initialisers via device allocator": {"config": {"session.use_device_allocator_for_initializers": "1"}},
    "no mem pattern + disable_prepacking": {"enable_mem_pattern": False,
                                            "config": {"session.disable_prepacking": "1"}},
}

PROBE = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import onnxruntime as ort
    from clip_serverless.engine.encoder import create_session

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024

    path, tower, variant, per_row = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4] == "int8"
    before = hwm()
    if variant:
        # encoder.create_session's options, then the variant's changes
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in variant.get("config", {}).items():
            options.add_session_config_entry(key, value)
        for key, value in variant.items():
            if key != "config":
                setattr(options, key, value)
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    else:
        session = create_session(path, 2)
    loaded = hwm()
    rng = np.random.default_rng(0)

    def feed(batch, tokens):
        if tower == "visual":
            return {"pixel_values": rng.random((batch, 3, 224, 224), dtype=np.float32)}
        ids = np.full((batch, tokens), 320, dtype=np.int64)
        ids[:, 0], ids[:, -1] = 49406, 49407
        return {"input_ids": ids}

    def median_ms(inputs, runs):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            if per_row:  # the engine runs int8 graphs one row at a time (batch-invariant results)
                for i in range(len(next(iter(inputs.values())))):
                    session.run(None, {k: v[i : i + 1] for k, v in inputs.items()})
            else:
                session.run(None, inputs)
            times.append(time.perf_counter() - start)
        return 1000 * sorted(times)[runs // 2]

    small = median_ms(feed(1, 12), 7)  # one image, or one caption of 12 tokens: the common request
    large = median_ms(feed(8, 0) if tower == "visual" else feed(32, 77), 3)  # the largest batch
    print(json.dumps({"before_mb": before, "loaded_mb": loaded, "run_mb": hwm(), "small_ms": small, "large_ms": large}))
""")


def ort_probe(task_root: Path, model: Path, precision: str, tower: str, variant: Mapping[str, Any],
              python: str) -> dict[str, float]:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(task_root), "PYTHONNOUSERSITE": "1"}
    out = subprocess.run([python, "-c", PROBE, str(model / f"{tower}.onnx"), tower, json.dumps(variant), precision],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"ORT probe {tower} {variant}: {out.stderr[-2000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def ort_options(task_root: Path, python: str, repeats: int) -> list[dict[str, Any]]:
    """Every variant of each tower ``repeats`` times, interleaved (a neighbour's burst hits all alike): the
    medians of the runs, and the spread of the times."""
    cases = [(model, precision, tower, name, variant)
             for model, precision in ((FP32, "fp32"), (INT8, "int8")) for tower in ("visual", "textual")
             for name, variant in ORT_VARIANTS.items() if precision == "fp32" or not variant]
    runs: dict[tuple[str, str, str], list[dict[str, float]]] = {}
    for repeat in range(repeats):
        for model, precision, tower, name, variant in cases:
            result = ort_probe(task_root, model, precision, tower, variant, python)
            runs.setdefault((precision, tower, name), []).append(result)
            print(f"  ORT {repeat + 1}/{repeats} {precision} {tower} {name}: {result}", file=sys.stderr)
    rows = []
    for (precision, tower, name), results in runs.items():
        row: dict[str, Any] = {"precision": precision, "tower": tower, "options": name, "runs": len(results)}
        for key in ("loaded_mb", "run_mb", "small_ms", "large_ms"):
            values = [r[key] for r in results]
            row[key], row[f"{key}_min"], row[f"{key}_max"] = statistics.median(values), min(values), max(values)
        rows.append(row)
    return rows


# -- report ------------------------------------------------------------------------------------------------
def print_peaks(results: Sequence[Peaks], catalogue: Mapping[str, list[Request]]) -> None:
    print(f"\nPeak resident set (VmHWM) per function, MB: at the end of init, then each request's own peak "
          f"(goal: fp32 <= {GOAL_MB} MB):\n")
    print("| function | flavour | init | request | request peak | s (2 cores) | function peak |\n"
          "|---|---|---|---|---|---|---|")
    for peaks in results:
        for i, request in enumerate(catalogue[peaks.endpoint]):
            first = i == 0
            goal = "" if peaks.flavour != "fp32" else (" ✓" if peaks.peak_mb <= GOAL_MB else " ✗")
            print(f"| {peaks.endpoint if first else ''} | {peaks.flavour if first else ''} | "
                  f"{f'{peaks.init_mb:.0f}' if first else ''} | {request.name} | {peaks.requests[request.name]:.0f} | "
                  f"{peaks.seconds[request.name]:.2f} | "
                  f"{f'**{peaks.peak_mb:.0f}**{goal}' if first else ''} |")


def print_ort(rows: Sequence[Mapping[str, Any]]) -> None:
    print("\nONNX Runtime alone, one tower per process, 2 threads (peak resident set, MB; times: medians, one "
          "image or a 12-token caption, then the largest batch: 8 images or 32 texts of 77 tokens, int8 one row at "
          "a time as the engine runs it; medians of the repeats, min-max):\n")
    print("| precision | tower | session options | after create | after largest batch | 1 item ms | batch ms |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['tower']} | {r['options']} | {r['loaded_mb']:.0f} | {r['run_mb']:.0f} | "
              f"{r['small_ms']:.1f} ({r['small_ms_min']:.1f}-{r['small_ms_max']:.1f}) | "
              f"{r['large_ms']:.0f} ({r['large_ms_min']:.0f}-{r['large_ms_max']:.0f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flavours", default=",".join(FLAVOURS))
    parser.add_argument("--functions", default=",".join(e.name for e in REGISTRY))
    parser.add_argument("--stress", action="store_true", help="also embed_image with 64 MP images")
    parser.add_argument("--ort-options", action="store_true", help="also each tower alone under session options")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every function (e.g. an engine setting to try)")
    parser.add_argument("--ort-repeats", type=int, default=5, help="processes per tower and session options")
    parser.add_argument("--reuse-build", action="store_true", help=f"use {BUILD}/sam-int8 as it is")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    for model in (FP32, INT8):
        if not (model / "manifest.json").exists():
            raise SystemExit(f"{model} is missing: make models-b32")
    python = find_python()
    app = build(python, reuse=args.reuse_build)
    flavours = [f for f in args.flavours.split(",") if f]
    endpoints = [e for e in args.functions.split(",") if e]
    root = image_layout(app) if "fp32" in flavours or args.ort_options else None
    catalogue = memory_requests(args.stress)
    results: list[Peaks] = []
    ort_rows: list[dict[str, Any]] = []
    for flavour in flavours:
        results += measure_flavour(flavour, app, root, endpoints, catalogue, python,
                                   dict(item.split("=", 1) for item in args.env))
    if args.ort_options:
        assert root is not None
        ort_rows = ort_options(root / "var" / "task", python, args.ort_repeats)
    print_peaks(results, catalogue)
    if ort_rows:
        print_ort(ort_rows)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "goal_mb": GOAL_MB,
            "functions": [{"endpoint": p.endpoint, "flavour": p.flavour, "init_mb": p.init_mb,
                           "requests_mb": p.requests, "seconds": p.seconds, "peak_mb": p.peak_mb,
                           "after_mb": p.after_mb} for p in results],
            "ort_options": ort_rows}, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
