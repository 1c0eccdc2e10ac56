"""The model directory: what a layer, an image or the repository ships for one CLIP model.

Layout::

    <dir>/manifest.json   what the files are (schema below), with a sha256 and size per file
    <dir>/visual.onnx     pixel_values float32 (N, 3, S, S) -> image_embeds float32 (N, D)
    <dir>/textual.onnx    input_ids int64 (N, L), L <= context_length -> text_embeds float32 (N, D)
    <dir>/tokenizer.json  the CLIP BPE as a `tokenizers` file

Embeddings are the raw projections (OpenAI's ``encode_image``/``encode_text``), not L2-normalised.
A model directory may hold only one tower (a function that embeds text ships no visual.onnx); what is
missing fails when that tower is asked for, with a message naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..types import Precision

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
VISUAL_FILE = "visual.onnx"
TEXTUAL_FILE = "textual.onnx"
TOKENIZER_FILE = "tokenizer.json"
MODEL_FILES = (VISUAL_FILE, TEXTUAL_FILE, TOKENIZER_FILE)


class ModelDirError(ValueError):
    """The model directory is missing, incomplete or inconsistent. The message says what to fix."""


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """The parsed ``manifest.json``."""

    model_id: str  # as the API names it: "clip/ViT-B-32"
    image_size: int
    embed_dim: int
    context_length: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    precision: Precision
    provenance: dict[str, Any]  # {"source": "pretrained", ...} | {"source": "synthetic", "seed": 0} | ...
    files: dict[str, FileEntry]
    format: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def version_id(self) -> str:
        """The API's ``clip_version_id``: the model id without its ``clip/`` prefix."""
        return self.model_id.removeprefix("clip/")

    @property
    def digest(self) -> str:
        """A digest of the model's identity and file contents, cheap to compute (no file reads).

        Two directories with the same digest hold byte-identical graphs and tokenizer, so a cache
        keyed on it never serves vectors from a re-exported model.
        """
        files = {name: entry.sha256 for name, entry in sorted(self.files.items())}
        blob = json.dumps({"model_id": self.model_id, "precision": self.precision, "files": files}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "model_id": self.model_id,
            "image_size": self.image_size,
            "embed_dim": self.embed_dim,
            "context_length": self.context_length,
            "mean": list(self.mean),
            "std": list(self.std),
            "precision": self.precision,
            "provenance": self.provenance,
            "files": {n: {"sha256": e.sha256, "bytes": e.bytes} for n, e in sorted(self.files.items())},
            **self.extra,
        }

    @classmethod
    def from_json(cls, data: Any, source: str = MANIFEST_NAME) -> Manifest:
        """Validate and parse; every problem is a ModelDirError naming the field."""
        if not isinstance(data, dict):
            raise ModelDirError(f"{source}: expected a JSON object")
        known = {"format", "model_id", "image_size", "embed_dim", "context_length", "mean", "std",
                 "precision", "provenance", "files"}

        def need(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in data:
                raise ModelDirError(f"{source}: missing field {key!r}")
            value = data[key]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ModelDirError(f"{source}: field {key!r} has the wrong type ({type(value).__name__})")
            return value

        fmt = need("format", int)
        if fmt != FORMAT_VERSION:
            raise ModelDirError(f"{source}: format {fmt} is not supported (this code reads format {FORMAT_VERSION})")
        model_id = need("model_id", str)
        if not model_id.startswith("clip/") or len(model_id) <= len("clip/"):
            raise ModelDirError(f"{source}: model_id must look like 'clip/ViT-B-32', got {model_id!r}")
        image_size, embed_dim, context_length = (need(k, int) for k in ("image_size", "embed_dim", "context_length"))
        if min(image_size, embed_dim, context_length) <= 0:
            raise ModelDirError(f"{source}: image_size, embed_dim and context_length must be positive")
        mean, std = need("mean", list), need("std", list)
        for name, triple in (("mean", mean), ("std", std)):
            if len(triple) != 3 or not all(isinstance(v, int | float) for v in triple):
                raise ModelDirError(f"{source}: {name} must be three numbers")
        if not all(v > 0 for v in std):
            raise ModelDirError(f"{source}: std must be positive")
        precision = need("precision", str)
        if precision not in ("fp32", "int8"):
            raise ModelDirError(f"{source}: precision must be 'fp32' or 'int8', got {precision!r}")
        provenance = need("provenance", dict)
        files_raw = need("files", dict)
        files: dict[str, FileEntry] = {}
        for name, entry in files_raw.items():
            if name not in MODEL_FILES:
                raise ModelDirError(f"{source}: unknown file {name!r} (expected some of {', '.join(MODEL_FILES)})")
            if (not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
                    or not isinstance(entry.get("bytes"), int) or len(entry["sha256"]) != 64):
                raise ModelDirError(f"{source}: files[{name!r}] must be {{'sha256': <64 hex>, 'bytes': <int>}}")
            files[name] = FileEntry(sha256=entry["sha256"], bytes=entry["bytes"])
        if TOKENIZER_FILE not in files and TEXTUAL_FILE in files:
            raise ModelDirError(f"{source}: a model with {TEXTUAL_FILE} needs {TOKENIZER_FILE}")
        return cls(
            model_id=model_id, image_size=image_size, embed_dim=embed_dim, context_length=context_length,
            mean=(float(mean[0]), float(mean[1]), float(mean[2])),
            std=(float(std[0]), float(std[1]), float(std[2])),
            precision=precision,  # checked above
            provenance=provenance, files=files, format=fmt,
            extra={k: v for k, v in data.items() if k not in known},
        )


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelDir:
    """A validated model directory. Construct with :meth:`open`."""

    path: Path
    manifest: Manifest

    @classmethod
    def open(cls, path: str | Path, *, verify_checksums: bool = False) -> ModelDir:
        """Read and check ``manifest.json`` and the files it lists.

        Sizes are always checked (a stat each); sha256 only with ``verify_checksums`` because hashing
        600 MB of fp32 graphs costs about a second of cold start.
        """
        root = Path(path)
        if not root.is_dir():
            raise ModelDirError(f"model directory {str(root)!r} does not exist (set CLIP_MODEL_DIR)")
        manifest_path = root / MANIFEST_NAME
        try:
            data = json.loads(manifest_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelDirError(f"{manifest_path} is missing: not a model directory") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelDirError(f"{manifest_path} is not readable JSON: {exc}") from None
        manifest = Manifest.from_json(data, source=str(manifest_path))
        present = [name for name in manifest.files if (root / name).exists()]
        if not present:
            raise ModelDirError(f"{root}: none of the files listed in {MANIFEST_NAME} is present")
        for name in present:
            entry, file = manifest.files[name], root / name
            size = file.stat().st_size
            if size != entry.bytes:
                raise ModelDirError(f"{file}: {size} bytes, manifest says {entry.bytes} (truncated or replaced?)")
            if verify_checksums and sha256_file(file) != entry.sha256:
                raise ModelDirError(f"{file}: sha256 does not match the manifest (corrupted or replaced?)")
        return cls(path=root, manifest=manifest)

    def file(self, name: str) -> Path:
        """The path of a listed file that is present, or a ModelDirError naming what is missing."""
        if name not in self.manifest.files:
            raise ModelDirError(f"{self.path}: {MANIFEST_NAME} lists no {name}")
        file = self.path / name
        if not file.exists():
            raise ModelDirError(f"{self.path}: {name} is listed but not shipped in this directory")
        return file

    def has(self, name: str) -> bool:
        return name in self.manifest.files and (self.path / name).exists()


def write_manifest(root: Path, **fields: Any) -> Manifest:
    """Hash the model files present in ``root`` and write ``manifest.json`` (used by the export tooling)."""
    files = {
        name: FileEntry(sha256=sha256_file(root / name), bytes=(root / name).stat().st_size)
        for name in MODEL_FILES
        if (root / name).exists()
    }
    data = {"format": FORMAT_VERSION, **fields,
            "files": {n: {"sha256": e.sha256, "bytes": e.bytes} for n, e in files.items()}}
    manifest = Manifest.from_json(data, source=str(root / MANIFEST_NAME))
    (root / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
    return manifest
