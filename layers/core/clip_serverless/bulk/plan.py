"""The planner: the source's entries into batches of ``batch_size``, one object each, and the list of them.

Entries come in a deterministic order (S3 lists keys in UTF-8 binary order; an inventory or a captions file
in file order), so batch ``i`` holds the same entries however often planning is resumed. A planner
invocation writes full batches until its time is nearly up (``deadline``), then saves a checkpoint
(``_plan/state.json``: the shards written, the entries planned, and a cursor: the last key planned for a
listing, ``[file, row]`` for an inventory, the rows read for a captions file) and answers ``done: false``;
the state machine invokes it again, and it resumes at the cursor (``StartAfter`` for a listing). When the
source is exhausted it writes the last, partial batch and ``_plan/plan.json``, the Distributed Map's items.

A destination holds one job (``_plan/job.json``): planning the same job again reuses the finished plan
(no listing); another job into the same destination is refused, so shards never mix two plans.

How far one invocation goes: ``ListObjectsV2`` returns at most 1,000 keys per call, one call after another;
at S3's usual 30-100 ms a call that is 10,000-30,000 keys a second, some 7-25 million keys in a 15-minute
invocation (it stops a minute early). Bigger buckets plan in several invocations, or from an S3 Inventory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .captions import caption_entries
from .inventory import inventory_entries
from .layout import JobError, JobSpec, shard_name
from .s3io import get_json, put_bytes, put_json, transient_or

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

Entries = Iterator[tuple[dict[str, Any], Any]]
CHECKPOINT_EVERY = 50  # batches: what a crashed planner redoes at most
PAGE_SIZE = 1000


@dataclass
class PlanState:
    next_shard: int = 0
    listed: int = 0
    cursor: Any = None
    complete: bool = False

    @classmethod
    def from_json(cls, data: Any) -> PlanState:
        if not isinstance(data, dict):
            return cls()
        return cls(next_shard=int(data.get("next_shard", 0)), listed=int(data.get("listed", 0)),
                   cursor=data.get("cursor"), complete=bool(data.get("complete", False)))

    def to_json(self) -> dict[str, Any]:
        return {"next_shard": self.next_shard, "listed": self.listed, "cursor": self.cursor,
                "complete": self.complete}


def list_entries(s3: S3Client, spec: JobSpec, start_after: str | None, page_size: int = PAGE_SIZE) -> Entries:
    """(entry, key) for every object under the source prefix after ``start_after``, in S3's order."""
    kwargs: dict[str, Any] = {"Bucket": spec.src.bucket, "Prefix": spec.src.key, "MaxKeys": page_size}
    if start_after:
        kwargs["StartAfter"] = start_after
    while True:
        try:
            page = s3.list_objects_v2(**kwargs)
        except Exception as exc:
            raise transient_or(exc, f"LIST {spec.src}") from exc
        for obj in page.get("Contents", []):
            yield {"key": obj["Key"], "size": obj["Size"], "etag": obj.get("ETag")}, obj["Key"]
        if not page.get("IsTruncated"):
            return
        kwargs.pop("StartAfter", None)
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def source_entries(s3: S3Client, spec: JobSpec, cursor: Any, page_size: int = PAGE_SIZE) -> Entries:
    if spec.source == "list":
        return list_entries(s3, spec, cursor, page_size)
    if spec.source == "inventory":
        return inventory_entries(s3, spec, cursor)
    return caption_entries(s3, spec, int(cursor or 0))


def claim_destination(s3: S3Client, spec: JobSpec) -> None:
    """Record the job in its destination, or refuse when the destination holds another job."""
    layout = spec.layout
    existing = get_json(s3, spec.dst.bucket, layout.job_key)
    if existing is None:
        put_json(s3, spec.dst.bucket, layout.job_key, spec.to_json())
        return
    try:
        same = JobSpec.from_json(existing).identity() == spec.identity()
    except JobError:
        same = False
    if not same:
        raise JobError(f"{spec.dst} already holds another job ({layout.job_key}: src "
                       f"{existing.get('src') if isinstance(existing, dict) else '?'}); a destination holds "
                       "one job: choose another destination, or delete that one to start over")


def plan(s3: S3Client, spec: JobSpec, *, deadline: float, clock: Callable[[], float] = time.monotonic,
         page_size: int = PAGE_SIZE) -> dict[str, Any]:
    """Plan (or go on planning) ``spec`` until done or ``deadline`` (``clock()`` seconds); what the state
    machine needs next: ``{"done", "shards", "listed", "bucket", "key"}``."""
    layout = spec.layout
    bucket = spec.dst.bucket
    claim_destination(s3, spec)
    state = PlanState.from_json(get_json(s3, bucket, layout.state_key))
    if not state.complete:
        state = _extend(s3, spec, state, deadline, clock, page_size)
    return {"done": state.complete, "shards": state.next_shard, "listed": state.listed, "bucket": bucket,
            "key": layout.plan_key}


def _extend(s3: S3Client, spec: JobSpec, state: PlanState, deadline: float, clock: Callable[[], float],
            page_size: int) -> PlanState:
    layout, bucket = spec.layout, spec.dst.bucket
    batch: list[dict[str, Any]] = []
    cursor = state.cursor
    since_checkpoint = 0

    def write(entries: list[dict[str, Any]], after: Any) -> None:
        shard = shard_name(state.next_shard)
        body = "".join(_json_line(entry) for entry in entries).encode("utf-8")
        put_bytes(s3, bucket, layout.batch_key(shard), body, "application/x-ndjson")
        state.next_shard += 1
        state.listed += len(entries)
        state.cursor = after

    for entry, cursor in source_entries(s3, spec, state.cursor, page_size):
        batch.append(entry)
        if len(batch) < spec.batch_size:
            continue
        write(batch, cursor)
        batch = []
        since_checkpoint += 1
        if clock() >= deadline:
            put_json(s3, bucket, layout.state_key, state.to_json())
            return state
        if since_checkpoint >= CHECKPOINT_EVERY:
            put_json(s3, bucket, layout.state_key, state.to_json())
            since_checkpoint = 0
    if batch:
        write(batch, cursor)
    items = [{"shard": shard_name(i), "batch": layout.batch_key(shard_name(i)),
              "count": min(spec.batch_size, state.listed - i * spec.batch_size)} for i in range(state.next_shard)]
    put_json(s3, bucket, layout.plan_key, items)
    state.complete = True
    put_json(s3, bucket, layout.state_key, state.to_json())
    return state


def _json_line(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"


def read_batch(s3: S3Client, bucket: str, key: str) -> list[dict[str, Any]]:
    """A batch object's entries, in plan order."""
    try:
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        raise transient_or(exc, f"GET s3://{bucket}/{key}") from exc
    return [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
