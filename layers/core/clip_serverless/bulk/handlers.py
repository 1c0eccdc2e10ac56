"""Lambda entries of the bulk state machine: the job function (plan, finish) and the embed functions.

Events (what ``template.yaml``'s state machine sends; ``bulk_cli`` sends the same when it runs a job here):

    {"step": "plan",   "input": {"job": {...}, "max_concurrency"?, "tolerated_failure_percentage"?, "plan"?}}
        -> {"job": {...}, "max_concurrency", "tolerated_failure_percentage",
            "plan": {"done", "shards", "listed", "bucket", "key"}}
    {"step": "finish", "input": <the state: the above, and "map_error" when the Map run failed>}
        -> {"complete", "manifest", "listed", "embedded", "errors", "shards", "shards_missing", ...}
    embed: {"shard": "000042", "batch": "<key of the batch>", "count": n, "job": {...}}
        -> {"shard", "skipped", "embedded", "errors"}

A bad job raises :class:`~.layout.JobError` (the error name Step Functions shows; no retry catches it).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

from .config import BulkSettings
from .layout import JobError, JobSpec, Modality

Handler = Callable[[Any, Any], dict[str, Any]]
logger = logging.getLogger("clip_serverless.bulk")
logger.setLevel(logging.INFO)


def deadline_of(context: Any, margin_s: float, clock: Callable[[], float] = time.monotonic) -> float:
    """When a planner should checkpoint: ``margin_s`` before the invocation's end (never, without a context)."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return math.inf
    return clock() + float(remaining()) / 1000 - margin_s


def parse_run(data: Any, settings: BulkSettings) -> tuple[JobSpec, dict[str, Any]]:
    """The job of a plan or finish input, checked against the deployment, and its run options."""
    if not isinstance(data, dict) or not isinstance(data.get("job"), dict):
        raise JobError('the input must be {"job": {"src": "s3://...", "dst": "s3://...", ...}, ...}')
    job = dict(data["job"])
    job.setdefault("batch_size", settings.batch_size)
    spec = JobSpec.from_json(job)
    settings.check(spec)
    concurrency = data.get("max_concurrency", settings.max_concurrency)
    tolerated = data.get("tolerated_failure_percentage", settings.tolerated_failure_percent)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 10_000:
        raise JobError(f"max_concurrency must be 1..10000 (Distributed Map's limit), got {concurrency!r}")
    if isinstance(tolerated, bool) or not isinstance(tolerated, int | float) or not 0 <= tolerated <= 100:
        raise JobError(f"tolerated_failure_percentage must be 0..100, got {tolerated!r}")
    return spec, {"max_concurrency": concurrency, "tolerated_failure_percentage": tolerated}


def job_handler(settings: BulkSettings | None = None, s3: Any = None) -> Handler:
    """The plan and finish steps (no model, no numpy: the core layer alone)."""
    from . import s3io
    from .finish import finish
    from .plan import plan

    settings = settings if settings is not None else BulkSettings.from_env()
    client = s3 if s3 is not None else s3io.client()

    def handle(event: Any, context: Any) -> dict[str, Any]:
        if not isinstance(event, dict) or event.get("step") not in ("plan", "finish"):
            raise JobError('expected {"step": "plan" | "finish", "input": {...}}')
        data = event.get("input")
        spec, run = parse_run(data, settings)
        if event["step"] == "plan":
            status = plan(client, spec, deadline=deadline_of(context, settings.plan_margin_s))
            _log("plan", spec, status)
            return {"job": spec.to_json(), **run, "plan": status}
        summary = finish(client, spec, map_error=data.get("map_error") if isinstance(data, dict) else None)
        _log("finish", spec, summary)
        return summary

    return handle


def embed_handler(modality: Modality, environ: dict[str, str] | None = None, s3: Any = None) -> Handler:
    """An embed function: loads its tower now (Lambda init), then runs one shard per invocation."""
    from ..cache.config import S3Config
    from ..engine.model_dir import ModelDir
    from ..envparse import SettingsError, env_str
    from ..service import ClipService
    from ..settings import engine_from_env
    from . import s3io
    from .shard import ShardRunner

    env = dict(os.environ) if environ is None else environ
    model_dir = env_str("CLIP_MODEL_DIR", None, env)
    if not model_dir:
        raise SettingsError("CLIP_MODEL_DIR is not set: it names the model directory (/opt/model on Lambda)")
    settings = BulkSettings.from_env(env)
    service = ClipService(ModelDir.open(model_dir), engine=engine_from_env(env))
    service.preload(("visual",) if modality == "image" else ("textual",))
    client = s3 if s3 is not None else s3io.client()
    runner = ShardRunner(service, client, cache=S3Config.from_env(env) if modality == "image" else None)

    def handle(event: Any, context: Any) -> dict[str, Any]:
        if not isinstance(event, dict) or not all(isinstance(event.get(k), str) for k in ("shard", "batch")):
            raise JobError('expected {"shard": "000042", "batch": "<key>", "count": n, "job": {...}}')
        spec = JobSpec.from_json(event.get("job"))
        settings.check(spec)
        if spec.modality != modality:
            raise JobError(f"this function embeds {modality}s, the job is a {spec.modality} job")
        if not event["batch"].startswith(spec.layout.key("_plan/batches/")):
            raise JobError(f"batch {event['batch']!r} is not one of the job's plan")
        result = runner.run(spec, event["shard"], event["batch"])
        _log("embed", spec, result)
        return result

    return handle


def _log(step: str, spec: JobSpec, result: dict[str, Any]) -> None:
    logger.info(json.dumps({"bulk": step, "src": str(spec.src), "dst": str(spec.dst), **result}, default=str))
