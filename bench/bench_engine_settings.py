"""ONNX Runtime settings per function, at Lambda's CPU share: intra-op threads, spin-waiting, memory arena and
memory patterns, measured on the built functions' warm requests, and on the local server's two towers.

**Functions.** Each built function of template.yaml (int8 model, zip flavour, as bench_cold_start.py builds
it) runs warm under AWS's runtime client (``lambda_runtime.LocalLambda``), cache off, with the setting given
as its environment (``CLIP_NUM_THREADS``, ``CLIP_ORT_SPINNING``, ``CLIP_ORT_CPU_MEM_ARENA``,
``CLIP_ORT_MEM_PATTERN``; the row ``default`` sets none: what the function runs with at that memory size),
its memory size as ``AWS_LAMBDA_FUNCTION_MEMORY_SIZE`` and its process under that size's CPU share
(bench/cpu_share.py: the cgroup v1 cpu controller, 2 visible cores, quota per 20 ms period): the whole
machine, 2,048 MB (1.16 vCPU, the template's default), 1,769 MB (1.0), and with ``--memory`` any other
(1,024 MB: 0.58). A request is the event of events/<endpoint>.http-api.json; its time is the invocation's
round trip through the Runtime API (what Lambda bills, to the millisecond). Each request starts after an
idle pause of 30-50 ms (an environment between requests: its quota refilled, ORT's workers asleep).
compare and embeddings call embed_text and embed_image through a local Invoke API; those run unrestricted
with their defaults, so the rows of compare and embeddings include that call.

**Local server** (``make serve``: all towers in one process, and uvicorn may run requests concurrently): the
local server's service with both towers (``default``: as ``make serve`` starts it, api/local.py's
LOCAL_ENGINE), unrestricted, in a child process each; an image client and a text client run at the same
time (one thread each, back to back), then each alone.

For one function, every (setting, memory size) cell has its own environment, all started together, and each
request goes to every cell in turn, in a new random order, so the machine's load weighs on all cells alike
(the environments other than the one asked are idle). Rounds start new environments; cells give the median
over rounds of each round's median, and the range of those.

    .venv/bin/python bench/bench_engine_settings.py [--rounds 3] [--requests 30] [--reuse-build]
    .venv/bin/python bench/bench_engine_settings.py --functions embed_image,embed_text --memory 1769,1024 --no-local

Needs root and a writable cgroup v1 cpu controller for the shares (``--memory full`` does without),
build/models/ViT-B-32-synthetic-int8 (`make models-b32`), Python 3.12 and the SAM CLI in .venv-sam.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra"))
sys.path.insert(0, str(REPO / "bench"))

from bench_cold_start import BENCH, INT8, sam_build  # noqa: E402
from clip_serverless.api.endpoints import REGISTRY  # noqa: E402
from clip_serverless.api.endpoints import endpoint as endpoint_spec  # noqa: E402
from cpu_share import CpuShare  # noqa: E402
from lambda_runtime import BuiltApp, LambdaService, LocalLambda, built_function, find_python  # noqa: E402

NO_CACHE = {"CLIP_CACHE": "off"}
ONE_VCPU_MB = 1769  # AWS: one vCPU's worth of CPU at 1,769 MB, in proportion to memory
# Columns: a function's memory size, and with it its CPU share (None: the whole machine, the template's 2,048 MB).
MEMORY: dict[str, int | None] = {"full": None, "2048": 2048, "1769": 1769, "1024": 1024}


def share(memory: str) -> float | None:
    mb = MEMORY[memory] if memory in MEMORY else int(memory)
    return None if mb is None else mb / ONE_VCPU_MB


@dataclass(frozen=True)
class Setting:
    """Knobs set through the environment; None leaves a knob to the function's default (api/endpoints.py)."""

    name: str
    threads: int | None = None
    spinning: bool | None = None
    arena: bool | None = None
    pattern: bool | None = None

    def env(self) -> dict[str, str]:
        knobs = {"CLIP_NUM_THREADS": self.threads, "CLIP_ORT_SPINNING": self.spinning,
                 "CLIP_ORT_CPU_MEM_ARENA": self.arena, "CLIP_ORT_MEM_PATTERN": self.pattern}
        return {name: str(value).lower() for name, value in knobs.items() if value is not None}


SETTINGS = (
    Setting("default"),  # what the function runs with unless told otherwise, at that memory size
    Setting("2 threads", 2, spinning=False),
    Setting("2 threads, spinning", 2, spinning=True),
    Setting("1 thread", 1, spinning=False),
    Setting("1 thread, spinning", 1, spinning=True),
    Setting("2 threads, no arena", 2, spinning=False, arena=False),
    Setting("2 threads, no mem pattern", 2, spinning=False, pattern=False),
)
LOCAL_SETTINGS = SETTINGS[1:5]  # threads x spinning: what two towers in one process share


def event(endpoint: str) -> dict[str, Any]:
    return dict(json.loads((REPO / "events" / f"{endpoint}.http-api.json").read_text()))


def function_times(built: BuiltApp, endpoint: str, settings: list[Setting], memory: list[str], requests: int,
                   python: str, invoke_env: dict[str, str]) -> dict[tuple[str, str], list[float]]:
    """Seconds per warm request of ``endpoint``'s function, per (setting, memory size): one environment per cell,
    each under its own CPU share and told its memory size, all started together and asked in turn, in a new
    random order for every request, so the machine's load at any moment weighs on every cell alike."""
    spec = built_function(built, endpoint_spec(endpoint).function, resources={"CacheBucket": ""})
    body = event(endpoint)
    with tempfile.TemporaryDirectory(prefix="engine-") as workdir, ExitStack() as stack:
        envs: dict[tuple[str, str], LocalLambda] = {}
        for setting in settings:
            for size in memory:
                vcpus = share(size)
                mb = {} if vcpus is None else {"AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(round(vcpus * ONE_VCPU_MB))}
                fn = stack.enter_context(LocalLambda(spec, Path(workdir) / f"{len(envs)}", python=python,
                                                     env={**NO_CACHE, **invoke_env, **mb, **setting.env()}))
                fn.start()
                assert fn.process is not None
                if vcpus is not None:
                    stack.enter_context(CpuShare(vcpus)).add(fn.process.pid)
                envs[setting.name, size] = fn
        for fn in envs.values():
            for _ in range(5):  # warm: the first requests set up what later ones reuse
                assert fn.invoke_json(body)["statusCode"] == 200
        times: dict[tuple[str, str], list[float]] = {cell: [] for cell in envs}
        order = list(envs)
        for _ in range(requests):
            random.shuffle(order)
            for cell in order:
                time.sleep(random.uniform(0.03, 0.05))
                start = time.perf_counter()
                response = envs[cell].invoke_json(body)
                times[cell].append(time.perf_counter() - start)
                assert response["statusCode"] == 200, response
    return times


# -- the local server: both towers in one process ---------------------------------------------------------
def local_server_times(setting: Setting, requests: int) -> dict[str, list[float]]:
    """Seconds per image and per text embedding, the two running concurrently, then each alone: in a child
    process per setting, configured as ``make serve`` is."""
    done = subprocess.run([sys.executable, __file__, "--local-child", setting.name, "--requests", str(requests)],
                          capture_output=True, text=True, check=True, timeout=600)
    times: dict[str, list[float]] = json.loads(done.stdout.strip().splitlines()[-1])
    return times


def local_server_child(setting: Setting, requests: int) -> dict[str, list[float]]:
    from clip_serverless.api.local import local_service
    from clip_serverless.settings import Settings

    settings = Settings.from_env({"CLIP_MODEL_DIR": str(INT8), "CLIP_CACHE": "off", **setting.env()})
    service = local_service(settings)  # as api.local.main: a pool per session
    service.preload(("visual", "textual"))
    image = base64.b64decode(json.loads(base64.b64decode(event("embed_image")["body"]))["image"]["value"])
    texts = json.loads(base64.b64decode(event("embed_text")["body"]))["text"]

    def run(kind: str) -> float:
        start = time.perf_counter()
        if kind == "image":
            service.embed_images([image], use_cache=False)
        else:
            service.embed_texts(texts, use_cache=False)
        return time.perf_counter() - start

    for kind in ("image", "text"):
        for _ in range(5):
            run(kind)
    out: dict[str, list[float]] = {"image, concurrent": [], "text, concurrent": [], "image, alone": [],
                                   "text, alone": []}

    def client(kind: str) -> None:
        for _ in range(requests):
            out[f"{kind}, concurrent"].append(run(kind))

    clients = [threading.Thread(target=client, args=(kind,)) for kind in ("image", "text")]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join()
    for kind in ("image", "text"):
        for _ in range(requests):
            time.sleep(random.uniform(0.005, 0.01))
            out[f"{kind}, alone"].append(run(kind))
    return out


def ms(xs: list[float]) -> str:
    return f"{1000 * statistics.median(xs):.1f}"


def cell(per_round: list[list[float]]) -> str:
    """Median over rounds of each round's median (ms), and the range of those medians."""
    medians = [statistics.median(xs) for xs in per_round]
    if len(medians) == 1:
        qs = statistics.quantiles(per_round[0], n=10)
        return f"{1000 * medians[0]:.1f} (p90 {1000 * qs[-1]:.1f})"
    return f"{1000 * statistics.median(medians):.1f} ({1000 * min(medians):.1f}-{1000 * max(medians):.1f})"


def shuffled(items: list[Any], seed: int) -> Iterator[Any]:
    items = list(items)
    random.Random(seed).shuffle(items)
    yield from items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--functions", default=",".join(spec.name for spec in REGISTRY))
    parser.add_argument("--memory", default="full,2048,1769",
                        help="memory sizes in MB (their CPU share: MB / 1,769 vCPU) or full, comma-separated")
    parser.add_argument("--settings", default="", help="names of SETTINGS to run, `;`-separated (default all)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=30, help="timed requests per cell and round")
    parser.add_argument("--no-local", action="store_true", help="skip the local server part")
    parser.add_argument("--reuse-build", action="store_true", help="use build/bench-cold-start/sam-int8 as it is")
    parser.add_argument("--local-child", help=argparse.SUPPRESS)  # one local-server setting, in a child process
    args = parser.parse_args()
    if args.local_child:
        print(json.dumps(local_server_child(next(s for s in SETTINGS if s.name == args.local_child), args.requests)))
        return
    endpoints = [endpoint_spec(name.strip()).name for name in args.functions.split(",") if name.strip()]
    memory = [size.strip() for size in args.memory.split(",") if size.strip()]
    wanted = {name.strip() for name in args.settings.split(";") if name.strip()}
    settings = [s for s in SETTINGS if not wanted or s.name in wanted]
    if not (INT8 / "manifest.json").exists():
        raise SystemExit(f"{INT8} is missing: make models-b32")
    python = find_python()
    built = BuiltApp(BENCH / "sam-int8") if args.reuse_build else sam_build(INT8, python)

    results: dict[tuple[str, str, str], list[list[float]]] = {}
    service = LambdaService()
    lenders = {entry.invokes.endpoint for entry in REGISTRY if entry.invokes is not None and entry.name in endpoints}
    for lender in sorted(lenders):
        pool = service.register(built_function(built, endpoint_spec(lender).function, resources={"CacheBucket": ""}),
                                python=python, env=NO_CACHE, max_concurrency=1)
        pool.prestart(1)
        pool.all[0].invoke_json(event(lender))
    invoke_env = {"AWS_ENDPOINT_URL_LAMBDA": service.endpoint_url}
    try:
        for round_ in range(args.rounds):
            for endpoint in shuffled(endpoints, round_):
                per_cell = function_times(built, endpoint, settings, memory, args.requests, python, invoke_env)
                for (setting_name, size), xs in per_cell.items():
                    results.setdefault((endpoint, setting_name, size), []).append(xs)
                print(f"round {round_ + 1}: {endpoint}: " + ", ".join(
                    f"{name} @ {size} {ms(xs)}" for (name, size), xs in per_cell.items()), file=sys.stderr)
    finally:
        service.close()

    local: dict[tuple[str, str], list[list[float]]] = {}
    if not args.no_local:
        for round_ in range(args.rounds):
            for setting in shuffled([SETTINGS[0], *LOCAL_SETTINGS], round_):
                for kind, times in local_server_times(setting, args.requests).items():
                    local.setdefault((setting.name, kind), []).append(times)
                print(f"round {round_ + 1}: local server, {setting.name}", file=sys.stderr)

    print(f"\nWarm requests (ms: median over {args.rounds} round(s) of {args.requests} requests each, range of the "
          f"round medians), cache off, the CPU share of each memory size (2 visible cores, 20 ms periods); default: "
          f"the function's own settings at that size; load average "
          f"{os.getloadavg()[0]:.1f}:\n")
    print("| function | setting | " + " | ".join("full machine" if share(size) is None else
                                                f"{size} MB ({share(size):.2f} vCPU)" for size in memory) + " |")
    print("|---|---|" + "---|" * len(memory))
    for endpoint in endpoints:
        for setting in settings:
            row = [cell(results[endpoint, setting.name, size]) for size in memory]
            print(f"| {endpoint} | {setting.name} | " + " | ".join(row) + " |")
    if local:
        kinds = ["image, alone", "text, alone", "image, concurrent", "text, concurrent"]
        print("\nLocal server: both towers in one process, full machine (ms per embedding, as above):\n")
        print("| setting | " + " | ".join(kinds) + " |\n|---|" + "---|" * len(kinds))
        for setting in [SETTINGS[0], *LOCAL_SETTINGS]:
            print(f"| {setting.name} | " + " | ".join(cell(local[setting.name, kind]) for kind in kinds) + " |")


if __name__ == "__main__":
    main()
