"""The local server: all three routes plus docs and health on one port (``make serve``)."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from typing import Any
from urllib.parse import unquote_plus

from ..aws_lambda.secrets import ApiKeyUnavailable
from ..engine import SessionTuning
from ..service import ClipService, ModelDirError
from ..settings import Settings, SettingsError

EXPORT_HINT = ("make setup-dev && .venv/bin/python -m clip_export pretrained --arch ViT-B-32 "
               "--out build/models/ViT-B-32 --int8   (needs internet)")


# Both towers spin (ONNX Runtime's own default), and stop as soon as a run returns; a run that starts while
# another is in flight (uvicorn serves requests concurrently) takes a quiet session instead, where spinners would
# burn the cores both runs need (engine.alternates). CLIP_ORT_SPINNING=false: quiet sessions only.
# CLIP_NUM_THREADS and CLIP_ORT_* override it.
LOCAL_ENGINE = SessionTuning(spinning=True)


def local_service(settings: Settings) -> ClipService:
    """The service the local server runs: ``settings``, with :data:`LOCAL_ENGINE` where they leave a knob unset;
    spinning sessions give way to quiet ones when runs overlap."""
    engine = settings.engine.with_defaults(LOCAL_ENGINE)
    return ClipService.from_settings(settings, engine=engine, quiet_when_busy=bool(engine.spinning))


_QUERY = re.compile(r"\?([^\s\"']*)")


def _redact_params(query: str) -> str:
    parts = []
    for part in query.split("&"):
        name, sep, _value = part.partition("=")
        # Starlette reads the key by its decoded name, so `api%5Fkey=...` is a key too.
        parts.append(f"{name}=***" if sep and unquote_plus(name).lower() == "api_key" else part)
    return "&".join(parts)


def redact_api_key(text: str) -> str:
    """``text`` with the value of every ``api_key`` query parameter replaced by ``***``."""
    if "?" not in text:
        return text
    return _QUERY.sub(lambda match: "?" + _redact_params(match.group(1)), text)


class RedactApiKey(logging.Filter):
    """Keeps API keys sent as ``?api_key=...`` out of uvicorn's access log (the path is one of its args)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_api_key(arg) if isinstance(arg, str) else arg for arg in record.args)
        elif isinstance(record.msg, str) and not record.args:
            record.msg = redact_api_key(record.msg)
        return True


def server(app: Any, host: str, port: int) -> Any:
    """A uvicorn server for ``app`` whose access log never shows an API key."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level="info")  # configures uvicorn's loggers
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactApiKey) for f in access.filters):
        access.addFilter(RedactApiKey())
    return uvicorn.Server(config)


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
    parser.add_argument("--host", help="default: $HOST, else 127.0.0.1")
    parser.add_argument("--port", type=int, help="default: $PORT, else 9001")
    args = parser.parse_args(argv)
    try:
        from .app import build

        settings = Settings.from_env()  # every variable, checked before anything loads
        app = build(settings, service=local_service(settings))
    except (ModelDirError, SettingsError, ApiKeyUnavailable) as exc:
        print(f"clip-serverless: cannot start: {exc}", file=sys.stderr)
        return 2
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    service = app.state.service
    service.preload(("visual", "textual"))  # the first request should not pay for loading
    manifest = service.manifest
    print(banner(manifest.model_id, manifest.provenance, host, port), file=sys.stderr, flush=True)
    local = server(app, host, port)
    local.run()
    return 0 if local.started else 1  # as uvicorn.run: not started (e.g. the port is taken) is a failure


if __name__ == "__main__":
    sys.exit(main())
