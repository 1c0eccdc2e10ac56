"""The committed demo model ``models/clip-tiny`` (``clip/tiny-shapes``) and the renderer it was trained on.

Everything here goes through the deployed, torch-free path: ModelDir -> ClipTokenizer / preprocessing ->
ImageEncoder / TextEncoder. Held-out images use seeds the training never drew (``HELD_OUT_SEED`` and up),
at several render sizes so that the bicubic resize of the preprocessing is exercised too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from clip_export import shapes
from clip_serverless.engine.encoder import ImageEncoder, TextEncoder
from clip_serverless.engine.model_dir import MODEL_FILES, TOKENIZER_FILE, ModelDir
from clip_serverless.engine.preprocessing import preprocess_batch
from clip_serverless.engine.tokenizer import ClipTokenizer
from PIL import Image

MAX_TOTAL_BYTES = 20_000_000
EMBED_DIM = 64
# Far from the training script's monitoring (HELD_OUT_SEED + [0, 200)) and report (+100_000) seeds.
TEST_SEEDS = shapes.HELD_OUT_SEED + 500_000


@pytest.fixture(scope="module")
def model(tiny_model_path: Path) -> ModelDir:
    return ModelDir.open(tiny_model_path, verify_checksums=True)


@pytest.fixture(scope="module")
def tokenizer(model: ModelDir) -> ClipTokenizer:
    return ClipTokenizer.from_file(model.file(TOKENIZER_FILE))


@pytest.fixture(scope="module")
def images(model: ModelDir) -> ImageEncoder:
    return ImageEncoder(model, threads=1)


@pytest.fixture(scope="module")
def texts(model: ModelDir) -> TextEncoder:
    return TextEncoder(model, threads=1)


def embed_texts(tokenizer: ClipTokenizer, encoder: TextEncoder, captions: list[str]) -> npt.NDArray[np.float32]:
    batch = tokenizer.encode(captions)
    return encoder.encode(batch.ids, batch.lengths)


def embed_images(model: ModelDir, encoder: ImageEncoder, pictures: list[Image.Image]) -> npt.NDArray[np.float32]:
    m = model.manifest
    return encoder.encode(preprocess_batch(pictures, m.image_size, m.mean, m.std))


def cosine(a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """(N, D) x (M, D) -> (N, M) cosine similarity of raw embeddings."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.asarray(a @ b.T, dtype=np.float32)


# --- the manifest and the files ------------------------------------------------------------------------


def test_manifest_names_the_trained_demo_model(model: ModelDir) -> None:
    m = model.manifest
    assert m.model_id == "clip/tiny-shapes"
    assert m.version_id == "tiny-shapes"
    assert m.provenance["source"] == "trained"
    assert m.provenance["script"] == "infra/clip_export/train_tiny.py"
    assert isinstance(m.provenance["seed"], int) and isinstance(m.provenance["steps"], int)
    assert "coloured shapes" in m.provenance["note"]
    assert (m.image_size, m.embed_dim, m.context_length, m.precision) == (224, EMBED_DIM, 77, "fp32")


def test_the_model_directory_ships_every_file_within_20_mb(model: ModelDir) -> None:
    assert sorted(model.manifest.files) == sorted(MODEL_FILES)
    on_disk = sum(p.stat().st_size for p in model.path.iterdir() if p.is_file())
    assert on_disk <= MAX_TOTAL_BYTES, f"models/clip-tiny holds {on_disk} bytes"
    assert sum(e.bytes for e in model.manifest.files.values()) <= on_disk


def test_the_tokenizer_is_clips(tokenizer: ClipTokenizer) -> None:
    batch = tokenizer.encode(["a photo of a red circle.", "RED   Circle"])
    assert batch.ids[0, 0] == 49406 and batch.ids[0, batch.lengths[0] - 1] == 49407
    # Lower-casing and whitespace collapsing: "RED   Circle" is "red circle", the last two words of row 0.
    assert list(batch.ids[1, 1:3]) == list(batch.ids[0, batch.lengths[0] - 4 : batch.lengths[0] - 2])


# --- embeddings -----------------------------------------------------------------------------------------


def test_embeddings_are_raw_projections_of_the_manifest_dimension(
        model: ModelDir, tokenizer: ClipTokenizer, images: ImageEncoder, texts: TextEncoder) -> None:
    pictures = [shapes.render_shape("circle", "red", TEST_SEEDS), shapes.render_shape("star", "green", TEST_SEEDS)]
    image = embed_images(model, images, pictures)
    text = embed_texts(tokenizer, texts, ["a photo of a red circle.", "green star"])
    for emb in (image, text):
        assert emb.shape == (2, model.manifest.embed_dim) and emb.dtype == np.float32
        assert np.all(np.isfinite(emb))
        norms = np.linalg.norm(emb, axis=1)
        assert np.all(np.abs(norms - 1.0) > 1e-3), f"embeddings look L2-normalised: norms {norms}"
    batch = tokenizer.encode(["green star"])
    unit = texts.encode(batch.ids, batch.lengths, normalize=True)
    np.testing.assert_allclose(unit[0], text[1] / np.linalg.norm(text[1]), rtol=1e-5, atol=1e-6)


def test_zero_shot_accuracy_on_held_out_images(
        model: ModelDir, tokenizer: ClipTokenizer, images: ImageEncoder, texts: TextEncoder) -> None:
    classes = shapes.classes()
    prompts = embed_texts(tokenizer, texts, [shapes.caption(s, c) for s, c in classes])
    labels = np.arange(3 * len(classes)) % len(classes)  # 60 images, 3 per class
    sizes = (224, 300, 256)
    pictures = [shapes.render_shape(*classes[k], seed=TEST_SEEDS + 1000 + i, size=sizes[i % len(sizes)])
                for i, k in enumerate(labels)]
    predicted = cosine(embed_images(model, images, pictures), prompts).argmax(axis=1)
    colors = len(shapes.COLORS)
    accuracy = float(np.mean(predicted == labels))
    color_accuracy = float(np.mean(predicted % colors == labels % colors))
    assert accuracy >= 0.85, f"zero-shot accuracy {accuracy:.3f} on {len(labels)} held-out images"
    assert color_accuracy >= 0.95, f"colour accuracy {color_accuracy:.3f}"


@pytest.mark.parametrize(("shape", "color"), [("circle", "red"), ("square", "blue")])
def test_red_circle_against_blue_square(shape: str, color: str, model: ModelDir, tokenizer: ClipTokenizer,
                                        images: ImageEncoder, texts: TextEncoder) -> None:
    captions = ["a photo of a red circle.", "a photo of a blue square."]
    right = captions.index(shapes.caption(shape, color))
    pictures = [shapes.render_shape(shape, color, seed=TEST_SEEDS + 7 + i, size=224) for i in range(5)]
    sims = cosine(embed_images(model, images, pictures), embed_texts(tokenizer, texts, captions))
    margins = sims[:, right] - sims[:, 1 - right]
    assert np.all(margins > 0.5), f"cosine margins of the right caption: {margins}"


def test_both_the_colour_and_the_shape_word_matter(
        model: ModelDir, tokenizer: ClipTokenizer, images: ImageEncoder, texts: TextEncoder) -> None:
    captions = ["a photo of a red circle.", "a photo of a red square.", "a photo of a blue circle."]
    pictures = [shapes.render_shape("circle", "red", seed=TEST_SEEDS + 50 + i) for i in range(5)]
    sims = cosine(embed_images(model, images, pictures), embed_texts(tokenizer, texts, captions))
    assert np.all(sims.argmax(axis=1) == 0), sims


# --- the renderer ---------------------------------------------------------------------------------------


def test_render_shape_is_deterministic_and_seeded() -> None:
    first = np.asarray(shapes.render_shape("triangle", "yellow", seed=3, size=96))
    again = np.asarray(shapes.render_shape("triangle", "yellow", seed=3, size=96))
    other_seed = np.asarray(shapes.render_shape("triangle", "yellow", seed=4, size=96))
    other_color = np.asarray(shapes.render_shape("triangle", "purple", seed=3, size=96))
    assert first.shape == (96, 96, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other_seed)
    assert not np.array_equal(first, other_color)


def test_render_shape_draws_the_colour_it_names() -> None:
    for color, channel in (("red", 0), ("green", 1), ("blue", 2)):
        pixels = np.asarray(shapes.render_shape("square", color, seed=11), dtype=np.int16)
        # The most saturated pixels belong to the shape (the background is near grey).
        saturation = pixels.max(axis=2) - pixels.min(axis=2)
        shape_pixels = pixels[saturation > 100]
        assert len(shape_pixels) > 1000
        assert np.all(shape_pixels.argmax(axis=1) == channel), color


def test_render_shape_rejects_unknown_names_and_tiny_sizes() -> None:
    with pytest.raises(ValueError, match="unknown shape"):
        shapes.render_shape("hexagon", "red", seed=0)
    with pytest.raises(ValueError, match="unknown colour"):
        shapes.render_shape("circle", "magenta", seed=0)
    with pytest.raises(ValueError, match="at least 32"):
        shapes.render_shape("circle", "red", seed=0, size=8)


def test_captions() -> None:
    assert shapes.caption("circle", "red") == "a photo of a red circle."
    assert shapes.captions("star", "blue")[0] == shapes.caption("star", "blue")
    assert all("blue" in c and "star" in c for c in shapes.captions("star", "blue"))
    assert len(shapes.classes()) == len(shapes.SHAPES) * len(shapes.COLORS)
