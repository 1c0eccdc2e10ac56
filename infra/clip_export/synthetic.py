"""A real CLIP architecture with seeded random weights: the offline stand-in for a pretrained checkpoint.

The weights are transformers' own initialisation (``CLIPPreTrainedModel._init_weights``) after
``torch.manual_seed(seed)``, so a seed reproduces them with the same torch and transformers versions
(recorded in the provenance). The embeddings mean nothing; sizes, speed and numerics are the real ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from clip_serverless.engine.model_dir import Manifest
from transformers import CLIPModel

from .architectures import DEFAULT_ARCHITECTURE, ClipDims, get_architecture
from .onnx_export import DEFAULT_OPSET, Progress, export_model_dir


def synthetic_model(dims: ClipDims, seed: int = 0) -> CLIPModel:
    """A ``CLIPModel`` of ``dims`` with weights drawn from ``seed``, in eval mode."""
    torch.manual_seed(seed)
    model = CLIPModel(dims.to_config())
    model.train(False)
    return model


def synthetic_provenance(arch: str, seed: int) -> dict[str, Any]:
    import transformers

    return {"source": "synthetic", "architecture": arch, "seed": seed,
            "note": "random weights (transformers' initialisation): real shapes and speed, "
                    "meaningless embeddings",
            "torch": torch.__version__, "transformers": transformers.__version__}


def export_synthetic(
    out_dir: Path,
    *,
    arch: str = DEFAULT_ARCHITECTURE,
    seed: int = 0,
    tokenizer_json: str | Path,
    opset: int = DEFAULT_OPSET,
    progress: Progress = print,
) -> Manifest:
    """Build the seeded ``arch`` model and export it as ``clip/<arch>`` (provenance says synthetic)."""
    architecture = get_architecture(arch)
    progress(f"building {arch} with seeded weights (seed {seed}) ...")
    model = synthetic_model(architecture.dims, seed)
    return export_model_dir(model, out_dir, model_id=architecture.model_id,
                            provenance=synthetic_provenance(arch, seed), tokenizer_json=tokenizer_json,
                            opset=opset, progress=progress)
