"""A bulk job run by plain Python: the same handlers and events as the state machine, without one.

For S3 stores moto's Step Functions interpreter cannot reach as it is (it signs with fake credentials):
plan until done, embed every shard of the plan on a thread pool (``max_concurrency`` at once), finish.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

from .local_sfn import Handler, LambdaContext

Progress = Callable[[int, int], None]


def run_job(handlers: Mapping[str, Handler], job_input: dict[str, Any], s3: Any, *,
            progress: Progress | None = None, timeout_s: float = 900.0) -> dict[str, Any]:
    """The finish step's summary. Shards that fail are left to the manifest (as a Map run with tolerated
    failures would), so a re-run redoes them."""
    import time

    job = handlers["BulkJobFunction"]
    state = job({"step": "plan", "input": job_input}, LambdaContext(timeout_s, time.monotonic()))
    while not state["plan"]["done"]:
        state = job({"step": "plan", "input": state}, LambdaContext(timeout_s, time.monotonic()))
    plan = state["plan"]
    items = json.loads(s3.get_object(Bucket=plan["bucket"], Key=plan["key"])["Body"].read())
    embed = handlers["BulkEmbedTextFunction" if state["job"]["modality"] == "text" else "BulkEmbedImageFunction"]
    failures: list[str] = []
    with ThreadPoolExecutor(state["max_concurrency"], thread_name_prefix="bulk-shard") as pool:
        futures = {pool.submit(embed, {**item, "job": state["job"]}, LambdaContext(timeout_s, time.monotonic())):
                   item["shard"] for item in items}
        for done, future in enumerate(as_completed(futures), 1):
            if future.exception() is not None:
                failures.append(f"{futures[future]}: {type(future.exception()).__name__}: {future.exception()}")
            if progress is not None:
                progress(done, len(items))
    if failures:
        state["map_error"] = {"Error": "ShardsFailed", "Cause": "; ".join(failures[:5])}
    return job({"step": "finish", "input": state}, LambdaContext(timeout_s, time.monotonic()))
