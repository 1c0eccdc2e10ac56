"""The local server: all three routes plus docs and health on one port (``make serve``)."""

from __future__ import annotations

import argparse
import os
import sys

from ..core.model_dir import ModelDirError
from .settings import Settings, SettingsError

EXPORT_HINT = ("make setup-dev && .venv/bin/python -m clip_export pretrained --arch ViT-B-32 "
               "--out build/models/ViT-B-32 --int8   (needs internet)")


def banner(model_id: str, provenance: dict[str, object], host: str, port: int) -> str:
    lines = [f"clip-serverless: serving {model_id} on http://{host}:{port} (docs: /docs, health: /healthz)"]
    if provenance.get("source") != "pretrained":
        rule = "!" * 100
        lines = [rule,
                 f"!! DEMO MODEL: {model_id} ({provenance.get('source')}) is not OpenAI's CLIP.",
                 f"!! {provenance.get('note', 'It exists for tests and demos only.')}",
                 "!! For real CLIP, export the weights where you have internet and point CLIP_MODEL_DIR at them:",
                 f"!!   {EXPORT_HINT}",
                 "!!   CLIP_MODEL_DIR=build/models/ViT-B-32 make serve",
                 rule, *lines]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "9001")))
    args = parser.parse_args(argv)
    try:
        from .app import build

        settings = Settings.from_env()
        app = build(settings)
    except (ModelDirError, SettingsError) as exc:
        print(f"clip-serverless: cannot start: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    service = app.state.service
    service.preload(("visual", "textual"))  # the first request should not pay for loading
    manifest = service.manifest
    print(banner(manifest.model_id, manifest.provenance, args.host, args.port), file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
