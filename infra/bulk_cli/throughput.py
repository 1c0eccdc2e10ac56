"""Images per second of one bulk child: the shard code (``ShardRunner``) over JPEG photos in in-process S3.

    taskset -c 0 .venv/bin/python -m bulk_cli.throughput --model-dir build/models/ViT-B-32-synthetic-int8 \
        --size 4032x3024 --images 100

``taskset -c 0`` gives the process one vCPU, what Lambda gives a function of 1,769 MB. S3 is moto in this
process (a GET takes about a millisecond, where S3 in-region takes tens): the shard code overlaps its GETs
(8 at once) with decoding and inference, so at these rates a child is bound by its CPU, not by S3 latency.
The photos are scikit-image's, resized to ``--size`` and saved as JPEG (quality 90), each one distinct.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import time
from collections.abc import Sequence

import numpy as np


def photos(count: int, width: int, height: int) -> list[bytes]:
    import skimage.data
    from PIL import Image

    names = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")
    base = [Image.fromarray(np.ascontiguousarray(getattr(skimage.data, n)()[..., :3])).resize((width, height))
            for n in names]
    out = []
    for i in range(count):
        image = base[i % len(base)].copy()
        image.putpixel((i % width, (i // width) % height), (i % 256, 0, 0))  # distinct bytes per photo
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--size", default="4032x3024", help="WxH of the JPEG photos")
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args(argv)
    width, height = map(int, args.size.split("x"))
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        os.environ.setdefault(name, "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)

    from clip_serverless.bulk import s3io
    from clip_serverless.bulk.layout import JobSpec
    from clip_serverless.bulk.plan import plan
    from clip_serverless.bulk.shard import ShardRunner
    from clip_serverless.engine.model_dir import ModelDir
    from clip_serverless.service import ClipService
    from moto import mock_aws

    data = photos(args.images, width, height)
    with mock_aws():
        s3 = s3io.client()
        s3.create_bucket(Bucket="src")
        s3.create_bucket(Bucket="dst")
        for i, blob in enumerate(data):
            s3.put_object(Bucket="src", Key=f"photos/{i:05d}.jpg", Body=blob)
        spec = JobSpec.from_json({"src": "s3://src/photos/", "dst": "s3://dst/out/", "batch_size": args.images})
        plan(s3, spec, deadline=float("inf"))
        service = ClipService(ModelDir.open(args.model_dir))
        start = time.perf_counter()
        service.preload(("visual",))
        loaded = time.perf_counter() - start
        runner = ShardRunner(service, s3)
        start = time.perf_counter()
        result = runner.run(spec, "000000", spec.layout.batch_key("000000"))
        seconds = time.perf_counter() - start
    assert result["embedded"] == args.images, result
    rate = args.images / seconds
    cpus = len(os.sched_getaffinity(0))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {service.manifest.model_id} ({service.manifest.precision}), {cpus} vCPU, ORT threads "
          f"{service.image_encoder.threads}; {args.images} JPEGs {width}x{height}, "
          f"{sum(map(len, data)) / len(data) / 1e6:.2f} MB mean")
    print(f"session load {loaded:.2f} s; shard {seconds:.2f} s: {rate:.1f} images/s, "
          f"{1000 / rate:.0f} s per 1000-image shard; peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
