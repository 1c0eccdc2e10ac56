"""The finisher: every done record against the plan, and ``_manifest.json``. Standard library only.

The job is complete when every planned shard has a done record for its batch, all of one model and dtype,
and the counts balance: planned entries = embedded + errors, shard by shard and in total. The manifest is
written either way (``complete: false`` with the shards that are missing or stale), so a failed run says
what a re-run will redo; the state machine then ends in a failure.
"""

from __future__ import annotations

import datetime
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from .layout import MANIFEST_FORMAT, JobError, JobSpec
from .s3io import get_json, put_json

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

READERS = 32
SHOWN = 20  # missing shards named in the manifest (all are counted)


def finish(s3: S3Client, spec: JobSpec, *, map_error: Any = None) -> dict[str, Any]:
    """Check the job's shards and write its manifest; the manifest's summary for the state machine."""
    layout, bucket = spec.layout, spec.dst.bucket
    state = get_json(s3, bucket, layout.state_key)
    items = get_json(s3, bucket, layout.plan_key)
    if not isinstance(state, dict) or not state.get("complete") or not isinstance(items, list):
        raise JobError(f"{spec.dst} has no finished plan ({layout.plan_key}): run the plan step first")
    with ThreadPoolExecutor(READERS, thread_name_prefix="bulk-finish") as pool:
        records = list(pool.map(lambda item: get_json(s3, bucket, layout.done_key(item["shard"])), items))
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    models: Counter[tuple[str, str, str, int, str | None]] = Counter()
    missing: list[str] = []
    for item, record in zip(items, records, strict=True):
        ok = (isinstance(record, dict) and record.get("batch") == item["batch"] and record.get("dtype") == spec.dtype
              and record.get("count") == item["count"] == record.get("embedded", -1) + record.get("errors", -1))
        if not ok:
            missing.append(item["shard"])
            continue
        counts.update(embedded=record["embedded"], errors=record["errors"], cache_writes=record.get("cache_writes", 0))
        reasons.update(record.get("errors_by_reason", {}))
        models[(record["model_id"], record["model_digest"], record["precision"], record["embed_dim"],
                spec.recorded_decode(record))] += 1
    mixed = len(models) > 1
    (model_id, digest, precision, dim, decode), _ = models.most_common(1)[0] if models else (("", "", "", 0, None), 0)
    listed = int(state.get("listed", 0))
    complete = not missing and not mixed and listed == counts["embedded"] + counts["errors"]
    manifest = {
        "format": MANIFEST_FORMAT,
        "complete": complete,
        "job": spec.to_json(),
        "model": {"model_id": model_id, "model_digest": digest, "precision": precision, "embed_dim": dim,
                  "dtype": spec.dtype, "image_decode": decode,
                  "mixed_models": [list(m) for m in models] if mixed else []},
        "counts": {"listed": listed, "embedded": counts["embedded"], "errors": counts["errors"],
                   "shards": len(items), "shards_missing": len(missing), "cache_writes": counts["cache_writes"]},
        "errors_by_reason": dict(sorted(reasons.items())),
        "missing_shards": missing[:SHOWN],
        "layout": {"embeddings": f"{layout.emb_folder}/{layout.emb_folder}_<shard>.npy",
                   "metadata": "metadata/metadata_<shard>.jsonl", "errors": "errors/errors_<shard>.jsonl"},
        "map_error": map_error,
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    put_json(s3, bucket, layout.manifest_key, manifest)
    return {"complete": complete, "manifest": f"s3://{bucket}/{layout.manifest_key}", **manifest["counts"]}
