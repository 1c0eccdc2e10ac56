"""Train ``clip/tiny-shapes``, the small demo model committed under ``models/clip-tiny``.

A CLIP of the deployed family (transformers ``CLIPModel``, quick_gelu, vocabulary 49408, 77 positions,
224-pixel images) made small enough to ship in the repository, trained for a few minutes on CPU on
synthetic captioned images (:mod:`clip_export.shapes`) so that zero-shot classification is meaningful:
it knows coloured shapes and nothing else.

Images go through the deployed preprocessing and captions through the deployed tokenizer, so the
exported graphs see at serving time exactly what they saw in training.

    python -m clip_export.train_tiny --out models/clip-tiny [--steps N] [--seed S]

The PyTorch weights are saved too (``--torch-out``, default ``build/clip-tiny-torch``: at 14.5 MB they do
not fit in the repository's 20 MB budget beside the ONNX graphs).

With the defaults (seed 0, 1200 steps of 64 images, one torch thread) a run takes 4-6 minutes on a shared
2-core machine and is deterministic (same losses, same weights). Colour words are learnt within ~100
steps; shape words take ~800: a ViT with 32-pixel patches has no built-in translation invariance below
the patch size, which is why the shapes are drawn upright (``shapes.MAX_TILT_DEGREES``) and the patch
position embeddings start as sine-cosine codes (:func:`new_model`).
"""

from __future__ import annotations

import argparse
import math
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from clip_serverless.engine.preprocessing import CLIP_MEAN, CLIP_STD, preprocess
from clip_serverless.engine.tokenizer import ClipTokenizer
from PIL import Image
from transformers import CLIPConfig, CLIPModel

from clip_export import shapes
from clip_export.build_tokenizer import build_tokenizer_json, find_bpe_file
from clip_export.onnx_export import export_model_dir

MODEL_ID = "clip/tiny-shapes"
IMAGE_SIZE = 224
PATCH_SIZE = 32
CONTEXT_LENGTH = 77
VOCAB_SIZE = 49408
MEAN, STD = CLIP_MEAN, CLIP_STD  # OpenAI's (clip/clip.py, _transform), which the exporter writes to the manifest
# Rendered sizes: all but 224 go through the bicubic resize of the real preprocessing.
RENDER_SIZES = (224, 256, 320)

DEFAULT_STEPS = 1200
DEFAULT_SEED = 0
DEFAULT_BATCH = 64
DEFAULT_LR = 2e-3
EVAL_IMAGES = 200  # held-out images scored during training (seeds HELD_OUT_SEED + [0, 200))
REPORT_IMAGES = 1000  # held-out images scored with the exported graphs at the end
REPORT_OFFSET = 100_000  # their seeds: HELD_OUT_SEED + REPORT_OFFSET + [0, 1000)


def tiny_config() -> CLIPConfig:
    """ViT with 32-pixel patches (7 x 7 + 1 tokens) and a small text transformer, both 64 wide.

    The token embedding (49408 x 64 fp32 = 12.6 MB) dominates the size; everything else is ~1.5 MB.
    """
    text = {
        "vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 2, "max_position_embeddings": CONTEXT_LENGTH, "hidden_act": "quick_gelu",
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0, "projection_dim": 64,
    }
    vision = {
        "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE, "hidden_size": 64, "intermediate_size": 256,
        "num_hidden_layers": 3, "num_attention_heads": 2, "hidden_act": "quick_gelu", "projection_dim": 64,
    }
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)


def sincos_position_embeddings(grid: int, dim: int, amplitude: float = 2.0) -> torch.Tensor:
    """(grid * grid, dim) fixed 2-D sine-cosine position codes (as in MAE), row-major like the patch tokens.

    Half the channels encode the row, half the column, each with ``dim / 4`` frequencies.
    """
    quarter = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angles = coord[:, None].float() * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    return amplitude * torch.cat(parts, dim=1)


def new_model(config: CLIPConfig) -> CLIPModel:
    """A freshly initialised CLIPModel whose patch position embeddings start as 2-D sine-cosine codes.

    Hugging Face initialises them with std 0.02, far below the patch embeddings (std ~1): the tokens then
    barely know where they are and a model this small takes several times longer to learn shapes.
    """
    model = CLIPModel(config)
    embeddings = model.vision_model.embeddings
    weight = embeddings.position_embedding.weight  # (1 + grid * grid, width); row 0 is the class token's
    grid = math.isqrt(weight.shape[0] - 1)
    with torch.no_grad():
        weight[0].zero_()
        weight[1:] = sincos_position_embeddings(grid, weight.shape[1])
    return model


# --- preprocessing and tokenizer: the deployed implementations ----------------------------------------


def preprocess_image(image: Image.Image) -> npt.NDArray[np.float32]:
    """The deployed preprocessing: resize short side (bicubic), centre crop, normalise -> (3, S, S)."""
    pixels: npt.NDArray[np.float32] = preprocess(image, IMAGE_SIZE, MEAN, STD)
    return pixels


@dataclass(frozen=True)
class Tokens:
    ids: npt.NDArray[np.int64]  # (N, 77), SOT ... EOT then zeros
    lengths: npt.NDArray[np.int64]  # (N,) index of EOT + 1


def tokenizer_json() -> str:
    """CLIP's BPE as a ``tokenizers`` JSON document (the file shipped as ``tokenizer.json``)."""
    return build_tokenizer_json(find_bpe_file())


def tokenize(texts: Sequence[str], tokenizer_json_text: str) -> Tokens:
    """Tokenize with the deployed :class:`ClipTokenizer`, built from the JSON that ships with the model."""
    from tokenizers import Tokenizer

    batch = ClipTokenizer(Tokenizer.from_str(tokenizer_json_text)).encode(list(texts))
    if any(batch.truncated):
        raise ValueError("a training caption does not fit in 77 tokens")
    return Tokens(ids=batch.ids, lengths=batch.lengths)


# --- data ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    pixels: torch.Tensor  # (B, 3, 224, 224) float32
    labels: torch.Tensor  # (B,) int64, index into shapes.classes()
    caption_rows: torch.Tensor  # (B,) int64, row of the caption table


def render_batch(rng: np.random.Generator, batch_size: int, classes: Sequence[tuple[str, str]]) -> Batch:
    """Random classes, seeds below ``shapes.HELD_OUT_SEED``, sizes and caption templates."""
    labels = rng.integers(0, len(classes), size=batch_size)
    templates = rng.integers(0, len(shapes.TEMPLATES), size=batch_size)
    seeds = rng.integers(0, shapes.HELD_OUT_SEED, size=batch_size)
    sizes = rng.choice(RENDER_SIZES, size=batch_size)
    pixels = np.stack([
        preprocess_image(shapes.render_shape(*classes[int(k)], seed=int(s), size=int(z)))
        for k, s, z in zip(labels, seeds, sizes, strict=True)
    ])
    return Batch(
        pixels=torch.from_numpy(pixels),
        labels=torch.from_numpy(labels.astype(np.int64)),
        caption_rows=torch.from_numpy((labels * len(shapes.TEMPLATES) + templates).astype(np.int64)),
    )


def prefetch(make: Any, count: int, depth: int = 3) -> Iterator[Batch]:
    """Render batches on a thread while the model trains (Pillow and torch both release the GIL).

    Batches come out in the order they were made, so the run stays deterministic.
    """
    out: queue.Queue[Batch | BaseException] = queue.Queue(maxsize=depth)

    def work() -> None:
        try:
            for _ in range(count):
                out.put(make())
        except BaseException as exc:  # surface rendering errors in the training loop
            out.put(exc)

    threading.Thread(target=work, daemon=True).start()
    for _ in range(count):
        item = out.get()
        if isinstance(item, BaseException):
            raise item
        yield item


def held_out_set(count: int, offset: int = 0) -> tuple[list[Image.Image], npt.NDArray[np.int64]]:
    """``count`` held-out images cycling through the classes, seeds from ``HELD_OUT_SEED + offset``."""
    classes = shapes.classes()
    labels = np.arange(count, dtype=np.int64) % len(classes)
    images = [
        shapes.render_shape(*classes[int(k)], seed=shapes.HELD_OUT_SEED + offset + i, size=224)
        for i, k in enumerate(labels)
    ]
    return images, labels


# --- model --------------------------------------------------------------------------------------------


def image_features(model: CLIPModel, pixels: torch.Tensor) -> torch.Tensor:
    """Raw image projections (N, D), as exported."""
    features: torch.Tensor = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    return features


def text_features(model: CLIPModel, ids: torch.Tensor) -> torch.Tensor:
    """Raw text projections (N, D), as exported (no attention mask: the tower is causal, pads trail EOT)."""
    features: torch.Tensor = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return features


def contrastive_loss(img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE loss, with every same-class pair counted as a positive.

    A batch of 64 from 20 classes has many repeats; plain CLIP loss would push an image away from
    the caption of its twin. Targets spread evenly over all matching pairs instead.
    img, txt: (B, D); labels: (B,).
    """
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T  # (B, B)
    positives = (labels[:, None] == labels[None, :]).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    loss_i = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    loss_t = -(targets * F.log_softmax(logits.T, dim=1)).sum(dim=1).mean()
    return (loss_i + loss_t) / 2


@torch.no_grad()
def zero_shot_accuracy(model: CLIPModel, pixels: torch.Tensor, labels: npt.NDArray[np.int64],
                       prompts: Tokens) -> dict[str, float]:
    """Top-1 accuracy of cosine similarity between images and the canonical caption of every class."""
    model.train(False)
    ids = torch.from_numpy(prompts.ids[:, : int(prompts.lengths.max())])
    img = F.normalize(image_features(model, pixels), dim=-1)
    txt = F.normalize(text_features(model, ids), dim=-1)
    model.train()
    return score(np.argmax((img @ txt.T).numpy(), axis=1), labels)


def score(predicted: npt.NDArray[np.integer], labels: npt.NDArray[np.integer]) -> dict[str, float]:
    """Accuracy overall, of the colour and of the shape (classes are shape-major)."""
    colors = len(shapes.COLORS)
    return {
        "accuracy": float(np.mean(predicted == labels)),
        "color": float(np.mean(predicted % colors == labels % colors)),
        "shape": float(np.mean(predicted // colors == labels // colors)),
    }


def train(steps: int, seed: int, batch_size: int, tok_json: str, *, lr: float = DEFAULT_LR,
          log_every: int = 100) -> tuple[CLIPModel, dict[str, float]]:
    """Train from scratch; returns the model (eval mode) and its final held-out scores plus ``seconds``."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(seed)
    classes = shapes.classes()
    table = tokenize([c for s, k in classes for c in shapes.captions(s, k)], tok_json)
    prompts = tokenize([shapes.caption(s, k) for s, k in classes], tok_json)
    table_ids = torch.from_numpy(table.ids)
    table_lengths = torch.from_numpy(table.lengths)

    eval_images, eval_labels = held_out_set(EVAL_IMAGES)
    eval_pixels = torch.from_numpy(np.stack([preprocess_image(im) for im in eval_images]))

    model = new_model(tiny_config())
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.98),
                                  fused=True)
    warmup = max(1, steps // 20)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 5%
        if step < warmup:
            return (step + 1) / warmup
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start = time.monotonic()
    batches = prefetch(lambda: render_batch(rng, batch_size, classes), steps)
    for step, batch in enumerate(batches, start=1):
        rows = batch.caption_rows
        ids = table_ids[rows][:, : int(table_lengths[rows].max())]
        loss = contrastive_loss(image_features(model, batch.pixels), text_features(model, ids), batch.labels,
                                model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))
        if step % log_every == 0 or step == steps:
            acc = zero_shot_accuracy(model, eval_pixels, eval_labels, prompts)
            print(f"step {step:5d}/{steps}  loss {loss.item():.4f}  scale {model.logit_scale.exp().item():6.2f}  "
                  f"held-out acc {acc['accuracy']:.3f} (colour {acc['color']:.3f}, shape {acc['shape']:.3f})  "
                  f"{time.monotonic() - start:6.1f}s", flush=True)
    model.train(False)
    final = zero_shot_accuracy(model, eval_pixels, eval_labels, prompts)
    return model, {**final, "seconds": time.monotonic() - start}


def evaluate_model_dir(path: Path, count: int = REPORT_IMAGES, offset: int = REPORT_OFFSET) -> dict[str, float]:
    """Zero-shot accuracy of an exported model directory, through the deployed (torch-free) code path."""
    from clip_serverless.engine.encoder import ImageEncoder, TextEncoder
    from clip_serverless.engine.model_dir import TOKENIZER_FILE, ModelDir
    from clip_serverless.engine.preprocessing import preprocess_batch

    model_dir = ModelDir.open(path, verify_checksums=True)
    m = model_dir.manifest
    tokens = ClipTokenizer.from_file(model_dir.file(TOKENIZER_FILE)).encode(
        [shapes.caption(s, c) for s, c in shapes.classes()])
    text = TextEncoder(model_dir, threads=1).encode(tokens.ids, tokens.lengths, normalize=True)  # (20, D)
    images, labels = held_out_set(count, offset)
    image = ImageEncoder(model_dir, threads=1).encode(preprocess_batch(images, m.image_size, m.mean, m.std),
                                                      normalize=True)  # (count, D)
    return score(np.argmax(image @ text.T, axis=1), labels)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="model directory to write (ONNX + manifest)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH)
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="peak learning rate (AdamW)")
    # One thread: on a shared machine two OpenMP threads spin-wait on each other and run ~10x slower.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--torch-out", type=Path, default=Path("build/clip-tiny-torch"),
                        help="where to save the PyTorch weights (safetensors)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    tok_json = tokenizer_json()
    model, result = train(args.steps, args.seed, args.batch, tok_json, lr=args.lr)
    print(f"trained {args.steps} steps in {result['seconds']:.0f}s; held-out accuracy {result['accuracy']:.3f}")

    args.torch_out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.torch_out)

    export_model_dir(
        model, args.out, model_id=MODEL_ID, tokenizer_json=tok_json,
        provenance={"source": "trained", "script": "infra/clip_export/train_tiny.py", "seed": args.seed,
                    "steps": args.steps, "batch": args.batch, "lr": args.lr,
                    "note": "demo model: knows coloured shapes only"},
    )
    report = evaluate_model_dir(args.out)
    print(f"exported graphs, {REPORT_IMAGES} new held-out images: accuracy {report['accuracy']:.3f} "
          f"(colour {report['color']:.3f}, shape {report['shape']:.3f})")
    print(f"wrote {args.out} and {args.torch_out}")


if __name__ == "__main__":
    main()
