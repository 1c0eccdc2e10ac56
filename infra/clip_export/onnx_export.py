"""Export a Hugging Face ``CLIPModel`` to a model directory: visual.onnx, textual.onnx, tokenizer.json.

The graphs compute OpenAI's ``encode_image`` / ``encode_text`` (the raw projections; ``CLIPModel.forward``
L2-normalises, so it is not what is exported):

- visual: ``pixel_values`` float32 (N, 3, S, S) -> ``image_embeds`` float32 (N, D)
- textual: ``input_ids`` int64 (N, L), 1 <= L <= 77 -> ``text_embeds`` float32 (N, D)

N and L are dynamic. The text tower pools at ``input_ids.argmax(-1)``: the first end-of-text token,
since EOT (49407) is the largest id. That is OpenAI's rule whatever the checkpoint's ``eos_token_id``.
There is no attention mask input: OpenAI CLIP uses only the causal mask, so positions after the EOT
cannot change the result and callers may trim ids to the longest row's EOT.

Exporter: ``torch.onnx.export(dynamo=True)`` at opset 18 with ``torch.export.Dim`` dynamic shapes. It
produces symbolic batch and sequence axes and graphs that match PyTorch to ~4e-6. The models are put in
eager attention for the export: the SDPA path decomposes into extra ``IsNaN``/``Where``/``Mul`` nodes per
layer for the same result.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from clip_serverless.engine.model_dir import (
    MANIFEST_NAME,
    TEXTUAL_FILE,
    TOKENIZER_FILE,
    VISUAL_FILE,
    Manifest,
    write_manifest,
)
from torch import nn
from transformers import CLIPModel

from .architectures import EOT_TOKEN, OPENAI_MEAN, OPENAI_STD, SOT_TOKEN, context_length, embed_dim
from .architectures import image_size as config_image_size

Progress = Callable[[str], None]
DEFAULT_OPSET = 18
# Example batch for tracing: 2, because torch.export specialises dimensions of size 1.
_EXAMPLE_BATCH = 2


class VisualTower(nn.Module):
    """``pixel_values`` (N, 3, S, S) float32 -> ``image_embeds`` (N, D): OpenAI's ``encode_image``."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision_model(pixel_values=pixel_values).pooler_output  # (N, W): post-LN class token
        projected: torch.Tensor = self.visual_projection(pooled)
        return projected


class TextualTower(nn.Module):
    """``input_ids`` (N, L) int64 -> ``text_embeds`` (N, D): OpenAI's ``encode_text``.

    Pools ``last_hidden_state[arange(N), input_ids.argmax(-1)]`` itself rather than using HF's
    ``pooler_output``, whose rule depends on the checkpoint's ``eos_token_id``.
    """

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.text_model = model.text_model
        self.text_projection = model.text_projection

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.text_model(input_ids=input_ids).last_hidden_state  # (N, L, W), after final LN
        # int32: ONNX Runtime's ArgMax has no int64 kernel. Ties resolve to the first index (first EOT).
        eot = input_ids.to(torch.int32).argmax(dim=-1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot]
        projected: torch.Tensor = self.text_projection(pooled)
        return projected


def example_pixels(batch: int, image_size: int, seed: int = 0) -> torch.Tensor:
    """Normal noise (batch, 3, S, S): the range of normalised pixels."""
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def example_ids(lengths: list[int], context_length: int = 77, seed: int = 0) -> torch.Tensor:
    """(N, context_length) ids shaped like the tokenizer's: SOT, ``length - 2`` random tokens, EOT, zeros."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), context_length, dtype=torch.int64)
    for row, length in enumerate(lengths):
        if not 2 <= length <= context_length:
            raise ValueError(f"a token sequence holds 2..{context_length} tokens, got {length}")
        ids[row, 0] = SOT_TOKEN
        ids[row, 1 : length - 1] = torch.randint(1, SOT_TOKEN, (length - 2,), generator=gen)
        ids[row, length - 1] = EOT_TOKEN
    return ids


@contextmanager
def _export_mode(model: CLIPModel) -> Iterator[None]:
    """Eval mode, eager attention and a quiet exporter for the duration; restores the attention choice."""
    previous = model.config._attn_implementation
    was_training = model.training
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [logger.level for logger in loggers]
    model.train(False)
    model.set_attn_implementation("eager")
    for logger in loggers:
        logger.setLevel(logging.ERROR)  # "torchvision is not installed" and similar noise
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # deprecations inside torch.export
            yield
    finally:
        model.set_attn_implementation(previous or "sdpa")
        model.train(was_training)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _export(module: nn.Module, example: torch.Tensor, path: Path, *, input_name: str, output_name: str,
            dynamic: dict[int, Any], opset: int) -> None:
    torch.onnx.export(
        module.eval(), (example,), str(path), input_names=[input_name], output_names=[output_name],
        dynamo=True, external_data=False, opset_version=opset, dynamic_shapes={input_name: dynamic},
        verbose=False,
    )


def export_visual(model: CLIPModel, path: Path, *, opset: int = DEFAULT_OPSET) -> None:
    """Write ``visual.onnx`` with a dynamic batch axis."""
    size = config_image_size(model.config)
    with _export_mode(model):
        _export(VisualTower(model), example_pixels(_EXAMPLE_BATCH, size), path, input_name="pixel_values",
                output_name="image_embeds", dynamic={0: torch.export.Dim("batch", min=1)}, opset=opset)


def export_textual(model: CLIPModel, path: Path, *, opset: int = DEFAULT_OPSET) -> None:
    """Write ``textual.onnx`` with dynamic batch and sequence axes (sequence up to the context length)."""
    context = context_length(model.config)
    example = example_ids([context // 2, context], context)
    dynamic = {0: torch.export.Dim("batch", min=1), 1: torch.export.Dim("sequence", min=1, max=context)}
    with _export_mode(model):
        _export(TextualTower(model), example, path, input_name="input_ids", output_name="text_embeds",
                dynamic=dynamic, opset=opset)


def check_against_torch(model: CLIPModel, out_dir: Path, *, atol: float = 1e-4) -> dict[str, float]:
    """Run both graphs and the PyTorch towers on the same inputs; raise if they disagree.

    Uses a batch size and sequence lengths other than the export examples, so the dynamic axes are
    exercised. Returns ``{"visual_max_abs": ..., "textual_max_abs": ...}``.
    """
    import onnxruntime as ort

    size, context = config_image_size(model.config), context_length(model.config)
    pixels = example_pixels(3, size, seed=1)
    ids = example_ids([5, 12, 9], context, seed=1)[:, :12]  # trimmed to the longest row's EOT
    with _export_mode(model):
        expected = {VISUAL_FILE: VisualTower(model)(pixels).numpy(),
                    TEXTUAL_FILE: TextualTower(model)(ids).numpy()}
    feeds = {VISUAL_FILE: {"pixel_values": pixels.numpy()}, TEXTUAL_FILE: {"input_ids": ids.numpy()}}
    result: dict[str, float] = {}
    for name, feed in feeds.items():
        session = ort.InferenceSession(str(out_dir / name), providers=["CPUExecutionProvider"])
        got = session.run(None, feed)[0]
        want = expected[name]
        if got.shape != want.shape:
            raise RuntimeError(f"{name}: output shape {got.shape}, PyTorch gives {want.shape}")
        diff = float(np.abs(got - want).max())
        scale = max(1.0, float(np.abs(want).max()))
        if not diff <= atol * scale:
            raise RuntimeError(f"{name}: differs from PyTorch by {diff:.3g} (tolerance {atol * scale:.3g})")
        result[f"{name.removesuffix('.onnx')}_max_abs"] = diff
    return result


def _write_tokenizer(tokenizer_json: str | Path, dest: Path) -> None:
    """``tokenizer_json`` is the JSON text (``str``) or a file to copy (``Path``)."""
    if isinstance(tokenizer_json, Path):
        shutil.copyfile(tokenizer_json, dest)
        return
    if not tokenizer_json.strip():
        raise ValueError("tokenizer_json is empty: pass the tokenizer JSON text or a Path to tokenizer.json")
    json.loads(tokenizer_json)  # fail here, not at serving time, if it is not JSON
    dest.write_text(tokenizer_json, encoding="utf-8")


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a non-empty directory that is not a model directory (no manifest.json)."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                      and not (out_dir / MANIFEST_NAME).exists())):
        raise FileExistsError(f"{out_dir} exists and is not a model directory; not replacing it")


def replace_dir(staging: Path, out_dir: Path) -> None:
    """Move a finished ``staging`` directory to ``out_dir``, replacing a previous model directory there."""
    check_replaceable(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)


def staging_dir(out_dir: Path) -> Path:
    """An empty directory beside ``out_dir`` (same file system, so the final rename is atomic)."""
    check_replaceable(out_dir)  # fail before minutes of work, not after
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a model directory is meant to be shipped
    return staging


def export_model_dir(
    model: CLIPModel,
    out_dir: Path,
    *,
    model_id: str,
    provenance: dict[str, Any],
    tokenizer_json: str | Path,
    image_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    progress: Progress = print,
) -> Manifest:
    """Export both towers, check them against PyTorch, write tokenizer.json and manifest.json.

    The directory is built beside ``out_dir`` and renamed into place at the end, so a failed export
    leaves any previous model directory untouched. ``image_size`` defaults to the model's; passing a
    different one is an error (the position embeddings fix it). ``tokenizer_json``: JSON text or a Path.
    """
    out_dir = Path(out_dir)
    size = config_image_size(model.config)
    if image_size is not None and image_size != size:
        raise ValueError(f"image_size={image_size} but the model's vision tower takes {size} x {size} pixels")
    staging = staging_dir(out_dir)
    try:
        _write_tokenizer(tokenizer_json, staging / TOKENIZER_FILE)  # first: a bad argument fails in no time
        for name, export in ((VISUAL_FILE, export_visual), (TEXTUAL_FILE, export_textual)):
            progress(f"exporting {name} (opset {opset}) ...")
            start = time.perf_counter()
            export(model, staging / name, opset=opset)
            progress(f"  {name}: {_mb(staging / name)} in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        diffs = check_against_torch(model, staging)
        progress(f"checked against PyTorch in {time.perf_counter() - start:.1f} s: "
                 + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items()))
        manifest = write_manifest(
            staging, model_id=model_id, image_size=size, embed_dim=embed_dim(model.config),
            context_length=context_length(model.config), mean=list(OPENAI_MEAN),
            std=list(OPENAI_STD), precision="fp32", provenance=provenance,
            export={"exporter": "torch.onnx.export(dynamo=True)", "opset": opset, "torch": torch.__version__,
                    "transformers": _transformers_version()},
        )
        replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    progress(f"wrote {out_dir} ({manifest.model_id}, fp32)")
    return manifest


def _transformers_version() -> str:
    import transformers

    return str(transformers.__version__)
