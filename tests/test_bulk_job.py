"""Bulk embedding end to end: the template's state machine in moto's Step Functions interpreter, the bulk
functions' handlers served in process, S3 in moto, the demo model.

A job over a few hundred objects, broken ones among them, runs twice: every listed object ends up in exactly
one metadata row or errors line, the manifest balances, the layout is clip-retrieval's, each vector is what
``embed_image`` returns for the same bytes, and the second run embeds nothing again.
"""

from __future__ import annotations

import hashlib
import io
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from bulk_cli.local_sfn import LocalStateMachine, local_state_machine
from bulk_cli.watch import map_run_counts
from clip_serverless.bulk.config import BulkSettings
from clip_serverless.bulk.handlers import embed_handler, job_handler
from clip_serverless.bulk.s3io import TransientS3Error
from PIL import Image

SRC_BUCKET = "photos-src"
DST_BUCKET = "photos-dst"
CACHE_BUCKET = "clip-cache"
BATCH = 40
RESULTS = (DST_BUCKET, "out/_sfn-results")  # the ResultWriter's, as the template's BulkDestination* give it
Handler = Callable[[Any, Any], dict[str, Any]]


def image_bytes(i: int, fmt: str = "PNG") -> bytes:
    """A small, distinct image: a colour gradient keyed on i."""
    rng = np.random.default_rng(i)
    size = (24 + i % 17, 20 + i % 13)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def source_objects() -> tuple[dict[str, bytes], dict[str, str]]:
    """(good objects by key, broken objects' expected reasons by key) under photos/."""
    good = {f"photos/{i:04d}.png": image_bytes(i) for i in range(230)}
    good.update({f"photos/jpeg/{i:03d}.jpg": image_bytes(1000 + i, "JPEG") for i in range(20)})
    good["photos/with space/a b+c.png"] = image_bytes(2001)
    good["photos/ünïcødé/猫 の写真.png"] = image_bytes(2002)
    good["photos/%2F?#&=.png"] = image_bytes(2003)
    broken = {
        "photos/notes.txt": "not_an_image", "photos/data.json": "not_an_image", "photos/fake.jpg": "not_an_image",
        "photos/empty.png": "empty", "photos/sub/": "empty",  # a "folder" marker is an empty object
        "photos/truncated.png": "unreadable", "photos/truncated.jpg": "unreadable",
        "photos/huge.bin": "too_large", "photos/vanishes.png": "vanished",
    }
    return good, broken


def broken_bytes(key: str) -> bytes:
    if key.endswith((".txt", ".json")) or key == "photos/fake.jpg":
        return b"hello, this is not an image\n" * 3
    if key.startswith("photos/truncated"):
        return image_bytes(3000, "PNG" if key.endswith(".png") else "JPEG")[:60]
    if key == "photos/huge.bin":
        return zlib.compress(b"x") * 40_000  # over the job's max_object_bytes below
    if key == "photos/vanishes.png":
        return image_bytes(3001)
    return b""


@pytest.fixture
def s3(fake_aws_credentials: None) -> Iterator[Any]:
    """moto (S3, Lambda, IAM, Step Functions with its interpreter on) in this process, and the buckets."""
    from clip_serverless.bulk import s3io
    from moto import mock_aws

    with mock_aws(config={"stepfunctions": {"execute_state_machine": True}}):
        client = s3io.client()
        for bucket in (SRC_BUCKET, DST_BUCKET, CACHE_BUCKET):
            client.create_bucket(Bucket=bucket)
        yield client


@pytest.fixture
def photos(s3: Any) -> tuple[dict[str, bytes], dict[str, str]]:
    good, broken = source_objects()
    for key, data in good.items():
        s3.put_object(Bucket=SRC_BUCKET, Key=key, Body=data)
    for key in broken:
        s3.put_object(Bucket=SRC_BUCKET, Key=key, Body=broken_bytes(key))
    return good, broken


def handlers(s3: Any, tiny_model_path: Path, **wrap: Callable[[Handler], Handler]) -> dict[str, Handler]:
    env = {"CLIP_MODEL_DIR": str(tiny_model_path), "CLIP_CACHE_BUCKET": CACHE_BUCKET,
           "CLIP_CACHE_PREFIX": "embeddings/", "CLIP_BULK_SOURCE": f"s3://{SRC_BUCKET}/photos/",
           "CLIP_BULK_DESTINATION": f"s3://{DST_BUCKET}/out/"}
    # A 900 s function that checkpoints 900 s before its end: each planner invocation writes one batch.
    made = {"BulkJobFunction": job_handler(BulkSettings.from_env({**env, "CLIP_BULK_PLAN_MARGIN_S": "900"}), s3),
            "BulkEmbedImageFunction": embed_handler("image", env, s3=s3),
            "BulkEmbedTextFunction": embed_handler("text", env, s3=s3)}
    return {name: wrap[name](h) if name in wrap else h for name, h in made.items()}


def recording(results: list[dict[str, Any]]) -> Callable[[Handler], Handler]:
    def wrap(handler: Handler) -> Handler:
        def run(event: Any, context: Any) -> dict[str, Any]:
            out = handler(event, context)
            results.append(out)
            return out
        return run
    return wrap


def deleting_after_plan(s3: Any, key: str) -> Callable[[Handler], Handler]:
    """The planner as is; once the plan is complete, ``key`` is deleted (it vanishes after the listing)."""
    def wrap(handler: Handler) -> Handler:
        def run(event: Any, context: Any) -> dict[str, Any]:
            out = handler(event, context)
            if event["step"] == "plan" and out["plan"]["done"]:
                s3.delete_object(Bucket=SRC_BUCKET, Key=key)
            return out
        return run
    return wrap


JOB: dict[str, Any] = {"job": {"src": f"s3://{SRC_BUCKET}/photos/", "dst": f"s3://{DST_BUCKET}/out/run1/",
                               "batch_size": BATCH, "max_object_bytes": 100_000, "cache": True},
                       "max_concurrency": 4}


def run(machine: LocalStateMachine, job: dict[str, Any] = JOB) -> dict[str, Any]:
    described = machine.wait(machine.start(job))
    return described


def manifest(s3: Any, dst: str = "out/run1/") -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(s3.get_object(Bucket=DST_BUCKET, Key=f"{dst}_manifest.json")["Body"].read())
    return loaded


def keys(s3: Any, prefix: str) -> list[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=DST_BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def jsonl(s3: Any, key: str) -> list[dict[str, Any]]:
    body = s3.get_object(Bucket=DST_BUCKET, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines()]


def test_a_job_over_hundreds_of_objects_balances_and_a_rerun_embeds_nothing_again(
        s3: Any, photos: tuple[dict[str, bytes], dict[str, str]], tiny_model_path: Path, tiny_service: Any) -> None:
    good, broken = photos
    listed = len(good) + len(broken)
    shards = -(-listed // BATCH)
    first: list[dict[str, Any]] = []
    served = handlers(s3, tiny_model_path, BulkJobFunction=deleting_after_plan(s3, "photos/vanishes.png"),
                      BulkEmbedImageFunction=recording(first))
    with local_state_machine(served, results=RESULTS, mock_aws=False) as machine:
        described = run(machine)
        assert described["status"] == "SUCCEEDED", described
        plans = [event for name, event in machine.calls if name == "BulkJobFunction" and event["step"] == "plan"]
        assert len(plans) == shards  # the planner ran out of time after each batch and was invoked again
        counts = map_run_counts(machine.sfn, described["executionArn"])
        assert counts is not None and counts["total"] == counts["succeeded"] == shards

        done = manifest(s3)
        assert done["complete"] is True and done["map_error"] is None
        assert done["counts"] == {"listed": listed, "embedded": len(good), "errors": len(broken), "shards": shards,
                                  "shards_missing": 0, "cache_writes": len(good)}
        assert done["errors_by_reason"] == {reason: list(broken.values()).count(reason)
                                            for reason in sorted(set(broken.values()))}
        assert done["model"]["model_id"] == tiny_service.manifest.model_id
        assert done["model"]["model_digest"] == tiny_service.manifest.digest
        assert done["model"]["precision"] == "fp32" and done["model"]["dtype"] == "float32"
        assert sorted(r["shard"] for r in first) == [f"{i:06d}" for i in range(shards)]
        assert not any(r["skipped"] for r in first)

        # The layout: clip-retrieval's folders, row for row; every listed key exactly once.
        npys = keys(s3, "out/run1/img_emb/")
        assert npys == [f"out/run1/img_emb/img_emb_{i:06d}.npy" for i in range(shards)]
        seen: dict[str, str] = {}
        for npy in npys:
            shard = npy[-10:-4]
            matrix = np.load(io.BytesIO(s3.get_object(Bucket=DST_BUCKET, Key=npy)["Body"].read()), allow_pickle=False)
            rows = jsonl(s3, f"out/run1/metadata/metadata_{shard}.jsonl")
            assert matrix.dtype == np.float32 and matrix.shape == (len(rows), tiny_service.manifest.embed_dim)
            for row, vector in zip(rows, matrix, strict=True):
                data = good[row["key"]]
                assert row["image_path"] == f"s3://{SRC_BUCKET}/{row['key']}"
                assert row["size"] == len(data) and row["sha256"] == hashlib.sha256(data).hexdigest()
                head = s3.head_object(Bucket=SRC_BUCKET, Key=row["key"])
                assert row["etag"] == head["ETag"]
                # bit for bit what embed_image returns for the same bytes
                assert np.array_equal(vector, tiny_service.embed_images([data], use_cache=False).vectors[0])
                assert row["key"] not in seen
                seen[row["key"]] = "embedded"
        for key in keys(s3, "out/run1/errors/"):
            for line in jsonl(s3, key):
                assert line["key"] not in seen
                seen[line["key"]] = line["reason"]
                assert line["detail"]
        assert seen == {**{k: "embedded" for k in good}, **broken}

        # The embedding cache holds each vector under the key the API looks up: a later API call is a hit.
        from clip_serverless.cache import codec
        from clip_serverless.cache.keys import ModelIdentity, image_key

        identity = ModelIdentity.from_manifest(tiny_service.manifest)
        data = good["photos/ünïcødé/猫 の写真.png"]
        key = image_key(identity, data)
        blob = s3.get_object(Bucket=CACHE_BUCKET, Key=f"embeddings/{key}")["Body"].read()
        cached = codec.decode(blob, key=key, model_id=identity.model_id, dim=identity.embed_dim)
        assert np.array_equal(cached, tiny_service.embed_images([data], use_cache=False).vectors[0])

        before = {k: s3.head_object(Bucket=DST_BUCKET, Key=k)["ETag"] for k in keys(s3, "out/run1/")}
        machine.calls.clear()
        first.clear()
        assert run(machine)["status"] == "SUCCEEDED"
        # The same job again: the finished plan is reused (one planner call, no listing), every shard skipped.
        assert [name for name, _ in machine.calls].count("BulkJobFunction") == 2  # plan once, finish
        assert len(first) == shards and all(r["skipped"] for r in first)
        after = {k: s3.head_object(Bucket=DST_BUCKET, Key=k)["ETag"] for k in keys(s3, "out/run1/")}
        assert {k: v for k, v in after.items() if not k.endswith(("_manifest.json", ".json"))} == \
            {k: v for k, v in before.items() if not k.endswith(("_manifest.json", ".json"))}
        assert manifest(s3)["counts"] == done["counts"]


def test_a_failed_shard_leaves_the_job_incomplete_until_a_rerun(s3: Any, photos: tuple[dict[str, bytes],
                                                                                         dict[str, str]],
                                                                  tiny_model_path: Path) -> None:
    failing = {"000002"}

    def flaky(handler: Handler) -> Handler:
        def run_shard(event: Any, context: Any) -> dict[str, Any]:
            if event["shard"] in failing:
                raise RuntimeError("boom")  # not retried: the child fails
            return handler(event, context)
        return run_shard

    job = {**JOB, "job": {**JOB["job"], "dst": f"s3://{DST_BUCKET}/out/run2/", "cache": False}}
    with local_state_machine(handlers(s3, tiny_model_path, BulkEmbedImageFunction=flaky), results=RESULTS,
                             mock_aws=False) as machine:
        described = run(machine, job)
        # moto ignores ToleratedFailurePercentage (its Map run succeeds); AWS fails the Map run, whose Catch
        # goes to Finish. Either way the finisher finds the shard missing and the job fails.
        assert described["status"] == "FAILED" and described.get("error") == "JobIncomplete", described
        first = manifest(s3, "out/run2/")
        assert first["complete"] is False and first["missing_shards"] == ["000002"]
        assert first["counts"]["embedded"] + first["counts"]["errors"] == first["counts"]["listed"] - BATCH
        failing.clear()
        assert run(machine, job)["status"] == "SUCCEEDED"
        second = manifest(s3, "out/run2/")
        assert second["complete"] is True and second["missing_shards"] == []
        assert second["counts"]["embedded"] + second["counts"]["errors"] == second["counts"]["listed"]


def test_transient_s3_faults_are_retried_by_the_state_machine(s3: Any, tiny_model_path: Path) -> None:
    s3.put_object(Bucket=SRC_BUCKET, Key="photos/one.png", Body=image_bytes(7))
    attempts: list[str] = []

    def throttled_once(handler: Handler) -> Handler:
        def run_shard(event: Any, context: Any) -> dict[str, Any]:
            attempts.append(event["shard"])
            if len(attempts) == 1:
                raise TransientS3Error("GET: SlowDown after every retry")
            return handler(event, context)
        return run_shard

    job = {"job": {"src": f"s3://{SRC_BUCKET}/photos/", "dst": f"s3://{DST_BUCKET}/out/run3/"}}
    with local_state_machine(handlers(s3, tiny_model_path, BulkEmbedImageFunction=throttled_once),
                             results=RESULTS, mock_aws=False) as machine:
        assert run(machine, job)["status"] == "SUCCEEDED"
    assert attempts == ["000000", "000000"]
    assert manifest(s3, "out/run3/")["counts"]["embedded"] == 1


def test_an_empty_prefix_finishes_with_zero_counts(s3: Any, tiny_model_path: Path) -> None:
    job = {"job": {"src": f"s3://{SRC_BUCKET}/photos/", "dst": f"s3://{DST_BUCKET}/out/empty/"}}
    with local_state_machine(handlers(s3, tiny_model_path), results=RESULTS, mock_aws=False) as machine:
        assert run(machine, job)["status"] == "SUCCEEDED"
    assert manifest(s3, "out/empty/")["counts"] == {"listed": 0, "embedded": 0, "errors": 0, "shards": 0,
                                                    "shards_missing": 0, "cache_writes": 0}


def test_a_job_outside_the_deployed_prefixes_fails_with_the_reason(s3: Any, tiny_model_path: Path) -> None:
    job = {"job": {"src": f"s3://{SRC_BUCKET}/elsewhere/", "dst": f"s3://{DST_BUCKET}/out/x/"}}
    with local_state_machine(handlers(s3, tiny_model_path), results=RESULTS, mock_aws=False) as machine:
        described = run(machine, job)
    assert described["status"] == "FAILED" and described["error"] == "JobError"
    assert "outside s3://photos-src/photos/" in described["cause"]


def test_captions_become_text_shards_equal_to_embed_text(s3: Any, tiny_model_path: Path, tiny_service: Any) -> None:
    captions = [f"a photo of a {c} {s}" for c in ("red", "green", "blue") for s in ("circle", "square", "star")]
    lines = ["id,caption"] + [f"{i},{c}" for i, c in enumerate(captions)]
    lines[3] = '2,""'  # an empty caption
    lines.insert(5, '"x","a caption, quoted, with ""quotes"""')
    s3.put_object(Bucket=SRC_BUCKET, Key="photos/captions.csv", Body="\n".join(lines).encode())
    job = {"job": {"src": f"s3://{SRC_BUCKET}/photos/captions.csv", "dst": f"s3://{DST_BUCKET}/out/text/",
                   "modality": "text", "id_column": "id", "batch_size": 4}}
    with local_state_machine(handlers(s3, tiny_model_path), results=RESULTS, mock_aws=False) as machine:
        assert run(machine, job)["status"] == "SUCCEEDED"
    done = manifest(s3, "out/text/")
    assert done["counts"]["listed"] == len(captions) + 1 and done["counts"]["errors"] == 1
    assert done["errors_by_reason"] == {"empty": 1}
    rows, vectors = [], []
    for key in keys(s3, "out/text/text_emb/"):
        shard = key[-10:-4]
        vectors.append(np.load(io.BytesIO(s3.get_object(Bucket=DST_BUCKET, Key=key)["Body"].read()),
                               allow_pickle=False))
        rows += jsonl(s3, f"out/text/metadata/metadata_{shard}.jsonl")
    texts = [row["caption"] for row in rows]
    assert 'a caption, quoted, with "quotes"' in texts and [row["id"] for row in rows][:4] == ["0", "1", "3", "x"]
    expected = tiny_service.embed_texts(texts, use_cache=False).vectors
    np.testing.assert_allclose(np.concatenate(vectors), expected, rtol=0, atol=1e-5)
