"""The largest text requests against the Lambda timeout: how long they take at a memory size's CPU share, and
whether the function answers them or refuses them early (413, ``service.OutOfTime``) instead of being killed.

The built zip int8 function (bench_cold_start.py's ``sam build``) runs under AWS's runtime client in
``bench/cpu_share.py``'s CPU share for ``--memory``, one small request first (so that init is done and the
deadline counts from the big request, as on Lambda), then the big one with ``--timeout`` as its deadline:

- ``embed_text``: 490 texts of 77 tokens, the most whose answer fits Lambda's 6 MB response;
- ``embeddings``: 2,048 of them (OpenAI's limit), base64.

    PYENV_VERSION=3.11.7:3.12.1 .venv/bin/python bench/bench_time_limit.py [--memory 768,1024] \
        [--functions embed_text,embeddings] [--texts N] [--reuse-build]

The local runner does not kill a function at its deadline as Lambda does: a request that answers after
``--timeout`` seconds is one Lambda would have ended with a timeout (API Gateway: a bare 500).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra"))
sys.path.insert(0, str(REPO / "bench"))

from bench_cold_start import BENCH, INT8, sam_build  # noqa: E402
from bench_cost import Request  # noqa: E402
from bench_memory import long_text  # noqa: E402
from clip_serverless.api.endpoints import endpoint as endpoint_spec  # noqa: E402
from clip_serverless.settings import DEFAULT_MAX_RESPONSE_BYTES, max_embeddings_per_response  # noqa: E402
from lambda_cpu import CpuShare, vcpu_share  # noqa: E402
from lambda_runtime.runner import LocalLambda, built_function, find_python  # noqa: E402
from lambda_runtime.sam_build import BuiltApp  # noqa: E402


def requests(endpoint: str, count: int | None = None) -> tuple[Request, Request]:
    """A one-caption request (to finish init) and the largest text request of ``endpoint`` (or ``count`` texts)."""
    if endpoint == "embed_text":
        most = count or max_embeddings_per_response(512, DEFAULT_MAX_RESPONSE_BYTES)
        return (Request("1 caption", endpoint, {"text": "a photo of a cat"}, 0),
                Request(f"{most} texts of 77 tokens", endpoint, {"text": [long_text(i) for i in range(most)]}, 0))
    if endpoint == "embeddings":
        texts = [long_text(i) for i in range(count or 2048)]
        return (Request("1 caption", endpoint, {"input": "a photo of a cat"}, 0),
                Request(f"{len(texts)} texts of 77 tokens", endpoint, {"input": texts, "encoding_format": "base64"}, 0))
    raise SystemExit(f"--functions: embed_text or embeddings, not {endpoint}")


def outcome(response: Any) -> tuple[int, str]:
    body = json.loads(response["body"])
    if response["statusCode"] == 200:
        return 200, f"{len(body.get('embeddings', body.get('data', [])))} embeddings"
    return response["statusCode"], body.get("message") or body.get("error", {}).get("message", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="768,1024", help="MB, comma-separated")
    parser.add_argument("--functions", default="embed_text,embeddings")
    parser.add_argument("--timeout", type=float, default=28.0, help="the template's FunctionTimeout")
    parser.add_argument("--texts", type=int, help="this many texts instead of the largest request (e.g. to try "
                        "the count a 413 advised)")
    parser.add_argument("--reuse-build", action="store_true", help="use build/bench-cold-start/sam-int8 as it is")
    args = parser.parse_args()
    python = find_python()
    app = BuiltApp(BENCH / "sam-int8") if args.reuse_build else sam_build(INT8, python)
    print("| function | request | memory (vCPU) | status | seconds | within the timeout | answer |")
    print("|---|---|---|---|---|---|---|")
    for endpoint in (name.strip() for name in args.functions.split(",") if name.strip()):
        small, big = requests(endpoint, args.texts)
        for memory in (int(m) for m in args.memory.split(",")):
            base = built_function(app, endpoint_spec(endpoint).function, resources={"CacheBucket": ""})
            spec = dataclasses.replace(base, memory_mb=memory)
            with tempfile.TemporaryDirectory(prefix="time-limit-") as workdir, \
                    CpuShare(memory) as share:
                fn = LocalLambda(spec, Path(workdir), env={"CLIP_CACHE": "off"}, python=python,
                                 timeout_s=args.timeout)
                try:
                    fn.start()
                    assert fn.process is not None
                    share.add(fn.process.pid)
                    first = fn.invoke(small.event(), timeout_s=120)
                    assert first.kind == "response", first.body
                    started = time.perf_counter()
                    result = fn.invoke(big.event(), timeout_s=300)
                    seconds = time.perf_counter() - started
                finally:
                    fn.stop()
            status, answer = outcome(result.json())
            print(f"| {endpoint} | {big.name} | {memory} ({vcpu_share(memory):.2f}) | {status} | {seconds:.1f} | "
                  f"{'yes' if seconds <= args.timeout else '**no**'} | {answer[:160]} |", flush=True)


if __name__ == "__main__":
    main()
