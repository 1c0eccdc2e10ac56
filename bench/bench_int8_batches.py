"""int8 visual tower: one activation scale per tensor (row by row) against one per token (one run per batch).

Quantises ``visual.onnx`` of an fp32 model directory twice (takes ~20 s): as ``quantize_dynamic`` leaves it
(per tensor: what int8 directories made before the per-token rewrite hold, which the engine runs one row
at a time) and rewritten per token (``clip_export.per_token``: batch-invariant, so a batch is one run).
Then times the ONNX runs alone, sessions made as the engine makes them, for each setting: one image with
each graph, and a batch of eight as the engine runs it with each graph (eight runs of one, one run of
eight), and, for reference only, the per-tensor graph given the eight in one run (what batching it would
cost, were its rows not changed by their neighbours). Interleaved rounds, medians in ms per call.

Before timing, checks the per-token graph: every row of a shuffled batch of eight equals its image alone,
bit for bit (np.array_equal).

    flock /tmp/bench.lock .venv/bin/python bench/bench_int8_batches.py [--fp32 build/models/ViT-B-32-synthetic]
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_core import interleaved
from clip_export.quantize import quantize_graph
from clip_serverless.engine import SessionTuning
from clip_serverless.engine.encoder import create_session
from clip_serverless.engine.model_dir import VISUAL_FILE, ModelDir

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FP32 = REPO / "build" / "models" / "ViT-B-32-synthetic"
SETTINGS = (("2 threads", SessionTuning(threads=2, spinning=False)),
            ("2 threads, spinning", SessionTuning(threads=2, spinning=True)),
            ("1 thread", SessionTuning(threads=1, spinning=False)))
BATCH = 8


def check_batch_invariance(session: Any, pixels: np.ndarray[Any, Any]) -> None:
    alone = [session.run(None, {"pixel_values": pixels[i : i + 1]})[0][0] for i in range(len(pixels))]
    order = np.random.default_rng(1).permutation(len(pixels))
    batch = session.run(None, {"pixel_values": pixels[order]})[0]
    for row, i in zip(batch, order, strict=True):
        assert np.array_equal(row, alone[i]), "a per-token batch changed a row"


def time_setting(tuning: SessionTuning, graphs: dict[str, Path], pixels: np.ndarray[Any, Any],
                 rounds: int) -> dict[str, float]:
    """Median ms per call of each way to run one image and eight, both graphs under ``tuning``."""
    old = create_session(str(graphs["per-tensor"]), tuning=tuning)
    new = create_session(str(graphs["per-token"]), tuning=tuning)
    check_batch_invariance(new, pixels)
    one, eight = pixels[:1], pixels
    runs: dict[str, Callable[[], object]] = {
        "old 1": lambda: old.run(None, {"pixel_values": one}),
        "new 1": lambda: new.run(None, {"pixel_values": one}),
        "old 8x1": lambda: [old.run(None, {"pixel_values": eight[i : i + 1]}) for i in range(len(eight))],
        "new 1x8": lambda: new.run(None, {"pixel_values": eight}),
        "old 1x8": lambda: old.run(None, {"pixel_values": eight}),
    }
    return interleaved(runs, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fp32", type=Path, default=DEFAULT_FP32, help="fp32 model directory")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    source = ModelDir.open(args.fp32)
    size = source.manifest.image_size
    rng = np.random.default_rng(0)
    pixels = rng.standard_normal((BATCH, 3, size, size)).astype(np.float32)
    pixels[3] *= 4  # a high-contrast neighbour
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {"per-tensor": Path(tmp) / "per_tensor.onnx", "per-token": Path(tmp) / "per_token.onnx"}
        for name, path in graphs.items():
            quantize_graph(source.file(VISUAL_FILE), path, per_token_activations=name == "per-token")
        print(f"{source.manifest.model_id} visual tower ({args.fp32.name}), int8; {args.rounds} interleaved rounds; "
              f"median ms per call (per image)")
        print(f"  {'setting':22s} {'1 image':>21s}   {'8 images, as the engine runs them':>35s}   {'reference':>16s}")
        print(f"  {'':22s} {'per-tensor':>10s} {'per-token':>10s}   {'per-tensor 8x1':>17s} {'per-token 1x8':>17s}   "
              f"{'per-tensor 1x8':>16s}")
        for label, tuning in SETTINGS:
            m = time_setting(tuning, graphs, pixels, args.rounds)
            print(f"  {label:22s} {m['old 1']:10.1f} {m['new 1']:10.1f}   "
                  f"{m['old 8x1']:7.1f} ({m['old 8x1'] / BATCH:5.1f}) "
                  f"{m['new 1x8']:7.1f} ({m['new 1x8'] / BATCH:5.1f})   "
                  f"{m['old 1x8']:6.1f} ({m['old 1x8'] / BATCH:5.1f})")

if __name__ == "__main__":
    main()
