"""The OpenAI CLIP architectures as Hugging Face ``CLIPConfig``s, and where their weights live.

Dimensions are those of the released checkpoints' ``config.json`` (``openai/clip-vit-base-patch32``
etc.), including their legacy ``bos_token_id=0``/``eos_token_id=2``/``pad_token_id=1``: with
``eos_token_id == 2`` transformers pools the text tower at ``input_ids.argmax(-1)``, as OpenAI does.
The exported graph does its own argmax pooling anyway (see :mod:`clip_export.onnx_export`), so a
checkpoint with the newer ids exports identically.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
SOT_TOKEN = 49406
EOT_TOKEN = 49407  # the largest id in the vocabulary, which is what argmax pooling relies on
# OpenAI's normalisation constants (clip/clip.py, _transform).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipDims:
    """The numbers that define a CLIP ViT architecture (both towers and the joint projection)."""

    image_size: int
    patch_size: int
    vision_width: int
    vision_layers: int
    vision_heads: int
    vision_mlp: int
    text_width: int
    text_layers: int
    text_heads: int
    text_mlp: int
    embed_dim: int  # the joint embedding: projection_dim
    vocab_size: int = VOCAB_SIZE
    context_length: int = CONTEXT_LENGTH

    def to_config(self) -> CLIPConfig:
        """The Hugging Face config, with the token ids and settings of the released checkpoints."""
        text = {
            "vocab_size": self.vocab_size, "hidden_size": self.text_width, "intermediate_size": self.text_mlp,
            "num_hidden_layers": self.text_layers, "num_attention_heads": self.text_heads,
            "max_position_embeddings": self.context_length, "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5, "projection_dim": self.embed_dim,
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        }
        vision = {
            "image_size": self.image_size, "patch_size": self.patch_size, "hidden_size": self.vision_width,
            "intermediate_size": self.vision_mlp, "num_hidden_layers": self.vision_layers,
            "num_attention_heads": self.vision_heads, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
            "projection_dim": self.embed_dim,
        }
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.embed_dim,
                          logit_scale_init_value=2.6592)

    @classmethod
    def from_config(cls, config: CLIPConfig) -> ClipDims:
        """The dimensions of a loaded checkpoint's config (to check it is the architecture asked for)."""
        t, v = text_config(config), vision_config(config)
        return cls(
            image_size=_square(v.image_size), patch_size=_square(v.patch_size), vision_width=v.hidden_size,
            vision_layers=v.num_hidden_layers, vision_heads=v.num_attention_heads,
            vision_mlp=v.intermediate_size,
            text_width=t.hidden_size, text_layers=t.num_hidden_layers, text_heads=t.num_attention_heads,
            text_mlp=t.intermediate_size, embed_dim=embed_dim(config), vocab_size=t.vocab_size,
            context_length=t.max_position_embeddings,
        )

    def differences(self, other: ClipDims) -> list[str]:
        """``["image_size: 224 != 336", ...]`` for every field that differs."""
        return [f"{f.name}: {getattr(self, f.name)} != {getattr(other, f.name)}"
                for f in dataclasses.fields(self) if getattr(self, f.name) != getattr(other, f.name)]


def text_config(config: CLIPConfig) -> CLIPTextConfig:
    """``config.text_config``, typed (transformers annotates it as a union with dict and None)."""
    sub = config.text_config
    if not isinstance(sub, CLIPTextConfig):
        raise TypeError(f"expected a CLIPTextConfig, got {type(sub).__name__}")
    return sub


def vision_config(config: CLIPConfig) -> CLIPVisionConfig:
    """``config.vision_config``, typed."""
    sub = config.vision_config
    if not isinstance(sub, CLIPVisionConfig):
        raise TypeError(f"expected a CLIPVisionConfig, got {type(sub).__name__}")
    return sub


def _square(size: object) -> int:
    """A side length from an int or an (h, w) pair with h == w (CLIP's patches and images are square)."""
    if isinstance(size, int):
        return size
    if isinstance(size, list | tuple) and len(size) == 2 and size[0] == size[1] and isinstance(size[0], int):
        return size[0]
    raise ValueError(f"expected a square size, got {size!r}")


def image_size(config: CLIPConfig) -> int:
    return _square(vision_config(config).image_size)


def context_length(config: CLIPConfig) -> int:
    return int(text_config(config).max_position_embeddings)


def embed_dim(config: CLIPConfig) -> int:
    return int(config.projection_dim or 0)


@dataclass(frozen=True)
class Architecture:
    """One of our model versions: its API name, its dimensions and where the real weights are."""

    name: str  # the API's clip_version_id: "ViT-B-32"
    dims: ClipDims
    hf_repo: str  # "openai/clip-vit-base-patch32"
    pretrained: str = "openai"  # open_clip's pretrained tag

    @property
    def model_id(self) -> str:
        return f"clip/{self.name}"

    def config(self) -> CLIPConfig:
        return self.dims.to_config()


_B = {"text_width": 512, "text_layers": 12, "text_heads": 8, "text_mlp": 2048, "embed_dim": 512,
      "vision_width": 768, "vision_layers": 12, "vision_heads": 12, "vision_mlp": 3072}
_L = {"text_width": 768, "text_layers": 12, "text_heads": 12, "text_mlp": 3072, "embed_dim": 768,
      "vision_width": 1024, "vision_layers": 24, "vision_heads": 16, "vision_mlp": 4096}

ARCHITECTURES: dict[str, Architecture] = {
    a.name: a
    for a in (
        Architecture("ViT-B-32", ClipDims(224, 32, **_B), "openai/clip-vit-base-patch32"),
        Architecture("ViT-B-16", ClipDims(224, 16, **_B), "openai/clip-vit-base-patch16"),
        Architecture("ViT-L-14", ClipDims(224, 14, **_L), "openai/clip-vit-large-patch14"),
        Architecture("ViT-L-14-336px", ClipDims(336, 14, **_L), "openai/clip-vit-large-patch14-336"),
    )
}
DEFAULT_ARCHITECTURE = "ViT-B-32"

# A few-MB model for tests: real vocabulary and context (so the real tokenizer works), tiny towers.
TINY_DIMS = ClipDims(image_size=224, patch_size=32, vision_width=64, vision_layers=2, vision_heads=2,
                     vision_mlp=256, text_width=64, text_layers=2, text_heads=2, text_mlp=256, embed_dim=64)


def get_architecture(name: str) -> Architecture:
    """The architecture called ``name``; a ValueError lists the known names."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHITECTURES)}") from None


def clip_config(name: str = DEFAULT_ARCHITECTURE) -> CLIPConfig:
    """The ``CLIPConfig`` of a released architecture."""
    return get_architecture(name).config()


def tiny_dims(**overrides: int) -> ClipDims:
    """:data:`TINY_DIMS` with some fields replaced (``tiny_dims(text_layers=1)``)."""
    return dataclasses.replace(TINY_DIMS, **overrides)


def tiny_config(**overrides: int) -> CLIPConfig:
    """The ``CLIPConfig`` of :func:`tiny_dims` (field names as in :class:`ClipDims`)."""
    return tiny_dims(**overrides).to_config()
