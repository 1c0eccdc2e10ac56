"""Bulk planning and job validation, without the state machine: paginated listing resumed across
invocations, S3 Inventory reports, captions files, one job per destination, and bad jobs refused clearly."""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from clip_serverless.bulk.captions import caption_entries
from clip_serverless.bulk.config import BulkSettings
from clip_serverless.bulk.layout import JobError, JobSpec, S3Uri
from clip_serverless.bulk.plan import plan, read_batch
from clip_serverless.bulk.shard import decode_reason
from clip_serverless.engine import ImageDecodeError
from clip_serverless.envparse import SettingsError

SRC, DST = "plan-src", "plan-dst"


@pytest.fixture
def s3(fake_aws_credentials: None) -> Iterator[Any]:
    from clip_serverless.bulk import s3io
    from moto import mock_aws

    with mock_aws():
        client = s3io.client()
        client.create_bucket(Bucket=SRC)
        client.create_bucket(Bucket=DST)
        yield client


def spec(dst: str = "out/", **fields: Any) -> JobSpec:
    return JobSpec.from_json({"src": f"s3://{SRC}/in/", "dst": f"s3://{DST}/{dst}", **fields})


def planned(s3: Any, job: JobSpec) -> list[list[dict[str, Any]]]:
    items = json.loads(s3.get_object(Bucket=DST, Key=job.layout.plan_key)["Body"].read())
    return [read_batch(s3, DST, item["batch"]) for item in items]


def test_listing_pages_and_resumes_to_the_same_batches_as_one_pass(s3: Any) -> None:
    names = [f"in/{i:03d}.jpg" for i in range(23)] + ["in/ä b/ç.png", "in/z z"]
    for name in names:
        s3.put_object(Bucket=SRC, Key=name, Body=b"x" * (len(name) % 5))
    one_pass = spec("one/", batch_size=4)
    status = plan(s3, one_pass, deadline=float("inf"), page_size=3)  # 9 pages
    assert status["done"] and status["listed"] == 25 and status["shards"] == 7
    # A planner that runs out of time after every batch: invoked again and again, it resumes at its cursor.
    resumed, calls = spec("resumed/", batch_size=4), 0
    while not plan(s3, resumed, deadline=0.0, clock=lambda: 1.0, page_size=3)["done"]:
        calls += 1
    assert calls == 6
    assert planned(s3, one_pass) == planned(s3, resumed)
    batches = planned(s3, one_pass)
    assert [e["key"] for batch in batches for e in batch] == sorted(names, key=lambda k: k.encode())
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 4, 1]
    assert batches[0][0] == {"key": "in/000.jpg", "size": len("in/000.jpg") % 5,
                             "etag": s3.head_object(Bucket=SRC, Key="in/000.jpg")["ETag"]}
    items = json.loads(s3.get_object(Bucket=DST, Key="one/_plan/plan.json")["Body"].read())
    assert items[-1] == {"shard": "000006", "batch": "one/_plan/batches/000006.jsonl", "count": 1}


def test_a_planned_job_is_reused_and_another_job_is_refused(s3: Any) -> None:
    s3.put_object(Bucket=SRC, Key="in/a.png", Body=b"1")
    job = spec(batch_size=10)
    assert plan(s3, job, deadline=float("inf"))["listed"] == 1
    s3.put_object(Bucket=SRC, Key="in/b.png", Body=b"2")  # after the plan: not part of this job
    assert plan(s3, job, deadline=float("inf"))["listed"] == 1
    assert plan(s3, JobSpec.from_json({**job.to_json(), "dtype": "float16"}), deadline=float("inf"))["listed"] == 1
    with pytest.raises(JobError, match="already holds another job"):
        plan(s3, spec(batch_size=11), deadline=float("inf"))


def test_an_inventory_report_plans_the_prefix_with_decoded_keys(s3: Any) -> None:
    rows = [[SRC, "in/a+b%20c.jpg", "10", '"e1"', "true", "false"],  # "a b c.jpg"
            [SRC, "in/%E7%8C%AB.png", "20", "e2", "true", "false"],  # "猫.png"
            [SRC, "other/x.jpg", "5", "e3", "true", "false"],  # outside the prefix
            ["another-bucket", "in/y.jpg", "5", "e4", "true", "false"],
            [SRC, "in/old.jpg", "5", "e5", "false", "false"],  # a non-current version
            [SRC, "in/gone.jpg", "0", "e6", "true", "true"]]  # a delete marker
    for i, chunk in enumerate((rows[:3], rows[3:])):
        text = io.StringIO()
        csv.writer(text).writerows(chunk)
        s3.put_object(Bucket="plan-src", Key=f"inv/data/{i}.csv.gz", Body=gzip.compress(text.getvalue().encode()))
    manifest = {"sourceBucket": SRC, "destinationBucket": f"arn:aws:s3:::{SRC}", "fileFormat": "CSV",
                "fileSchema": "Bucket, Key, Size, ETag, IsLatest, IsDeleteMarker",
                "files": [{"key": "inv/data/0.csv.gz"}, {"key": "inv/data/1.csv.gz"}]}
    s3.put_object(Bucket=SRC, Key="inv/manifest.json", Body=json.dumps(manifest).encode())
    job = spec(inventory=f"s3://{SRC}/inv/manifest.json", batch_size=1)
    while not plan(s3, job, deadline=0.0, clock=lambda: 1.0)["done"]:
        pass
    assert planned(s3, job) == [[{"key": "in/a b c.jpg", "size": 10, "etag": '"e1"'}],
                                [{"key": "in/猫.png", "size": 20, "etag": '"e2"'}]]
    s3.put_object(Bucket=SRC, Key="inv/orc.json", Body=json.dumps({**manifest, "fileFormat": "ORC"}).encode())
    with pytest.raises(JobError, match="only CSV inventories"):
        plan(s3, spec("orc/", inventory=f"s3://{SRC}/inv/orc.json"), deadline=float("inf"))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_every_captions_row_is_an_entry_or_a_reasoned_problem(s3: Any, suffix: str) -> None:
    if suffix == ".jsonl":
        body = b"\n".join([b'{"caption": "a cat", "id": 7}', b"", b'{"caption": ""}', b"not json", b"[1]",
                           b'{"text": "no caption field"}', b'{"caption": "caf\xc3\xa9"}', b'{"caption": "\xff"}'])
        expected = [("a cat", None), ("", "empty caption"), (None, "line is not JSON"),
                    (None, "line is not a JSON object"), (None, "no 'caption' text in this row"), ("café", None),
                    (None, "line is not UTF-8")]
    else:
        body = "\ufeffid,caption\n7,a cat\n8,\n9,\"two\nlines\"\n10\n11,café\n".encode()
        expected = [("a cat", None), ("", "empty caption"), ("two\nlines", None),
                    (None, "no 'caption' text in this row"), ("café", None)]
    s3.put_object(Bucket=SRC, Key=f"in/c{suffix}", Body=body)
    job = JobSpec.from_json({"src": f"s3://{SRC}/in/c{suffix}", "dst": f"s3://{DST}/t/", "modality": "text",
                             "id_column": "id"})
    entries = [entry for entry, _ in caption_entries(s3, job, 0)]
    assert [(e["caption"], e.get("problem")) for e in entries] == expected
    assert [e["row"] for e in entries] == list(range(len(expected)))
    assert entries[0]["id"] == "7"
    assert [e["row"] for e, _ in caption_entries(s3, job, 3)] == list(range(3, len(expected)))
    missing = JobSpec.from_json({**job.to_json(), "caption_column": "text"})
    if suffix == ".csv":
        with pytest.raises(JobError, match="no column 'text'"):
            list(caption_entries(s3, missing, 0))


@pytest.mark.parametrize(("job", "message"), [
    ({"src": "photos/", "dst": "s3://b-ok/x/"}, "s3://bucket/prefix URI"),
    ({"src": "s3://UPPER/x/", "dst": "s3://b-ok/x/"}, "not an S3 bucket name"),
    ({"src": "s3://b-ok/photos/", "dst": "s3://b-ok/photos/emb/"}, "overlap"),
    ({"src": "s3://b-ok/", "dst": "s3://b-ok/emb/"}, "overlap"),
    ({"src": "s3://b-ok/photos/", "dst": "s3://b-ok/emb/", "batch_size": 0}, "batch_size must be 1..10000"),
    ({"src": "s3://b-ok/photos/", "dst": "s3://b-ok/emb/", "batch_size": "10"}, "batch_size must be a whole"),
    ({"src": "s3://b-ok/photos/", "dst": "s3://b-ok/emb/", "dtype": "int8"}, "dtype must be"),
    ({"src": "s3://b-ok/photos/", "dst": "s3://b-ok/emb/", "modality": "text"}, "CSV or JSON Lines file"),
    ({"src": "s3://b-ok/c.csv", "dst": "s3://b-ok/emb/", "modality": "text", "cache": True}, "only image"),
    ({"src": "s3://b-ok/photos/", "dst": "s3://b-ok/emb/", "colour": "red"}, "unknown job field"),
    ({"src": "s3://b-ok/photos/"}, "needs dst"),
])
def test_bad_jobs_are_refused_with_the_reason(job: dict[str, Any], message: str) -> None:
    with pytest.raises(JobError, match=message):
        JobSpec.from_json(job)


def test_a_deployment_runs_only_jobs_inside_its_prefixes() -> None:
    settings = BulkSettings.from_env({"CLIP_BULK_SOURCE": "s3://src-b/photos/",
                                      "CLIP_BULK_DESTINATION": "s3://dst-b/e/"})
    settings.check(JobSpec.from_json({"src": "s3://src-b/photos/2024/", "dst": "s3://dst-b/e/run/"}))
    with pytest.raises(JobError, match="source s3://src-b/other/ is outside s3://src-b/photos/"):
        settings.check(JobSpec.from_json({"src": "s3://src-b/other/", "dst": "s3://dst-b/e/run/"}))
    with pytest.raises(JobError, match="may write"):
        settings.check(JobSpec.from_json({"src": "s3://src-b/photos/", "dst": "s3://dst-b/f/"}))
    with pytest.raises(JobError, match="reads no S3 Inventory"):
        settings.check(JobSpec.from_json({"src": "s3://src-b/photos/", "dst": "s3://dst-b/e/",
                                          "inventory": "s3://src-b/inv/manifest.json"}))
    with pytest.raises(SettingsError, match="CLIP_BULK_SOURCE"):
        BulkSettings.from_env({"CLIP_BULK_SOURCE": "photos/"})
    with pytest.raises(SettingsError, match="CLIP_BULK_BATCH_SIZE"):
        BulkSettings.from_env({"CLIP_BULK_BATCH_SIZE": "20000"})


def test_s3_uri_prefix_arithmetic() -> None:
    photos = S3Uri.parse("s3://b-ok/photos/")
    assert photos.contains(S3Uri.parse("s3://b-ok/photos/a/b.jpg"))
    assert not photos.contains(S3Uri.parse("s3://b-ok/photos2/"))
    assert S3Uri.parse("s3://b-ok/photos").as_prefix() == photos
    assert str(photos) == "s3://b-ok/photos/"


@pytest.mark.parametrize(("message", "reason"), [
    ("Image data is empty.", "empty"), ("Data is not an image.", "not_an_image"),
    ("Image is too large: 9x9 (81 pixels) exceeds the limit of 80 pixels.", "too_large"),
    ("Truncated or corrupt image data.", "unreadable"), ("Image has no pixels.", "unreadable")])
def test_decoder_refusals_map_to_reasons(message: str, reason: str) -> None:
    assert decode_reason(ImageDecodeError(message)) == reason


def test_the_decoders_messages_are_the_ones_mapped() -> None:
    """decode_reason reads the decoder's messages: they must still start as it expects."""
    from clip_serverless.engine.preprocessing import decode_image

    from tests.images import blank_png, png_header_only

    cases = [(b"", 10**6, "empty"), (b"plain text", 10**6, "not_an_image"),
             (png_header_only(100, 100), 10**6, "unreadable"), (blank_png(100, 100), 50, "too_large")]
    for data, max_pixels, reason in cases:
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(data, max_pixels=max_pixels)
        assert decode_reason(caught.value) == reason, caught.value


def test_the_plan_and_finish_steps_import_neither_numpy_nor_the_engine() -> None:
    """The job function ships the core layer alone: no numpy, Pillow or ONNX Runtime there."""
    code = ("import sys, clip_serverless.bulk.handlers as h, clip_serverless.bulk.plan, clip_serverless.bulk.finish; "
            "h.job_handler(h.BulkSettings(), s3=object()); "
            "print(sorted(m for m in ('numpy', 'PIL', 'onnxruntime', 'fastapi') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
