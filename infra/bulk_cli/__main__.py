"""Start a bulk embedding job and watch it.

    python -m bulk_cli start s3://bucket/photos/ s3://bucket/clip-embeddings/photos/ [--stack clip-serverless]
    python -m bulk_cli local s3://bucket/photos/ s3://bucket/clip-embeddings/photos/ [--engine python]
    python -m bulk_cli watch <execution ARN>

``start`` runs the job on the deployed stack's state machine (its outputs name it and the prefixes it may
read and write), ``local`` on this machine against ``AWS_ENDPOINT_URL_S3`` (e.g. a moto server) with the
model in ``CLIP_MODEL_DIR``. Both show the shards done as a progress bar and print the job's manifest;
the exit status is 0 when the job is complete.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .watch import read_manifest, watch


def job_input(args: argparse.Namespace) -> dict[str, Any]:
    job: dict[str, Any] = {"src": args.src, "dst": args.dst}
    if args.text:
        job["modality"] = "text"
        job["caption_column"] = args.caption_column
        if args.id_column:
            job["id_column"] = args.id_column
    for name in ("batch_size", "dtype", "inventory"):
        if getattr(args, name) is not None:
            job[name] = getattr(args, name)
    if args.cache:
        job["cache"] = True
    out: dict[str, Any] = {"job": job}
    if args.concurrency is not None:
        out["max_concurrency"] = args.concurrency
    if args.tolerated_failure_percentage is not None:
        out["tolerated_failure_percentage"] = args.tolerated_failure_percentage
    return out


def stack_outputs(stack: str) -> dict[str, str]:
    import boto3

    stacks = boto3.client("cloudformation").describe_stacks(StackName=stack)["Stacks"]
    return {o["OutputKey"]: o["OutputValue"] for o in stacks[0].get("Outputs", [])}


def _report(s3: Any, dst: str, status: str) -> int:
    manifest = read_manifest(s3, dst)
    if manifest is None:
        print(f"no manifest at {dst}_manifest.json (execution {status})", file=sys.stderr)
        return 1
    print(json.dumps(manifest, indent=2, ensure_ascii=False))
    counts = manifest["counts"]
    print(f"{'complete' if manifest['complete'] else 'INCOMPLETE'}: listed {counts['listed']} = embedded "
          f"{counts['embedded']} + errors {counts['errors']}; {counts['shards']} shards, "
          f"{counts['shards_missing']} missing", file=sys.stderr)
    return 0 if manifest["complete"] else 1


def start(args: argparse.Namespace) -> int:
    import boto3

    outputs = stack_outputs(args.stack)
    arn = outputs.get("BulkStateMachineArn")
    if not arn:
        raise SystemExit(f"stack {args.stack} has no bulk embedding: deploy it with BulkSourceBucket and "
                         "BulkDestinationBucket (README: Bulk embedding)")
    for uri, allowed, what in ((args.src, outputs["BulkSource"], "source"),
                               (args.dst, outputs["BulkDestination"], "destination")):
        if not uri.startswith(allowed):
            raise SystemExit(f"{what} {uri} is outside {allowed}, which the stack's bulk functions may use "
                             "(deploy with other Bulk* parameters)")
    name = f"bulk-{hashlib.sha256(f'{args.src} {args.dst}'.encode()).hexdigest()[:8]}-{time.strftime('%Y%m%dT%H%M%S')}"
    sfn = boto3.client("stepfunctions")
    execution = sfn.start_execution(stateMachineArn=arn, name=name, input=json.dumps(job_input(args)))["executionArn"]
    print(f"started {execution}", file=sys.stderr)
    if args.no_watch:
        return 0
    described = watch(sfn, execution, poll_s=args.poll)
    return _report(boto3.client("s3"), args.dst.rstrip("/") + "/", described["status"])


def watch_only(args: argparse.Namespace) -> int:
    import boto3

    sfn = boto3.client("stepfunctions")
    described = watch(sfn, args.execution, poll_s=args.poll)
    job = json.loads(described.get("input") or "{}").get("job", {})
    return _report(boto3.client("s3"), str(job.get("dst", "")).rstrip("/") + "/", described["status"])


def local(args: argparse.Namespace) -> int:
    from clip_serverless.bulk import s3io
    from clip_serverless.bulk.config import BulkSettings
    from clip_serverless.bulk.handlers import embed_handler, job_handler

    if not os.environ.get("CLIP_MODEL_DIR"):
        raise SystemExit("CLIP_MODEL_DIR is not set: the model directory to embed with (make bulk-local sets "
                         "models/clip-tiny by default)")
    s3 = s3io.client()
    tower = "BulkEmbedTextFunction" if args.text else "BulkEmbedImageFunction"
    handlers = {"BulkJobFunction": job_handler(BulkSettings(), s3),
                tower: embed_handler("text" if args.text else "image", s3=s3)}
    data = job_input(args)
    dst = args.dst.rstrip("/") + "/"
    if args.engine == "python":
        from tqdm import tqdm

        from .driver import run_job

        with tqdm(unit="shard", desc="shards", file=sys.stderr) as bar:
            def progress(done: int, total: int) -> None:
                bar.total, bar.n = total, done
                bar.refresh()

            run_job(handlers, data, s3, progress=progress)
        return _report(s3, dst, "finished")
    from .local_sfn import local_state_machine

    bucket, _, prefix = dst.removeprefix("s3://").partition("/")
    with local_state_machine(handlers, results=(bucket, f"{prefix}_sfn-results")) as machine:
        execution = machine.start(data)
        described = watch(machine.sfn, execution, poll_s=0.5)
        print(f"execution {described['status']}", file=sys.stderr)
        return _report(s3, dst, described["status"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bulk_cli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {"start": sub.add_parser("start", help="run a job on the deployed stack and watch it"),
                "local": sub.add_parser("local", help="run a job on this machine (AWS_ENDPOINT_URL_S3)")}
    for cmd in commands.values():
        cmd.add_argument("src", help="s3://bucket/prefix/ of images, or s3://bucket/captions.csv|.jsonl with --text")
        cmd.add_argument("dst", help="s3://bucket/folder/ for the shards (one job per folder)")
        cmd.add_argument("--text", action="store_true", help="embed the captions of a CSV or JSON Lines file")
        cmd.add_argument("--caption-column", default="caption")
        cmd.add_argument("--id-column", default=None, help="a column copied into the metadata")
        cmd.add_argument("--inventory", default=None, help="s3://... S3 Inventory manifest.json to plan from")
        cmd.add_argument("--batch-size", type=int, default=None, help="entries per shard (default: the stack's)")
        cmd.add_argument("--dtype", choices=["float32", "float16"], default=None)
        cmd.add_argument("--cache", action="store_true", help="also write each image vector to the API's cache")
        cmd.add_argument("--concurrency", type=int, default=None, help="shards at once (Map MaxConcurrency)")
        cmd.add_argument("--tolerated-failure-percentage", type=float, default=None)
        cmd.add_argument("--poll", type=float, default=2.0, help="seconds between progress updates")
    commands["start"].add_argument("--stack", default=os.environ.get("STACK", "clip-serverless"))
    commands["start"].add_argument("--no-watch", action="store_true")
    commands["local"].add_argument("--engine", choices=["stepfunctions", "python"], default="stepfunctions",
                                   help="stepfunctions: the template's state machine in moto's interpreter; "
                                        "python: the same steps without it (any S3-compatible store)")
    watcher = sub.add_parser("watch", help="watch a running execution, then print its manifest")
    watcher.add_argument("execution")
    watcher.add_argument("--poll", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.command == "start":
        return start(args)
    if args.command == "local":
        return local(args)
    return watch_only(args)


if __name__ == "__main__":
    sys.exit(main())
