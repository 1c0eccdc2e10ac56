"""Dollars per million requests of each function, from its measured warm durations at several memory sizes.

Each function is the ``sam build`` output of template.yaml with the int8 model (the zip flavour, built
as bench_cold_start.py builds it), run warm as Lambda runs it (a python3.12 process under AWS's runtime
client, ``lambda_runtime.LocalLambda``), cache off (``CLIP_CACHE=off``), with Lambda's CPU share of each
memory size emulated by a CPU cgroup (bench/lambda_cpu.py: memory / 1,769 MB vCPUs, two visible vCPUs up
to 3,008 MB, quota per 20 ms period by default). The requests (API Gateway HTTP API events):

- embed_image: one 1024x768 JPEG photo (a scikit-image sample photo, quality 90) as base64;
- embed_text: one caption; a list of 8 captions;
- compare: the photo against 8 captions, the captions embedded by ``embed_text`` behind a local Lambda
  Invoke API (its own CPU share, ``--invoked-memory``), whose duration and request are billed too;
- embeddings (OpenAI's API): one caption; 8 captions (``encoding_format: base64``, the ``openai`` client's).

A request's duration is Lambda's: from the event's delivery to the runtime (its ``next`` call returns)
to the result's arrival at the Runtime API, rounded up to 1 ms (bench/lambda_pricing.py has the prices
and the arithmetic). Each request reaches an idle environment (``--arrival idle``, the default: a pause of
one to two CPU periods before it, so the period's quota is whole and the request starts at a random
point of the period) or follows the previous one at once (``back-to-back``: a busy environment).

Rounds (``--rounds``) go over every memory size in turn, a fresh environment each time, so a noisy
neighbour slows all sizes alike; the tables give medians over all rounds and the spread of the rounds'
medians. Costs use the median billed duration (the bill is the mean: it is in the JSON, and on a quiet
machine the two agree closely; on a shared one the mean follows the neighbours).

Also per environment: its init (process start to the runtime's first poll, under the same share: a cold
start without its first request), the CPU time of each request (all the function's threads; unlike the
duration, hardly affected by neighbours), the share of CPU periods in which the cgroup was throttled, and
the process's peak resident set.

The recommended memory size of a function is the cheapest (its first request kind, total $/M) at which
every request kind of the function keeps its p90 within its latency bound (``BOUNDS``, ``--bound``), its
init within ``INIT_BOUND_S`` (``--init-bound``), and the process's peak resident memory below the memory
size; a size within ``TOLERANCE`` (2%, ``--tolerance``) of that cost counts as a tie, which the larger size
wins. The sizes below 1,769 MB cost about the same for CPU-bound work (duration x memory is constant while
the share is below one vCPU), so the bounds decide among them.

    .venv/bin/python bench/bench_cost.py [--rounds 3] [--requests 20] [--json build/bench-lambda/cost.json]
    .venv/bin/python bench/bench_cost.py --functions embed_text --memory 512,1024,1769 --reuse-build
    .venv/bin/python bench/bench_cost.py --period-us 100000 --arrival back-to-back   # sensitivity

Needs root and a writable cgroup v1 CPU controller (bench/lambda_cpu.py), build/models/ViT-B-32-synthetic-int8
(`make models-b32`), Python 3.12 and the SAM CLI in .venv-sam.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "infra"))

import bench_cold_start  # noqa: E402
from bench_cache import CAPTIONS  # noqa: E402
from bench_cold_start import INT8, NO_CACHE  # noqa: E402
from clip_serverless.api.endpoints import REGISTRY  # noqa: E402
from clip_serverless.api.endpoints import endpoint as endpoint_spec  # noqa: E402
from lambda_cpu import DEFAULT_PERIOD_US, CgroupUnavailable, CpuShare, check_cgroup, thread_ids, vcpu_share  # noqa: E402
from lambda_pricing import (  # noqa: E402
    ARCHITECTURE,
    LAMBDA_USD_PER_GB_SECOND,
    PRICE_SOURCES,
    PRICES_CHECKED,
    REGION,
    CostPerMillion,
    Invocation,
    billed_ms,
    cost_per_million,
    http_api_units,
)
from lambda_runtime import BuiltApp, FunctionSpec, LambdaService, LocalLambda, built_function, find_python  # noqa: E402
from lambda_runtime.runtime_api import InvocationResult, RuntimeApi, _Pending  # noqa: E402

from tests.images import encode, sized  # noqa: E402
from tests.lambda_events import http_api_event  # noqa: E402

# Built apart from bench_cold_start's build/bench-cold-start/, which that bench rebuilds on every run.
BUILD = REPO / "build" / "bench-lambda"
DEFAULT_MEMORY = (512, 768, 1024, 1536, 1769, 2048, 3008)
DEFAULT_INVOKED_MEMORY = 1024
PHOTO = "coffee"  # skimage.data.coffee(), 600x400, resized to the benchmark's size
GOALS_USD_PER_MILLION = {"embed_image": 2.50, "embed_text": 1.50}


# -- the requests ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """One kind of request to an endpoint, with the p90 duration it must keep."""

    name: str
    endpoint: str
    body: Mapping[str, Any]
    bound_ms: float

    def event(self) -> dict[str, Any]:
        """The HTTP API event: a JSON body travels as text (``isBase64Encoded`` false), as API Gateway sends it."""
        path = next(route.path for route in endpoint_spec(self.endpoint).routes if route.method == "POST")
        return http_api_event("POST", path, dict(self.body), base64_encoded=False)

    @property
    def body_bytes(self) -> int:
        return len(json.dumps(self.body).encode())


# p90 bounds on the function's duration. A caption is embedded while someone waits for search results:
# 50 ms leaves API Gateway, the network and the search itself most of the 0.1 s within which an answer
# feels instant. An image arrives after an upload of a few hundred KB, which takes longer than its
# embedding: 150 ms. Eight items (a batch, compare's prompts): 400 ms, a step a user still sees as prompt.
BOUNDS = {"caption": 50.0, "image": 150.0, "batch": 400.0}
# A cold start is a request's latency too (every burst starts new environments): its init, measured under
# the same CPU share, at most 2 s, three times what it takes with two whole cores (README: ~0.7 s). If
# Lambda runs init faster than the share (it has been seen to), this bound is on the safe side.
INIT_BOUND_S = 2.0
# Sizes whose cost is this close to the cheapest are as cheap, as far as these measurements can tell (the
# rounds' medians of one size spread by several per cent on a shared machine): the largest of them wins.
TOLERANCE = 0.02


def photo_jpeg(width: int = 1024, height: int = 768, quality: int = 90) -> bytes:
    return encode(sized(width, height, PHOTO), "JPEG", quality=quality)


def requests_by_endpoint(bounds: Mapping[str, float] = BOUNDS) -> dict[str, list[Request]]:
    """Each endpoint's request kinds, its most common first (the one the recommendation prices)."""
    photo = {"type": "base64", "value": base64.b64encode(photo_jpeg()).decode()}
    caption, captions = CAPTIONS[0], list(CAPTIONS[:8])
    return {
        "embed_image": [Request("1 photo 1024x768", "embed_image", {"image": photo}, bounds["image"])],
        "embed_text": [Request("1 caption", "embed_text", {"text": caption}, bounds["caption"]),
                       Request("8 captions", "embed_text", {"text": captions}, bounds["batch"])],
        "compare": [Request("photo vs 8 captions", "compare",
                            {"subject": photo, "subject_type": "image", "prompt": captions, "prompt_type": "text"},
                            bounds["batch"])],
        "embeddings": [Request("1 caption", "embeddings", {"input": caption, "encoding_format": "base64"},
                               bounds["caption"]),
                       Request("8 captions", "embeddings", {"input": captions, "encoding_format": "base64"},
                               bounds["batch"])],
    }


# -- running a built function with Lambda's clock and CPU share ---------------------------------------------
class TimedRuntimeApi(RuntimeApi):
    """The Runtime API stand-in, recording each invocation's duration as Lambda bills it: from the event's
    delivery to the runtime (its ``next`` call returns) to the arrival of its result."""

    def __init__(self, function_arn: str, timeout_s: float = 30.0) -> None:
        super().__init__(function_arn, timeout_s)
        self.durations: list[float] = []
        self._delivered: dict[str, float] = {}
        self.polled = threading.Event()  # the runtime asked for its first event: init is over
        self.polled_at = 0.0

    def _next(self) -> _Pending | None:
        if not self.polled.is_set():
            self.polled_at = time.perf_counter()
            self.polled.set()
        pending = super()._next()
        if pending is not None:
            self._delivered[pending.request_id] = time.perf_counter()
        return pending

    def _finish(self, request_id: str, result: InvocationResult) -> bool:
        arrived = time.perf_counter()
        delivered = self._delivered.pop(request_id, None)
        if delivered is not None:
            self.durations.append(arrived - delivered)
        return super()._finish(request_id, result)


class MeasuredLambda(LocalLambda):
    """A :class:`LocalLambda` whose invocations are timed (``durations``) and whose process runs in ``share``."""

    def __init__(self, spec: FunctionSpec, workdir: Path, *, share: CpuShare | None = None, **kwargs: Any) -> None:
        super().__init__(spec, workdir, **kwargs)
        self.api.close()
        self.api = self.timed = TimedRuntimeApi(self.api.function_arn, self.api.timeout_s)
        self.share = share

    @property
    def durations(self) -> list[float]:
        return self.timed.durations

    def start(self) -> None:
        super().start()
        if self.share is not None and self.process is not None:
            self.share.add(self.process.pid)  # at once: its init (imports, model) runs inside the share too

    def __enter__(self) -> MeasuredLambda:
        return self

    def peak_rss_mb(self) -> float:
        """The process's peak resident set (VmHWM) so far."""
        return proc_status_kb(self.process.pid if self.process else 0, "VmHWM") / 1024

    def init_seconds(self) -> float:
        """Process start to the runtime's first poll: Lambda's init phase (imports, model, warm-up)."""
        if not self.timed.polled.wait(timeout=self.api.timeout_s):
            raise TimeoutError(f"{self.spec.name}: init did not finish within {self.api.timeout_s} s")
        return self.timed.polled_at - self.started_at

    def cpu_seconds(self) -> float:
        """CPU time its threads have run so far (``/proc/PID/task/*/schedstat``, nanoseconds)."""
        pid, total = self.process.pid if self.process else 0, 0
        for tid in thread_ids(pid):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just ended
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
        return total / 1e9


def proc_status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/{pid}/status")


def response_bytes(response: Mapping[str, Any]) -> int:
    body = response.get("body") or ""
    return len(base64.b64decode(body)) if response.get("isBase64Encoded") else len(body.encode())


# -- measuring ---------------------------------------------------------------------------------------------
@dataclass
class Series:
    """The measurements of one request kind at one memory size, over all rounds."""

    request: Request
    memory_mb: int
    durations: list[list[float]] = field(default_factory=list)  # per round, seconds
    cpu: list[float] = field(default_factory=list)  # CPU seconds of the function's process per request
    invoked: list[list[float]] = field(default_factory=list)  # per request: durations of the invocations it made
    init: list[float] = field(default_factory=list)  # per environment (round): its init, seconds
    response_bytes: int = 0
    peak_rss_mb: float = 0.0
    throttled_periods: int = 0
    periods: int = 0

    @property
    def all(self) -> list[float]:
        return [d for run in self.durations for d in run]


@dataclass(frozen=True)
class Settings:
    rounds: int
    requests: int
    warmup: int
    period_us: int
    arrival: str
    invoked_memory_mb: int
    python: str
    init_bound_s: float = INIT_BOUND_S
    env: Mapping[str, str] = field(default_factory=dict)


def pause(settings: Settings) -> None:
    if settings.arrival == "idle":
        period = settings.period_us / 1e6
        time.sleep(random.uniform(period, 2 * period))


def start_lenders(app: BuiltApp, endpoints: Sequence[str], settings: Settings,
                  catalogue: Mapping[str, list[Request]],
                  stack: ExitStack) -> tuple[LambdaService, dict[str, MeasuredLambda]]:
    """The functions that ``endpoints`` invoke (embed_text for compare) behind a local Invoke API: one warm
    environment each, timed, in its own CPU share (``settings.invoked_memory_mb``)."""
    service = stack.enter_context(LambdaService())
    lenders: dict[str, MeasuredLambda] = {}
    for entry in REGISTRY:
        if entry.name not in endpoints or entry.invokes is None or entry.invokes.endpoint in lenders:
            continue
        lender = endpoint_spec(entry.invokes.endpoint)
        memory = settings.invoked_memory_mb
        spec = dataclasses.replace(built_function(app, lender.function, resources={"CacheBucket": ""}),
                                   memory_mb=memory)
        share = stack.enter_context(CpuShare(memory, period_us=settings.period_us,
                                             name=f"clip-bench-{os.getpid()}-lender-{lender.name}"))
        made: list[MeasuredLambda] = []

        def make(workdir: Path, spec: FunctionSpec = spec, share: CpuShare = share,
                 made: list[MeasuredLambda] = made) -> LocalLambda:
            env = MeasuredLambda(spec, workdir, share=share, python=settings.python, env={**NO_CACHE, **settings.env})
            made.append(env)
            return env

        pool = service.register(spec, max_concurrency=1)
        pool.make = make  # an adapter: the pool's environments are timed and run in the lender's share
        pool.prestart(1)
        made[0].invoke_json(catalogue[lender.name][0].event())  # its init, before anything is timed
        lenders[lender.name] = made[0]
    return service, lenders


def measure_round(app: BuiltApp, endpoint: str, memory: int, requests: Sequence[Request], series: dict[Any, Series],
                  settings: Settings, service: LambdaService, lenders: Mapping[str, MeasuredLambda]) -> None:
    """One fresh environment of ``endpoint``'s function at ``memory``: warm it up, then time each request kind."""
    entry = endpoint_spec(endpoint)
    spec = dataclasses.replace(built_function(app, entry.function, resources={"CacheBucket": ""}), memory_mb=memory)
    lender = lenders.get(entry.invokes.endpoint) if entry.invokes else None
    name = f"clip-bench-{os.getpid()}-{endpoint}-{memory}"
    with CpuShare(memory, period_us=settings.period_us, name=name) as share, \
            tempfile.TemporaryDirectory(prefix="cost-") as workdir, \
            MeasuredLambda(spec, Path(workdir), share=share, python=settings.python,
                           env={**NO_CACHE, **settings.env, "AWS_ENDPOINT_URL_LAMBDA": service.endpoint_url}) as fn:
        events = [request.event() for request in requests]
        fn.start()
        init = fn.init_seconds()
        for _ in range(settings.warmup):
            for event in events:
                assert fn.invoke_json(event)["statusCode"] == 200
                pause(settings)
        before = share.stats()
        runs: dict[str, list[float]] = {r.name: [] for r in requests}
        invoked: dict[str, list[list[float]]] = {r.name: [] for r in requests}
        for _ in range(settings.requests):
            for request, event in zip(requests, events, strict=True):  # interleaved: drift hits every kind
                pause(settings)
                lent = len(lender.durations) if lender else 0
                cpu = fn.cpu_seconds()
                response = fn.invoke_json(event)
                series[endpoint, request.name, memory].cpu.append(fn.cpu_seconds() - cpu)
                if response["statusCode"] != 200:
                    raise RuntimeError(f"{endpoint} {request.name}: {response}")
                runs[request.name].append(fn.durations[-1])
                if lender is not None:
                    invoked[request.name].append(list(lender.durations[lent:]))
                series[endpoint, request.name, memory].response_bytes = response_bytes(response)
        after = share.stats()
        for request in requests:
            s = series[endpoint, request.name, memory]
            s.durations.append(runs[request.name])
            s.invoked += invoked[request.name]
            s.init.append(init)
            s.peak_rss_mb = max(s.peak_rss_mb, fn.peak_rss_mb())
            s.throttled_periods += after["nr_throttled"] - before["nr_throttled"]
            s.periods += after["nr_periods"] - before["nr_periods"]


# -- results -----------------------------------------------------------------------------------------------
def p90(xs: Sequence[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1] if len(xs) >= 2 else xs[0]


@dataclass(frozen=True)
class Row:
    endpoint: str
    request: str
    memory_mb: int
    vcpu: float
    median_ms: float
    cpu_ms: float  # median CPU time of the function's process per request (all its threads)
    p90_ms: float
    round_medians_ms: tuple[float, ...]
    billed_ms: float  # median of the billed durations
    mean_billed_ms: float
    invoked_calls: int  # invocations of other functions per request (median)
    invoked_billed_ms: float  # their billed duration per request (median; 0: none)
    invoked_memory_mb: int
    init_s: float  # the environment's init (cold start without the first request), median over rounds
    init_bound_s: float
    bound_ms: float
    peak_rss_mb: float
    throttled_share: float  # of the CPU periods in which the function ran, those it was throttled in
    cost: CostPerMillion
    cost_mean: CostPerMillion

    @property
    def meets_bound(self) -> bool:
        return self.p90_ms <= self.bound_ms

    @property
    def meets_init_bound(self) -> bool:
        return self.init_s <= self.init_bound_s

    @property
    def fits(self) -> bool:
        return self.peak_rss_mb < self.memory_mb


def to_row(s: Series, settings: Settings) -> Row:
    durations = s.all
    billed = [billed_ms(d) for d in durations]
    calls = round(statistics.median(len(made) for made in s.invoked)) if s.invoked else 0
    invoked = [sum(billed_ms(d) for d in made) for made in s.invoked]  # billed ms per request, all its calls
    invoked_memory = settings.invoked_memory_mb if calls else 0
    units = http_api_units(s.request.body_bytes, s.response_bytes)

    def cost(own: float, lent: float) -> CostPerMillion:
        made = [Invocation(lent / calls, invoked_memory) for _ in range(calls)]
        return cost_per_million([Invocation(own, s.memory_mb), *made], units)

    med_invoked = statistics.median(invoked) if calls else 0.0
    return Row(endpoint=s.request.endpoint, request=s.request.name, memory_mb=s.memory_mb,
               vcpu=vcpu_share(s.memory_mb), median_ms=1000 * statistics.median(durations),
               cpu_ms=1000 * statistics.median(s.cpu),
               p90_ms=1000 * p90(durations),
               round_medians_ms=tuple(1000 * statistics.median(run) for run in s.durations),
               billed_ms=statistics.median(billed), mean_billed_ms=statistics.fmean(billed),
               invoked_calls=calls, invoked_billed_ms=med_invoked, invoked_memory_mb=invoked_memory,
               init_s=statistics.median(s.init), init_bound_s=settings.init_bound_s, bound_ms=s.request.bound_ms,
               peak_rss_mb=s.peak_rss_mb, throttled_share=s.throttled_periods / max(1, s.periods),
               cost=cost(statistics.median(billed), med_invoked),
               cost_mean=cost(statistics.fmean(billed), statistics.fmean(invoked) if calls else 0.0))


def recommend(rows: Sequence[Row], endpoint: str, tolerance: float = TOLERANCE) -> tuple[int | None, str]:
    """The memory size for ``endpoint``'s function: among the sizes at which every request kind meets its
    bound, init meets its bound and the process fits, those within ``tolerance`` of the cheapest (first
    request kind, total $/M), and of these the largest (the most CPU for the same money)."""
    mine = [r for r in rows if r.endpoint == endpoint]
    first = mine[0].request
    ok = []
    for memory in sorted({r.memory_mb for r in mine}):
        at = [r for r in mine if r.memory_mb == memory]
        if all(r.meets_bound and r.meets_init_bound and r.fits for r in at):
            ok.append(next(r for r in at if r.request == first))
    if not ok:
        return None, f"no memory size keeps every request kind of {endpoint} and its init within the bounds"
    cheapest = min(ok, key=lambda r: r.cost.total)
    best = max((r for r in ok if r.cost.total <= cheapest.cost.total * (1 + tolerance)), key=lambda r: r.memory_mb)
    missed = [r.memory_mb for r in mine if r.request == first and r not in ok]
    reason = (f"${best.cost.total:.3f}/M for '{first}'"
              + (f", within {tolerance:.0%} of the cheapest passing size ({cheapest.memory_mb} MB, "
                 f"${cheapest.cost.total:.3f}/M)" if best is not cheapest else ", the cheapest passing size")
              + (f"; {', '.join(map(str, sorted(missed)))} MB miss a bound" if missed else ""))
    return best.memory_mb, reason


def print_table(rows: Sequence[Row]) -> None:
    print("| function | request | memory (vCPU) | median ms (rounds) | p90 ms | bound | CPU ms | billed ms | "
          "compute | requests | HTTP API | **total $/M** | peak RSS | throttled | init s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        spread = f"{min(r.round_medians_ms):.1f}-{max(r.round_medians_ms):.1f}"
        billed = f"{r.billed_ms:.0f}" + (f" + {r.invoked_billed_ms:.0f} @{r.invoked_memory_mb}"
                                         if r.invoked_memory_mb else "")
        flag = "" if r.meets_bound else " ✗"
        print(f"| {r.endpoint} | {r.request} | {r.memory_mb} ({r.vcpu:.2f}) | {r.median_ms:.1f} ({spread}) | "
              f"{r.p90_ms:.1f}{flag} | {r.bound_ms:.0f} | {r.cpu_ms:.1f} | {billed} | {r.cost.compute:.2f} | "
              f"{r.cost.requests:.2f} | {r.cost.http_api:.2f} | **{r.cost.total:.2f}** | {r.peak_rss_mb:.0f} MB | "
              f"{r.throttled_share:.0%} | {r.init_s:.2f}{'' if r.meets_init_bound else ' ✗'} |")


def conditions(settings: Settings, load_before: float) -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "load_average_before": load_before,
            "load_average_after": os.getloadavg()[0], "rounds": settings.rounds,
            "requests_per_round": settings.requests, "warmup": settings.warmup,
            "cfs_period_us": settings.period_us, "arrival": settings.arrival,
            "invoked_memory_mb": settings.invoked_memory_mb, "model": INT8.name, "cache": "off"}


def parse_memory(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--functions", default=",".join(e.name for e in REGISTRY),
                        help="endpoints whose functions to measure (comma-separated)")
    parser.add_argument("--memory", type=parse_memory, default=list(DEFAULT_MEMORY), help="MB, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=20, help="timed requests of each kind per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--period-us", type=int, default=DEFAULT_PERIOD_US, help="CFS period (Lambda: ~20 ms)")
    parser.add_argument("--arrival", choices=("idle", "back-to-back"), default="idle")
    parser.add_argument("--invoked-memory", type=int, default=DEFAULT_INVOKED_MEMORY,
                        help="MB of the functions others invoke (embed_text for compare)")
    parser.add_argument("--bound", action="append", default=[], metavar="KIND=MS",
                        help=f"override a p90 bound ({', '.join(f'{k}={v:.0f}' for k, v in BOUNDS.items())})")
    parser.add_argument("--init-bound", type=float, default=INIT_BOUND_S, help="seconds of init allowed")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help="cost difference treated as a tie (the larger memory size wins)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every function (e.g. CLIP_NUM_THREADS=1)")
    parser.add_argument("--reuse-build", action="store_true", help=f"use {BUILD}/sam-int8 as it is")
    parser.add_argument("--json", type=Path, help="write the rows, prices and conditions here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, metavar="JSON",
                        help="measure nothing: print the table and recommendations of an earlier --json file")
    args = parser.parse_args()
    if args.report:
        data = json.loads(args.report.read_text())
        rows = [row_from_json(item, args.init_bound) for item in data["rows"]]
        print(header(data["conditions"]))
        print_recommendations(rows, args.init_bound, args.tolerance)
        return
    try:
        check_cgroup()
    except CgroupUnavailable as exc:
        raise SystemExit(f"bench_cost: {exc}") from None
    if not (INT8 / "manifest.json").exists():
        raise SystemExit(f"{INT8} is missing: make models-b32")
    bounds = dict(BOUNDS)
    for item in args.bound:
        kind, _, ms = item.partition("=")
        if kind not in bounds:
            raise SystemExit(f"--bound: no kind {kind!r} ({', '.join(bounds)})")
        bounds[kind] = float(ms)
    random.seed(args.seed)
    python = find_python()
    settings = Settings(rounds=args.rounds, requests=args.requests, warmup=args.warmup, period_us=args.period_us,
                        arrival=args.arrival, invoked_memory_mb=args.invoked_memory, python=python,
                        init_bound_s=args.init_bound,
                        env=dict(item.split("=", 1) for item in args.env))
    load_before = os.getloadavg()[0]
    app = build(python, reuse=args.reuse_build)
    endpoints = [e for e in args.functions.split(",") if e]
    catalogue = requests_by_endpoint(bounds)
    series: dict[Any, Series] = {(e, r.name, m): Series(r, m) for e in endpoints for r in catalogue[e]
                                 for m in args.memory}
    with ExitStack() as stack:
        service, lenders = start_lenders(app, endpoints, settings, catalogue, stack)
        for round_ in range(args.rounds):
            order = list(args.memory)
            random.shuffle(order)
            for memory in order:
                for endpoint in endpoints:
                    measure_round(app, endpoint, memory, catalogue[endpoint], series, settings, service, lenders)
                    print(f"round {round_ + 1}/{args.rounds}: {endpoint} at {memory} MB", file=sys.stderr)
    rows = [to_row(series[e, r.name, m], settings) for e in endpoints for r in catalogue[e] for m in args.memory]
    info = conditions(settings, load_before)
    print(header(info))
    recommended = print_recommendations(rows, args.init_bound, args.tolerance)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "prices": {"checked": PRICES_CHECKED, "sources": PRICE_SOURCES, "region": REGION,
                       "architecture": ARCHITECTURE, "lambda_usd_per_gb_second": LAMBDA_USD_PER_GB_SECOND},
            "conditions": info, "bounds_ms": bounds, "init_bound_s": args.init_bound, "tolerance": args.tolerance,
            "rows": [row_to_json(r) for r in rows], "recommended": recommended}, indent=2) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)


def header(info: Mapping[str, Any]) -> str:
    return (f"\nWarm durations and $ per million requests, {ARCHITECTURE} {REGION} list prices of {PRICES_CHECKED} "
            f"(Lambda ${LAMBDA_USD_PER_GB_SECOND:.10f} per GB-s; cache writes apart); int8 zip functions, cache off; "
            f"{info['rounds']} round(s) x {info['requests_per_round']} requests; CFS period "
            f"{info['cfs_period_us'] // 1000} ms, arrival {info['arrival']}; compare's embed_text at "
            f"{info['invoked_memory_mb']} MB; {info['cpu']}, load average {info['load_average_before']:.1f} -> "
            f"{info['load_average_after']:.1f}:\n")


def print_recommendations(rows: Sequence[Row], init_bound: float, tolerance: float) -> dict[str, Any]:
    print_table(rows)
    print(f"\nRecommended memory size (p90s within the bounds, init at most {init_bound:.1f} s, peak RSS "
          f"within the size; the largest of those within {tolerance:.0%} of the cheapest):\n")
    recommended: dict[str, Any] = {}
    for endpoint in dict.fromkeys(r.endpoint for r in rows):
        memory, reason = recommend(rows, endpoint, tolerance)
        row = next((r for r in rows if r.endpoint == endpoint and r.memory_mb == memory), None)
        goal = GOALS_USD_PER_MILLION.get(endpoint)
        verdict = ("" if goal is None or row is None
                   else f" (goal ${goal:.2f}: {'met' if row.cost.total <= goal else 'missed'})")
        print(f"- {endpoint}: {memory} MB: {reason}{verdict}")
        recommended[endpoint] = {"memory_mb": memory, "reason": reason,
                                 "total_usd_per_million": row.cost.total if row else None, "goal": goal}
    return recommended


def row_to_json(r: Row) -> dict[str, Any]:
    return {**{k: v for k, v in dataclasses.asdict(r).items() if k not in ("cost", "cost_mean")},
            "usd_per_million": {**dataclasses.asdict(r.cost), "total": r.cost.total},
            "usd_per_million_from_mean": {**dataclasses.asdict(r.cost_mean), "total": r.cost_mean.total},
            "meets_bound": r.meets_bound, "meets_init_bound": r.meets_init_bound, "fits": r.fits}


def row_from_json(item: Mapping[str, Any], init_bound: float) -> Row:
    names = {f.name for f in dataclasses.fields(Row)} - {"cost", "cost_mean", "round_medians_ms", "init_bound_s"}

    def cost(d: Mapping[str, float]) -> CostPerMillion:
        return CostPerMillion(compute=d["compute"], requests=d["requests"], http_api=d["http_api"])

    return Row(**{k: item[k] for k in names}, round_medians_ms=tuple(item["round_medians_ms"]),
               init_bound_s=init_bound, cost=cost(item["usd_per_million"]),
               cost_mean=cost(item["usd_per_million_from_mean"]))


def build(python: str, *, reuse: bool) -> BuiltApp:
    """``sam build`` of template.yaml with the int8 model, by bench_cold_start's own helper, into ``BUILD``."""
    out = BUILD / "sam-int8"
    if reuse and (out / "template.yaml").exists():
        return BuiltApp(out)
    started = time.perf_counter()
    with mock.patch.object(bench_cold_start, "BENCH", BUILD):  # its helper builds into BENCH / "sam-int8"
        app = bench_cold_start.sam_build(INT8, python)
    print(f"sam build: {time.perf_counter() - started:.0f} s -> {out}", file=sys.stderr)
    return app


if __name__ == "__main__":
    main()
