"""The stored value: one float32 vector with what it takes to verify it. Never pickle.

Layout (all integers little-endian)::

    magic        8 bytes   b"CLIPEMB\\x01"
    header_len   uint32
    header       header_len bytes of UTF-8 JSON:
                 {"key": <cache key>, "model_id": "clip/ViT-B-32", "dim": 512, "dtype": "<f4"}
    payload      dim * 4 bytes, the vector as little-endian float32
    sha256       32 bytes over everything before it

A 512-d entry is about 2.2 KB. :func:`decode` checks every field against what the reader expects
(key, model, dimension) and the checksum; anything off raises :class:`CorruptEntry`, which the cache
treats as a miss: the vector is recomputed and the entry overwritten.
"""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np

from ..types import Float32Array

MAGIC = b"CLIPEMB\x01"
DTYPE = "<f4"
_LEN = struct.Struct("<I")
_DIGEST_BYTES = 32
MAX_HEADER_BYTES = 4096
MAX_DIM = 65536
MAX_ENTRY_BYTES = len(MAGIC) + _LEN.size + MAX_HEADER_BYTES + 4 * MAX_DIM + _DIGEST_BYTES


class CorruptEntry(ValueError):
    """A stored value that does not verify. The message says which check failed."""


def encode(key: str, model_id: str, vector: Float32Array) -> bytes:
    """One (D,) float32 vector -> the stored bytes. Raises ValueError for a non-finite or non-1-D vector."""
    vec = np.asarray(vector)
    if vec.ndim != 1 or vec.size == 0 or vec.size > MAX_DIM:
        raise ValueError(f"expected a vector of shape (D,), 0 < D <= {MAX_DIM}, got shape {vec.shape}")
    if vec.dtype != np.float32:
        raise ValueError(f"expected float32, got {vec.dtype}")
    if not np.isfinite(vec).all():
        raise ValueError("refusing to store a vector with NaN or infinity")
    header = json.dumps({"key": key, "model_id": model_id, "dim": int(vec.size), "dtype": DTYPE},
                        separators=(",", ":"), sort_keys=True).encode("utf-8")
    if len(header) > MAX_HEADER_BYTES:
        raise ValueError("key or model id too long for the entry header")
    body = b"".join((MAGIC, _LEN.pack(len(header)), header, vec.astype(DTYPE, copy=False).tobytes()))
    return body + hashlib.sha256(body).digest()


def decode(blob: bytes, *, key: str, model_id: str, dim: int | None = None) -> Float32Array:
    """Stored bytes -> (D,) float32 (a fresh, writable array), or CorruptEntry naming the failed check."""
    fixed = len(MAGIC) + _LEN.size
    if len(blob) < fixed + _DIGEST_BYTES:
        raise CorruptEntry(f"truncated entry ({len(blob)} bytes)")
    if len(blob) > MAX_ENTRY_BYTES:
        raise CorruptEntry(f"entry too large ({len(blob)} bytes)")
    if blob[: len(MAGIC)] != MAGIC:
        raise CorruptEntry("bad magic (not an embedding entry, or another format version)")
    body, digest = blob[:-_DIGEST_BYTES], blob[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptEntry("sha256 mismatch")
    (header_len,) = _LEN.unpack_from(blob, len(MAGIC))
    if header_len > MAX_HEADER_BYTES or fixed + header_len > len(body):
        raise CorruptEntry(f"header length {header_len} out of range")
    try:
        header = json.loads(body[fixed : fixed + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CorruptEntry("header is not JSON") from None
    if not isinstance(header, dict):
        raise CorruptEntry("header is not a JSON object")
    if header.get("dtype") != DTYPE:
        raise CorruptEntry(f"dtype {header.get('dtype')!r}, expected {DTYPE!r}")
    if header.get("key") != key:
        raise CorruptEntry("entry was written for another key")
    if header.get("model_id") != model_id:
        raise CorruptEntry(f"entry was written by model {header.get('model_id')!r}, expected {model_id!r}")
    stored_dim = header.get("dim")
    if not isinstance(stored_dim, int) or isinstance(stored_dim, bool) or not 0 < stored_dim <= MAX_DIM:
        raise CorruptEntry(f"bad dimension {stored_dim!r}")
    if dim is not None and stored_dim != dim:
        raise CorruptEntry(f"dimension {stored_dim}, expected {dim}")
    payload = body[fixed + header_len :]
    if len(payload) != 4 * stored_dim:
        raise CorruptEntry(f"payload is {len(payload)} bytes, header says {stored_dim} float32")
    vector = np.frombuffer(payload, dtype=DTYPE).astype(np.float32)  # astype copies: writable, native order
    if not np.isfinite(vector).all():
        raise CorruptEntry("vector holds NaN or infinity")
    return vector
