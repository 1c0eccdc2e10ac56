"""A captions file as planner entries: CSV with a header row, or JSON Lines (one object per line).

Each row is one entry, numbered from 0 in file order (the header is not a row). A row that has no usable
caption is still an entry, with a ``problem`` that the shard turns into an errors line: nothing in the file
is dropped silently. The file is streamed, never held whole; a resumed planner reads it again from the start
and skips the rows it already planned.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .layout import JobError, JobSpec
from .s3io import is_missing, transient_or

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CSV_SUFFIXES = (".csv", ".tsv")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
MAX_CAPTION_CHARS = 100_000  # far beyond CLIP's 77 tokens; a longer field is a broken file, not a caption


def caption_entries(s3: S3Client, spec: JobSpec, skip: int) -> Iterator[tuple[dict[str, Any], int]]:
    """(entry, rows read so far) for every row after the first ``skip`` rows."""
    key = spec.src.key
    lower = key.lower()
    if not lower.endswith(CSV_SUFFIXES + JSONL_SUFFIXES):
        raise JobError(f"{spec.src}: a captions file ends in .csv, .tsv, .jsonl, .ndjson or .json (JSON Lines)")
    try:
        body = s3.get_object(Bucket=spec.src.bucket, Key=key)["Body"]
    except Exception as exc:
        if is_missing(exc):
            raise JobError(f"captions file {spec.src} does not exist") from None
        raise transient_or(exc, f"GET {spec.src}") from exc
    lines = _text_lines(body.iter_lines(keepends=True))
    rows = _csv_rows(lines, spec, delimiter="\t" if lower.endswith(".tsv") else ",") \
        if lower.endswith(CSV_SUFFIXES) else _jsonl_rows(lines, spec)
    for row, entry in enumerate(rows):
        if row >= skip:
            yield {"row": row, **entry}, row + 1


def _text_lines(raw: Iterator[bytes]) -> Iterator[str | None]:
    """Decoded lines (a BOM dropped); None for a line that is not UTF-8."""
    first = True
    for line in raw:
        if first and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        first = False
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError:
            yield None


def _checked(caption: Any, ident: Any, spec: JobSpec) -> dict[str, Any]:
    entry: dict[str, Any] = {"caption": caption if isinstance(caption, str) else None}
    if spec.id_column is not None:
        entry["id"] = None if ident is None else str(ident)
    if not isinstance(caption, str):
        entry["problem"] = f"no {spec.caption_column!r} text in this row"
    elif not caption.strip():
        entry["problem"] = "empty caption"
    elif len(caption) > MAX_CAPTION_CHARS:
        entry["caption"] = None
        entry["problem"] = f"caption longer than {MAX_CAPTION_CHARS} characters"
    return entry


def _jsonl_rows(lines: Iterator[str | None], spec: JobSpec) -> Iterator[dict[str, Any]]:
    for line in lines:
        if line is not None and not line.strip():
            continue  # blank lines separate nothing in JSON Lines
        if line is None:
            yield {"caption": None, "problem": "line is not UTF-8"}
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            yield {"caption": None, "problem": "line is not JSON"}
            continue
        if not isinstance(record, dict):
            yield {"caption": None, "problem": "line is not a JSON object"}
            continue
        yield _checked(record.get(spec.caption_column), record.get(spec.id_column or ""), spec)


def _csv_rows(lines: Iterator[str | None], spec: JobSpec, delimiter: str) -> Iterator[dict[str, Any]]:
    reader = csv.reader((line if line is not None else "\ufffd\n" for line in lines), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    if spec.caption_column not in header:
        raise JobError(f"{spec.src}: no column {spec.caption_column!r} in the header {header[:20]} "
                       "(set caption_column)")
    if spec.id_column is not None and spec.id_column not in header:
        raise JobError(f"{spec.src}: no column {spec.id_column!r} in the header {header[:20]}")
    text_at = header.index(spec.caption_column)
    id_at = header.index(spec.id_column) if spec.id_column is not None else None
    for fields in reader:
        if not fields:
            continue  # a blank line is no row
        caption = fields[text_at] if text_at < len(fields) else None
        if caption is not None and "\ufffd" in caption:
            yield {"caption": None, "problem": "row is not UTF-8"}
            continue
        ident = fields[id_at] if id_at is not None and id_at < len(fields) else None
        yield _checked(caption, ident, spec)
