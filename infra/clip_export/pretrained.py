"""Export real pretrained CLIP weights: from the Hugging Face Hub, or from a ``save_pretrained`` directory.

The Hub needs a network; without one this fails in a few seconds with a message that says so and
names the offline route (``--from-local DIR``), instead of transformers' retries and stack trace.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from clip_serverless.engine.model_dir import Manifest
from transformers import CLIPModel

from .architectures import DEFAULT_ARCHITECTURE, Architecture, ClipDims, get_architecture
from .onnx_export import DEFAULT_OPSET, Progress, export_model_dir


class PretrainedUnavailable(RuntimeError):
    """The weights cannot be loaded (no network, not cached, not a checkpoint directory)."""


def hub_endpoint() -> str:
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the Hub? (DNS failure or no route: False, quickly.)"""
    url = urlparse(endpoint)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _from_pretrained(source: str | Path, **kwargs: Any) -> CLIPModel:
    model: CLIPModel = CLIPModel.from_pretrained(source, dtype=torch.float32, **kwargs)
    model.train(False)
    return model


def load_pretrained(
    arch: Architecture,
    *,
    from_local: Path | None = None,
    cache_dir: Path | None = None,
    probe_timeout: float = 3.0,
) -> CLIPModel:
    """The pretrained ``CLIPModel`` for ``arch``, checked to have ``arch``'s dimensions.

    ``from_local``: a directory written by ``CLIPModel.save_pretrained`` (no network used). Otherwise
    ``arch.hf_repo`` from the Hugging Face cache (``cache_dir`` or the default), downloading it if the
    Hub is reachable. Raises :class:`PretrainedUnavailable` with an explanation, never a raw trace.
    """
    if from_local is not None:
        if not (Path(from_local) / "config.json").is_file():
            raise PretrainedUnavailable(f"{from_local} is not a checkpoint directory (no config.json); "
                                        "write one with CLIPModel.save_pretrained")
        try:
            model = _from_pretrained(Path(from_local), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise PretrainedUnavailable(f"cannot load {from_local}: {exc}") from None
        source = str(from_local)
    else:
        model = _load_from_hub(arch.hf_repo, cache_dir=cache_dir, probe_timeout=probe_timeout)
        source = arch.hf_repo
    differences = ClipDims.from_config(model.config).differences(arch.dims)
    if differences:
        raise PretrainedUnavailable(f"{source} is not a {arch.name} checkpoint (checkpoint vs expected: "
                                    + ", ".join(differences) + ")")
    return model


def _load_from_hub(repo: str, *, cache_dir: Path | None, probe_timeout: float) -> CLIPModel:
    from huggingface_hub.errors import HfHubHTTPError

    try:  # cached already: no network needed
        return _from_pretrained(repo, cache_dir=cache_dir, local_files_only=True)
    except OSError:
        pass
    endpoint = hub_endpoint()
    if not hub_reachable(endpoint, probe_timeout):
        raise PretrainedUnavailable(f"cannot download {repo}: no network ({endpoint} is unreachable) and "
                                    "it is not in the Hugging Face cache; pass --from-local DIR with a "
                                    "directory written by CLIPModel.save_pretrained")
    try:
        return _from_pretrained(repo, cache_dir=cache_dir)
    except (OSError, HfHubHTTPError) as exc:
        raise PretrainedUnavailable(f"cannot download {repo} from {endpoint}: {exc}; "
                                    "pass --from-local DIR to export a local copy") from None


def pretrained_provenance(arch: Architecture, *, from_local: bool) -> dict[str, Any]:
    provenance: dict[str, Any] = {"source": "pretrained", "pretrained": arch.pretrained,
                                  "hf_repo": arch.hf_repo}
    if from_local:
        provenance["loaded_from"] = "local save_pretrained directory"
    return provenance


def export_pretrained(
    out_dir: Path,
    *,
    arch: str | Architecture = DEFAULT_ARCHITECTURE,
    from_local: Path | None = None,
    tokenizer_json: str | Path,
    cache_dir: Path | None = None,
    opset: int = DEFAULT_OPSET,
    progress: Progress = print,
) -> Manifest:
    """Load the pretrained weights of ``arch`` and export them as ``clip/<arch>``."""
    architecture = get_architecture(arch) if isinstance(arch, str) else arch
    progress(f"loading {architecture.name} weights from {from_local or architecture.hf_repo} ...")
    model = load_pretrained(architecture, from_local=from_local, cache_dir=cache_dir)
    return export_model_dir(model, out_dir, model_id=architecture.model_id,
                            provenance=pretrained_provenance(architecture, from_local=from_local is not None),
                            tokenizer_json=tokenizer_json, opset=opset, progress=progress)
