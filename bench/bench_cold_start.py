"""Cold start of the built functions: process start to first response, int8 (zip) and fp32 (image layout).

Each run starts a fresh python3.12 process under AWS's runtime client with the function's layers (or
the container image's layout), queues one API Gateway event from events/, and stops the clock when the
response is posted back. Baseline: a naive PyTorch + transformers handler doing the same job (import,
``CLIPModel.from_pretrained`` on the same seeded ViT-B/32 weights, tokenizer, one embedding) in a
fresh process of the dev venv.

    .venv/bin/python bench/bench_cold_start.py [--runs 5] [--cpus 2] [--warm 20]

compare embeds its texts through embed_text (Lambda Invoke): its cold start is measured with one warm
embed_text environment behind a local Invoke API (the usual case on AWS: embed_text serves every
text request), and its first answer includes that round trip. ``--warm N`` also times N warm
invocations of each zip function after its cold start (median), compare's Invoke included.

Needs build/models/ViT-B-32-synthetic{,-int8} (`make models-b32`) and the SAM CLI in .venv-sam.
Page cache is warm after the first run (the medians exclude a first, discarded run): on Lambda, the
layer files are read from the extracted package, which adds disk reads the figures here do not have.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra"))

from clip_serverless.api.endpoints import REGISTRY  # noqa: E402
from clip_serverless.api.endpoints import endpoint as endpoint_spec  # noqa: E402
from lambda_runtime import BuiltApp, LambdaService, LocalLambda, built_function, cold_start, find_python  # noqa: E402
from lambda_runtime.image_layout import Dockerfile, assemble, image_function  # noqa: E402

FP32 = REPO / "build" / "models" / "ViT-B-32-synthetic"
INT8 = REPO / "build" / "models" / "ViT-B-32-synthetic-int8"
BENCH = REPO / "build" / "bench-cold-start"
SAM = os.environ.get("CLIP_SAM") or str(REPO / ".venv-sam" / "bin" / "sam")
# The naive PyTorch baseline knows the three Roboflow endpoints' bodies.
NAIVE_ENDPOINTS = ("embed_text", "embed_image", "compare")
NO_CACHE = {"CLIP_CACHE": "off"}


def sam_build(model: Path, python: str) -> BuiltApp:
    out = BENCH / "sam-int8"
    bin_dir = BENCH / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    link = bin_dir / "python3.12"
    if not link.exists():
        link.symlink_to(python)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SAM_CLI_TELEMETRY": "0",
           "AWS_DEFAULT_REGION": "us-east-1", "CLIP_MODEL_SRC": str(model)}
    subprocess.run([SAM, "build", "--template", "template.yaml", "--build-dir", str(out)], cwd=REPO, env=env,
                   check=True, capture_output=True)
    return BuiltApp(out)


def event(endpoint: str) -> dict[str, Any]:
    return dict(json.loads((REPO / "events" / f"{endpoint}.http-api.json").read_text()))


def median_cold(spec: Any, endpoint: str, runs: int, python: str, cpus: int | None,
                env: dict[str, str] | None = None) -> list[float]:
    times = []
    for _ in range(runs + 1):  # the first run warms the page cache and is dropped
        with tempfile.TemporaryDirectory(prefix="cold-") as workdir:
            seconds, response = cold_start(spec, event(endpoint), Path(workdir), python=python, cpus=cpus,
                                           env={**NO_CACHE, **(env or {})})
        assert response["statusCode"] == 200, response
        times.append(seconds)
    return times[1:]


def warm_times(spec: Any, endpoint: str, runs: int, python: str, cpus: int | None,
               env: dict[str, str] | None = None) -> list[float]:
    """Seconds per warm invocation (handler and runtime round trip), cache off."""
    with tempfile.TemporaryDirectory(prefix="warm-") as workdir, \
            LocalLambda(spec, Path(workdir), python=python, cpus=cpus, env={**NO_CACHE, **(env or {})}) as fn:
        assert fn.invoke_json(event(endpoint))["statusCode"] == 200
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            response = fn.invoke_json(event(endpoint))
            times.append(time.perf_counter() - start)
            assert response["statusCode"] == 200, response
    return times


NAIVE = textwrap.dedent("""
    import time, sys
    start = time.perf_counter()
    import json, base64, io
    import torch, transformers
    from PIL import Image
    torch.set_num_threads({threads})
    model = transformers.CLIPModel.from_pretrained({weights!r}).eval()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file={tokenizer!r}, pad_token="<|endoftext|>")
    proc = transformers.CLIPImageProcessor()
    event = json.load(open({event!r}))
    body = json.loads(base64.b64decode(event["body"]))
    with torch.no_grad():
        if {endpoint!r} == "embed_text":
            ids = tok(body["text"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
            out = model.get_text_features(input_ids=ids["input_ids"])
        else:
            image = Image.open(io.BytesIO(base64.b64decode(body[{image_key!r}]["value"]))).convert("RGB")
            out = model.get_image_features(**proc(images=image, return_tensors="pt"))
            if {endpoint!r} == "compare":
                ids = tok(body["prompt"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
                model.get_text_features(input_ids=ids["input_ids"])
    print(time.perf_counter() - start)
""")


def naive_weights() -> Path:
    """The same seeded ViT-B/32 as the ONNX models, saved as transformers weights (once)."""
    out = BENCH / "torch-ViT-B-32-synthetic"
    if not (out / "config.json").exists():
        code = ("from clip_export.synthetic import synthetic_model; from clip_export.architectures import "
                f"get_architecture as g; synthetic_model(g('ViT-B-32').dims, seed=0).save_pretrained({str(out)!r})")
        subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", code], check=True)
    return out


def naive_cold(endpoint: str, runs: int, threads: int) -> list[float]:
    weights = naive_weights()
    script = NAIVE.format(weights=str(weights), tokenizer=str(FP32 / "tokenizer.json"), threads=threads,
                          event=str(REPO / "events" / f"{endpoint}.http-api.json"), endpoint=endpoint,
                          image_key="subject" if endpoint == "compare" else "image")
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-c", script], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=None, help="pin each function to N cores")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--warm", type=int, default=0, help="also time N warm invocations per zip function")
    args = parser.parse_args()
    for model in (FP32, INT8):
        if not (model / "manifest.json").exists():
            raise SystemExit(f"{model} is missing: make models-b32")
    python = find_python()
    built = sam_build(INT8, python)
    dockerfile = Dockerfile.parse(REPO / "Dockerfile", {"MODEL_DIR": str(FP32.relative_to(REPO))})
    image_root = BENCH / "image-fp32"
    if image_root.exists():  # assembled afresh (hard links: fast), so it never holds an older package
        shutil.rmtree(image_root)
    assemble(dockerfile, image_root, built.layers["DepsAllLayer"].path / "python")
    threads = args.cpus or len(os.sched_getaffinity(0))
    # The functions that others invoke for one modality (compare -> embed_text, embeddings -> embed_image):
    # one environment each, started (and warmed) before the runs, as on AWS where they serve their own routes.
    service = LambdaService()
    for lender in {entry.invokes.endpoint for entry in REGISTRY if entry.invokes is not None}:
        pool = service.register(built_function(built, endpoint_spec(lender).function, resources={"CacheBucket": ""}),
                                python=python, cpus=args.cpus, env=NO_CACHE, max_concurrency=1)
        pool.prestart(1)
        pool.all[0].invoke_json(event(lender))
    invoke_env = {"AWS_ENDPOINT_URL_LAMBDA": service.endpoint_url}
    rows, warm = [], {}
    for entry in REGISTRY:
        endpoint_name, name = entry.name, entry.function
        spec = built_function(built, name, resources={"CacheBucket": ""})
        int8 = median_cold(spec, endpoint_name, args.runs, python, args.cpus, invoke_env)
        if args.warm:
            warm[endpoint_name] = warm_times(spec, endpoint_name, args.warm, python, args.cpus, invoke_env)
        command = f"functions/{endpoint_name}/app.handler"
        fp32 = median_cold(image_function(dockerfile, image_root, name, command=command),
                           endpoint_name, args.runs, python, args.cpus)
        naive = [] if args.skip_naive or endpoint_name not in NAIVE_ENDPOINTS else naive_cold(endpoint_name,
                                                                                               args.runs, threads)
        size = built.functions[name].unzipped_bytes() / 2**20
        rows.append((endpoint_name, int8, fp32, naive, size))
        print(f"{endpoint_name}: int8 {statistics.median(int8):.3f} s, fp32 {statistics.median(fp32):.3f} s"
              + (f", naive PyTorch {statistics.median(naive):.3f} s" if naive else ""), file=sys.stderr)
    print(f"\nCold start, process start to first response (median of {args.runs}; min-max), "
          f"{threads} core(s), load average {os.getloadavg()[0]:.1f}:\n")
    print("| function | zip, int8 | image layout, fp32 | naive PyTorch + transformers, fp32 | zip size (MiB) |")
    print("|---|---|---|---|---|")
    for endpoint, int8, fp32, naive, size in rows:
        def cell(xs: list[float]) -> str:
            return f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"

        print(f"| {endpoint} | {cell(int8)} | {cell(fp32)} | {cell(naive)} | {size:.0f} |")
    if warm:
        print(f"\nWarm invocations, zip int8 (median of {args.warm}; p10-p90), cache off:\n")
        print("| function | warm |\n|---|---|")
        for endpoint, xs in warm.items():
            qs = statistics.quantiles(xs, n=10)
            print(f"| {endpoint} | {1000 * statistics.median(xs):.1f} ms ({1000 * qs[0]:.1f}-{1000 * qs[-1]:.1f}) |")
    service.close()


if __name__ == "__main__":
    main()
