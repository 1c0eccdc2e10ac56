"""Command line: invoke a built function locally (the `sam local invoke` of machines without Docker).

    PYTHONPATH=infra .venv/bin/python -m lambda_runtime invoke EmbedTextFunction -e events/embed_text.http-api.json
    PYTHONPATH=infra .venv/bin/python -m lambda_runtime invoke CompareFunction -e events/compare.http-api.json \
        --s3 moto --repeat 3
    PYTHONPATH=infra .venv/bin/python -m lambda_runtime sizes

``--param Name=Value`` sets template parameters (e.g. ``ApiKeySource=ssm``), ``--env NAME=VALUE`` adds
environment variables (e.g. ``CLIP_API_KEY=secret``). ``--s3 moto`` starts a local moto S3 server for
the embedding cache (otherwise the S3 tier is off). Every other function of the build is served through a
local Lambda Invoke API (``AWS_ENDPOINT_URL_LAMBDA``), so ``CompareFunction`` gets its text vectors from
``EmbedTextFunction`` as on AWS.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .invoke_api import LambdaService
from .runner import LocalLambda, built_function
from .sam_build import DEFAULT_BUILD_DIR, LAMBDA_UNZIPPED_LIMIT, BuiltApp, MiB, tree_bytes


def _pairs(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"expected NAME=VALUE, got {item!r}")
        out[key] = value
    return out


def _summary(response: dict[str, Any], full: bool) -> str:
    body = response.get("body", "")
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode(errors="replace")
    try:
        parsed = json.loads(body)
    except ValueError:
        return f"status {response.get('statusCode')}: {body[:2000]}"
    if not full and isinstance(parsed, dict) and isinstance(parsed.get("embeddings"), list):
        parsed["embeddings"] = [f"<{len(e)} floats: {', '.join(f'{x:.4f}' for x in e[:3])}, ...>"
                                for e in parsed["embeddings"]]
    return f"status {response.get('statusCode')}\n{json.dumps(parsed, indent=2)}"


def invoke(args: argparse.Namespace) -> int:
    app = BuiltApp(args.build_dir)
    event = json.loads(Path(args.event).read_text()) if args.event else {}
    resources: dict[str, str] = {"CacheBucket": ""}
    env = _pairs(args.env)
    server = None
    if args.s3 == "moto":
        import boto3
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket="clip-cache-local")
        resources["CacheBucket"] = "clip-cache-local"
        env.setdefault("CLIP_CACHE_S3_ENDPOINT_URL", endpoint)
    service = LambdaService()
    env["AWS_ENDPOINT_URL_LAMBDA"] = service.endpoint_url
    for other in app.functions:
        if other != args.function:
            service.register(built_function(app, other, parameters=_pairs(args.param), resources=resources),
                             env=env, cpus=args.cpus)
    try:
        with tempfile.TemporaryDirectory(prefix="lambda-") as workdir, \
                LocalLambda(built_function(app, args.function, parameters=_pairs(args.param), resources=resources),
                            Path(workdir), env=env, cpus=args.cpus) as fn:
            for i in range(args.repeat):
                start = time.perf_counter()
                result = fn.invoke(event)
                now = time.perf_counter()
                label = f"cold start (process start to response) {now - fn.started_at:.3f} s" if i == 0 \
                    else f"warm invoke {now - start:.3f} s"
                print(f"[{args.function}] {label}", file=sys.stderr)
            if args.logs:
                print(fn.output(), file=sys.stderr)
            if result.kind != "response":
                print(f"{result.kind} {result.error_type}: {result.body.decode()}", file=sys.stderr)
                print(fn.output(), file=sys.stderr)
                return 1
            print(_summary(result.json(), args.full))
    finally:
        service.close()
        if server is not None:
            server.stop()
    return 0


def sizes(args: argparse.Namespace) -> int:
    app = BuiltApp(args.build_dir)
    worst = 0
    for name, fn in app.functions.items():
        parts = [f"code {tree_bytes(fn.code) / MiB:.1f}"] + [f"{layer.name} {tree_bytes(layer.path) / MiB:.1f}"
                                                              for layer in fn.layers]
        total = fn.unzipped_bytes()
        worst = max(worst, total)
        print(f"{name:20s} {total / MiB:6.1f} MiB of {LAMBDA_UNZIPPED_LIMIT / MiB:.0f}  ({', '.join(parts)})")
    return 0 if worst <= LAMBDA_UNZIPPED_LIMIT else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lambda_runtime", description=__doc__.split("\n\n")[0])
    parser.add_argument("--build-dir", type=Path, default=DEFAULT_BUILD_DIR)
    sub = parser.add_subparsers(dest="command", required=True)
    inv = sub.add_parser("invoke", help="run a built function under awslambdaric and invoke it")
    inv.add_argument("function", help="logical id, e.g. EmbedTextFunction")
    inv.add_argument("-e", "--event", help="event JSON file (events/*.json)")
    inv.add_argument("--param", action="append", default=[], help="template parameter Name=Value")
    inv.add_argument("--env", action="append", default=[], help="extra environment NAME=VALUE")
    inv.add_argument("--s3", choices=["off", "moto"], default="off", help="embedding cache S3 tier")
    inv.add_argument("--repeat", type=int, default=1, help="invoke N times (the first is the cold start)")
    inv.add_argument("--cpus", type=int, default=None, help="pin the function to N cores")
    inv.add_argument("--full", action="store_true", help="print whole embeddings")
    inv.add_argument("--logs", action="store_true", help="print the function's output")
    sub.add_parser("sizes", help="unzipped size of each function plus its layers (limit 250 MiB)")
    args = parser.parse_args(argv)
    return invoke(args) if args.command == "invoke" else sizes(args)


if __name__ == "__main__":
    sys.exit(main())
