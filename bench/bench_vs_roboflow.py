"""Our local server against Roboflow's own Inference server, side by side, on the same seeded weights.

Starts both servers on loopback, runs ``../shared/tools/peer-bench`` (the same four requests to both in
interleaved rounds: embed_text 1 and 8 captions, embed_image of a 1024x768 JPEG, compare image vs 8
captions), prints its table, stops both. Our server is ``make serve``'s (``python -m
clip_serverless.api.local``) with the cache off; Roboflow's is ``../shared/tools/peer-roboflow`` (inference-cpu
1.8.3) on a plain export of the same seed-0 ViT-B/32 (``../shared/tools/synth-clip-model``), fp32 (its default)
or int8 (dynamic quantisation, as ours).

    .venv/bin/python bench/bench_vs_roboflow.py [--roboflow fp32|int8] [--ours build/models/ViT-B-32-synthetic-int8]
        [--rounds 25] [--json FILE]

Needs `make models-b32`; the first run of the shared tools builds their virtual environments under /tmp.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOOLS = (REPO / ".." / "shared" / "tools").resolve()
PEER_MODEL = REPO / "build" / "peer-model"


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with status {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):  # loopback only
                return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url}: no answer within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roboflow", choices=["fp32", "int8"], default="fp32")
    parser.add_argument("--ours", type=Path, default=REPO / "build" / "models" / "ViT-B-32-synthetic-int8")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--photo", default="coffee", choices=["coffee", "astronaut"])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--ours-port", type=int, default=9301)
    parser.add_argument("--roboflow-port", type=int, default=9401)
    args = parser.parse_args()
    if not (args.ours / "manifest.json").exists():
        raise SystemExit(f"{args.ours}: no model directory (make models-b32)")
    if not (PEER_MODEL / "int8" / "visual.onnx").exists():
        subprocess.run([str(TOOLS / "synth-clip-model"), str(PEER_MODEL), "--int8"], check=True)
    peer_dir = PEER_MODEL / "int8" if args.roboflow == "int8" else PEER_MODEL
    env = {**os.environ, "CLIP_MODEL_DIR": str(args.ours), "CLIP_CACHE": "off"}
    ours = subprocess.Popen([sys.executable, "-m", "clip_serverless.api.local", "--port", str(args.ours_port)],
                            env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    roboflow = subprocess.Popen([str(TOOLS / "peer-roboflow"), str(peer_dir), "--port", str(args.roboflow_port)],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{args.ours_port}/healthz", ours, 120)
        wait_http(f"http://127.0.0.1:{args.roboflow_port}/info", roboflow, 600)
        command = [str(TOOLS / "peer-bench"), f"http://127.0.0.1:{args.ours_port}",
                   f"http://127.0.0.1:{args.roboflow_port}", "--names", "ours", f"roboflow-{args.roboflow}",
                   "--rounds", str(args.rounds), "--photo", args.photo]
        if args.json:
            command += ["--json", str(args.json)]
        print(f"ours: {args.ours.name}; roboflow: {peer_dir.relative_to(REPO)} ({args.roboflow})", flush=True)
        subprocess.run(command, check=True)
    finally:
        stop(ours)
        stop(roboflow)


if __name__ == "__main__":
    main()
