"""The local server under concurrent clients: requests per second with its default engine against variants.

Starts ``make serve``'s server (``python -m clip_serverless.api.local``, cache off, the int8 ViT-B/32) once per
variant, on its own port, all at once; then, for 1, 2 and 4 client threads, loads each server in turn for
``--seconds`` with a rotating mix of the four requests of ``peer-bench`` (``embed_image`` of a 1024x768 JPEG,
``embed_text`` of one and of 8 captions, ``compare`` of the image against the 8 captions), one keep-alive
connection per client. Prints requests per second and the median latency per kind, and each server's
resident memory at the end (a quiet session is made only once runs overlap).

Variants: ``default`` (as ``make serve`` runs: spinning sessions for runs alone, quiet ones beside another run,
``engine/alternates.py``), ``quiet`` (``CLIP_ORT_SPINNING=false``: no spinning anywhere).

    .venv/bin/python bench/bench_local_concurrency.py [--clients 1,2,4] [--seconds 12] [--model DIR]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_vs_roboflow import REPO, stop, wait_http

VARIANTS = {"quiet": {"CLIP_ORT_SPINNING": "false"}, "default": {}}
CAPTIONS = [f"a photo of a {thing}" for thing in ("cat", "dog", "cup of coffee", "rocket", "clock", "bowl of fruit",
                                                   "red sports car", "city skyline at night")]


def requests_mix() -> list[tuple[str, str, bytes]]:
    """(label, route, JSON body) of each request kind."""
    import numpy as np
    import skimage.data
    from PIL import Image

    photo = np.asarray(skimage.data.coffee())  # type: ignore[no-untyped-call]
    image = Image.fromarray(photo).resize((1024, 768), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    value = {"type": "base64", "value": base64.b64encode(buffer.getvalue()).decode()}
    bodies = [("image", "embed_image", {"image": value}), ("text 1", "embed_text", {"text": CAPTIONS[0]}),
              ("text 8", "embed_text", {"text": CAPTIONS}),
              ("compare", "compare", {"subject": value, "subject_type": "image", "prompt": CAPTIONS,
                                      "prompt_type": "text"})]
    return [(label, route, json.dumps(body).encode()) for label, route, body in bodies]


def load(port: int, clients: int, seconds: float, mix: list[tuple[str, str, bytes]]) -> dict[str, list[float]]:
    """Latencies (s) per kind of every request answered within ``seconds``, ``clients`` threads at once."""
    times: dict[str, list[float]] = {label: [] for label, _, _ in mix}
    deadline = time.monotonic() + seconds

    def client(first: int) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        i = first
        while time.monotonic() < deadline:
            label, route, body = mix[i % len(mix)]
            i += 1
            start = time.perf_counter()
            connection.request("POST", f"/clip/{route}", body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"{label}: HTTP {response.status}")
            times[label].append(time.perf_counter() - start)
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return times


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "build" / "models" / "ViT-B-32-synthetic-int8")
    parser.add_argument("--clients", default="1,2,4")
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--port", type=int, default=9311)
    args = parser.parse_args()
    if not (args.model / "manifest.json").exists():
        raise SystemExit(f"{args.model}: no model directory (make models-b32)")
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    try:
        for i, (name, extra) in enumerate(VARIANTS.items()):
            inherited = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_")}  # only the variant's
            env = {**inherited, "CLIP_MODEL_DIR": str(args.model), "CLIP_CACHE": "off", **extra}
            proc = subprocess.Popen([sys.executable, "-m", "clip_serverless.api.local", "--port", str(args.port + i)],
                                    env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            servers[name] = (args.port + i, proc)
        for port, proc in servers.values():
            wait_http(f"http://127.0.0.1:{port}/healthz", proc, 120)
        mix = requests_mix()
        for port, _ in servers.values():
            load(port, 1, 2.0, mix)  # warm: every kind once at least
        print(f"model {args.model.name}; {args.seconds:.0f} s per cell; requests/s, then median ms per kind "
              "(image / text 1 / text 8 / compare)")
        for clients in (int(c) for c in args.clients.split(",")):
            for name, (port, _) in servers.items():
                times = load(port, clients, args.seconds, mix)
                done = sum(len(xs) for xs in times.values())
                medians = " / ".join(f"{1000 * statistics.median(xs):.0f}" if xs else "-" for xs in times.values())
                print(f"  {clients} clients  {name:8s} {done / args.seconds:6.1f} req/s   {medians} ms")
        for name, (_, proc) in servers.items():
            print(f"  RSS at the end, {name}: {rss_mb(proc.pid):.0f} MB")
    finally:
        for _, proc in servers.values():
            stop(proc)


if __name__ == "__main__":
    main()
