"""int8 quantisation of a model directory: validity, closeness to fp32, the refusal threshold, and
batch independence of int8 embeddings: in one run for per-token graphs, row by row for directories made
before them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from clip_export.architectures import TINY_DIMS
from clip_export.onnx_export import example_ids, export_model_dir
from clip_export.quantize import (
    REPORT_FILE,
    QuantizationRefused,
    Thresholds,
    default_thresholds,
    quantize_graph,
    quantize_model_dir,
)
from clip_export.synthetic import synthetic_model, synthetic_provenance
from clip_serverless.engine import SessionTuning
from clip_serverless.engine.encoder import ImageEncoder, TextEncoder, session_options
from clip_serverless.engine.model_dir import (
    TEXTUAL_FILE,
    TOKENIZER_FILE,
    VISUAL_FILE,
    Manifest,
    ModelDir,
    write_manifest,
)

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


@pytest.fixture(scope="module")
def per_token_dir(fp32_dir: ModelDir) -> ModelDir:
    dst = fp32_dir.path.parent / "tiny-int8-per-token"
    quantize_model_dir(fp32_dir.path, dst, progress=quiet, per_token_activations=True)
    return ModelDir.open(dst, verify_checksums=True)


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


def test_int8_graph_is_quantised_per_token(per_token_dir: ModelDir, tmp_path: Path) -> None:
    """Per-token quantisation in the file and in what ONNX Runtime's optimiser makes of it: no per-tensor
    kernel fused back in, and no bias folded into MatMulIntegerToFloat (it would be scaled per token too)."""
    int8_dir = per_token_dir
    assert int8_dir.manifest.extra["quantization"]["activation_scale"] == "per-token"
    assert "per token" in int8_dir.manifest.provenance["quantized_from"]["method"]
    for name in (VISUAL_FILE, TEXTUAL_FILE):
        ops = Counter(node.op_type for node in onnx.load(str(int8_dir.file(name))).graph.node)
        assert ops["DynamicQuantizeLinear"] == 0 and ops["MatMulInteger"] == 0
        assert ops["MatMulIntegerToFloat"] > 0 and ops["QuantizeLinear"] == ops["ReduceMax"] > 0
        options = session_options(SessionTuning(threads=1))
        options.optimized_model_filepath = str(tmp_path / name)
        ort.InferenceSession(str(int8_dir.file(name)), sess_options=options, providers=["CPUExecutionProvider"])
        optimised = onnx.load(str(tmp_path / name)).graph.node
        ops = Counter(node.op_type for node in optimised)
        assert ops["DynamicQuantizeLinear"] == ops["DynamicQuantizeMatMul"] == ops["MatMulInteger"] == 0
        assert ops["MatMulIntegerToFloat"] > 0
        fused = [node for node in optimised if node.op_type == "MatMulIntegerToFloat"]
        assert all(len([i for i in node.input if i]) == 6 for node in fused)  # no bias input
    assert not ImageEncoder(int8_dir).per_row and not TextEncoder(int8_dir).per_row


def test_per_token_rows_do_not_depend_on_their_batch(per_token_dir: ModelDir) -> None:
    """One ONNX Runtime run of a batch gives each row the bits it gets alone, in any order and beside a
    high-contrast neighbour, in the graph ONNX Runtime optimises (the session's, not the file's)."""
    images = pixels(5, seed=1)
    images[2] *= 4  # a high-contrast neighbour would widen a shared activation range
    encoder = ImageEncoder(per_token_dir)
    alone = [encoder.session.run(None, {"pixel_values": images[i : i + 1]})[0][0] for i in range(len(images))]
    for order in ([0, 1, 2, 3, 4], [4, 2, 0, 3, 1], [2, 2, 1]):
        batch = encoder.session.run(None, {"pixel_values": images[order]})[0]
        for row, i in zip(batch, order, strict=True):
            np.testing.assert_array_equal(row, alone[i])
        np.testing.assert_array_equal(encoder.encode(images[order]), batch)
    ids = example_ids([3, 77, 12, 40, 12, 3], seed=4).numpy()
    ids[5, 1] = 7  # same length as row 0, other tokens
    lengths = ids.argmax(axis=1) + 1
    texts = TextEncoder(per_token_dir)
    single = [texts.session.run(None, {"input_ids": ids[i : i + 1, : lengths[i]]})[0][0] for i in range(len(ids))]
    for order in ([0, 1, 2, 3, 4, 5], [5, 3, 0, 4, 2, 1]):
        together = texts.encode(ids[order])
        for row, i in zip(together, order, strict=True):
            np.testing.assert_array_equal(row, single[i])
    same = [0, 5, 0]  # one run of three rows of equal length, no padding
    raw = texts.session.run(None, {"input_ids": ids[same, : lengths[0]]})[0]
    for row, i in zip(raw, same, strict=True):
        np.testing.assert_array_equal(row, single[i])


@pytest.fixture(scope="module")
def legacy_int8_dir(fp32_dir: ModelDir, int8_dir: ModelDir) -> ModelDir:
    """An int8 directory as made before the per-token rewrite: quantize_dynamic's graphs, no scheme recorded."""
    out = fp32_dir.path.parent / "tiny-int8-legacy"
    out.mkdir()
    for name in (VISUAL_FILE, TEXTUAL_FILE):
        quantize_graph(fp32_dir.file(name), out / name, per_token_activations=False)
    shutil.copyfile(int8_dir.file(TOKENIZER_FILE), out / TOKENIZER_FILE)
    fields = {k: v for k, v in int8_dir.manifest.to_json().items() if k not in ("format", "files")}
    fields["quantization"] = {k: v for k, v in fields["quantization"].items() if k != "activation_scale"}
    write_manifest(out, **fields)
    return ModelDir.open(out, verify_checksums=True)


@pytest.mark.parametrize("made", ["before per-token graphs", "per-tensor"])
def test_per_tensor_int8_rows_do_not_depend_on_their_batch(made: str, legacy_int8_dir: ModelDir, int8_dir: ModelDir
                                                          ) -> None:
    """Per-tensor graphs, and directories made before the manifest said which, run one row at a time."""
    model = legacy_int8_dir if made.startswith("before") else int8_dir
    assert model.manifest.extra["quantization"].get("activation_scale") == (None if model is legacy_int8_dir
                                                                             else "per-tensor")
    images = pixels(5, seed=1)
    images[2] *= 4
    encoder = ImageEncoder(model)
    assert encoder.per_row
    batch = encoder.encode(images)
    # Precondition: this graph is batch-dependent on these inputs, or this test would prove nothing.
    raw = encoder.session.run(None, {"pixel_values": images})[0]
    assert not np.array_equal(raw, batch)
    for i in range(len(images)):
        np.testing.assert_array_equal(batch[i], encoder.encode(images[i : i + 1])[0])
    ids = example_ids([3, 77, 12, 40], seed=4).numpy()
    lengths = ids.argmax(axis=1) + 1
    texts = TextEncoder(model)
    assert texts.per_row
    together = texts.encode(ids)
    for i in range(len(ids)):
        alone = texts.encode(ids[i : i + 1, : lengths[i]])
        np.testing.assert_array_equal(together[i], alone[0])
        np.testing.assert_array_equal(texts.encode(ids[i : i + 1])[0], alone[0])  # padding is irrelevant


def test_per_token_int8_is_as_close_to_fp32_as_per_tensor(fp32_dir: ModelDir, int8_dir: ModelDir,
                                                         per_token_dir: ModelDir) -> None:
    images = pixels(4, seed=2)
    reference = ImageEncoder(fp32_dir).encode(images)
    new = cosines(reference, ImageEncoder(per_token_dir).encode(images))
    old = cosines(reference, ImageEncoder(int8_dir).encode(images))
    assert new.min() >= 0.99 and 1 - new.mean() <= 2 * (1 - old.mean())
    report = json.loads((per_token_dir.path / REPORT_FILE).read_text())
    assert report["passed"] and report["text_cosine"]["min"] >= 0.99


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
    assert ModelDir.open(dst).manifest.extra["quantization"]["activation_scale"] == "per-tensor"
    assert main(["quantize", str(fp32_dir.path), str(dst), "--per-token"]) == 0
    assert ModelDir.open(dst).manifest.extra["quantization"]["activation_scale"] == "per-token"
