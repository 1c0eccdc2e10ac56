"""Cold start of the built functions: process start to first response, int8 (zip) and fp32 (image layout).

Each run starts a fresh python3.12 process with the function's layers (or the container image's layout),
hands it one API Gateway event from events/, and stops the clock when the response comes back. Two ways
of starting it (``--ways``):

- ``runtime``: under AWS's runtime client (awslambdaric) against a local Runtime API, the event queued
  before the start: what Lambda runs (the client's own import and its HTTP round trips included);
- ``plain``: ``python3.12 -c`` that imports the handler module and calls it once: the function's own
  init and first request, nothing else.

Baseline: a naive PyTorch + transformers handler doing the same job (import, ``CLIPModel.from_pretrained``
on the same seeded ViT-B/32 weights, tokenizer, one embedding) in a fresh process of the dev venv.

    .venv/bin/python bench/bench_cold_start.py [--runs 5] [--cpus 2] [--warm 20]
    .venv/bin/python bench/bench_cold_start.py --runs 10 --skip-naive --no-fp32 --baseline 59d821e

``--baseline REF`` also measures the ``clip_serverless`` package (core layer) and function code of the
git commit REF on the same deps and model layers, interleaved with the current one run by run (before,
after, before, after, ...), so both see the same machine load: the table gives both and the change.

``--aws`` runs the functions as deployed by default rather than bare: the embedding cache on (an S3 bucket of
a local moto server, a fresh key prefix per run, so the first request misses and writes) and the API key in
Secrets Manager (moto), sent by the event as ``Authorization: Bearer``; without it, the cache is off and the
API open (no AWS client at all in embed_text and embed_image).

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
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra"))

from build_layer import build_core  # noqa: E402
from clip_serverless.api.endpoints import REGISTRY  # noqa: E402
from clip_serverless.api.endpoints import endpoint as endpoint_spec  # noqa: E402
from lambda_runtime import (  # noqa: E402
    BuiltApp,
    FunctionSpec,
    LambdaService,
    LocalLambda,
    built_function,
    cold_start,
    find_python,
    plain_cold_start,
)
from lambda_runtime.image_layout import Dockerfile, assemble, image_function  # noqa: E402

FP32 = REPO / "build" / "models" / "ViT-B-32-synthetic"
INT8 = REPO / "build" / "models" / "ViT-B-32-synthetic-int8"
BENCH = REPO / "build" / "bench-cold-start"
SAM = os.environ.get("CLIP_SAM") or str(REPO / ".venv-sam" / "bin" / "sam")
# The naive PyTorch baseline knows the three Roboflow endpoints' bodies.
NAIVE_ENDPOINTS = ("embed_text", "embed_image", "compare")
NO_CACHE = {"CLIP_CACHE": "off"}
WAYS: dict[str, Callable[..., tuple[float, Any]]] = {"runtime": cold_start, "plain": plain_cold_start}


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


def baseline_tree(ref: str, python: str) -> Path:
    """``build/bench-cold-start/baseline-<sha>/``: the core layer (precompiled) and functions/ of commit ``ref``."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=REPO, check=True,
                         capture_output=True, text=True).stdout.strip()
    root = BENCH / f"baseline-{sha[:12]}"
    if (root / ".complete").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", sha, "layers/core/clip_serverless", "functions"],
                             cwd=REPO, check=True, capture_output=True).stdout
    with tempfile.TemporaryFile() as fh:
        fh.write(archive)
        fh.seek(0)
        with tarfile.open(fileobj=fh) as tar:
            tar.extractall(root / "src", filter="data")
    build_core(root / "core", python, src=root / "src" / "layers" / "core" / "clip_serverless")
    (root / ".complete").write_text(sha + "\n")
    return root


def with_baseline(spec: FunctionSpec, built: BuiltApp, root: Path, endpoint: str) -> FunctionSpec:
    """``spec`` with the baseline's core layer and function code in place of the current ones."""
    core = built.layers["CoreLayer"].path
    layers = tuple(root / "core" if layer == core else layer for layer in spec.layers)
    return dataclasses.replace(spec, layers=layers, code=root / "src" / "functions" / endpoint)


class Aws:
    """What the functions reach as deployed: the cache bucket and the API key's secret, in a local moto server."""

    BUCKET, SECRET, KEY = "clip-bench-cache", "clip-bench/api-key", "bench-key-5f1c"

    def __init__(self) -> None:
        import boto3
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self.server.start()
        host, port = self.server.get_host_and_port()
        self.url = f"http://{host}:{port}"
        kwargs: dict[str, Any] = {"endpoint_url": self.url, "region_name": "us-east-1",
                                  "aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", **kwargs).create_bucket(Bucket=self.BUCKET)
        boto3.client("secretsmanager", **kwargs).create_secret(Name=self.SECRET, SecretString=self.KEY)
        self.runs = 0

    def resources(self) -> dict[str, str]:
        return {"CacheBucket": self.BUCKET}

    def parameters(self) -> dict[str, str]:
        return {"ApiKeySource": "secretsmanager", "ApiKeyName": self.SECRET}

    def env(self) -> dict[str, str]:
        """A fresh cache prefix each time: the first request of every run misses, computes and writes."""
        self.runs += 1
        return {"CLIP_CACHE_S3_ENDPOINT_URL": self.url, "AWS_ENDPOINT_URL_SECRETS_MANAGER": self.url,
                "CLIP_CACHE_PREFIX": f"bench/{self.runs}/"}

    def close(self) -> None:
        self.server.stop()


def event(endpoint: str, api_key: str | None = None) -> dict[str, Any]:
    body = dict(json.loads((REPO / "events" / f"{endpoint}.http-api.json").read_text()))
    if api_key:
        body["headers"] = {**body.get("headers", {}), "authorization": f"Bearer {api_key}"}
    return body


def cold_runs(variants: dict[str, FunctionSpec], endpoint: str, ways: list[str], runs: int, python: str,
              cpus: int | None, env: dict[str, str] | None = None,
              aws: Aws | None = None) -> dict[tuple[str, str], list[float]]:
    """Seconds to the first response per (variant, way), the variants and ways interleaved run by run."""
    times: dict[tuple[str, str], list[float]] = {(v, w): [] for v in variants for w in ways}
    for run in range(runs + 1):  # the first round warms the page cache and is dropped
        for variant, spec in variants.items():
            for way in ways:
                run_env = {**(aws.env() if aws else NO_CACHE), **(env or {})}
                with tempfile.TemporaryDirectory(prefix="cold-") as workdir:
                    seconds, response = WAYS[way](spec, event(endpoint, aws.KEY if aws else None), Path(workdir),
                                                  python=python, cpus=cpus, env=run_env)
                assert response["statusCode"] == 200, response
                if run:
                    times[variant, way].append(seconds)
    return times


def warm_times(spec: Any, endpoint: str, runs: int, python: str, cpus: int | None,
               env: dict[str, str] | None = None, api_key: str | None = None) -> list[float]:
    """Seconds per warm invocation (handler and runtime round trip), cache off."""
    with tempfile.TemporaryDirectory(prefix="warm-") as workdir, \
            LocalLambda(spec, Path(workdir), python=python, cpus=cpus, env={**(env or {}), **NO_CACHE}) as fn:
        assert fn.invoke_json(event(endpoint, api_key))["statusCode"] == 200
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            response = fn.invoke_json(event(endpoint, api_key))
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


def cell(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} s ({min(xs):.2f}-{max(xs):.2f})" if xs else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=None, help="pin each function to N cores")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--no-fp32", action="store_true", help="skip the container image layout (fp32)")
    parser.add_argument("--ways", default="runtime,plain", help="runtime, plain or both (see above)")
    parser.add_argument("--functions", default=",".join(spec.name for spec in REGISTRY),
                        help="endpoints to measure (default: all)")
    parser.add_argument("--baseline", metavar="REF", help="also measure the core layer of git commit REF")
    parser.add_argument("--warm", type=int, default=0, help="also time N warm invocations per zip function")
    parser.add_argument("--aws", action="store_true", help="cache on and API key from Secrets Manager (moto)")
    args = parser.parse_args()
    ways = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not ways or set(ways) - set(WAYS):
        raise SystemExit(f"--ways: some of {', '.join(WAYS)}")
    endpoints = [endpoint_spec(name.strip()).name for name in args.functions.split(",") if name.strip()]
    for model in (FP32, INT8):
        if not (model / "manifest.json").exists():
            raise SystemExit(f"{model} is missing: make models-b32")
    python = find_python()
    built = sam_build(INT8, python)
    baseline = baseline_tree(args.baseline, python) if args.baseline else None
    dockerfile = Dockerfile.parse(REPO / "Dockerfile", {"MODEL_DIR": str(FP32.relative_to(REPO))})
    image_root = BENCH / "image-fp32"
    if not args.no_fp32:
        if image_root.exists():  # assembled afresh (hard links: fast), so it never holds an older package
            shutil.rmtree(image_root)
        assemble(dockerfile, image_root, built.layers["DepsAllLayer"].path / "python")
    threads = args.cpus or len(os.sched_getaffinity(0))
    # The functions that others invoke for one modality (compare -> embed_text, embeddings -> embed_image):
    # one environment each, started (and warmed) before the runs, as on AWS where they serve their own routes.
    aws = Aws() if args.aws else None
    resources = aws.resources() if aws else {"CacheBucket": ""}
    parameters = aws.parameters() if aws else {}
    service = LambdaService()
    for lender in {entry.invokes.endpoint for entry in REGISTRY if entry.invokes is not None}:
        pool = service.register(built_function(built, endpoint_spec(lender).function, resources=resources,
                                               parameters=parameters),
                                python=python, cpus=args.cpus, env=aws.env() if aws else NO_CACHE, max_concurrency=1)
        pool.prestart(1)
        pool.all[0].invoke_json(event(lender, aws.KEY if aws else None))
    invoke_env = {"AWS_ENDPOINT_URL_LAMBDA": service.endpoint_url}
    rows, warm = [], {}
    try:
        for endpoint_name in endpoints:
            name = endpoint_spec(endpoint_name).function
            spec = built_function(built, name, resources=resources, parameters=parameters)
            variants = {"now": spec}
            if baseline is not None:
                variants = {"baseline": with_baseline(spec, built, baseline, endpoint_name), "now": spec}
            int8 = cold_runs(variants, endpoint_name, ways, args.runs, python, args.cpus, invoke_env, aws)
            if args.warm:
                warm[endpoint_name] = warm_times(spec, endpoint_name, args.warm, python, args.cpus,
                                                 {**invoke_env, **(aws.env() if aws else {})}, aws.KEY if aws else None)
            command = f"functions/{endpoint_name}/app.handler"
            fp32 = [] if args.no_fp32 else cold_runs(
                {"now": image_function(dockerfile, image_root, name, command=command)}, endpoint_name,
                ["runtime"], args.runs, python, args.cpus)["now", "runtime"]
            naive = [] if args.skip_naive or endpoint_name not in NAIVE_ENDPOINTS else naive_cold(endpoint_name,
                                                                                                   args.runs, threads)
            size = built.functions[name].unzipped_bytes() / 2**20
            rows.append((endpoint_name, int8, fp32, naive, size))
            print(f"{endpoint_name}: " + ", ".join(f"{v} {w} {statistics.median(xs):.3f} s"
                                                  for (v, w), xs in int8.items()), file=sys.stderr)
    finally:
        service.close()
        if aws:
            aws.close()
    setup = "cache on (moto S3), API key from Secrets Manager (moto)" if aws else "cache off, no API key"
    print(f"\nCold start, process start to first response (median of {args.runs}; min-max), {setup}, "
          f"{threads} core(s), load average {os.getloadavg()[0]:.1f}:\n")
    columns = [(v, w) for v in (["baseline", "now"] if baseline else ["now"]) for w in ways]
    label = {"baseline": f"{args.baseline}, ", "now": ""}
    head = [f"zip int8, {label[v]}{w}" for v, w in columns]
    if baseline:
        head += [f"change, {w}" for w in ways]
    head += ["image layout fp32, runtime", "naive PyTorch + transformers, fp32", "zip size (MiB)"]
    print("| function | " + " | ".join(head) + " |")
    print("|---" * (len(head) + 1) + "|")
    for endpoint, int8, fp32, naive, size in rows:
        cells = [cell(int8[key]) for key in columns]
        if baseline:
            cells += [f"{statistics.median(int8['now', w]) - statistics.median(int8['baseline', w]):+.2f} s"
                      for w in ways]
        cells += [cell(fp32), cell(naive), f"{size:.0f}"]
        print(f"| {endpoint} | " + " | ".join(cells) + " |")
    if warm:
        print(f"\nWarm invocations, zip int8 (median of {args.warm}; p10-p90), cache off:\n")
        print("| function | warm |\n|---|---|")
        for endpoint, xs in warm.items():
            qs = statistics.quantiles(xs, n=10)
            print(f"| {endpoint} | {1000 * statistics.median(xs):.1f} ms ({1000 * qs[0]:.1f}-{1000 * qs[-1]:.1f}) |")


if __name__ == "__main__":
    main()
