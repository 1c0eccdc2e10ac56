"""The cache's pieces without S3: keys, codec, memory LRU, disk, breaker, config, metrics, embed_cached,
statistics, and the tier interface through a remote tier that is not S3."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from clip_serverless.aws_lambda.metrics import EmfEmitter, emf_observer
from clip_serverless.cache import (
    CacheConfig,
    CacheStats,
    EmbeddingCache,
    Entry,
    ModelIdentity,
    Tier,
    TierResult,
    codec,
    compute_uncached,
    embed_cached,
    embed_payloads,
    from_env,
    image_key,
    text_key,
    text_payload,
)
from clip_serverless.cache.breaker import Breaker
from clip_serverless.cache.config import DEFAULT_S3_POLICY, parse_policy
from clip_serverless.cache.disk import DiskTier
from clip_serverless.cache.keys import KEY_PATTERN, key_modality
from clip_serverless.cache.memory import MemoryTier, entry_bytes
from clip_serverless.cache.s3 import S3Tier
from clip_serverless.cache.tier import Policy
from clip_serverless.envparse import SettingsError

from tests.cache_helpers import DIM, CountingCompute, expected, hammer, vector_for

MODEL = ModelIdentity(model_id="clip/ViT-B-32", digest="ab" * 32, embed_dim=DIM)


def run(cache: EmbeddingCache | None, payloads: Sequence[bytes], modality: str = "image",
        use_cache: bool = True) -> tuple[np.ndarray, CacheStats, CountingCompute]:
    compute = CountingCompute(payloads)
    keys = [cache.key(modality, p) if cache else str(i) for i, p in enumerate(payloads)]  # type: ignore[arg-type]
    out, stats = embed_cached(cache, keys, compute, modality=modality, use_cache=use_cache)  # type: ignore[arg-type]
    return out, stats, compute


# -- keys -------------------------------------------------------------------------------------------
def test_key_shape_and_prefix() -> None:
    key = image_key(MODEL, b"\xff\xd8jpeg bytes")
    assert KEY_PATTERN.fullmatch(key)
    model, digest12, modality, shard, h = key.split("/")
    assert (model, digest12, modality) == ("ViT-B-32", "ab" * 6, "image")
    assert shard == h[:2]
    assert key_modality(key) == "image"


def test_key_depends_on_every_input() -> None:
    base = image_key(MODEL, b"img")
    variants = [
        image_key(ModelIdentity("clip/ViT-B-32", "cd" * 32, DIM), b"img"),  # re-exported model
        image_key(ModelIdentity("clip/ViT-B-16", "ab" * 32, DIM), b"img"),  # other model id
        image_key(ModelIdentity("clip/ViT-B-32", "ab" * 32, DIM, image_pipeline="other"), b"img"),
        image_key(MODEL, b"img2"),
        text_key(MODEL, [1, 2]),
    ]
    assert len({base, *variants}) == len(variants) + 1
    # A text pipeline bump does not touch image keys, and the other way round.
    assert image_key(ModelIdentity("clip/ViT-B-32", "ab" * 32, DIM, text_pipeline="x"), b"img") == base


def test_text_key_is_over_token_ids() -> None:
    ids = [49406, 320, 1125, 49407]
    assert text_key(MODEL, ids) == text_key(MODEL, np.array(ids, dtype=np.int32))
    assert text_payload(ids) == np.array(ids, dtype="<i8").tobytes()
    assert text_key(MODEL, ids) != text_key(MODEL, [*ids, 0])  # padding is not part of the key
    with pytest.raises(ValueError, match="1-D"):
        text_payload(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match="integers"):
        text_payload([0.5, 1.5])  # type: ignore[list-item]


def test_model_identity_validation_and_manifest() -> None:
    with pytest.raises(ValueError, match="hex"):
        ModelIdentity("clip/x", "not-hex", 4)
    with pytest.raises(ValueError, match="embed_dim"):
        ModelIdentity("clip/x", "ab" * 32, 0)

    class Manifest:
        model_id = "clip/ViT-L/14@336"
        digest = "0f" * 32
        embed_dim = 768

    ident = ModelIdentity.from_manifest(Manifest())
    assert ident.path_prefix == "ViT-L-14-336/0f0f0f0f0f0f"
    assert KEY_PATTERN.fullmatch(image_key(ident, b"x"))


def test_key_modality_rejects_non_keys() -> None:
    for bad in ("", "../../etc/passwd", "a/b/image/ab/cd"):
        with pytest.raises(ValueError, match="not a cache key"):
            key_modality(bad)


# -- codec ------------------------------------------------------------------------------------------
KEY = image_key(MODEL, b"payload")


def test_codec_round_trip() -> None:
    vec = vector_for(b"payload")
    blob = codec.encode(KEY, MODEL.model_id, vec)
    out = codec.decode(blob, key=KEY, model_id=MODEL.model_id, dim=DIM)
    assert out.dtype == np.float32 and out.flags.writeable
    np.testing.assert_array_equal(out, vec)
    assert len(blob) < 4 * DIM + 256


def _reseal(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-40] + bytes([b[-40] ^ 1]) + b[-39:], "sha256"),  # a flipped payload bit
    (lambda b: b[:20], "truncated"),
    (lambda b: b"NOTCLIP!" + b[8:], "magic"),
    (lambda b: b[:-32] + b"\0" * 32, "sha256"),
    (lambda b: b + b"x", "sha256"),
    (lambda b: _reseal(b[:-32].replace(b'"dim":16', b'"dim":15')), "dimension 15, expected 16"),
    (lambda b: _reseal(b[:-36]), "payload is 60 bytes"),
    (lambda b: _reseal(b[:-32].replace(b'"<f4"', b'"<f8"')), "dtype"),
    (lambda b: _reseal(b[:-32].replace(b"clip/ViT-B-32", b"clip/ViT-B-16")), "written by model"),
])
def test_codec_rejects_damage(damage, message) -> None:  # type: ignore[no-untyped-def]
    blob = codec.encode(KEY, MODEL.model_id, vector_for(b"payload"))
    with pytest.raises(codec.CorruptEntry, match=message):
        codec.decode(damage(blob), key=KEY, model_id=MODEL.model_id, dim=DIM)


def test_codec_rejects_wrong_key_model_dim() -> None:
    blob = codec.encode(KEY, MODEL.model_id, vector_for(b"payload"))
    with pytest.raises(codec.CorruptEntry, match="another key"):
        codec.decode(blob, key=image_key(MODEL, b"other"), model_id=MODEL.model_id)
    with pytest.raises(codec.CorruptEntry, match="model"):
        codec.decode(blob, key=KEY, model_id="clip/RN50")
    with pytest.raises(codec.CorruptEntry, match="dimension 16, expected 32"):
        codec.decode(blob, key=KEY, model_id=MODEL.model_id, dim=32)


def test_codec_refuses_bad_vectors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        codec.encode(KEY, MODEL.model_id, np.array([1.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="shape"):
        codec.encode(KEY, MODEL.model_id, np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match="float32"):
        codec.encode(KEY, MODEL.model_id, np.zeros(4, np.float64))


# -- memory -----------------------------------------------------------------------------------------
def test_memory_lru_bounded_in_bytes() -> None:
    keys = [image_key(MODEL, bytes([i])) for i in range(10)]
    one = entry_bytes(keys[0], np.zeros(DIM, np.float32))
    mem = MemoryTier(max_bytes=3 * one)
    for k in keys[:3]:
        mem.put(k, vector_for(k.encode()))
    assert mem.get(keys[0]) is not None  # 0 is now the most recently used
    mem.put(keys[3], vector_for(keys[3].encode()))
    assert keys[1] not in mem and keys[0] in mem and keys[3] in mem
    assert mem.nbytes <= mem.max_bytes and len(mem) == 3
    mem.put(keys[3], vector_for(b"replacement"))  # replacing does not grow the total
    assert mem.nbytes == 3 * one
    MemoryTier(max_bytes=10).put(keys[0], vector_for(b"x"))  # larger than the bound: silently not kept


def test_memory_values_are_read_only_copies() -> None:
    mem = MemoryTier(1 << 20)
    vec = vector_for(b"a")
    mem.put(KEY, vec)
    vec[0] = 123.0  # the caller's array is not the stored one
    stored = mem.get(KEY)
    assert stored is not None and stored[0] != 123.0
    with pytest.raises(ValueError):
        stored[0] = 1.0


def test_memory_thread_safety() -> None:
    keys = [image_key(MODEL, bytes([i])) for i in range(64)]
    mem = MemoryTier(20 * entry_bytes(keys[0], np.zeros(DIM, np.float32)))

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(2000):
            k = keys[int(rng.integers(len(keys)))]
            if rng.random() < 0.5:
                mem.put(k, vector_for(k.encode()))
            else:
                got = mem.get(k)
                if got is not None:
                    np.testing.assert_array_equal(got, vector_for(k.encode()))

    errors = hammer(worker, 6, args=lambda s: (s,))
    assert not errors
    assert len(mem) == 20 and mem.nbytes <= mem.max_bytes


# -- disk -------------------------------------------------------------------------------------------
def test_disk_round_trip_and_atomic_layout(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path)
    blob = codec.encode(KEY, MODEL.model_id, vector_for(b"payload"))
    assert disk.get(KEY) is None
    assert disk.put(KEY, blob)
    assert disk.get(KEY) == blob
    assert (tmp_path / KEY).is_file()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith(".tmp-")]


def test_disk_refuses_paths_outside_root(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "root")
    assert disk.put("../escape", b"x") is False
    assert disk.get("../../etc/passwd") is None
    assert not (tmp_path / "escape").exists()


def test_disk_fault_is_a_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    disk = DiskTier(blocker)  # every path under it fails with NotADirectoryError
    assert disk.put(KEY, b"data") is False
    assert disk.get(KEY) is None
    assert any("cache disk fault" in r.getMessage() for r in caplog.records)


def test_disk_tier_serves_a_fresh_process_and_heals_corruption(tmp_path: Path) -> None:
    payloads = [b"one", b"two", b"three"]
    first = EmbeddingCache(MODEL, [MemoryTier(1 << 20), DiskTier(tmp_path)])
    out1, stats1, compute1 = run(first, payloads)
    assert compute1.computed == 3 and stats1.misses == 3

    # A new process: empty memory, same directory.
    second = EmbeddingCache(MODEL, [MemoryTier(1 << 20), DiskTier(tmp_path)])
    path = tmp_path / second.key("image", b"two")
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0xFF  # flip a byte inside the entry
    path.write_bytes(bytes(raw))
    out2, stats2, compute2 = run(second, payloads)
    assert compute2.calls == [[1]]  # only the corrupted one is recomputed
    assert (stats2.tier("disk").hits, stats2.corrupt, stats2.misses) == (2, 1, 1)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(out2, expected(payloads))
    # ...and overwritten with a valid entry.
    good = codec.decode(path.read_bytes(), key=second.key("image", b"two"), model_id=MODEL.model_id, dim=DIM)
    np.testing.assert_array_equal(good, vector_for(b"two"))
    # Disk hits were promoted to memory: a third call touches neither disk nor the model.
    _, stats3, compute3 = run(second, payloads)
    assert compute3.calls == [] and stats3.tier("memory").hits == 3


# -- embed_cached -----------------------------------------------------------------------------------
def test_miss_then_memory_hit_skips_compute() -> None:
    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20)])
    payloads = [b"a", b"b"]
    out1, stats1, compute1 = run(cache, payloads)
    out2, stats2, compute2 = run(cache, payloads)
    assert compute1.calls == [[0, 1]] and compute2.calls == []
    assert (stats1.misses, stats2.tier("memory").hits, stats2.misses) == (2, 2, 0)
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(out1, expected(payloads))
    assert stats2.tier("s3").skipped == "" and stats1.tier("s3").skipped == ""  # no bucket: nothing to report


def test_partial_hits_keep_order_and_compute_once_per_distinct_key() -> None:
    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20)])
    run(cache, [b"b", b"d"])
    payloads = [b"a", b"b", b"c", b"a", b"d", b"e", b"c"]
    out, stats, compute = run(cache, payloads)
    assert compute.calls == [[0, 2, 5]]  # a, c, e once each, by first occurrence
    assert (stats.requested, stats.unique, stats.tier("memory").hits, stats.misses) == (7, 5, 2, 3)
    np.testing.assert_array_equal(out, expected(payloads))
    out[0, 0] = 99.0  # the result is the caller's to modify
    again, _, _ = run(cache, payloads)
    np.testing.assert_array_equal(again, expected(payloads))


def test_opt_out_and_no_cache_compute_everything() -> None:
    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20)])
    run(cache, [b"a"])
    out, stats, compute = run(cache, [b"a", b"a"], use_cache=False)
    assert compute.calls == [[0, 1]] and not stats.enabled and stats.misses == 2
    assert stats.to_log() == {"modality": "image", "hits": 0, "misses": 2, "cache": "off"}
    out, _, compute = run(None, [b"x", b"y"])
    assert compute.calls == [[0, 1]]
    np.testing.assert_array_equal(out, expected([b"x", b"y"]))


def test_empty_request() -> None:
    out, stats, compute = run(EmbeddingCache(MODEL, [MemoryTier(1 << 20)]), [])
    assert out.shape == (0, DIM) and compute.calls == [] and stats.misses == 0


def test_compute_with_wrong_shape_is_an_error() -> None:
    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20)])
    with pytest.raises(ValueError, match=r"compute returned shape \(1, 8\), expected \(1, 16\)"):
        embed_cached(cache, [KEY], lambda idx: np.zeros((len(idx), 8), np.float32), modality="image")


def test_compute_errors_propagate() -> None:
    class BadImage(ValueError):
        pass

    def compute(indices: Sequence[int]) -> np.ndarray:
        raise BadImage("cannot decode")

    with pytest.raises(BadImage):
        embed_cached(EmbeddingCache(MODEL, [MemoryTier(1 << 20)]), [KEY], compute, modality="image")


def test_non_finite_vectors_are_returned_but_never_stored(tmp_path: Path) -> None:
    memory = MemoryTier(1 << 20)
    cache = EmbeddingCache(MODEL, [memory, DiskTier(tmp_path)])
    bad = np.full((1, DIM), np.nan, np.float32)
    out, _ = embed_cached(cache, [KEY], lambda idx: bad, modality="image")
    assert np.isnan(out).all()
    assert KEY not in memory and not (tmp_path / KEY).exists()


def test_a_broken_tier_never_fails_the_request(caplog: pytest.LogCaptureFixture) -> None:
    class Exploding(MemoryTier):
        def get(self, key: str) -> np.ndarray | None:
            raise RuntimeError("bug in a tier")

        def put(self, key: str, vector: np.ndarray) -> None:
            raise RuntimeError("bug in a tier")

    cache = EmbeddingCache(MODEL, [Exploding(1 << 20)])
    out, stats, compute = run(cache, [b"a", b"b"])
    np.testing.assert_array_equal(out, expected([b"a", b"b"]))
    assert compute.calls == [[0, 1]] and stats.errors == 2
    assert any("bug in a tier" in r.getMessage() for r in caplog.records)


def test_embed_payloads_returns_stats_for_the_log_and_text_payload_keys() -> None:
    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20)])
    payloads = [text_payload([49406, 320, 49407]), text_payload([49406, 321, 49407])]
    compute = CountingCompute(payloads)
    out, stats = embed_payloads(cache, "text", payloads, compute)
    log = stats.to_log()
    assert log["misses"] == 2 and log["modality"] == "text"
    out2, stats2 = embed_payloads(cache, "text", payloads, compute)
    log2 = stats2.to_log()
    assert log2["hits"] == 2 and log2["memory_hits"] == 2 and len(compute.calls) == 1
    np.testing.assert_array_equal(out, out2)
    assert cache.key("text", payloads[0]) == text_key(MODEL, [49406, 320, 49407])


def test_concurrent_requests_same_keys_memory_and_disk(tmp_path: Path) -> None:
    memory = MemoryTier(1 << 20)
    cache = EmbeddingCache(MODEL, [memory, DiskTier(tmp_path)])
    payloads = [b"shared-1", b"shared-2", b"shared-3"]
    want = expected(payloads)

    def worker() -> None:
        for _ in range(30):
            out, _, _ = run(cache, payloads)
            np.testing.assert_array_equal(out, want)
            memory.clear()  # force the disk path too

    errors = hammer(worker, 6)
    assert not errors
    for p in payloads:
        key = cache.key("image", p)
        stored = codec.decode((tmp_path / key).read_bytes(), key=key, model_id=MODEL.model_id, dim=DIM)
        np.testing.assert_array_equal(stored, vector_for(p))
    assert not [p for p in tmp_path.rglob(".tmp-*")]


# -- breaker ----------------------------------------------------------------------------------------
def test_breaker_opens_cools_down_and_probes_once() -> None:
    now = [0.0]
    changes: list[tuple[str, str]] = []
    breaker = Breaker(3, 10.0, clock=lambda: now[0],
                      on_change=lambda old, new, why: changes.append((old, new)))
    for _ in range(2):
        assert breaker.allow()
        breaker.record_failure("boom")
    breaker.record_success()  # resets the count
    for _ in range(3):
        breaker.record_failure("boom")
    assert str(breaker.state) == "open" and not breaker.allow()
    now[0] = 9.9
    assert not breaker.allow()
    now[0] = 10.0
    assert breaker.allow()  # the probe
    assert not breaker.allow()  # only one at a time
    breaker.record_failure("still down")
    assert str(breaker.state) == "open" and not breaker.allow()
    now[0] = 20.0
    assert breaker.allow()
    breaker.record_success()
    assert str(breaker.state) == "closed" and breaker.allow() and breaker.allow()
    assert changes == [("closed", "open"), ("open", "half-open"), ("half-open", "open"),
                       ("open", "half-open"), ("half-open", "closed")]


# -- config -----------------------------------------------------------------------------------------
def test_config_defaults_off_lambda_and_on_lambda() -> None:
    local = CacheConfig.from_env({})
    assert local.enabled and local.s3 is None and local.write_mode == "background" and not local.metrics
    s3 = CacheConfig.from_env({"CLIP_CACHE_BUCKET": "b"}).s3
    assert s3 is not None and s3.prefix == "embeddings/" and s3.remote.policy == DEFAULT_S3_POLICY
    assert (s3.max_attempts, s3.remote.deadline_s, s3.remote.workers) == (2, 0.5, 8)
    assert (s3.remote.breaker_failures, s3.remote.breaker_cooldown_s) == (5, 30.0)
    lam = CacheConfig.from_env({"AWS_LAMBDA_FUNCTION_NAME": "f", "CLIP_CACHE_BUCKET": "b",
                                "CLIP_CACHE_PREFIX": "/cache", "CLIP_CACHE_MEMORY_MB": "1.5"})
    assert lam.write_mode == "sync" and lam.metrics and lam.s3 is not None
    assert lam.s3.bucket == "b" and lam.s3.prefix == "cache/"
    assert lam.memory_bytes == int(1.5 * 1024 * 1024)
    unprefixed = CacheConfig.from_env({"CLIP_CACHE_BUCKET": "b", "CLIP_CACHE_PREFIX": ""}).s3
    assert unprefixed is not None and unprefixed.prefix == ""  # set but empty: no prefix
    assert CacheConfig.from_env({"CLIP_CACHE_MEMORY_MB": "0"}).memory_bytes == 0  # no memory tier


@pytest.mark.parametrize("name, value", [
    ("CLIP_CACHE", "maybe"),
    ("CLIP_CACHE_MEMORY_MB", "nan"),
    ("CLIP_CACHE_MEMORY_MB", "-1"),
    ("CLIP_CACHE_S3_DEADLINE", "soon"),
    ("CLIP_CACHE_S3_READ_TIMEOUT", "-1"),
    ("CLIP_CACHE_S3_CONNECT_TIMEOUT", "0"),
    ("CLIP_CACHE_S3_MAX_ATTEMPTS", "0"),
    ("CLIP_CACHE_S3_WORKERS", "many"),
    ("CLIP_CACHE_S3_BREAKER", "x"),
    ("CLIP_CACHE_S3_BREAKER", "0,30"),
    ("CLIP_CACHE_S3_POLICY", "video=3"),
    ("CLIP_CACHE_S3_WRITE", "later"),
    ("CLIP_CACHE_METRICS", "statsd"),
])
def test_config_bad_values_stop_start_up_naming_the_variable(name: str, value: str) -> None:
    # With and without a bucket: a bad S3 value is reported before a bucket is configured too.
    for bucket in ({}, {"CLIP_CACHE_BUCKET": "b"}):
        with pytest.raises(SettingsError, match=name):
            CacheConfig.from_env({**bucket, name: value})


def test_policy_parsing() -> None:
    assert parse_policy("") == {"image": 1, "text": 4}
    assert parse_policy("text=off, image=2") == {"image": 2, "text": None}
    assert parse_policy("off") == {"image": None, "text": None}
    with pytest.raises(SettingsError, match="CLIP_CACHE_S3_POLICY: unknown modality 'video'"):
        parse_policy("text=1,video=3")
    with pytest.raises(SettingsError, match="'image=zero' is not"):
        parse_policy("text=1,image=zero")


def test_from_env_off_and_memory_only() -> None:
    class Manifest:
        model_id = "clip/ViT-B-32"
        digest = "ab" * 32
        embed_dim = DIM

    assert from_env(Manifest(), {"CLIP_CACHE": "off"}) is None
    cache = from_env(Manifest(), {})
    assert cache is not None and [tier.name for tier in cache.tiers] == ["memory"]


def test_importing_and_using_without_a_bucket_never_imports_boto3(tmp_path: Path) -> None:
    code = """
import sys
import numpy as np
from clip_serverless.cache import embed_payloads, from_env
class M:
    model_id = "clip/ViT-B-32"; digest = "ab" * 32; embed_dim = 4
for env in ({}, {"CLIP_CACHE_BUCKET": "unused-bucket", "CLIP_CACHE_S3_POLICY": "text=off"}):
    cache = from_env(M(), env)
    out, stats = embed_payloads(cache, "text", [b"x" * 8], lambda idx: np.ones((len(idx), 4), np.float32))
    log = stats.to_log()
    assert log["misses"] == 1, log
heavy = [m for m in ("boto3", "botocore", "fastapi", "PIL", "onnxruntime", "aws_lambda_powertools",
                     "clip_serverless.engine.encoder", "clip_serverless.api", "clip_serverless.aws_lambda")
         if m in sys.modules]
print(",".join(heavy) or "none")
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIP_CACHE")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert proc.stdout.strip() == "none", proc.stdout + proc.stderr


# -- metrics ----------------------------------------------------------------------------------------
def test_emf_record_is_valid() -> None:
    lines: list[str] = []
    emitter = EmfEmitter("TestNs", function_name="embed-image", sink=lines.append, clock=lambda: 1700000000.5)
    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20)], observers=[emitter.emit])
    run(cache, [b"a", b"b"])
    run(cache, [b"a", b"c"])
    assert len(lines) == 2
    record = json.loads(lines[1])
    meta = record["_aws"]
    assert meta["Timestamp"] == 1700000000500
    (directive,) = meta["CloudWatchMetrics"]
    assert directive["Namespace"] == "TestNs"
    for dims in directive["Dimensions"]:
        for dim in dims:
            assert isinstance(record[dim], str)
    for metric in directive["Metrics"]:
        assert metric["Unit"] in ("Count", "Milliseconds")
        assert isinstance(record[metric["Name"]], int | float)
    assert (record["CacheHits"], record["CacheMisses"], record["CacheMemoryHits"]) == (1, 1, 1)
    assert record["Modality"] == "image" and record["FunctionName"] == "embed-image"
    assert "s3_skipped" not in record


def test_metrics_sink_failure_is_swallowed() -> None:
    def sink(line: str) -> None:
        raise OSError("stdout closed")

    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20)], observers=[EmfEmitter(sink=sink).emit])
    out, _, _ = run(cache, [b"a"])
    np.testing.assert_array_equal(out, expected([b"a"]))


# -- statistics -------------------------------------------------------------------------------------
def test_counts_are_what_the_header_and_the_log_line_show() -> None:
    from clip_serverless.cache import TierStats

    image = CacheStats("image", misses=1, errors=1, tiers={
        "memory": TierStats(hits=1), "disk": TierStats(), "s3": TierStats(hits=2, lookups=3, writes=1)})
    assert list(image.counts().items()) == [("hits", 3), ("misses", 1), ("memory_hits", 1), ("s3_hits", 2),
                                            ("errors", 1), ("s3_lookups", 3), ("s3_writes", 1)]
    text = CacheStats("text", tiers={"memory": TierStats(hits=2), "s3": TierStats(skipped="policy")})
    assert text.to_log()["s3_skipped"] == "policy" and "s3_skipped" not in text.counts()
    merged = CacheStats.merge([image, text])
    assert merged.modality == "image,text" and merged.enabled
    assert merged.counts() == {"hits": 5, "misses": 1, "memory_hits": 3, "s3_hits": 2, "errors": 1,
                               "s3_lookups": 3, "s3_writes": 1}
    assert CacheStats.merge([]).counts() == {}


def test_one_path_without_a_cache_and_one_shape_of_stats() -> None:
    payloads = [b"x", b"y", b"x"]
    off_out, off = embed_payloads(None, "image", payloads, CountingCompute(payloads))
    compute = CountingCompute(payloads)
    bypass_out, bypass = embed_payloads(EmbeddingCache(MODEL, [MemoryTier(1 << 20)]), "image", payloads, compute,
                                        use_cache=False)
    assert compute.calls == [[0, 1, 2]]  # everything computed, repeats included, nothing hashed or looked up
    np.testing.assert_array_equal(off_out, bypass_out)
    assert type(off) is type(bypass) is CacheStats and not off.enabled and not bypass.enabled
    assert (off.misses, off.bypassed, bypass.misses, bypass.bypassed) == (3, 0, 3, 1)
    assert off.counts() == {}  # no cache configured: no X-Clip-Cache header
    assert bypass.counts() == {"hits": 0, "misses": 3, "bypass": 1}
    text_bypass = compute_uncached(2, CountingCompute([b"a", b"b"]), modality="text", bypassed=True)[1]
    assert CacheStats.merge([bypass, text_bypass]).counts() == {"hits": 0, "misses": 5, "bypass": 2}


# -- the tier interface: a remote tier that is not S3 ---------------------------------------------------
class RemoteDict:
    """A remote tier in a dict (what a DynamoDB or Redis tier would be): the cache knows it by its interface."""

    name = "dict"
    remote = True

    def __init__(self, policy: Policy | None = None, *, failing: bool = False) -> None:
        self.policy: Policy = policy or {"image": 1, "text": 2}
        self.failing = failing
        self.stored: dict[str, bytes] = {}
        self.queued: list[dict[str, bytes]] = []
        self.asked: list[list[str]] = []
        self.renewed = 0

    def get_many(self, keys: Sequence[str]) -> TierResult:
        self.asked.append(list(keys))
        if self.failing:
            return TierResult(errors=len(keys))
        return TierResult(found={k: self.stored[k] for k in keys if k in self.stored}, ok=len(keys))

    def put_many(self, entries: Mapping[str, Entry], *, wait_for_completion: bool = True) -> TierResult:
        blobs = {key: entry.blob for key, entry in entries.items()}
        if not wait_for_completion:
            self.queued.append(blobs)
            return TierResult()
        self.stored.update(blobs)
        return TierResult(ok=len(blobs))

    def prepare(self) -> None:
        pass

    def renew(self) -> bool:
        self.renewed += 1
        return True

    def drain(self, timeout_s: float) -> bool:
        for blobs in self.queued:
            self.stored.update(blobs)
        self.queued.clear()
        return True

    def close(self) -> None:
        pass


def test_every_tier_implements_the_interface(tmp_path: Path) -> None:
    tiers: list[Tier] = [MemoryTier(1 << 20), DiskTier(tmp_path), S3Tier("bucket"), RemoteDict()]  # mypy checks
    assert [(t.name, t.remote) for t in tiers] == [("memory", False), ("disk", False), ("s3", True),
                                                   ("dict", True)]
    with pytest.raises(ValueError, match="unique"):
        EmbeddingCache(MODEL, [MemoryTier(1), MemoryTier(2)])


def test_a_remote_tier_gets_policy_writes_and_counts_under_its_name() -> None:
    remote = RemoteDict()
    container = EmbeddingCache(MODEL, [MemoryTier(1 << 20), remote])
    _, few, _ = run(container, [b"t1"], "text")  # one text miss: below the tier's threshold of 2
    assert few.tier("dict").skipped == "policy" and remote.asked == [] and remote.stored == {}
    assert few.to_log()["dict_skipped"] == "policy"
    _, many, _ = run(container, [b"t2", b"t3"], "text")
    assert many.counts() == {"hits": 0, "misses": 2, "dict_lookups": 2, "dict_writes": 2}
    # A new container: the entries come from the remote tier, verified, and are promoted to memory.
    memory = MemoryTier(1 << 20)
    fresh = EmbeddingCache(MODEL, [memory, remote])
    out, hit, compute = run(fresh, [b"t2", b"t3"], "text")
    assert compute.calls == [] and hit.tier("dict").hits == 2 and len(memory) == 2
    np.testing.assert_array_equal(out, expected([b"t2", b"t3"]))
    assert fresh.renew() == ["dict"] and fresh.has_remote_tiers


def test_a_remote_tier_that_failed_its_read_is_not_written_and_background_writes_drain() -> None:
    broken = RemoteDict(failing=True)
    _, stats, _ = run(EmbeddingCache(MODEL, [broken]), [b"a", b"b"])
    assert stats.errors == 2 and broken.stored == {} and broken.queued == []
    remote = RemoteDict()
    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20), remote], write_mode="background")
    _, stats, _ = run(cache, [b"a", b"b"])
    assert stats.tier("dict").writes == 0 and remote.stored == {} and len(remote.queued) == 1
    assert cache.drain(1.0) and len(remote.stored) == 2


# -- metrics as an observer -----------------------------------------------------------------------------
def test_metrics_are_an_observer_wired_from_the_config() -> None:
    assert emf_observer(CacheConfig(metrics=False)) is None
    assert emf_observer(CacheConfig.from_env({"AWS_LAMBDA_FUNCTION_NAME": "f"})) is not None  # Lambda default
    assert emf_observer(CacheConfig.from_env({"AWS_LAMBDA_FUNCTION_NAME": "f", "CLIP_CACHE_METRICS": "off"})) is None
    lines: list[str] = []
    emitter = EmfEmitter("Ns", function_name="f", sink=lines.append, clock=time.time)
    cache = EmbeddingCache(MODEL, [MemoryTier(1 << 20), RemoteDict()])
    cache.observe(emitter.emit)
    run(cache, [b"t1"], "text")
    record = json.loads(lines[0])
    names = [m["Name"] for m in record["_aws"]["CloudWatchMetrics"][0]["Metrics"]]
    assert names == ["CacheHits", "CacheMisses", "CacheMemoryHits", "CacheDiskHits", "CacheS3Hits",
                     "CacheDictHits", "CacheCorrupt", "CacheErrors", "CacheLookupTime"]
    assert record["CacheS3Hits"] == 0 and record["dict_skipped"] == "policy"
