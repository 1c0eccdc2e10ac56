"""What the opt-in fast JPEG decode (``CLIP_IMAGE_DECODE=draft``) saves, and what it costs in fidelity.

Pillow's ``draft`` lets libjpeg scale a JPEG by 1/2, 1/4 or 1/8 while decoding (both sides kept at least
224), so decode and resize both get cheaper; the pixels are not those of the exact path, so the embedding
moves a little. For real photos (scikit-image's) as JPEGs (q=90) at three camera sizes, this prints decode +
resize time of both paths (median) and the cosine between the two embeddings (min and mean over the photos).

    .venv/bin/python bench/bench_draft_decode.py [--model build/models/ViT-B-32-synthetic] [--rounds 20]

Use real CLIP weights (``clip_export pretrained``) where you have them: the seeded model's embeddings are
random functions of the pixels, so its cosines are a pessimistic proxy for a trained CLIP's.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from pathlib import Path

import numpy as np
from bench_request_path import DEFAULT_MODEL
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel")
SIZES = ((1024, 768), (2048, 1536), (4032, 3024))


def jpeg(name: str, size: tuple[int, int]) -> bytes:
    import skimage.data

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    from clip_serverless.engine.encoder import ImageEncoder, l2_normalize
    from clip_serverless.engine.model_dir import ModelDir
    from clip_serverless.engine.preprocessing import decode_image, preprocess, resize_center_crop

    model_dir = ModelDir.open(args.model)
    encoder = ImageEncoder(model_dir)
    print(f"model {args.model.name}; {len(PHOTOS)} photos as JPEG q=90; median of {args.rounds}")
    print(f"  {'size':>10s} | {'exact ms':>8s} | {'draft ms':>8s} | 1-cosine max | 1-cosine mean | pixels: mean |diff| "
          f"(levels), PSNR dB | 1-cosine between different photos (min)")
    for size in SIZES:
        blobs = [jpeg(name, size) for name in PHOTOS]
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.rounds):
            for draft in (False, True):
                start = time.perf_counter()
                preprocess(decode_image(blobs[0], draft=draft))
                times[draft].append((time.perf_counter() - start) * 1000)
        crops = [(resize_center_crop(decode_image(b)), resize_center_crop(decode_image(b, draft=True))) for b in blobs]
        diff = np.concatenate([np.abs(a.astype(np.int16) - f.astype(np.int16)).ravel() for a, f in crops])
        psnr = 10 * np.log10(255.0**2 / max(float(np.mean(diff.astype(np.float64) ** 2)), 1e-12))
        exact = l2_normalize(encoder.encode(np.stack([preprocess(decode_image(b)) for b in blobs])))
        fast = l2_normalize(encoder.encode(np.stack([preprocess(decode_image(b, draft=True)) for b in blobs])))
        gap = 1.0 - np.sum(exact * fast, axis=1)
        between = 1.0 - (exact @ exact.T)[~np.eye(len(blobs), dtype=bool)]
        print(f"  {size[0]:>4d}x{size[1]:<5d} | {statistics.median(times[False]):8.2f} | "
              f"{statistics.median(times[True]):8.2f} | {gap.max():12.2e} | {gap.mean():13.2e} | "
              f"{diff.mean():6.2f}, {psnr:5.1f} | {between.min():.2e}")


if __name__ == "__main__":
    main()
