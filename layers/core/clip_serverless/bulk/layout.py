"""What a bulk job is (:class:`JobSpec`) and where it writes (:class:`Layout`). Standard library only.

The layout is clip-retrieval's embedding folder (``img_emb/img_emb_<n>.npy`` beside
``metadata/metadata_<n>.<ext>``), which autofaiss and clip-retrieval's back end read, plus this job's own
bookkeeping under names that start with ``_`` (the plan, the done records, the manifest)::

    <dst>img_emb/img_emb_000042.npy        (text jobs: text_emb/text_emb_000042.npy)
    <dst>metadata/metadata_000042.jsonl
    <dst>errors/errors_000042.jsonl        only when the batch had errors
    <dst>_shards/000042.json               done record, written after the three above
    <dst>_plan/job.json                    the job that owns this destination
    <dst>_plan/state.json                  the planner's checkpoint
    <dst>_plan/batches/000042.jsonl        the entries of batch 42
    <dst>_plan/plan.json                   [{"shard", "batch", "count"}, ...]: the Distributed Map's items
    <dst>_manifest.json

Shard names are six digits, so they sort as they number (clip-retrieval pads to the width of its shard count).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

Modality = Literal["image", "text"]
Dtype = Literal["float32", "float16"]
SourceKind = Literal["list", "inventory", "captions"]

SHARD_DIGITS = 6
MAX_SHARDS = 10**SHARD_DIGITS
MAX_BATCH_SIZE = 10_000
DEFAULT_BATCH_SIZE = 1000
DEFAULT_MAX_OBJECT_BYTES = 25 * 1024 * 1024
MANIFEST_FORMAT = "clip-serverless-bulk/1"
# S3 bucket names (the general purpose rules, loosely: the service refuses the rest with its own message).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class JobError(ValueError):
    """A job that cannot run as asked; the message says what to change. Step Functions shows it as the
    error ``JobError``, which no retry catches."""


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # a prefix ("photos/", "" for the whole bucket) or an object key (a captions file)

    @classmethod
    def parse(cls, text: str, what: str = "location") -> S3Uri:
        if not isinstance(text, str) or not text.startswith("s3://"):
            raise JobError(f"{what} must be an s3://bucket/prefix URI, got {text!r}")
        bucket, _, key = text[len("s3://"):].partition("/")
        if not _BUCKET.fullmatch(bucket):
            raise JobError(f"{what}: {bucket!r} is not an S3 bucket name")
        return cls(bucket, key)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def as_prefix(self) -> S3Uri:
        """The same location as a folder: a trailing slash added unless empty or present."""
        return self if not self.key or self.key.endswith("/") else S3Uri(self.bucket, self.key + "/")

    def contains(self, other: S3Uri) -> bool:
        """True when every key under ``other`` is also under this prefix."""
        return self.bucket == other.bucket and other.key.startswith(self.key)

    def overlaps(self, other: S3Uri) -> bool:
        return self.contains(other) or other.contains(self)


def shard_name(index: int) -> str:
    if not 0 <= index < MAX_SHARDS:
        raise JobError(f"a job has at most {MAX_SHARDS} shards (raise the batch size), got shard {index}")
    return f"{index:0{SHARD_DIGITS}d}"


@dataclass(frozen=True)
class JobSpec:
    """One job: what to embed, where, and how. ``to_json``/``from_json`` are its wire form (the state
    machine's input, the planner's ``_plan/job.json``)."""

    src: S3Uri
    dst: S3Uri  # always a folder (as_prefix)
    modality: Modality = "image"
    source: SourceKind = "list"
    inventory: S3Uri | None = None  # an S3 Inventory manifest.json, for source "inventory"
    batch_size: int = DEFAULT_BATCH_SIZE
    dtype: Dtype = "float32"
    max_object_bytes: int = DEFAULT_MAX_OBJECT_BYTES
    caption_column: str = "caption"  # captions files: the text's column (CSV header) or field (JSON Lines)
    id_column: str | None = None  # and an optional id copied into the metadata
    cache: bool = False  # also write each image vector to the embedding cache (one PUT per image)

    def __post_init__(self) -> None:
        if self.modality not in ("image", "text"):
            raise JobError(f"modality must be image or text, got {self.modality!r}")
        if self.dtype not in ("float32", "float16"):
            raise JobError(f"dtype must be float32 or float16, got {self.dtype!r}")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise JobError(f"batch_size must be 1..{MAX_BATCH_SIZE}, got {self.batch_size}")
        if self.max_object_bytes < 1:
            raise JobError(f"max_object_bytes must be positive, got {self.max_object_bytes}")
        if self.modality == "text":
            if self.source != "captions":
                raise JobError("a text job reads a captions file (source captions)")
            if not self.src.key or self.src.key.endswith("/"):
                raise JobError(f"a text job's source is a CSV or JSON Lines file, got the folder {self.src}")
            if self.cache:
                raise JobError("cache: only image vectors are written to the embedding cache")
        elif self.source == "captions":
            raise JobError("an image job lists a prefix (source list) or reads an inventory (source inventory)")
        if (self.source == "inventory") != (self.inventory is not None):
            raise JobError("source inventory needs an inventory manifest URI, and only it")
        if self.dst.key and not self.dst.key.endswith("/"):
            raise JobError(f"destination must be a folder (ending in /), got {self.dst}")
        if self.src.overlaps(self.dst):
            raise JobError(f"source {self.src} and destination {self.dst} overlap: the job would embed its "
                           "own output, or write into its input")

    @property
    def layout(self) -> Layout:
        return Layout(self.dst, self.modality)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["src"], out["dst"] = str(self.src), str(self.dst)
        out["inventory"] = str(self.inventory) if self.inventory else None
        return out

    @classmethod
    def from_json(cls, data: Any) -> JobSpec:
        """Validate a job given as JSON (the state machine's input); JobError names what is wrong."""
        if not isinstance(data, dict):
            raise JobError(f"a job is a JSON object, got {type(data).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise JobError(f"unknown job field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        for required in ("src", "dst"):
            if required not in data:
                raise JobError(f"a job needs {required} (an s3:// URI)")
        fields: dict[str, Any] = dict(data)
        fields["src"] = S3Uri.parse(data["src"], "src")
        fields["dst"] = S3Uri.parse(data["dst"], "dst").as_prefix()
        if data.get("inventory"):
            fields["inventory"] = S3Uri.parse(data["inventory"], "inventory")
            fields.setdefault("source", "inventory")
        else:
            fields["inventory"] = None
        if data.get("modality") == "text":
            fields.setdefault("source", "captions")
        ints = ("batch_size", "max_object_bytes")
        for name in ints:
            if name in fields and (isinstance(fields[name], bool) or not isinstance(fields[name], int)):
                raise JobError(f"{name} must be a whole number, got {fields[name]!r}")
        if "cache" in fields and not isinstance(fields["cache"], bool):
            raise JobError(f"cache must be true or false, got {fields['cache']!r}")
        for name in ("caption_column", "id_column"):
            if fields.get(name) is not None and not isinstance(fields[name], str):
                raise JobError(f"{name} must be a string, got {fields[name]!r}")
        return cls(**fields)

    def identity(self) -> dict[str, Any]:
        """What decides the plan: a destination holds one job, and another job with these equal resumes it."""
        return {k: v for k, v in self.to_json().items() if k not in ("dtype", "cache", "max_object_bytes")}

    def recorded_decode(self, record: dict[str, Any]) -> str | None:
        """How the images of a shard's done record were decoded (CLIP_IMAGE_DECODE); None for a text job.
        Records written before the setting existed decoded exactly."""
        return record.get("image_decode", "exact") if self.modality == "image" else None


@dataclass(frozen=True)
class Layout:
    dst: S3Uri
    modality: Modality

    def key(self, relative: str) -> str:
        return f"{self.dst.key}{relative}"

    @property
    def emb_folder(self) -> str:
        return "img_emb" if self.modality == "image" else "text_emb"

    def emb_key(self, shard: str) -> str:
        return self.key(f"{self.emb_folder}/{self.emb_folder}_{shard}.npy")

    def metadata_key(self, shard: str) -> str:
        return self.key(f"metadata/metadata_{shard}.jsonl")

    def errors_key(self, shard: str) -> str:
        return self.key(f"errors/errors_{shard}.jsonl")

    def done_key(self, shard: str) -> str:
        return self.key(f"_shards/{shard}.json")

    @property
    def done_prefix(self) -> str:
        return self.key("_shards/")

    def batch_key(self, shard: str) -> str:
        return self.key(f"_plan/batches/{shard}.jsonl")

    @property
    def job_key(self) -> str:
        return self.key("_plan/job.json")

    @property
    def state_key(self) -> str:
        return self.key("_plan/state.json")

    @property
    def plan_key(self) -> str:
        return self.key("_plan/plan.json")

    @property
    def manifest_key(self) -> str:
        return self.key("_manifest.json")
