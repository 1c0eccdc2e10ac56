"""An S3 Inventory report as planner entries: for buckets too large to list within a job's planning time.

S3 Inventory writes, daily or weekly, a ``manifest.json`` naming gzipped CSV files with one line per object
(``fileSchema`` names the columns). Keys in CSV inventories are URL-encoded. Only the CSV format is read:
ORC and Parquet inventories would need pyarrow, which does not fit the function beside the model (see the
README). Rows of other buckets, keys outside the job's prefix, delete markers and non-current versions are
skipped. An inventory is a snapshot: objects written after it are not in the job, objects deleted since
end up in the errors file as "vanished".

The cursor is ``[file index, rows read in that file]``: a resumed planner reopens that file and skips.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_plus

from .layout import JobError, JobSpec, S3Uri
from .s3io import get_bytes, transient_or

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

Cursor = list[int]


def read_manifest(s3: S3Client, uri: S3Uri) -> tuple[str, list[str], list[str]]:
    """(bucket of the files, column names, file keys) from an inventory ``manifest.json``."""
    data = get_bytes(s3, uri.bucket, uri.key)
    if data is None:
        raise JobError(f"inventory manifest {uri} does not exist")
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError:
        raise JobError(f"inventory manifest {uri} is not JSON") from None
    if not isinstance(manifest, dict):
        raise JobError(f"inventory manifest {uri} is not a JSON object")
    if manifest.get("fileFormat") != "CSV":
        raise JobError(f"inventory {uri} is {manifest.get('fileFormat')!r}: only CSV inventories are read "
                       "(configure the inventory's output format as CSV)")
    columns = [c.strip() for c in str(manifest.get("fileSchema", "")).split(",")]
    if "Key" not in columns or "Bucket" not in columns:
        raise JobError(f"inventory {uri}: fileSchema {manifest.get('fileSchema')!r} has no Bucket and Key")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("key"), str) for f in files):
        raise JobError(f"inventory {uri}: 'files' must list objects with a 'key'")
    bucket = str(manifest.get("destinationBucket") or uri.bucket).removeprefix("arn:aws:s3:::")
    return bucket, columns, [f["key"] for f in files]


def inventory_entries(s3: S3Client, spec: JobSpec, cursor: Cursor | None) -> Iterator[tuple[dict[str, Any], Cursor]]:
    """(entry, cursor after it) for every object of the inventory under the job's prefix, after ``cursor``."""
    assert spec.inventory is not None
    bucket, columns, files = read_manifest(s3, spec.inventory)
    start_file, start_row = cursor if cursor else (0, 0)
    wanted = ("Bucket", "Key", "Size", "ETag", "IsLatest", "IsDeleteMarker")
    at: dict[str, int] = {name: columns.index(name) for name in wanted if name in columns}
    for index in range(start_file, len(files)):
        skip = start_row if index == start_file else 0
        for row, fields in enumerate(_rows(s3, bucket, files[index])):
            if row < skip:
                continue
            entry = _entry(fields, at, spec)
            if entry is not None:
                yield entry, [index, row + 1]


def _rows(s3: S3Client, bucket: str, key: str) -> Iterator[list[str]]:
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as exc:
        raise transient_or(exc, f"GET s3://{bucket}/{key}") from exc
    stream: Any = gzip.GzipFile(fileobj=body) if key.endswith(".gz") else body
    yield from csv.reader(io.TextIOWrapper(stream, encoding="utf-8", newline=""))


def _entry(fields: list[str], at: dict[str, int], spec: JobSpec) -> dict[str, Any] | None:
    def field(name: str) -> str | None:
        i = at.get(name)
        return fields[i] if i is not None and i < len(fields) else None

    if field("Bucket") != spec.src.bucket or field("IsLatest") == "false" or field("IsDeleteMarker") == "true":
        return None
    key = unquote_plus(field("Key") or "")
    if not key.startswith(spec.src.key):
        return None
    size = field("Size")
    etag = field("ETag")
    return {"key": key, "size": int(size) if size and size.isdigit() else None,
            "etag": f'"{etag.strip(chr(34))}"' if etag else None}
