"""Watch a bulk job's execution: a progress bar from its Map run's item counts, then the job's manifest."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

DONE_STATES = ("succeeded", "failed", "timedOut", "aborted")


def map_run_counts(sfn: Any, execution_arn: str) -> dict[str, int] | None:
    """The latest Map run's item counts (pending, running, succeeded, failed, ..., total), or None before it."""
    runs = sfn.list_map_runs(executionArn=execution_arn).get("mapRuns", [])
    if not runs:
        return None
    counts: dict[str, int] = sfn.describe_map_run(mapRunArn=runs[-1]["mapRunArn"])["itemCounts"]
    return counts


def watch(sfn: Any, execution_arn: str, *, poll_s: float = 2.0, out: TextIO | None = None) -> dict[str, Any]:
    """Poll until the execution ends, drawing the shards done (on ``out``, default stderr); the final
    DescribeExecution."""
    from tqdm import tqdm

    out = out if out is not None else sys.stderr

    bar: Any = None
    said_planning = False
    try:
        while True:
            described: dict[str, Any] = dict(sfn.describe_execution(executionArn=execution_arn))
            try:
                counts = map_run_counts(sfn, execution_arn)
            except Exception as exc:  # e.g. no states:ListMapRuns; moto right after the start
                counts = None
                if not said_planning:
                    print(f"map run counts unavailable for now: {type(exc).__name__}: {exc}", file=out)
            if counts is None and not said_planning and described["status"] == "RUNNING":
                print(f"{time.strftime('%H:%M:%S')} planning (listing the source)...", file=out, flush=True)
                said_planning = True
            elif counts is not None:
                if bar is None:
                    bar = tqdm(total=counts["total"], unit="shard", desc="shards", file=out, dynamic_ncols=True)
                bar.total = counts["total"]
                bar.n = sum(counts[state] for state in DONE_STATES)
                bar.set_postfix(running=counts["running"], failed=counts["failed"] + counts["timedOut"],
                                refresh=False)
                bar.refresh()
            if described["status"] != "RUNNING":
                return described
            time.sleep(poll_s)
    finally:
        if bar is not None:
            bar.close()


def read_manifest(s3: Any, dst: str) -> dict[str, Any] | None:
    bucket, _, prefix = dst.removeprefix("s3://").partition("/")
    try:
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}_manifest.json")["Body"].read()
        manifest: dict[str, Any] = json.loads(body)
    except Exception:
        return None
    return manifest
