"""The exported ONNX graphs against PyTorch (transformers' CLIPModel) with the same weights.

Two models: the full-size ViT-B/32 architecture with seeded weights (exported once per session) and a
tiny one. Reference embeddings follow OpenAI's definitions, written out here: ``encode_image`` is the
visual projection of the post-LN class token; ``encode_text`` is the text projection of the final-LN
hidden state at ``ids.argmax(-1)`` (the first end-of-text token).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from clip_export.architectures import (
    ARCHITECTURES,
    EOT_TOKEN,
    TINY_DIMS,
    Architecture,
    ClipDims,
    clip_config,
    get_architecture,
    text_config,
    tiny_config,
    vision_config,
)
from clip_export.onnx_export import export_model_dir
from clip_export.pretrained import PretrainedUnavailable, export_pretrained, load_pretrained
from clip_export.synthetic import synthetic_model, synthetic_provenance
from clip_serverless.engine.encoder import ImageEncoder, TextEncoder
from clip_serverless.engine.model_dir import TEXTUAL_FILE, VISUAL_FILE, ModelDir
from clip_serverless.engine.tokenizer import ClipTokenizer
from transformers import CLIPModel

pytestmark = pytest.mark.torch

ATOL = 1e-4
MIN_COSINE = 0.99999
CAPTIONS = [
    "a photo of a cat",
    "a diagram",
    "an astronaut riding a horse on the moon, in the style of an old oil painting, with a golden frame",
    "two <|endoftext|> tokens: pooling must use the first",
    "word " * 100,  # truncated to 77 tokens, EOT last
]

Float32Array = npt.NDArray[np.float32]


# --- fixtures ------------------------------------------------------------------------------------------


def _export(model: CLIPModel, out: Path, tokenizer_json: str, arch: str) -> ModelDir:
    export_model_dir(model, out, model_id=f"clip/{arch}", provenance=synthetic_provenance(arch, 0),
                     tokenizer_json=tokenizer_json, progress=lambda _: None)
    return ModelDir.open(out, verify_checksums=True)


@pytest.fixture(scope="session")
def full_model() -> CLIPModel:
    return synthetic_model(get_architecture("ViT-B-32").dims, seed=0)


@pytest.fixture(scope="session")
def full_dir(full_model: CLIPModel, tokenizer_json: str,
             tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    return _export(full_model, tmp_path_factory.mktemp("export") / "ViT-B-32", tokenizer_json, "ViT-B-32")


@pytest.fixture(scope="session")
def tiny_model() -> CLIPModel:
    return synthetic_model(TINY_DIMS, seed=3)


@pytest.fixture(scope="session")
def tiny_dir(tiny_model: CLIPModel, tokenizer_json: str,
             tmp_path_factory: pytest.TempPathFactory) -> ModelDir:
    return _export(tiny_model, tmp_path_factory.mktemp("export") / "tiny", tokenizer_json, "tiny")


@pytest.fixture(params=["full", "tiny"])
def pair(request: pytest.FixtureRequest) -> tuple[CLIPModel, ModelDir]:
    return request.getfixturevalue(f"{request.param}_model"), request.getfixturevalue(f"{request.param}_dir")


# --- references --------------------------------------------------------------------------------------


def torch_image(model: CLIPModel, pixels: Float32Array) -> Float32Array:
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=torch.from_numpy(pixels)).pooler_output
        return np.asarray(model.visual_projection(pooled).numpy(), dtype=np.float32)


def torch_text(model: CLIPModel, ids: npt.NDArray[np.int64]) -> Float32Array:
    """OpenAI's encode_text: ``ln_final(x)[arange(N), ids.argmax(-1)] @ text_projection``."""
    tensor = torch.from_numpy(ids)
    with torch.no_grad():
        hidden = model.text_model(input_ids=tensor).last_hidden_state
        pooled = hidden[torch.arange(len(ids)), tensor.argmax(dim=-1)]
        return np.asarray(model.text_projection(pooled).numpy(), dtype=np.float32)


def pixels_for(model_dir: ModelDir, n: int, seed: int = 0) -> Float32Array:
    """One real photo through the core's preprocessing, then normal noise (the range of normalised pixels)."""
    from clip_serverless.engine.preprocessing import preprocess
    from PIL import Image
    from skimage import data

    m = model_dir.manifest
    astronaut = data.astronaut()  # type: ignore[no-untyped-call]
    photo = preprocess(Image.fromarray(astronaut), m.image_size, m.mean, m.std)
    noise = np.random.default_rng(seed).standard_normal((n - 1, 3, m.image_size, m.image_size))
    return np.concatenate([photo[None], noise.astype(np.float32)])


def tokens(model_dir: ModelDir, texts: list[str]) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    batch = ClipTokenizer.from_file(model_dir.file("tokenizer.json")).encode(texts)
    return batch.ids, batch.lengths


def assert_matches(got: Float32Array, want: Float32Array) -> None:
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() <= ATOL
    cos = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= MIN_COSINE


# --- architecture -------------------------------------------------------------------------------------


def test_architectures_match_released_configs() -> None:
    config = clip_config("ViT-B-32")
    text, vision = text_config(config), vision_config(config)
    # openai/clip-vit-base-patch32 config.json
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (
        512, 12, 8, 2048)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads,
            vision.intermediate_size, vision.patch_size, vision.image_size) == (768, 12, 12, 3072, 32, 224)
    assert config.projection_dim == 512 and text.vocab_size == 49408 and text.max_position_embeddings == 77
    assert text.hidden_act == vision.hidden_act == "quick_gelu"
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (0, 2, 1)
    large = clip_config("ViT-L-14-336px")
    lv = vision_config(large)
    assert (lv.image_size, lv.patch_size, lv.num_hidden_layers, lv.hidden_size, large.projection_dim) == (
        336, 14, 24, 1024, 768)
    assert get_architecture("ViT-B-16").hf_repo == "openai/clip-vit-base-patch16"
    for arch in ARCHITECTURES.values():
        assert ClipDims.from_config(arch.config()) == arch.dims
        assert arch.pretrained == "openai" and arch.model_id == f"clip/{arch.name}"
    assert text_config(tiny_config(text_layers=1)).num_hidden_layers == 1
    with pytest.raises(ValueError, match="ViT-B-32"):
        get_architecture("ViT-H-14")


def test_full_size_model_has_the_real_parameter_count(full_model: CLIPModel) -> None:
    # ViT-B/32: 151,277,313 parameters (87.8M visual + 63.2M text + logit scale).
    assert sum(p.numel() for p in full_model.parameters()) == 151_277_313


# --- graphs -------------------------------------------------------------------------------------------


def test_graph_io_contract(full_dir: ModelDir) -> None:
    visual = ImageEncoder(full_dir, threads=1).session
    textual = TextEncoder(full_dir, threads=1).session
    (pix,), (img,) = visual.get_inputs(), visual.get_outputs()
    (ids,), (txt,) = textual.get_inputs(), textual.get_outputs()
    assert (pix.name, pix.type, pix.shape[1:]) == ("pixel_values", "tensor(float)", [3, 224, 224])
    assert isinstance(pix.shape[0], str)  # symbolic batch axis
    assert (img.name, img.type, img.shape[1]) == ("image_embeds", "tensor(float)", 512)
    assert (ids.name, ids.type) == ("input_ids", "tensor(int64)")
    assert all(isinstance(d, str) for d in ids.shape)  # symbolic batch and sequence axes
    assert (txt.name, txt.type, txt.shape[1]) == ("text_embeds", "tensor(float)", 512)


def test_manifest_round_trip(full_dir: ModelDir) -> None:
    m = full_dir.manifest
    assert (m.model_id, m.version_id, m.image_size, m.embed_dim, m.context_length, m.precision) == (
        "clip/ViT-B-32", "ViT-B-32", 224, 512, 77, "fp32")
    assert m.provenance["source"] == "synthetic" and m.provenance["seed"] == 0
    assert m.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    assert set(m.files) == {"visual.onnx", "textual.onnx", "tokenizer.json"}
    assert 300e6 < m.files[VISUAL_FILE].bytes < 400e6 and 200e6 < m.files[TEXTUAL_FILE].bytes < 300e6


def test_images_match_pytorch(pair: tuple[CLIPModel, ModelDir]) -> None:
    model, model_dir = pair
    pixels = pixels_for(model_dir, 4)
    assert_matches(ImageEncoder(model_dir).encode(pixels), torch_image(model, pixels))


def test_texts_match_pytorch(pair: tuple[CLIPModel, ModelDir]) -> None:
    model, model_dir = pair
    ids, lengths = tokens(model_dir, CAPTIONS)
    assert len(set(lengths.tolist())) == len(CAPTIONS) and lengths.max() == 77
    assert (ids[3] == EOT_TOKEN).sum() == 2  # the literal <|endoftext|> is a second EOT after the first
    want = torch_text(model, ids)
    assert_matches(TextEncoder(model_dir).encode(ids, lengths), want)
    # transformers' own pooling agrees for this config (eos_token_id == 2 selects argmax pooling)
    with torch.no_grad():
        hf = model.get_text_features(input_ids=torch.from_numpy(ids))
    hf = getattr(hf, "pooler_output", hf).numpy()
    np.testing.assert_allclose(hf, want, atol=1e-5)


def test_text_pools_at_the_first_eot(tiny_model: CLIPModel, tiny_dir: ModelDir) -> None:
    """Whatever follows the first EOT (padding, a second EOT, other tokens) cannot change the embedding."""
    ids, lengths = tokens(tiny_dir, ["a photo of a dog", "a photo of a dog"])
    ids[1, lengths[1]:] = np.random.default_rng(0).integers(1, EOT_TOKEN + 1, 77 - int(lengths[1]))
    session = TextEncoder(tiny_dir).session
    out = session.run(None, {"input_ids": ids})[0]
    np.testing.assert_array_equal(out[0], out[1])
    assert_matches(out, torch_text(tiny_model, ids[:1]).repeat(2, axis=0))


def test_trimmed_text_equals_full_context(full_dir: ModelDir) -> None:
    ids, lengths = tokens(full_dir, CAPTIONS[:3])
    encoder = TextEncoder(full_dir)
    full = encoder.session.run(None, {"input_ids": ids})[0]  # all 77 positions
    trimmed = encoder.encode(ids, lengths)  # cut to the longest row's EOT
    assert int(lengths.max()) < 77
    np.testing.assert_array_equal(trimmed, full)
    np.testing.assert_array_equal(encoder.encode(ids[:1, : lengths[0]]), full[:1])


def test_dynamic_batch(full_model: CLIPModel, full_dir: ModelDir) -> None:
    pixels = pixels_for(full_dir, 5, seed=7)
    encoder = ImageEncoder(full_dir)
    one, five = encoder.encode(pixels[:1]), encoder.encode(pixels)
    assert one.shape == (1, 512) and five.shape == (5, 512)
    want = torch_image(full_model, pixels)
    assert_matches(one, want[:1])
    assert_matches(five, want)
    np.testing.assert_allclose(one[0], five[0], atol=1e-5)
    ids, lengths = tokens(full_dir, CAPTIONS[:1])
    assert_matches(TextEncoder(full_dir).encode(ids, lengths), torch_text(full_model, ids))


# --- pretrained path -----------------------------------------------------------------------------------


TINY_ARCH = Architecture("tiny-test", TINY_DIMS, hf_repo="example/tiny-test")


def test_pretrained_from_save_pretrained_dir(tiny_model: CLIPModel, tokenizer_json: str,
                                             tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path / "checkpoint")
    manifest = export_pretrained(tmp_path / "out", arch=TINY_ARCH, from_local=tmp_path / "checkpoint",
                                 tokenizer_json=tokenizer_json, progress=lambda _: None)
    assert manifest.model_id == "clip/tiny-test"
    assert manifest.provenance["source"] == "pretrained" and manifest.provenance["pretrained"] == "openai"
    assert manifest.provenance["hf_repo"] == "example/tiny-test"
    model_dir = ModelDir.open(tmp_path / "out", verify_checksums=True)
    pixels = pixels_for(model_dir, 3)
    assert_matches(ImageEncoder(model_dir).encode(pixels), torch_image(tiny_model, pixels))
    ids, lengths = tokens(model_dir, CAPTIONS)
    assert_matches(TextEncoder(model_dir).encode(ids, lengths), torch_text(tiny_model, ids))


def test_pretrained_checks_the_architecture(tiny_model: CLIPModel, tmp_path: Path) -> None:
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(PretrainedUnavailable, match=r"not a ViT-B-32 checkpoint .*vision_width: 64 != 768"):
        load_pretrained(get_architecture("ViT-B-32"), from_local=tmp_path)
    with pytest.raises(PretrainedUnavailable, match=r"no config\.json"):
        load_pretrained(TINY_ARCH, from_local=tmp_path / "missing")


def test_pretrained_offline_error_names_the_way_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import clip_export.pretrained as pretrained

    probes: list[str] = []

    def unreachable(endpoint: str, timeout: float = 3.0) -> bool:
        probes.append(endpoint)
        return False

    monkeypatch.setattr(pretrained, "hub_reachable", unreachable)
    message = r"cannot download openai/clip-vit-base-patch32: no network.*--from-local DIR"
    with pytest.raises(PretrainedUnavailable, match=message):
        load_pretrained(get_architecture("ViT-B-32"), cache_dir=tmp_path)  # empty cache: must try the Hub
    assert len(probes) == 1


def test_cli_reports_errors_without_a_trace(tiny_model: CLIPModel, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from clip_export.__main__ import main

    tiny_model.save_pretrained(tmp_path / "checkpoint")
    capsys.readouterr()  # drop save_pretrained's progress bar
    code = main(["pretrained", "--arch", "ViT-B-32", "--from-local", str(tmp_path / "checkpoint"),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err  # transformers' loading progress bar, then our message
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ") and "not a ViT-B-32 checkpoint" in last
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_failed_export_keeps_the_previous_directory(tiny_model: CLIPModel, tiny_dir: ModelDir,
                                                    tmp_path: Path) -> None:
    import shutil

    out = tmp_path / "model"
    shutil.copytree(tiny_dir.path, out)
    before = sorted(p.name for p in tmp_path.iterdir())

    def fail(message: str) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        export_model_dir(tiny_model, out, model_id="clip/tiny", provenance={}, tokenizer_json="{}",
                         progress=fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no staging directory left behind
    with pytest.raises(ValueError, match="tokenizer_json is empty"):
        export_model_dir(tiny_model, out, model_id="clip/tiny", provenance={}, tokenizer_json=" ", progress=fail)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    ModelDir.open(out, verify_checksums=True)
    (tmp_path / "not-a-model").mkdir()
    (tmp_path / "not-a-model" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_model_dir(tiny_model, tmp_path / "not-a-model", model_id="clip/tiny", provenance={},
                         tokenizer_json="{}", progress=lambda _: None)
    assert (tmp_path / "not-a-model" / "notes.txt").read_text() == "mine"
