"""Settings: every variable read once, at start, in one style; a bad value stops start-up naming the variable."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clip_serverless.aws_lambda import secrets
from clip_serverless.cache.config import CacheConfig
from clip_serverless.engine import DEFAULT_MAX_IMAGE_PIXELS, EngineSettings
from clip_serverless.settings import (
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_RESPONSE_BYTES,
    LambdaSettings,
    ServerSettings,
    Settings,
    SettingsError,
    TextFunctionSettings,
)

from tests.conftest import REPO
from tests.handlers import load_function

PACKAGE = REPO / "layers" / "core" / "clip_serverless"

# (variable, a bad value): every variable Settings parses itself, and some of cache.config's CLIP_CACHE*.
BAD_VALUES = [
    ("CLIP_MAX_BATCH_SIZE", "eight"),
    ("CLIP_MAX_BATCH_SIZE", "0"),
    ("CLIP_TEXT_BATCH_SIZE", "-4"),
    ("CLIP_TRUNCATE_TEXT", "maybe"),
    ("CLIP_MAX_BODY_BYTES", "6MB"),
    ("CLIP_MAX_RESPONSE_BYTES", "0"),
    ("CLIP_NUM_THREADS", "two"),
    ("CLIP_NUM_THREADS", "0"),
    ("CLIP_ORT_SPINNING", "sometimes"),
    ("CLIP_ORT_CPU_MEM_ARENA", "2"),
    ("CLIP_ORT_MEM_PATTERN", "yes please"),
    ("CLIP_MAX_IMAGE_PIXELS", "1e6"),
    ("CLIP_IMAGE_DECODE", "fast"),
    ("CLIP_TEXT_FUNCTION_TIMEOUT", "soon"),
    ("CLIP_TEXT_FUNCTION_TIMEOUT", "0"),
    ("CLIP_ALLOW_URL_INPUT", "perhaps"),
    ("CLIP_ALLOW_HTTP_URLS", "2"),
    ("CLIP_URL_CONNECT_TIMEOUT", "0"),
    ("CLIP_URL_READ_TIMEOUT", "-1"),
    ("CLIP_URL_TOTAL_TIMEOUT", "nan"),
    ("CLIP_URL_MAX_BYTES", "20MiB"),
    ("CLIP_URL_MAX_REDIRECTS", "-1"),
    ("CLIP_PRELOAD", "visul"),
    ("CLIP_PRELOAD", "visual,,textual"),
    ("PORT", "http"),
    ("PORT", "70000"),
    # parsed by cache.config, called by Settings.from_env: a sample, the cache's own tests cover the rest
    ("CLIP_CACHE", "maybe"),
    ("CLIP_CACHE_MEMORY_MB", "lots"),
    ("CLIP_CACHE_S3_BREAKER", "5"),
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tiny_model_path: Path) -> Iterator[pytest.MonkeyPatch]:
    """This process's environment without any of the service's variables, but the demo model's directory."""
    for name in list(os.environ):
        if name.startswith("CLIP_") or name in ("HOST", "PORT"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("CLIP_MODEL_DIR", str(tiny_model_path))
    monkeypatch.setenv("CLIP_CACHE", "off")
    yield monkeypatch


# -- a bad value stops start-up, naming the variable ------------------------------------------------------
@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_bad_value_is_a_settings_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=rf"^{name} "):
        Settings.from_env({"CLIP_MODEL_DIR": "m", name: value})


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_the_local_server_prints_it_and_exits_2(name: str, value: str, clean_env: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from clip_serverless.api.local import main

    clean_env.setenv(name, value)
    assert main([]) == 2
    assert re.search(rf"^clip-serverless: cannot start: {name} ", capsys.readouterr().err, re.MULTILINE)


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_a_lambda_function_fails_its_init(name: str, value: str, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(SettingsError, match=rf"^{name} "):
        load_function("embed_text")


def test_no_model_directory_is_a_clear_message(clean_env: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """The package knows no repository layout: `make serve` passes the demo model's directory."""
    from clip_serverless.api.local import main

    clean_env.delenv("CLIP_MODEL_DIR")
    assert main([]) == 2
    assert "cannot start: CLIP_MODEL_DIR is not set" in capsys.readouterr().err
    with pytest.raises(SettingsError, match=r"^CLIP_MODEL_DIR is not set.*make serve.*models/clip-tiny"):
        Settings.from_env({"CLIP_MODEL_DIR": "  "})
    makefile = (REPO / "Makefile").read_text()
    assert "CLIP_MODEL_DIR ?= models/clip-tiny" in makefile
    assert "CLIP_MODEL_DIR=$(CLIP_MODEL_DIR) $(PY) -m clip_serverless.api.local" in makefile


def test_both_key_stores_is_a_settings_error_naming_both(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_store(*_args: Any) -> Any:
        raise AssertionError("a store was read")

    monkeypatch.setattr(secrets, "_aws_client", no_store)
    env = {"CLIP_MODEL_DIR": "m", secrets.SSM_VARIABLE: "/k", secrets.SECRET_VARIABLE: "k"}
    with pytest.raises(SettingsError, match=f"{secrets.SSM_VARIABLE} and {secrets.SECRET_VARIABLE}, not both") as bad:
        Settings.from_env(env)
    assert isinstance(bad.value, secrets.ApiKeyUnavailable)  # what the key's readers have always caught


def test_the_key_store_is_read_only_after_every_other_value_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []

    def store(service: str, _retry: Any) -> Any:
        reads.append(service)
        raise AssertionError("no store in tests")

    monkeypatch.setattr(secrets, "_aws_client", store)
    env = {"CLIP_MODEL_DIR": "m", secrets.SECRET_VARIABLE: "k", "CLIP_URL_MAX_REDIRECTS": "many"}
    with pytest.raises(SettingsError, match="CLIP_URL_MAX_REDIRECTS"):
        Settings.from_env(env)
    assert reads == []


# -- defaults ---------------------------------------------------------------------------------------------
def test_defaults() -> None:
    settings = Settings.from_env({"CLIP_MODEL_DIR": "models/m"})
    assert settings == Settings(model_dir=Path("models/m"), cache=CacheConfig.from_env({}))
    assert settings.api_key is None
    assert (settings.max_batch_size, settings.text_batch_size, settings.truncate_text) == (8, 32, True)
    assert (settings.max_body_bytes, settings.max_response_bytes) == (DEFAULT_MAX_BODY_BYTES,
                                                                      DEFAULT_MAX_RESPONSE_BYTES)
    assert settings.engine == EngineSettings(threads=None, max_image_pixels=64_000_000)
    assert settings.url.enabled and not settings.url.policy.allow_http
    policy = settings.url.policy
    assert (policy.connect_timeout, policy.read_timeout, policy.total_timeout) == (3.0, 10.0, 15.0)
    assert (policy.max_bytes, policy.max_redirects) == (20 * 1024 * 1024, 3)
    assert settings.text_function is None
    assert settings.cache == CacheConfig.from_env({})
    assert settings.aws_lambda == LambdaSettings(preload=None, base_path="/")
    assert settings.server == ServerSettings(host="127.0.0.1", port=9001)


def test_values_reach_their_part() -> None:
    settings = Settings.from_env({
        "CLIP_MODEL_DIR": " /opt/model ", "CLIP_MAX_BATCH_SIZE": "4", "CLIP_TRUNCATE_TEXT": "false",
        "CLIP_API_KEY": "s3cret", "CLIP_NUM_THREADS": "3", "CLIP_MAX_IMAGE_PIXELS": "1000",
        "CLIP_ALLOW_HTTP_URLS": "yes", "CLIP_URL_MAX_REDIRECTS": "0", "CLIP_TEXT_FUNCTION": "embed-text:live",
        "CLIP_TEXT_FUNCTION_TIMEOUT": "2.5", "CLIP_CACHE": "off", "CLIP_PRELOAD": "Textual, visual",
        "CLIP_BASE_PATH": "/prod", "HOST": "0.0.0.0", "PORT": "8080",
    })
    assert settings.model_dir == Path("/opt/model")
    assert (settings.max_batch_size, settings.truncate_text, settings.api_key) == (4, False, "s3cret")
    assert settings.engine == EngineSettings(threads=3, max_image_pixels=1000)
    assert settings.url.policy.allow_http and settings.url.policy.max_redirects == 0
    assert settings.text_function == TextFunctionSettings("embed-text:live", 2.5)
    assert not settings.cache.enabled
    assert settings.aws_lambda == LambdaSettings(preload=("visual", "textual"), base_path="/prod")
    assert settings.server == ServerSettings(host="0.0.0.0", port=8080)


@pytest.mark.parametrize(("raw", "towers"), [("", None), ("none", ()), ("NONE", ()), ("visual", ("visual",)),
                                            ("textual,visual", ("visual", "textual"))])
def test_preload_names_towers_and_each_function_loads_only_its_own(raw: str, towers: Any) -> None:
    from clip_serverless.aws_lambda.entry import preload_for

    requested = LambdaSettings.from_env({"CLIP_PRELOAD": raw}).preload
    assert requested == towers
    assert preload_for("embed_text", requested) == (() if towers == ("visual",) or towers == () else ("textual",))
    assert preload_for("compare", None) == ("visual", "textual")


# -- one default for the image size limit ---------------------------------------------------------------
def test_one_default_for_the_image_size_limit(tiny_model_path: Path) -> None:
    from clip_serverless.engine.model_dir import ModelDir
    from clip_serverless.engine.preprocessing import decode_image
    from clip_serverless.service import ClipService

    assert DEFAULT_MAX_IMAGE_PIXELS == 64_000_000
    assert inspect.signature(decode_image).parameters["max_pixels"].default == DEFAULT_MAX_IMAGE_PIXELS
    assert EngineSettings().max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert Settings(model_dir=Path(".")).engine.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert Settings.from_env({"CLIP_MODEL_DIR": "m"}).engine.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert ClipService(ModelDir.open(tiny_model_path)).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    assert f"| `CLIP_MAX_IMAGE_PIXELS` | `{DEFAULT_MAX_IMAGE_PIXELS}` |" in (REPO / "README.md").read_text()
    literals = re.findall(r"\b(?:8192|64_?000_?000)\b", "".join(p.read_text() for p in PACKAGE.rglob("*.py")))
    assert literals == ["64_000_000"]  # the constant itself, nowhere else


# -- the engine and the service read no environment -------------------------------------------------------
def test_the_engine_takes_its_settings_as_parameters(clean_env: pytest.MonkeyPatch, tiny_model_path: Path) -> None:
    from clip_serverless.api.app import build
    from clip_serverless.engine.encoder import ImageEncoder, available_cpus
    from clip_serverless.engine.model_dir import ModelDir
    from clip_serverless.service import ClipService

    clean_env.setenv("CLIP_NUM_THREADS", "3")
    clean_env.setenv("CLIP_MAX_IMAGE_PIXELS", "5000")
    model_dir = ModelDir.open(tiny_model_path)
    library = ClipService(model_dir)  # no settings: the defaults, whatever the environment says
    assert library.image_encoder.threads == available_cpus() == ImageEncoder(model_dir).threads
    assert library.max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    served = build(Settings.from_env()).state.service  # the environment, through Settings
    assert served.image_encoder.threads == 3 == served.text_encoder.threads
    assert served.max_image_pixels == 5000
    ours = ClipService(model_dir, engine=EngineSettings(threads=1, max_image_pixels=10))
    assert (ours.image_encoder.threads, ours.max_image_pixels) == (1, 10)


def test_only_the_settings_module_reads_the_configuration() -> None:
    readers = [PACKAGE / "service.py", PACKAGE / "aws_lambda" / "entry.py",
               *(PACKAGE / "engine").glob("*.py"), *(PACKAGE / "api").glob("*.py")]
    for path in readers:
        assert not re.search(r"os\.environ|getenv", path.read_text()), path
    assert not (PACKAGE / "api" / "settings.py").exists()


def test_readme_lists_every_variable_settings_reads() -> None:
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Models")]
    documented = {name for name in re.findall(r"`((?:CLIP_[A-Z_]+)|HOST|PORT)`", table)
                  if not name.startswith("CLIP_CACHE")}
    source = (PACKAGE / "settings.py").read_text()
    parsed = set(re.findall(r'"((?:CLIP_[A-Z_]+)|HOST|PORT)"', source)) | set(secrets.VARIABLES)
    assert documented == parsed
