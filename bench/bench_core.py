"""The core's ONNX Runtime encoders against PyTorch eager, same weights, same thread count, one run.

Full-size ViT-B/32 with seeded weights (``python -m clip_export synthetic``; built into ``build/models/``
if missing), fp32 and int8, batch 1 and 8:

  * image: a 600x400 JPEG, preprocessing (decode + resize + crop + normalise, the core's
    ``preprocessing``) reported separately from the encoder;
  * text: a 77-token caption and a typical ~12-token one. The core cuts ids to the last row's EOT
    (int8: to each row's own EOT); PyTorch runs the 77-token context that ``clip.tokenize`` gives, as
    OpenAI's code does. The "PyTorch, trimmed" row shows PyTorch on the same short ids, for fairness.

The PyTorch model is transformers' ``CLIPModel`` with the same seed; the bench checks that both engines
give the same fp32 embeddings before timing anything. Measurements are interleaved round-robin (every
engine once per round) so that load from other processes hits them alike; medians are printed, with
ratios over PyTorch. Also: session creation time and file size per graph.

    python bench/bench_core.py [--threads 2] [--repeats 20] [--models build/models]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import numpy.typing as npt
from clip_serverless.engine.encoder import ImageEncoder, TextEncoder, create_session
from clip_serverless.engine.model_dir import TEXTUAL_FILE, VISUAL_FILE, ModelDir

ARCH = "ViT-B-32"
SEED = 0
SHORT_CAPTIONS = [
    "a photo of a dog playing with a red ball in the park",
    "two cats sleeping on a sofa next to a window",
    "a bowl of ramen with an egg and green onions",
    "an old man riding a bicycle down a cobbled street",
    "a sailing boat on a calm lake at sunset",
    "a child reading a book under a large oak tree",
    "a plate of pasta with tomato sauce and basil",
    "a snowy mountain peak above a pine forest",
]
LONG_CAPTION = "a very long caption that keeps going " * 12  # truncated to 77 tokens

Timings = dict[str, float]


def ensure_models(root: Path) -> tuple[ModelDir, ModelDir]:
    """The fp32 and int8 model directories, exported (synthetic seed 0) if missing."""
    fp32, int8 = root / f"{ARCH}-synthetic", root / f"{ARCH}-synthetic-int8"
    if not (fp32 / "manifest.json").exists():
        from clip_export.build_tokenizer import build_tokenizer_json, find_bpe_file
        from clip_export.synthetic import export_synthetic

        export_synthetic(fp32, arch=ARCH, seed=SEED, tokenizer_json=build_tokenizer_json(find_bpe_file()))
    if not (int8 / "manifest.json").exists():
        from clip_export.quantize import quantize_model_dir

        quantize_model_dir(fp32, int8)
    dirs = ModelDir.open(fp32), ModelDir.open(int8)
    for d in dirs:
        p = d.manifest.provenance
        if (p.get("source"), p.get("architecture"), p.get("seed")) != ("synthetic", ARCH, SEED):
            raise SystemExit(f"{d.path} is not the synthetic {ARCH} seed {SEED} model: {p}")
    return dirs


def interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> Timings:
    """Median milliseconds per case; each round runs every case once (after one warm-up round)."""
    for fn in cases.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def jpeg_bytes() -> bytes:
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.coffee()).save(  # type: ignore[no-untyped-call]
        buffer, format="JPEG", quality=90)  # 600 x 400
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", type=Path, default=Path("build/models"))
    args = parser.parse_args()

    import torch
    from clip_export.architectures import get_architecture
    from clip_export.synthetic import synthetic_model
    from clip_serverless.engine.preprocessing import decode_image, preprocess_batch
    from clip_serverless.engine.tokenizer import ClipTokenizer

    torch.set_num_threads(args.threads)
    fp32_dir, int8_dir = ensure_models(args.models)
    m = fp32_dir.manifest
    model = synthetic_model(get_architecture(ARCH).dims, SEED)

    # Session creation (fresh sessions, median of 3) and sizes.
    print(f"threads {args.threads}, torch {torch.__version__}, repeats {args.repeats}\n")
    print(f"{'graph':<22}{'size MB':>10}{'session ms':>12}")
    for d in (fp32_dir, int8_dir):
        for name in (VISUAL_FILE, TEXTUAL_FILE):
            path = d.file(name)
            ms = []
            for _ in range(3):
                start = time.perf_counter()
                create_session(str(path), args.threads)
                ms.append((time.perf_counter() - start) * 1e3)
            print(f"{d.manifest.precision + ' ' + name:<22}{path.stat().st_size / 1e6:>10.1f}"
                  f"{statistics.median(ms):>12.0f}")

    encoders = {p: (ImageEncoder(d, threads=args.threads), TextEncoder(d, threads=args.threads))
                for p, d in (("fp32", fp32_dir), ("int8", int8_dir))}
    for image_encoder, text_encoder in encoders.values():
        image_encoder.load()
        text_encoder.load()
    tokenizer = ClipTokenizer.from_file(fp32_dir.file("tokenizer.json"))
    jpeg = jpeg_bytes()
    pixels8 = preprocess_batch([decode_image(jpeg)] * 8, m.image_size, m.mean, m.std)
    pixels8[1:] += np.random.default_rng(0).normal(0, 0.05, pixels8[1:].shape).astype(np.float32)
    short, long = tokenizer.encode(SHORT_CAPTIONS), tokenizer.encode([LONG_CAPTION] * 8)
    print(f"\nshort captions: {int(short.lengths.min())}-{int(short.lengths.max())} tokens; "
          f"long: {int(long.lengths.max())} tokens; JPEG {len(jpeg) / 1e3:.0f} kB")

    def torch_image(px: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        with torch.no_grad():
            out = model.visual_projection(model.vision_model(pixel_values=torch.from_numpy(px)).pooler_output)
        return np.asarray(out.numpy(), np.float32)

    def torch_text(ids: npt.NDArray[np.int64]) -> npt.NDArray[np.float32]:
        t = torch.from_numpy(ids)
        with torch.no_grad():
            hidden = model.text_model(input_ids=t).last_hidden_state
            out = model.text_projection(hidden[torch.arange(len(ids)), t.argmax(-1)])
        return np.asarray(out.numpy(), np.float32)

    # Same weights, same answers: check before timing.
    image_fp32, text_fp32 = encoders["fp32"]
    for got, want in ((image_fp32.encode(pixels8[:2]), torch_image(pixels8[:2])),
                      (text_fp32.encode(short.ids[:2], short.lengths[:2]), torch_text(short.ids[:2]))):
        diff = float(np.abs(got - want).max())
        if diff > 1e-4:
            raise SystemExit(f"ONNX and PyTorch disagree by {diff:.2g}: not the same weights")

    rows: list[tuple[str, Timings]] = []
    for n in (1, 8):
        px = pixels8[:n]
        rows.append((f"image, batch {n}", interleaved({
            "torch": partial(torch_image, px),
            "fp32": partial(encoders["fp32"][0].encode, px),
            "int8": partial(encoders["int8"][0].encode, px),
        }, args.repeats)))
        for label, batch in (("77 tokens", long), ("short caption", short)):
            ids, lengths = batch.ids[:n], batch.lengths[:n]
            cases: dict[str, Callable[[], object]] = {
                "torch": partial(torch_text, ids),  # the 77-token context, as OpenAI runs it
                "fp32": partial(encoders["fp32"][1].encode, ids, lengths),
                "int8": partial(encoders["int8"][1].encode, ids, lengths),
            }
            if label == "short caption":
                cases["torch trimmed"] = partial(torch_text, ids[:, : int(lengths.max())])
            rows.append((f"text {label}, batch {n}", interleaved(cases, args.repeats)))

    def load_images(n: int) -> npt.NDArray[np.float32]:
        images = [decode_image(jpeg) for _ in range(n)]
        return np.asarray(preprocess_batch(images, m.image_size, m.mean, m.std), np.float32)

    pre = interleaved({"decode+preprocess, batch 1": partial(load_images, 1),
                       "decode+preprocess, batch 8": partial(load_images, 8)}, args.repeats)

    header = f"{'PyTorch':>9}{'ORT fp32':>10}{'x':>6}{'ORT int8':>10}{'x':>6}{'PT trimmed':>12}"
    print(f"\n{'median ms':<28}{header}")
    for label, t in rows:
        trimmed_col = f"{t['torch trimmed']:>12.1f}" if "torch trimmed" in t else ""
        print(f"{label:<28}{t['torch']:>9.1f}{t['fp32']:>10.1f}{t['torch'] / t['fp32']:>6.1f}"
              f"{t['int8']:>10.1f}{t['torch'] / t['int8']:>6.1f}{trimmed_col}")
    for label, median in pre.items():
        print(f"{label:<28}{median:>9.1f}  (the core's decode + preprocess of the JPEG, either engine)")


if __name__ == "__main__":
    main()
