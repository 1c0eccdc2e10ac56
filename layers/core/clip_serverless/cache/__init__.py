"""The embedding cache: a repeated image or prompt costs neither decoding nor inference.

Tiers (:class:`~.tier.Tier`, one module each), looked up in order, hits promoted upwards:

1. memory (:mod:`.memory`): an LRU bounded in bytes, per process (a warm Lambda container, the local server);
2. disk (:mod:`.disk`, optional, ``CLIP_CACHE_DIR``): files under a directory, for the local server;
3. S3 (:mod:`.s3`, optional, ``CLIP_CACHE_BUCKET``): a remote tier, one object per entry, shared by every
   container and function, so a prompt embedded by ``embed_text`` is a hit for ``compare``. Expiry is the
   bucket's lifecycle rule.

Rooms: :mod:`.keys` (content addresses), :mod:`.codec` (stored values), :mod:`.tier` (the tier interface),
:mod:`.tiered` (``EmbeddingCache``: the ordered tiers), :mod:`.embedder` (a request through the cache and
the model), :mod:`.stats` (what one request did), :mod:`.config` (the environment), :mod:`.breaker` and
:mod:`.faultlog` (remote faults). Nothing here imports the Lambda plumbing: metrics are an observer.

**Keys** are content addresses (see :mod:`.keys`)::

    <prefix><model>/<digest12>/<modality>/<h[:2]>/<h>
    e.g. embeddings/ViT-B-32/3f2a9c1b0d4e/image/9c/9c41...

where ``h = sha256("clip-serverless-cache/1" \\0 model_id \\0 Manifest.digest \\0 modality \\0
pipeline_version \\0 input)``; the input is the image's encoded bytes as received (after base64 decoding
or download: a hit never decodes), or the text's token ids as little-endian int64 from SOT to the first
EOT (two strings that tokenize the same share an entry). ``Manifest.digest`` hashes the model files, so
a re-exported model never reads stale vectors; :data:`.keys.IMAGE_PIPELINE_VERSION` and
:data:`.keys.TEXT_PIPELINE_VERSION` are bumped when preprocessing changes what a given input yields.

**Values** (see :mod:`.codec`): magic, a JSON header (key, model id, dimension, dtype), the raw float32
vector, and a sha256 over all of it. A value that does not verify is a miss, recomputed and overwritten,
never returned. Vectors are the raw projections (not normalised). The cache relies on the encoder being
batch-invariant (fp32; int8 models run row by row), so a stored vector does not depend on its batch.

**Faults never fail a request**: short botocore timeouts, bounded attempts, a deadline per batch, and a
breaker that skips S3 for a while after repeated faults; each fault is logged once with its cause.

**When S3 is used** (the S3 tier's policy, ``CLIP_CACHE_S3_POLICY``, default ``image=1,text=4``; every
remote tier has one): S3 is consulted (and written) for a modality only when a request has at least that
many misses left after memory and disk. Measured
with ``bench/bench_cache.py`` (ViT-B/32, one ORT thread, shared 2-vCPU machine): an image costs 40 ms
(int8) to 100 ms (fp32) to decode and embed, more than any in-region GET (10-30 ms), so one image miss
pays for S3; a caption costs 5-12 ms plus ~5 ms per extra caption in the batch, so S3 pays only from
3-6 misses (a list's GETs run concurrently): single prompts stay in memory. A memory hit costs ~5 us.
A miss that goes to S3 pays a GET (404) on top of computing; its PUT runs after the response (on Lambda
through an internal extension, :mod:`clip_serverless.aws_lambda.after_response`; sync writes when the
extension cannot register).

Entry points: :func:`from_env` (or :func:`from_config` with a :class:`CacheConfig` read once at start)
builds the cache (None when ``CLIP_CACHE=off``); :func:`embed_payloads` / :func:`embed_cached` run a request
through it (or, without a cache, through :func:`compute_uncached`) and return a :class:`CacheStats`.
Importing this package does not import botocore, the CLIP core, FastAPI or Pillow.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..types import Modality
from .config import CacheConfig, RemoteTierConfig, S3Config
from .embedder import compute_uncached, embed_cached, embed_payloads
from .keys import (
    IMAGE_PIPELINE_VERSION,
    TEXT_PIPELINE_VERSION,
    ManifestLike,
    ModelIdentity,
    image_key,
    text_key,
    text_payload,
)
from .stats import CacheStats, StatsObserver, TierStats
from .tier import Entry, Tier, TierResult
from .tiered import EmbeddingCache

__all__ = [
    "IMAGE_PIPELINE_VERSION",
    "TEXT_PIPELINE_VERSION",
    "CacheConfig",
    "CacheStats",
    "EmbeddingCache",
    "Entry",
    "Modality",
    "ModelIdentity",
    "RemoteTierConfig",
    "S3Config",
    "StatsObserver",
    "Tier",
    "TierResult",
    "TierStats",
    "compute_uncached",
    "embed_cached",
    "embed_payloads",
    "from_config",
    "from_env",
    "image_key",
    "text_key",
    "text_payload",
]


def from_config(manifest: ManifestLike, config: CacheConfig, observers: Iterable[StatsObserver] = (),
                image_decode: str = "exact") -> EmbeddingCache | None:
    """The cache for this model as ``config`` describes it, or None when the cache is off."""
    if not config.enabled:
        return None
    identity = ModelIdentity.from_manifest(manifest, image_decode=image_decode)
    return EmbeddingCache.from_config(identity, config, observers=observers)


def from_env(manifest: ManifestLike, environ: Mapping[str, str] | None = None,
             observers: Iterable[StatsObserver] = ()) -> EmbeddingCache | None:
    """The cache for this model as the environment configures it, or None when ``CLIP_CACHE=off``.
    Raises :class:`~clip_serverless.envparse.SettingsError` naming a bad variable."""
    return from_config(manifest, CacheConfig.from_env(environ), observers)
