"""int8 dynamic quantisation of a model directory, with an accuracy report against fp32.

Weights: ``QuantType.QInt8``, per output channel (``onnxruntime.quantization.quantize_dynamic``), of
the MatMuls and the token embedding; the patch-embedding convolution stays fp32 (faster).
Activations are quantised to uint8 at run time; u8 x s8 is the combination with VNNI kernels (QUInt8
weights were measured 1.2-1.7x slower). ``quantize_dynamic`` gives them one scale per tensor, so a row's
result depends on its batch neighbours: the core runs such int8 models one row at a time
(``encoder._Tower.per_row``). With ``per_token_activations``, :mod:`.per_token` rewrites the graphs to
one scale per token, which makes every row of a batch come out bit for bit as it does alone; the
manifest says which (``quantization.activation_scale``: ``per-token`` or ``per-tensor``, absent in
directories made before), and the core runs a per-token batch in one ONNX Runtime run.

Per tensor stays the default because it is faster where it matters most. ViT-B/32's visual tower
(``bench/bench_int8_batches.py``): per token makes one image 13 % slower on one thread (Lambda below
1,769 MB) and 13-33 % on two, and a batch of eight in one run is no faster than eight single runs of
the per-tensor graph on one thread, 3-9 % faster on two: ONNX Runtime fuses the per-tensor chain into
one kernel with its bias, while the per-token one needs separate reductions, a zero-point correction
and the bias as their own passes. Per token is as close to fp32 on the seeded ViT-B/32 and closer on
the demo model (figures in :mod:`.per_token`). The report below goes through the core's encoders,
preprocessing and tokenizer.

The report compares fp32 and int8 embeddings of real photographs (scikit-image's sample images) and
of captions: cosine per image and per text, and the top-1 agreement of zero-shot classification
(each photo against every caption). Below the thresholds the quantised model is not written unless
forced.

Thresholds, and why. ``min_cosine`` 0.99: measured minima are 0.9998 (images) and 0.9994 (texts) on
the seeded full-size ViT-B/32 and 0.9999 / 0.9993 on the tiny test model, so 0.99 (an 8 degree turn)
allows over ten times that error for real weights, whose activation outliers are known to be harder on
int8, while still catching a real degradation: at 0.99 the error vector is 14 % of the embedding's
length, enough to shift image-text scores (which sit around 0.2-0.35 for CLIP) by about 0.01, the
size of the gaps between close zero-shot candidates. ``min_top1_agreement`` 0.9: of the 16 photos at
most one may change its zero-shot label. That criterion only means something for weights that
know photographs: seeded random weights give near-tied scores (median top-2 gap 0.0025 on ViT-B/32),
so labels flip at cosines above 0.999 (agreement 0.75-0.81 measured), and a demo model trained on
coloured shapes has no opinion on these photos either; :func:`default_thresholds` applies it to
pretrained models only.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from clip_serverless.engine.encoder import ImageEncoder, TextEncoder, l2_normalize
from clip_serverless.engine.model_dir import (
    MODEL_FILES,
    TEXTUAL_FILE,
    TOKENIZER_FILE,
    VISUAL_FILE,
    Manifest,
    ModelDir,
    write_manifest,
)

from . import per_token
from .onnx_export import Progress, replace_dir, staging_dir

REPORT_FILE = "quantization_report.json"
Float32Array = npt.NDArray[np.float32]
Int64Array = npt.NDArray[np.int64]
Pair = tuple[Float32Array, Float32Array]  # (fp32, int8) embeddings of the same inputs

# (scikit-image sample, caption). The captions double as the zero-shot label set.
REFERENCE_IMAGES: tuple[tuple[str, str], ...] = (
    ("astronaut", "a portrait of an astronaut with the american flag"),
    ("coffee", "a cup of coffee on a saucer"),
    ("chelsea", "a photo of a cat"),
    ("rocket", "a rocket on the launch pad"),
    ("camera", "a black and white photo of a man with a camera"),
    ("hubble_deep_field", "galaxies in deep space"),
    ("immunohistochemistry", "a microscope image of stained tissue"),
    ("coins", "old coins on a table"),
    ("moon", "the surface of the moon"),
    ("clock", "a clock on a wall"),
    ("retina", "a photo of the retina of an eye"),
    ("colorwheel", "a colour wheel"),
    ("logo", "the scikit-image logo"),
    ("brick", "a brick wall"),
    ("grass", "a close-up of grass"),
    ("stereo_motorcycle", "a motorcycle in a garage"),
)
EXTRA_CAPTIONS: tuple[str, ...] = (
    "a photo of a dog",
    "a red sports car",
    "a city skyline at night",
    "a bowl of fruit",
    "a diagram",
    "a person riding a horse on the beach",
    "a plate of spaghetti",
    "an aerial photo of a forest",
)


@dataclass(frozen=True)
class Thresholds:
    min_cosine: float = 0.99
    min_top1_agreement: float = 0.9


def default_thresholds(manifest: Manifest) -> Thresholds:
    """Both thresholds for pretrained weights; cosine only for others (synthetic, demo), whose zero-shot
    labels on photographs are near-ties."""
    if manifest.provenance.get("source") == "pretrained":
        return Thresholds()
    return Thresholds(min_top1_agreement=0.0)


class QuantizationRefused(RuntimeError):
    """The int8 model is below the accuracy thresholds; ``report`` says by how much."""

    def __init__(self, report: dict[str, Any]) -> None:
        self.report = report
        reasons = "; ".join(report["failures"])
        super().__init__(f"int8 model refused: {reasons} (use --force to write it anyway)")


@functools.cache
def reference_photos() -> tuple[tuple[str, bytes], ...]:
    """The sample photographs as PNG bytes (decoded by the core's ``decode_image``, like an upload)."""
    from PIL import Image
    from skimage import data

    photos = []
    for name, _ in REFERENCE_IMAGES:
        array = getattr(data, name)()
        if isinstance(array, tuple):  # stereo pairs
            array = array[0]
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(array)).save(buffer, format="PNG")
        photos.append((name, buffer.getvalue()))
    return tuple(photos)


def reference_captions() -> list[str]:
    return [caption for _, caption in REFERENCE_IMAGES] + list(EXTRA_CAPTIONS)


def photo_pixels(manifest: Manifest, photos: Sequence[tuple[str, bytes]]) -> Float32Array:
    """(N, 3, S, S) float32 through the core's decoding and preprocessing."""
    from clip_serverless.engine.preprocessing import decode_image, preprocess_batch

    images = [decode_image(blob) for _, blob in photos]
    return np.asarray(preprocess_batch(images, manifest.image_size, manifest.mean, manifest.std), np.float32)


def caption_tokens(model_dir: ModelDir, texts: Sequence[str]) -> tuple[Int64Array, Int64Array]:
    """Ids (N, 77) and lengths (N,) from the model's own tokenizer.json through the core's tokenizer."""
    from clip_serverless.engine.tokenizer import ClipTokenizer

    batch = ClipTokenizer.from_file(model_dir.file(TOKENIZER_FILE)).encode(list(texts))
    return np.asarray(batch.ids, dtype=np.int64), np.asarray(batch.lengths, dtype=np.int64)


def _cosines(a: Float32Array, b: Float32Array) -> Float32Array:
    """Row-wise cosine of (N, D) and (N, D) -> (N,)."""
    return np.asarray(np.sum(l2_normalize(a) * l2_normalize(b), axis=1), dtype=np.float32)


def _summary(values: Float32Array) -> dict[str, float]:
    return {"min": float(values.min()), "mean": float(values.mean())}


def compare(fp32: ModelDir, int8: ModelDir, thresholds: Thresholds) -> dict[str, Any]:
    """Embed the reference photos and captions with both models and score the int8 one."""
    report: dict[str, Any] = {"thresholds": asdict(thresholds)}
    failures: list[str] = []
    towers = [name for name in (VISUAL_FILE, TEXTUAL_FILE) if fp32.has(name)]
    emb: dict[str, Pair] = {}
    # Inputs are prepared once: int8 shares the fp32 manifest's preprocessing and a copy of its tokenizer.
    if VISUAL_FILE in towers:
        photos = reference_photos()
        pixels = photo_pixels(fp32.manifest, photos)
        emb["image"] = (ImageEncoder(fp32).encode(pixels), ImageEncoder(int8).encode(pixels))
        cos = _cosines(*emb["image"])
        report["images"] = {name: float(c) for (name, _), c in zip(photos, cos, strict=True)}
        report["image_cosine"] = _summary(cos)
    if TEXTUAL_FILE in towers:
        captions = reference_captions()
        ids, lengths = caption_tokens(fp32, captions)
        emb["text"] = (TextEncoder(fp32).encode(ids, lengths), TextEncoder(int8).encode(ids, lengths))
        cos = _cosines(*emb["text"])
        report["texts"] = {text: float(c) for text, c in zip(captions, cos, strict=True)}
        report["text_cosine"] = _summary(cos)
    for kind in emb:
        worst = report[f"{kind}_cosine"]["min"]
        if worst < thresholds.min_cosine:
            failures.append(f"{kind} cosine min {worst:.4f} < {thresholds.min_cosine}")
    if len(emb) == 2:
        zero_shot = _zero_shot(emb["image"], emb["text"])
        report["zero_shot"] = zero_shot
        if zero_shot["top1_agreement"] < thresholds.min_top1_agreement:
            failures.append(f"zero-shot top-1 agreement {zero_shot['top1_agreement']:.3f} "
                            f"< {thresholds.min_top1_agreement}")
    report["failures"] = failures
    report["passed"] = not failures
    return report


def _zero_shot(images: Pair, texts: Pair) -> dict[str, Any]:
    """Each photo's best caption under fp32 and under int8, and how often they agree."""
    preds, margins = [], []
    for image, text in zip(images, texts, strict=True):
        scores = l2_normalize(image) @ l2_normalize(text).T  # (images, captions)
        preds.append(scores.argmax(axis=1))
        top2 = np.sort(scores, axis=1)[:, -2:]
        margins.append(top2[:, 1] - top2[:, 0])
    agreement = float(np.mean(preds[0] == preds[1]))
    return {"classes": int(texts[0].shape[0]), "top1_agreement": agreement,
            "fp32_top1": preds[0].tolist(), "int8_top1": preds[1].tolist(),
            "fp32_margins": {"min": float(margins[0].min()), "median": float(np.median(margins[0]))}}


# Not "Conv": the one convolution (the patch embedding) ran 2.6 ms as fp32 Conv and 7 ms as ConvInteger
# per image (profiled, 1 thread); leaving it fp32 made the int8 visual tower 15 % faster for 7 MB more.
QUANTIZED_OPS = ("MatMul", "Gather")  # Gather: the token embedding, 101 MB -> 25 MB


def quantize_graph(src: Path, dst: Path, *, per_token_activations: bool = False) -> None:
    """QInt8 per-channel weights, dynamic uint8 activations, for :data:`QUANTIZED_OPS`.

    Without ``quant_pre_process``, whose advice onnxruntime logs as a warning (silenced here): on these
    graphs it gave the same quantised visual graph node for node, and its symbolic shape inference
    fails on the textual one. One activation scale per tensor, or per token (batch-invariant) with
    ``per_token_activations``.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=list(QUANTIZED_OPS))
    finally:
        root.setLevel(level)
    if per_token_activations:
        per_token.rewrite_file(dst, dst)


def quantize_model_dir(
    src: Path,
    dst: Path,
    *,
    force: bool = False,
    thresholds: Thresholds | None = None,
    progress: Progress = print,
    per_token_activations: bool = False,
) -> tuple[Manifest, dict[str, Any]]:
    """Write an int8 copy of the fp32 model directory ``src`` to ``dst`` and its report beside it.

    Raises :class:`QuantizationRefused` (and writes nothing) when the report fails ``thresholds``
    (default: :func:`default_thresholds`) unless ``force``. Returns the new manifest and the report.
    ``per_token_activations``: one activation scale per token, so that the core runs a batch in one run
    (single images slower; see the module's docstring).
    """
    source = ModelDir.open(src, verify_checksums=True)
    if source.manifest.precision != "fp32":
        raise ValueError(f"{src} is {source.manifest.precision}; quantise an fp32 model directory")
    thresholds = thresholds or default_thresholds(source.manifest)
    dst = Path(dst)
    staging = staging_dir(dst)
    try:
        for name in (VISUAL_FILE, TEXTUAL_FILE):
            if source.has(name):
                progress(f"quantising {name} ...")
                start = time.perf_counter()
                quantize_graph(source.file(name), staging / name, per_token_activations=per_token_activations)
                sizes = (staging / name).stat().st_size / 1e6, source.file(name).stat().st_size / 1e6
                progress(f"  {name}: {sizes[0]:.1f} MB (fp32 {sizes[1]:.1f} MB) "
                         f"in {time.perf_counter() - start:.1f} s")
        if source.has(TOKENIZER_FILE):
            shutil.copyfile(source.file(TOKENIZER_FILE), staging / TOKENIZER_FILE)
        m = source.manifest
        activations = "uint8 activations per token" if per_token_activations else "uint8 activations per tensor"
        origin = {"model_id": m.model_id, "digest": m.digest,
                  "method": f"onnxruntime quantize_dynamic, QInt8 per-channel weights, {activations}"}
        provenance = {**m.provenance, "quantized_from": origin}
        fields: dict[str, Any] = {
            "model_id": m.model_id, "image_size": m.image_size, "embed_dim": m.embed_dim,
            "context_length": m.context_length, "mean": list(m.mean), "std": list(m.std),
            "precision": "int8", "provenance": provenance, **m.extra,
            # The encoders run a batch in one ONNX Runtime run when this says per-token, else row by row.
            "quantization": {"activation_scale": per_token.SCHEME if per_token_activations else "per-tensor"},
        }
        write_manifest(staging, **fields)
        progress("comparing int8 with fp32 on reference photos and captions ...")
        start = time.perf_counter()
        report = compare(source, ModelDir.open(staging), thresholds)
        report["forced"] = force and not report["passed"]
        report["sizes"] = {name: (staging / name).stat().st_size
                           for name in MODEL_FILES if (staging / name).exists()}
        progress(f"  compared in {time.perf_counter() - start:.1f} s: {_headline(report)}")
        if not report["passed"] and not force:
            raise QuantizationRefused(report)
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        summary: dict[str, float] = {f"{k}_min": report[k]["min"]
                                     for k in ("image_cosine", "text_cosine") if k in report}
        if "zero_shot" in report:
            summary["top1_agreement"] = report["zero_shot"]["top1_agreement"]
        manifest = write_manifest(staging, **{**fields, "quantization": {
            **fields["quantization"], "report": REPORT_FILE, "passed": report["passed"], "forced": report["forced"],
            **summary}})
        replace_dir(staging, dst)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"wrote {dst} ({manifest.model_id}, int8)")
    return manifest, report


def _headline(report: dict[str, Any]) -> str:
    parts = [f"{k.replace('_', ' ')} min {report[k]['min']:.4f} mean {report[k]['mean']:.4f}"
             for k in ("image_cosine", "text_cosine") if k in report]
    if "zero_shot" in report:
        parts.append(f"top-1 agreement {report['zero_shot']['top1_agreement']:.3f}")
    return ", ".join(parts) + ("" if report["passed"] else " -- FAILS: " + "; ".join(report["failures"]))
