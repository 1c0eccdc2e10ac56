"""Cache keys: content addresses over the model identity, the pipeline version, the modality and the input.

A key is a relative path, the same string in every tier (memory dict key, file under the disk tier's
root, object key under the S3 prefix)::

    <model>/<digest12>/<modality>/<h[:2]>/<h>

    model     the model id without ``clip/``, reduced to [A-Za-z0-9._-]          "ViT-B-32"
    digest12  the first 12 hex digits of ``Manifest.digest``                    "3f2a9c1b0d4e"
    modality  "image" | "text"
    h         sha256, 64 hex digits, over (each field NUL-terminated)
                  "clip-serverless-cache/1", model id, full Manifest.digest, modality,
                  pipeline version of that modality, and then the input bytes:
                  image: the encoded image exactly as received (after base64 decoding or download)
                  text:  the token ids as little-endian int64, from SOT up to and including the
                         first EOT, without padding

The model id and the digest lead the path so that an operator can delete or expire one model version's
entries by prefix; ``h[:2]`` spreads keys over 256 prefixes for S3's per-prefix request rates. The digest
covers the graphs and the tokenizer file, so a re-exported model never reads another export's vectors.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..types import Modality

MODALITIES: tuple[Modality, ...] = ("image", "text")

# Bump when decoding/resizing/normalising changes what vector a given image file yields (EXIF handling,
# resampling filter, crop rounding...). Entries written under the old version are then never read.
IMAGE_PIPELINE_VERSION = "decode-exif-bicubic-centercrop-1"
# Text keys hash the token ids, so a tokenizer change needs no bump (other ids, other keys). Bump when
# the way ids are fed to the graph changes what it returns (e.g. a different truncation rule).
TEXT_PIPELINE_VERSION = "ids-to-first-eot-1"

KEY_SCHEME = "clip-serverless-cache/1"


def pillow_series() -> str:
    """Pillow's major version, read from its ``PIL/_version.py`` (without importing Pillow, nor
    ``importlib.metadata``: ~10 ms of a text function's cold start, where there is no Pillow to find).

    Resizing is part of what an image key stands for, and Pillow 13 changed the rounding of
    bicubic resizes for some aspect ratios, so entries are kept apart per major version.
    """
    import importlib.util

    spec = importlib.util.find_spec("PIL")
    if spec is None or not spec.submodule_search_locations:
        return "pillow-unknown"
    for location in spec.submodule_search_locations:
        try:
            source = Path(location, "_version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        found = re.search(r"""^__version__\s*=\s*["'](\d+)\.""", source, re.MULTILINE)
        if found:
            return "pillow" + found.group(1)
    return "pillow-unknown"


_SAFE = re.compile(r"[^A-Za-z0-9._-]")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9._-]+/[0-9a-f]{12}/(image|text)/[0-9a-f]{2}/[0-9a-f]{64}$")


class ManifestLike(Protocol):
    """What a key needs from ``core.model_dir.Manifest`` (a Protocol: this package never imports the core)."""

    @property
    def model_id(self) -> str: ...

    @property
    def digest(self) -> str: ...

    @property
    def embed_dim(self) -> int: ...


@dataclass(frozen=True)
class ModelIdentity:
    """Everything besides the input that decides an embedding."""

    model_id: str  # "clip/ViT-B-32"
    digest: str  # Manifest.digest: 64 hex digits
    embed_dim: int
    image_pipeline: str = IMAGE_PIPELINE_VERSION
    text_pipeline: str = TEXT_PIPELINE_VERSION

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[0-9a-f]{12,}", self.digest):
            raise ValueError(f"model digest must be lower-case hex (at least 12 digits), got {self.digest!r}")
        if self.embed_dim <= 0:
            raise ValueError(f"embed_dim must be positive, got {self.embed_dim}")

    @classmethod
    def from_manifest(cls, manifest: ManifestLike, image_decode: str = "exact") -> ModelIdentity:
        """``image_decode``: ``EngineSettings.image_decode``; a draft decode gives other vectors, so other keys
        (the exact path keeps the keys it always had)."""
        draft = "" if image_decode == "exact" else f"+{image_decode}"
        return cls(model_id=manifest.model_id, digest=manifest.digest, embed_dim=manifest.embed_dim,
                   image_pipeline=f"{IMAGE_PIPELINE_VERSION}+{pillow_series()}{draft}")

    @property
    def path_prefix(self) -> str:
        """``<model>/<digest12>``: the first two components of every key of this model."""
        name = _SAFE.sub("-", self.model_id.removeprefix("clip/")) or "model"
        return f"{name}/{self.digest[:12]}"

    def pipeline(self, modality: Modality) -> str:
        return self.image_pipeline if modality == "image" else self.text_pipeline


def payload_key(model: ModelIdentity, modality: Modality, payload: bytes | memoryview) -> str:
    """The key of one input given as bytes: encoded image bytes, or ``text_payload(ids)``."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
    h = hashlib.sha256()
    for part in (KEY_SCHEME, model.model_id, model.digest, modality, model.pipeline(modality)):
        h.update(part.encode("utf-8"))
        h.update(b"\0")
    h.update(payload)
    hexdigest = h.hexdigest()
    return f"{model.path_prefix}/{modality}/{hexdigest[:2]}/{hexdigest}"


def text_payload(token_ids: Sequence[int] | npt.NDArray[np.integer]) -> bytes:
    """Token ids (SOT .. first EOT, no padding) as the bytes that text keys hash: little-endian int64."""
    ids = np.asarray(token_ids)
    if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"token ids must be a 1-D sequence of integers, got shape {ids.shape} {ids.dtype}")
    return ids.astype("<i8").tobytes()


def image_key(model: ModelIdentity, data: bytes | memoryview) -> str:
    """Key of an encoded image (JPEG/PNG/... bytes as received): no decoding needed to look it up."""
    return payload_key(model, "image", data)


def text_key(model: ModelIdentity, token_ids: Sequence[int] | npt.NDArray[np.integer]) -> str:
    """Key of a tokenized text: two strings that tokenize the same share an entry."""
    return payload_key(model, "text", text_payload(token_ids))


def key_modality(key: str) -> Modality:
    """The modality component of a key; ValueError for a string that is not a key."""
    if not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"not a cache key: {key[:200]!r}")
    return "image" if key.split("/")[2] == "image" else "text"
