"""Where an ONNX run's time goes, per operator type (ONNX Runtime's own profiler).

Runs one tower's graph under the engine's session options (``SessionTuning``: threads, spinning), warms it,
profiles ``--runs`` runs and sums each operator type's kernel time per run. The profiler adds a few
microseconds to every node, so the run time it prints is above an unprofiled run's (``bench_core.py``);
the shares are what this is for.

    .venv/bin/python bench/bench_ort_profile.py [--model build/models/ViT-B-32-synthetic-int8] \
        [--tower visual|textual] [--runs 30] [--threads 2] [--no-spinning]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "layers" / "core"))

from clip_serverless.engine import SessionTuning  # noqa: E402
from clip_serverless.engine.encoder import session_options  # noqa: E402
from clip_serverless.engine.model_dir import ModelDir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "build" / "models" / "ViT-B-32-synthetic-int8")
    parser.add_argument("--tower", choices=("visual", "textual"), default="visual")
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-spinning", action="store_true")
    args = parser.parse_args()
    model = ModelDir.open(args.model)
    options = session_options(SessionTuning(threads=args.threads, spinning=not args.no_spinning))
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(model.file(f"{args.tower}.onnx")), options,
                                       providers=["CPUExecutionProvider"])
        m = model.manifest
        feed: dict[str, np.ndarray[Any, Any]]
        if args.tower == "visual":
            feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(
                (1, 3, m.image_size, m.image_size)).astype(np.float32)}
        else:  # a 77-token text: the longest a text run gets
            feed = {session.get_inputs()[0].name: np.arange(1, m.context_length + 1, dtype=np.int64)[None, :]}
        warm = 5
        for _ in range(warm):
            session.run(None, feed)
        seconds = []
        for _ in range(args.runs):
            started = time.perf_counter()
            session.run(None, feed)
            seconds.append(time.perf_counter() - started)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op: defaultdict[str, float] = defaultdict(float)
    nodes: Counter[str] = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            per_op[op] += event["dur"] / 1000
            nodes[op] += 1
    runs = warm + args.runs  # the profile holds every run since the session was created
    total = sum(per_op.values()) / runs
    print(f"{args.model.name} {args.tower}, {args.threads} thread(s), spinning {not args.no_spinning}: "
          f"run {1000 * statistics.median(seconds):.1f} ms profiled (median of {args.runs}), "
          f"kernels {total:.1f} ms\n")
    print("| operator | nodes | ms per run | share |\n|---|---|---|---|")
    for op, ms in sorted(per_op.items(), key=lambda item: -item[1]):
        print(f"| {op} | {nodes[op] // runs} | {ms / runs:.2f} | {100 * ms / runs / total:.0f} % |")


if __name__ == "__main__":
    main()
