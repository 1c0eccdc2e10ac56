"""`make bulk` and `make bulk-local` (``python -m bulk_cli``): a job started and watched to its manifest.

``local`` runs against an S3 endpoint (``AWS_ENDPOINT_URL_S3``: moto's server here), with both engines: the
template's state machine in moto's interpreter, and the same steps without it. ``start`` runs against a
state machine it finds in the stack's outputs (moto's, here) and watches the Map run's item counts.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
from bulk_cli import __main__ as cli
from bulk_cli.local_sfn import local_state_machine
from clip_serverless.bulk.config import BulkSettings
from clip_serverless.bulk.handlers import embed_handler, job_handler

from tests.test_bulk_job import image_bytes


@pytest.fixture
def endpoint(moto_server: str, fake_aws_credentials: None, monkeypatch: pytest.MonkeyPatch,
             tiny_model_path: Path) -> str:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_server)
    monkeypatch.setenv("CLIP_MODEL_DIR", str(tiny_model_path))
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="cli-photos")
    for i in range(7):
        s3.put_object(Bucket="cli-photos", Key=f"in/{i}.png", Body=image_bytes(i))
    s3.put_object(Bucket="cli-photos", Key="in/readme.txt", Body=b"not an image")
    return moto_server


@pytest.mark.parametrize("engine", ["stepfunctions", "python"])
def test_bulk_local_runs_a_job_against_an_s3_endpoint(endpoint: str, engine: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    dst = f"s3://cli-photos/out/{engine}/"
    code = cli.main(["local", "s3://cli-photos/in/", dst, "--batch-size", "3", "--engine", engine])
    out, err = capsys.readouterr()
    manifest = json.loads(out)
    assert code == 0 and manifest["complete"] is True and manifest["map_error"] is None, err
    assert manifest["counts"] == {"listed": 8, "embedded": 7, "errors": 1, "shards": 3, "shards_missing": 0,
                                  "cache_writes": 0}
    assert "complete: listed 8 = embedded 7 + errors 1" in err
    s3 = boto3.client("s3", region_name="us-east-1")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket="cli-photos", Prefix=f"out/{engine}/img_emb/")["Contents"]]
    assert listed == [f"out/{engine}/img_emb/img_emb_00000{i}.npy" for i in range(3)]


def test_bulk_start_finds_the_stack_state_machine_and_watches_it_to_the_manifest(
        fake_aws_credentials: None, tiny_model_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from clip_serverless.bulk import s3io

    with local_state_machine({}) as machine:  # moto in process; the handlers come next, on its S3
        s3 = s3io.client()
        s3.create_bucket(Bucket="stack-src")
        for i in range(5):
            s3.put_object(Bucket="stack-src", Key=f"photos/{i}.png", Body=image_bytes(i))
        env = {"CLIP_MODEL_DIR": str(tiny_model_path)}
        machine.handlers.update({"BulkJobFunction": job_handler(BulkSettings(), s3),
                                 "BulkEmbedImageFunction": embed_handler("image", env, s3=s3)})
        outputs = {"BulkStateMachineArn": machine.arn, "BulkSource": "s3://stack-src/photos/",
                   "BulkDestination": "s3://stack-src/clip-embeddings/"}
        monkeypatch.setattr(cli, "stack_outputs", lambda stack: outputs)
        code = cli.main(["start", "s3://stack-src/photos/", "s3://stack-src/clip-embeddings/run/",
                         "--batch-size", "2", "--poll", "0.05"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert json.loads(out)["counts"]["embedded"] == 5
        assert "3/3" in err  # the progress bar: shards done of the Map run's total
        with pytest.raises(SystemExit, match="outside s3://stack-src/clip-embeddings/"):
            cli.main(["start", "s3://stack-src/photos/", "s3://stack-src/elsewhere/"])
        monkeypatch.setattr(cli, "stack_outputs", lambda stack: {})
        with pytest.raises(SystemExit, match="has no bulk embedding"):
            cli.main(["start", "s3://stack-src/photos/", "s3://stack-src/clip-embeddings/run/"])


def test_watch_draws_the_map_runs_item_counts() -> None:
    from bulk_cli.watch import watch

    class FakeSfn:
        def __init__(self) -> None:
            self.polls = 0

        def describe_execution(self, executionArn: str) -> dict[str, Any]:
            self.polls += 1
            return {"status": "RUNNING" if self.polls < 4 else "SUCCEEDED"}

        def list_map_runs(self, executionArn: str) -> dict[str, Any]:
            return {"mapRuns": [{"mapRunArn": "run"}] if self.polls > 1 else []}

        def describe_map_run(self, mapRunArn: str) -> dict[str, Any]:
            done = min(self.polls * 3, 10)
            return {"itemCounts": {"pending": 10 - done, "running": 1, "succeeded": done, "failed": 0,
                                   "timedOut": 0, "aborted": 0, "total": 10}}

    out = io.StringIO()
    assert watch(FakeSfn(), "arn", poll_s=0, out=out)["status"] == "SUCCEEDED"
    text = out.getvalue()
    assert "planning" in text and "10/10" in text and "running=1" in text
