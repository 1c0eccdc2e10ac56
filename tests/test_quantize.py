"""int8 quantisation of a model directory: validity, closeness to fp32, the refusal threshold, and
batch independence of int8 embeddings through the core's encoders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from clip_export.architectures import TINY_DIMS
from clip_export.onnx_export import example_ids, export_model_dir
from clip_export.quantize import (
    REPORT_FILE,
    QuantizationRefused,
    Thresholds,
    default_thresholds,
    quantize_model_dir,
)
from clip_export.synthetic import synthetic_model, synthetic_provenance
from clip_serverless.engine.encoder import ImageEncoder, TextEncoder
from clip_serverless.engine.model_dir import TEXTUAL_FILE, VISUAL_FILE, Manifest, ModelDir

pytestmark = pytest.mark.torch  # builds the fp32 source model with transformers

Float32Array = npt.NDArray[np.float32]


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def fp32_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_json: str) -> ModelDir:
    out = tmp_path_factory.mktemp("quantize") / "tiny"
    export_model_dir(synthetic_model(TINY_DIMS, seed=5), out, model_id="clip/tiny",
                     provenance=synthetic_provenance("tiny", 5),
                     tokenizer_json=tokenizer_json, progress=quiet)
    return ModelDir.open(out)


@pytest.fixture(scope="module")
def int8_result(fp32_dir: ModelDir) -> tuple[ModelDir, dict[str, object]]:
    dst = fp32_dir.path.parent / "tiny-int8"
    _, report = quantize_model_dir(fp32_dir.path, dst, progress=quiet)
    return ModelDir.open(dst, verify_checksums=True), report


@pytest.fixture(scope="module")
def int8_dir(int8_result: tuple[ModelDir, dict[str, object]]) -> ModelDir:
    return int8_result[0]


def pixels(n: int, seed: int = 0) -> Float32Array:
    return np.random.default_rng(seed).standard_normal((n, 3, 224, 224)).astype(np.float32)


def cosines(a: Float32Array, b: Float32Array) -> Float32Array:
    return np.asarray(np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)),
                      dtype=np.float32)


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_int8_directory_is_valid(fp32_dir: ModelDir, int8_dir: ModelDir) -> None:
    src, m = fp32_dir.manifest, int8_dir.manifest
    assert m.precision == "int8" and src.precision == "fp32"
    assert (m.model_id, m.image_size, m.embed_dim, m.context_length, m.mean, m.std) == (
        src.model_id, src.image_size, src.embed_dim, src.context_length, src.mean, src.std)
    assert m.files["tokenizer.json"] == src.files["tokenizer.json"]  # copied byte for byte
    # The tiny visual graph is mostly its (fp32) patch-embedding convolution; the text graph, its embedding.
    assert m.files[VISUAL_FILE].bytes < 0.8 * src.files[VISUAL_FILE].bytes
    assert m.files[TEXTUAL_FILE].bytes < 0.3 * src.files[TEXTUAL_FILE].bytes
    assert m.provenance["source"] == "synthetic" and m.provenance["quantized_from"]["digest"] == src.digest
    assert m.digest != src.digest
    summary = m.extra["quantization"]
    assert summary["report"] == REPORT_FILE and summary["passed"] is True and summary["forced"] is False
    report = json.loads((int8_dir.path / REPORT_FILE).read_text())
    assert report["passed"] and report["image_cosine"]["min"] == summary["image_cosine_min"]
    assert len(report["images"]) >= 10 and len(report["texts"]) >= 20
    assert 0.0 <= report["zero_shot"]["top1_agreement"] <= 1.0


def test_report_scores_are_computed(int8_result: tuple[ModelDir, dict[str, object]]) -> None:
    report = int8_result[1]
    for key in ("image_cosine", "text_cosine"):
        summary = report[key]
        assert isinstance(summary, dict)
        assert 0.99 <= summary["min"] <= summary["mean"] < 1.0  # close, and not trivially identical


def test_int8_embeddings_are_close_to_fp32(fp32_dir: ModelDir, int8_dir: ModelDir) -> None:
    images = pixels(4)
    assert cosines(ImageEncoder(fp32_dir).encode(images), ImageEncoder(int8_dir).encode(images)).min() >= 0.99
    ids = example_ids([2, 9, 30, 77], seed=3).numpy()
    assert cosines(TextEncoder(fp32_dir).encode(ids), TextEncoder(int8_dir).encode(ids)).min() >= 0.99


def test_int8_rows_do_not_depend_on_their_batch(int8_dir: ModelDir) -> None:
    images = pixels(5, seed=1)
    images[2] *= 4  # a high-contrast neighbour would widen a shared activation range
    encoder = ImageEncoder(int8_dir)
    batch = encoder.encode(images)
    # Precondition: the raw int8 graph is batch-dependent on these inputs, or this test would prove nothing.
    raw = encoder.session.run(None, {"pixel_values": images})[0]
    assert not np.array_equal(raw, batch)
    for i in range(len(images)):
        np.testing.assert_array_equal(batch[i], encoder.encode(images[i : i + 1])[0])
    ids = example_ids([3, 77, 12, 40], seed=4).numpy()
    lengths = ids.argmax(axis=1) + 1
    texts = TextEncoder(int8_dir)
    together = texts.encode(ids)
    for i in range(len(ids)):
        alone = texts.encode(ids[i : i + 1, : lengths[i]])
        np.testing.assert_array_equal(together[i], alone[0])
        np.testing.assert_array_equal(texts.encode(ids[i : i + 1])[0], alone[0])  # padding is irrelevant


def test_refuses_below_threshold(fp32_dir: ModelDir) -> None:
    dst = fp32_dir.path.parent / "refused"
    with pytest.raises(QuantizationRefused, match=r"cosine min .* < 1\.01") as info:
        quantize_model_dir(fp32_dir.path, dst, thresholds=Thresholds(1.01, 0.0), progress=quiet)
    assert not info.value.report["passed"] and len(info.value.report["failures"]) == 2  # image and text
    assert not dst.exists() and leftovers(dst.parent) == []
    with pytest.raises(QuantizationRefused, match="top-1 agreement"):
        quantize_model_dir(fp32_dir.path, dst, thresholds=Thresholds(0.0, 1.01), progress=quiet)


def test_force_writes_and_records_it(fp32_dir: ModelDir) -> None:
    dst = fp32_dir.path.parent / "forced"
    manifest, report = quantize_model_dir(fp32_dir.path, dst, force=True, thresholds=Thresholds(1.01, 0.0),
                                          progress=quiet)
    assert report["forced"] is True and report["passed"] is False
    assert manifest.extra["quantization"]["forced"] is True
    assert ModelDir.open(dst, verify_checksums=True).manifest.precision == "int8"


def test_rejects_an_int8_source(int8_dir: ModelDir, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is int8"):
        quantize_model_dir(int8_dir.path, tmp_path / "again", progress=quiet)


def test_default_thresholds_depend_on_provenance(fp32_dir: ModelDir) -> None:
    def with_source(source: str) -> Manifest:
        return dataclasses.replace(fp32_dir.manifest, provenance={"source": source})

    assert default_thresholds(fp32_dir.manifest) == Thresholds(min_cosine=0.99, min_top1_agreement=0.0)
    assert default_thresholds(with_source("trained")) == Thresholds(min_cosine=0.99, min_top1_agreement=0.0)
    assert default_thresholds(with_source("pretrained")) == Thresholds(min_cosine=0.99, min_top1_agreement=0.9)


def test_cli_quantize(fp32_dir: ModelDir, capsys: pytest.CaptureFixture[str]) -> None:
    from clip_export.__main__ import main

    dst = fp32_dir.path.parent / "cli-int8"
    assert main(["quantize", str(fp32_dir.path), str(dst), "--min-cosine", "1.01"]) == 1
    err = capsys.readouterr().err
    assert "refused" in err and "--force" in err and not dst.exists()
    assert main(["quantize", str(fp32_dir.path), str(dst), "--min-cosine", "1.01", "--force"]) == 0
    assert ModelDir.open(dst).manifest.extra["quantization"]["forced"] is True
