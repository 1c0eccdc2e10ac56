"""Eight images in one ``embed_image`` call against eight single calls, through the Lambda handler.

Each round sends eight different 1024x768 JPEG photos (q=90, base64, scikit-image's photos cropped to 4:3)
once as eight requests and once as one request of eight, interleaved, with the cache off; it prints the
medians per image. A third row sends the batch with the decode and resize of its images done one after
another (the service's ``decode_and_preprocess`` given one worker), as before batches ran them in
parallel; the ONNX sessions are the same in all three.

Every vector of the batch is checked equal, bit for bit, to its image's single call (the batch never changes
a vector: int8 runs row by row, fp32 in one run).

    .venv/bin/python bench/bench_batches.py [--model build/models/ViT-B-32-synthetic-int8] [--rounds 10]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from bench_request_path import DEFAULT_MODEL, Context, http_api_event, photo_jpeg

PHOTOS = ("coffee", "astronaut", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "colorwheel",
          "coffee")


def jpegs() -> list[bytes]:
    out = [photo_jpeg(name) for name in PHOTOS]
    out[-1] = photo_jpeg("astronaut", mirror=True)  # eight distinct images
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    os.environ.update({"CLIP_MODEL_DIR": str(args.model), "CLIP_CACHE": "off"})
    import clip_serverless.engine.preprocessing as preprocessing
    from clip_serverless.aws_lambda.entry import handler_for

    handler = handler_for("embed_image")
    blobs = jpegs()
    images = [{"type": "base64", "value": base64.b64encode(b).decode()} for b in blobs]
    singles = [http_api_event(json.dumps({"image": image})) for image in images]
    batch = http_api_event(json.dumps({"image": images}))

    def call(event: dict[str, Any]) -> list[list[float]]:
        response = handler(event, Context())
        assert response["statusCode"] == 200, response
        return list(json.loads(response["body"])["embeddings"])

    one_by_one = np.asarray([call(e)[0] for e in singles])
    together = np.asarray(call(batch))
    assert np.array_equal(one_by_one, together), "a batch changed a vector"
    parallel = preprocessing.decode_and_preprocess

    def one_worker(*args: Any, **kwargs: Any) -> Any:
        return parallel(*args, **{**kwargs, "workers": 1})

    def sequential_batch() -> None:
        preprocessing.decode_and_preprocess = one_worker  # the service looks it up at each call
        try:
            call(batch)
        finally:
            preprocessing.decode_and_preprocess = parallel

    runs: dict[str, Callable[[], object]] = {
        "8 single calls": lambda: [call(e) for e in singles],
        "1 call of 8 images": lambda: call(batch),
        "1 call of 8, decode+resize sequential": sequential_batch,
    }
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up
        run()
    for _ in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            samples[name].append((time.perf_counter() - start) * 1000 / len(blobs))
    print(f"model {args.model.name}; {len(blobs)} photos 1024x768 JPEG q=90; {os.cpu_count()} CPUs; "
          f"{args.rounds} interleaved rounds; ms per image (median, p10-p90)")
    for name, values in samples.items():
        q = np.percentile(values, [10, 90])
        print(f"  {name:40s} {statistics.median(values):7.2f}   ({q[0]:.2f}-{q[1]:.2f})")


if __name__ == "__main__":
    main()
