"""`sam build` output, run as Lambda runs it: the project's `sam local invoke` without Docker.

A session fixture runs `sam validate`-checked `sam build` into build/sam-test/ (python3.12, the layers'
Makefiles; ~3 s when build/layer-cache/ is warm, ~30 s on a fresh clone). Each function then runs in a
fresh python3.12 process under AWS's runtime client (awslambdaric) against the Runtime API stand-in,
with the embedding cache on a moto S3 server and the API key in moto's SSM.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clip_serverless.api.endpoints import REGISTRY, endpoint

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra"))

from lambda_runtime import (  # noqa: E402
    LAMBDA_UNZIPPED_LIMIT,
    BuiltApp,
    LambdaService,
    LocalLambda,
    LocalLambdaError,
    built_function,
    find_python,
    plain_cold_start,
)
from lambda_runtime.image_layout import Dockerfile, assemble, image_function  # noqa: E402

from tests.lambda_events import http_api_event  # noqa: E402

pytestmark = [pytest.mark.sam, pytest.mark.lambda312]  # sam build, then the functions under python3.12
EVENTS = REPO / "events"
TEST_BUILD = REPO / "build" / "sam-test"
MiB = 1024 * 1024
FUNCTIONS = {spec.name: spec.function for spec in REGISTRY}  # every endpoint's function
# The CLIP endpoints (Roboflow's API), whose answers are compared with the app's /clip/<endpoint>.
ENDPOINTS = {name: function for name, function in FUNCTIONS.items() if endpoint(name).api == "roboflow"}
# The functions others ask for vectors through Invoke (compare: embed_text; embeddings: embed_image).
INVOKED = sorted({endpoint(spec.invokes.endpoint).function for spec in REGISTRY if spec.invokes is not None})
BUCKET = "clip-cache-test"
PREFIX = "embeddings/"
SSM_KEY_NAME = "/clip-serverless/api-key"
API_KEY = "test-key-5f1c"


def model_src() -> Path:
    raw = os.environ.get("CLIP_MODEL_SRC") or "models/clip-tiny"
    path = Path(raw) if Path(raw).is_absolute() else REPO / raw
    assert (path / "manifest.json").exists(), f"model directory {path} is missing (CLIP_MODEL_SRC)"
    return path


def sam_cli() -> str:
    candidate = os.environ.get("CLIP_SAM") or str(REPO / ".venv-sam" / "bin" / "sam")
    assert Path(candidate).exists() or shutil.which(candidate), \
        f"AWS SAM CLI not found at {candidate}: `make sam-setup` installs it into .venv-sam"
    return candidate


@pytest.fixture(scope="session")
def lambda_python() -> str:
    return find_python()


@pytest.fixture(scope="session")
def sam_env(lambda_python: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """`sam build` needs python3.12 on PATH: a directory with just that link, first on PATH."""
    bin_dir = tmp_path_factory.mktemp("py312-bin")
    (bin_dir / "python3.12").symlink_to(lambda_python)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_PROFILE")}
    env.update({"PATH": f"{bin_dir}:{env.get('PATH', '')}", "SAM_CLI_TELEMETRY": "0",
                "AWS_DEFAULT_REGION": "us-east-1", "CLIP_MODEL_SRC": str(model_src()),
                "CLIP_LAMBDA_PYTHON": lambda_python})
    return env


def run_sam(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sam_cli(), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def built(sam_env: dict[str, str]) -> BuiltApp:
    build_dir = TEST_BUILD / "build"
    start = time.perf_counter()
    done = run_sam(sam_env, "build", "--template", "template.yaml", "--build-dir", str(build_dir))
    assert done.returncode == 0, f"sam build failed:\n{done.stdout}\n{done.stderr}"
    print(f"\nsam build: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return BuiltApp(build_dir)


# ---- validate, build, sizes ----------------------------------------------------------------------
@pytest.mark.parametrize("template", ["template.yaml", "template.image.yaml"])
@pytest.mark.parametrize("lint", [False, True], ids=["transform", "lint"])
def test_sam_validate(sam_env: dict[str, str], template: str, lint: bool) -> None:
    done = run_sam(sam_env, "validate", "--template", template, *(["--lint"] if lint else []))
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "is a valid SAM Template" in done.stdout + done.stderr


def test_build_has_every_function_and_layer(built: BuiltApp) -> None:
    bulk = {"BulkJobFunction", "BulkEmbedImageFunction", "BulkEmbedTextFunction"}  # bulk embedding's
    assert set(built.functions) == set(FUNCTIONS.values()) | bulk
    for fn in built.functions.values():
        assert (fn.code / "app.py").exists()
        assert all(layer.path.is_dir() for layer in fn.layers)


def test_every_function_with_its_layers_fits_lambdas_unzipped_limit(built: BuiltApp) -> None:
    assert 250 * MiB == LAMBDA_UNZIPPED_LIMIT
    sizes = {name: fn.unzipped_bytes() for name, fn in built.functions.items()}
    print("\n" + "\n".join(f"{name}: {size / MiB:.1f} MiB" for name, size in sizes.items()), file=sys.stderr)
    over = {name: f"{size / MiB:.1f} MiB" for name, size in sizes.items() if size > LAMBDA_UNZIPPED_LIMIT}
    assert not over, f"over Lambda's 250 MiB (function + layers, unzipped): {over}"


def test_dependency_layers_are_slimmed_and_precompiled(built: BuiltApp) -> None:
    for name in ("DepsTextLayer", "DepsImageLayer", "DepsAllLayer"):
        site = built.layers[name].path / "python"
        assert (site / "onnxruntime" / "capi").is_dir()
        assert not list((site / "onnxruntime" / "capi").glob("libonnxruntime.so*"))
        for unwanted in ("huggingface_hub", "hf_xet", "google", "boto3", "onnxruntime/transformers"):
            assert not (site / unwanted).exists(), f"{name}: {unwanted} should not be shipped"
        assert not list(site.rglob("tests")), f"{name}: test suites shipped"
        pyc = site / "numpy" / "__pycache__" / "__init__.cpython-312.pyc"
        flags = struct.unpack("<I", pyc.read_bytes()[4:8])[0]
        assert flags == 0b01, "expected an unchecked-hash .pyc (PEP 552): /opt is read-only, mtimes unreliable"
    assert not (built.layers["DepsTextLayer"].path / "python" / "PIL").exists()
    assert not (built.layers["DepsImageLayer"].path / "python" / "tokenizers").exists()


# ---- running the built functions -----------------------------------------------------------------
@pytest.fixture(scope="session")
def moto_endpoint(moto_server: str) -> str:
    import boto3

    kwargs: dict[str, Any] = {"endpoint_url": moto_server, "region_name": "us-east-1"}
    boto3.client("s3", **kwargs).create_bucket(Bucket=BUCKET)
    boto3.client("ssm", **kwargs).put_parameter(Name=SSM_KEY_NAME, Value=API_KEY, Type="SecureString")
    return moto_server


def s3_keys(endpoint: str) -> list[str]:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    return [o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]


@pytest.fixture(scope="module")
def lambda_service(built: BuiltApp, moto_endpoint: str, lambda_python: str) -> Iterator[LambdaService]:
    """Lambda's Invoke API serving the built functions that others invoke: EmbedTextFunction (compare's text
    vectors) and EmbedImageFunction (embeddings' image vectors)."""
    with LambdaService() as service:
        for name in INVOKED:
            spec = built_function(built, name, resources={"CacheBucket": BUCKET}, parameters={"CachePrefix": PREFIX})
            service.register(spec, python=lambda_python, env={"CLIP_CACHE_S3_ENDPOINT_URL": moto_endpoint})
        yield service


@pytest.fixture(scope="module")
def functions(built: BuiltApp, moto_endpoint: str, lambda_python: str, lambda_service: LambdaService,
              tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalLambda]]:
    """One execution environment per function, started once for this module (cold start each)."""
    running = {}
    try:
        for name, function in FUNCTIONS.items():
            spec = built_function(built, function, resources={"CacheBucket": BUCKET},
                                  parameters={"CachePrefix": PREFIX})
            fn = LocalLambda(spec, tmp_path_factory.mktemp(name), python=lambda_python,
                             env={"CLIP_CACHE_S3_ENDPOINT_URL": moto_endpoint,
                                  "AWS_ENDPOINT_URL_LAMBDA": lambda_service.endpoint_url})
            fn.start()
            running[name] = fn
        yield running
    finally:
        for fn in running.values():
            fn.stop()


def event(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / f"{name}.json").read_text()))


def body_of(response: dict[str, Any]) -> Any:
    body = response["body"]
    return json.loads(base64.b64decode(body) if response.get("isBase64Encoded") else body)


def request_body(evt: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(evt["body"]) if evt.get("isBase64Encoded") else evt["body"])


@pytest.fixture(scope="module")
def in_process() -> Iterator[Any]:
    """The same app in this test process (Python 3.11, the dev venv's packages): the reference answer."""
    from clip_serverless.api.app import build
    from fastapi.testclient import TestClient

    saved = dict(os.environ)
    os.environ.update({"CLIP_MODEL_DIR": str(model_src()), "CLIP_CACHE": "off"})
    for key in ("CLIP_API_KEY", "CLIP_API_KEY_SSM_PARAMETER", "CLIP_API_KEY_SECRET_ID"):
        os.environ.pop(key, None)
    try:
        with TestClient(build()) as client:
            yield client
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.mark.parametrize("payload", ["http-api", "rest-api"])
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_built_function_answers_like_the_app(functions: dict[str, LocalLambda], in_process: Any,
                                             endpoint: str, payload: str) -> None:
    evt = event(f"{endpoint}.{payload}")
    response = functions[endpoint].invoke_json(evt)
    assert response["statusCode"] == 200, response
    got = body_of(response)
    want = in_process.post(f"/clip/{endpoint}", json=request_body(evt)).json()
    key = "similarity" if endpoint == "compare" else "embeddings"
    assert len(got[key]) == len(want[key]) > 0
    tolerance = 1e-4
    if endpoint == "compare":
        assert got[key] == pytest.approx(want[key], abs=tolerance)
    else:
        for a, b in zip(got[key], want[key], strict=True):
            assert len(a) == len(b) and a == pytest.approx(b, abs=tolerance)


# What a function imports at init, probed in a plain python3.12 over its layout (PYTHONDONTWRITEBYTECODE: as on
# Lambda, where /opt is read-only, a module without a shipped .pyc is compiled at every cold start).
INIT_PROBE = """
import importlib, importlib.util, json, os, sys
opt = sys.argv[1]
importlib.import_module("app")
files = {name: getattr(module, "__file__", None) or "" for name, module in list(sys.modules.items())}
print(json.dumps({
    "without_pyc": sorted(name for name, f in files.items() if f.startswith(opt) and f.endswith(".py")
                          and not os.path.exists(importlib.util.cache_from_source(f))),
    "modules": sorted(name for name, module in sys.modules.items() if module is not None),
}))
"""


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_a_function_imports_only_precompiled_modules_and_no_boto3_at_init(built: BuiltApp, moto_endpoint: str,
                                                                          lambda_python: str, tmp_path: Path,
                                                                          name: str) -> None:
    spec = built_function(built, FUNCTIONS[name], resources={"CacheBucket": BUCKET}, parameters={"CachePrefix": PREFIX})
    fn = LocalLambda(spec, tmp_path, python=lambda_python, env={"CLIP_CACHE_S3_ENDPOINT_URL": moto_endpoint})
    try:
        env = {**fn.prepare(), "PYTHONDONTWRITEBYTECODE": "1"}
    finally:
        fn.stop()
    done = subprocess.run([lambda_python, "-c", INIT_PROBE, str(tmp_path / "opt")], cwd=spec.code, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["without_pyc"] == []
    modules = set(probe["modules"])
    assert "boto3" not in modules  # botocore alone (clip_serverless.aws_clients), where a client is needed
    assert "pydantic.v1" not in modules  # FastAPI's check for v1 models, skipped (entry.without_pydantic_v1)
    assert {"clip_serverless.api.app", "fastapi", "mangum"} <= modules  # FastAPI and Mangum still serve


def test_the_plain_runner_answers_as_the_runtime_client(built: BuiltApp, lambda_python: str, tmp_path: Path) -> None:
    spec = built_function(built, FUNCTIONS["embed_text"], resources={"CacheBucket": ""})
    seconds, response = plain_cold_start(spec, event("embed_text.http-api"), tmp_path / "plain",
                                         python=lambda_python, env={"CLIP_CACHE": "off"})
    assert response["statusCode"] == 200 and len(body_of(response)["embeddings"]) == 2
    assert 0 < seconds < 60


def test_health_route_names_the_model_and_the_loaded_tower(functions: dict[str, LocalLambda]) -> None:
    response = functions["embed_text"].invoke_json(event("healthz.http-api"))
    assert response["statusCode"] == 200
    health = body_of(response)
    manifest = json.loads((model_src() / "manifest.json").read_text())
    assert health["model_id"] == manifest["model_id"]
    assert health["loaded"] == ["textual"] and health["endpoints"] == ["/clip/embed_text"]


def test_compare_loads_one_tower_and_gets_text_vectors_from_embed_text(functions: dict[str, LocalLambda],
                                                                      lambda_service: LambdaService) -> None:
    pool = lambda_service.pools["EmbedTextFunction"]
    before = pool.invocations
    evt = event("compare.http-api")
    body = request_body(evt)
    # New prompts (and no cache) so that the text vectors cannot come from compare's cache tiers.
    fresh = {**body, "prompt": [f"{p} number {before}" for p in body["prompt"]]}
    no_cache = {**evt, "body": json.dumps(fresh), "isBase64Encoded": False,
                "headers": {**evt["headers"], "cache-control": "no-cache"}}
    response = functions["compare"].invoke_json(no_cache)
    assert response["statusCode"] == 200, response
    assert len(body_of(response)["similarity"]) == len(body["prompt"])
    assert pool.invocations == before + 1  # one Invoke for all the prompts
    # compare's own process holds the image tower only (its app answers /healthz too, unrouted on AWS).
    health = body_of(functions["compare"].invoke_json(event("healthz.http-api")))
    assert health["loaded"] == ["visual"] and health["endpoints"] == ["/clip/compare"]


def test_embeddings_answers_text_itself_and_images_through_embed_image(functions: dict[str, LocalLambda],
                                                                      lambda_service: LambdaService,
                                                                      in_process: Any) -> None:
    """OpenAI's /v1/embeddings: texts on the built function's own text tower, images from the built
    embed_image through the local Invoke API, both as the app in this process answers them."""
    evt = event("embeddings.http-api")
    response = functions["embeddings"].invoke_json(evt)
    assert response["statusCode"] == 200, response
    want = in_process.post("/v1/embeddings", json=request_body(evt)).json()
    got = body_of(response)
    assert [d["index"] for d in got["data"]] == list(range(len(request_body(evt)["input"])))
    for a, b in zip(got["data"], want["data"], strict=True):
        assert a["embedding"] == pytest.approx(b["embedding"], abs=1e-5)
    assert got["usage"] == want["usage"] and got["model"] == want["model"]
    # An image: decoded and embedded by embed_image (one Invoke), L2-normalised here.
    pool = lambda_service.pools["EmbedImageFunction"]
    before = pool.invocations
    png = request_body(event("compare.http-api"))["subject"]["value"]
    image = {"input": [f"data:image/png;base64,{png}"], "modality": "image", "encoding_format": "float"}
    no_cache = {**evt, "body": json.dumps(image), "isBase64Encoded": False,
                "headers": {**evt["headers"], "cache-control": "no-cache"}}
    response = functions["embeddings"].invoke_json(no_cache)
    assert response["statusCode"] == 200, response
    assert pool.invocations == before + 1
    want = in_process.post("/v1/embeddings", json=image).json()
    assert body_of(response)["data"][0]["embedding"] == pytest.approx(want["data"][0]["embedding"], abs=1e-5)
    # A bad image: embed_image's 400, in OpenAI's shape.
    bad = {**no_cache, "body": json.dumps({**image, "input": ["data:image/png;base64,aGVsbG8="]})}
    response = functions["embeddings"].invoke_json(bad)
    assert response["statusCode"] == 400
    assert body_of(response)["error"]["message"].startswith("Could not load input image. Cause: ")
    # The function holds the text tower only; GET /v1/models is routed to it too.
    health = body_of(functions["embeddings"].invoke_json(event("healthz.http-api")))
    assert health["loaded"] == ["textual"] and health["endpoints"] == ["/v1/embeddings", "/v1/models"]
    models = functions["embeddings"].invoke_json(http_api_event("GET", "/v1/models"))
    assert models["statusCode"] == 200 and body_of(models)["data"][0]["id"] == want["model"]


# ---- compare and the text function: failures and bursts ------------------------------------------
def _headers(response: dict[str, Any]) -> dict[str, str]:
    return {k.lower(): v for k, v in (response.get("headers") or {}).items()}


@pytest.fixture(scope="module")
def faulty(built: BuiltApp, lambda_python: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LambdaService, LocalLambda]]:
    """A compare environment whose embed_text can be made to throttle, fail or answer late."""
    with LambdaService() as service:
        service.register(built_function(built, "EmbedTextFunction", resources={"CacheBucket": ""}),
                         python=lambda_python)
        spec = built_function(built, "CompareFunction", resources={"CacheBucket": ""})
        env = {"AWS_ENDPOINT_URL_LAMBDA": service.endpoint_url, "CLIP_TEXT_FUNCTION_TIMEOUT": "2", "CLIP_CACHE": "off"}
        with LocalLambda(spec, tmp_path_factory.mktemp("compare-faulty"), python=lambda_python, env=env) as fn:
            yield service, fn


@pytest.mark.parametrize(("fault", "status"), [("throttle", 503), ("error", 502), ("slow", 504), (None, 200)])
def test_compare_maps_text_function_failures_to_clear_answers(faulty: tuple[LambdaService, LocalLambda],
                                                              fault: str | None, status: int) -> None:
    service, compare = faulty
    faults = service.faults("EmbedTextFunction")
    faults.throttle, faults.error, faults.delay_s = fault == "throttle", fault == "error", 4.0 * (fault == "slow")
    try:
        started = time.perf_counter()
        response = compare.invoke_json(event("compare.http-api"))
        elapsed = time.perf_counter() - started
    finally:
        faults.throttle, faults.error, faults.delay_s = False, False, 0.0
    assert response["statusCode"] == status, response
    body = body_of(response)
    if fault is None:
        assert len(body["similarity"]) == len(request_body(event("compare.http-api"))["prompt"])
        return
    assert "embedding function" in body["message"]
    assert "injected" not in body["message"]  # the text function's detail stays in the log
    if fault == "throttle":
        assert _headers(response)["retry-after"] == "1"
    if fault == "slow":  # answered when compare's own deadline passed, not when embed_text did
        assert "2 s" in body["message"] and elapsed < 4.0


def test_compare_refuses_vectors_of_another_model_during_a_deploy(built: BuiltApp, lambda_python: str,
                                                                  tmp_path: Path) -> None:
    """Mid-deploy, compare and embed_text may run different model versions: never mix their vectors."""
    import dataclasses

    text_layer = built.layers["ModelTextLayer"].path
    other = tmp_path / "ModelTextLayer-v2"  # embed_text's model layer as a redeploy would change it
    shutil.copytree(text_layer, other)
    manifest = json.loads((other / "model" / "manifest.json").read_text())
    manifest["model_id"] += "-v2"
    (other / "model" / "manifest.json").write_text(json.dumps(manifest))
    text_spec = built_function(built, "EmbedTextFunction", resources={"CacheBucket": ""})
    text_spec = dataclasses.replace(text_spec, layers=tuple(other if p == text_layer else p for p in text_spec.layers))
    assert other in text_spec.layers
    with LambdaService() as service:
        service.register(text_spec, python=lambda_python)
        spec = built_function(built, "CompareFunction", resources={"CacheBucket": ""})
        env = {"AWS_ENDPOINT_URL_LAMBDA": service.endpoint_url, "CLIP_CACHE": "off"}
        with LocalLambda(spec, tmp_path / "compare", python=lambda_python, env=env) as compare:
            response = compare.invoke_json(event("compare.http-api"))
    assert response["statusCode"] == 503, response
    assert "deployment is in progress" in body_of(response)["message"]
    assert _headers(response)["retry-after"] == "1"


def test_a_burst_of_cold_compare_and_embed_text_starts_all_answer(built: BuiltApp, lambda_python: str,
                                                                  tmp_path: Path) -> None:
    """Many cold inits at once: no init waits on a control-plane call, none fails, all answers agree."""
    burst = 6
    evt = event("compare.http-api")
    with LambdaService() as service:
        pool = service.register(built_function(built, "EmbedTextFunction", resources={"CacheBucket": ""}),
                                python=lambda_python, max_concurrency=burst, env={"CLIP_CACHE": "off"})
        spec = built_function(built, "CompareFunction", resources={"CacheBucket": ""})
        env = {"AWS_ENDPOINT_URL_LAMBDA": service.endpoint_url, "CLIP_CACHE": "off"}
        compares = [LocalLambda(spec, tmp_path / f"compare-{i}", python=lambda_python, env=env) for i in range(burst)]
        try:
            futures = [fn.api.submit(json.dumps(evt).encode()) for fn in compares]  # queued before init
            pool.prestart(burst)
            for fn in compares:
                fn.start()
            results = [future.result(timeout=120) for future in futures]
        finally:
            for fn in compares:
                fn.stop()
        assert pool.throttled == 0
    answers = [body_of(r.json()) for r in results]
    assert all(r.kind == "response" and r.json()["statusCode"] == 200 for r in results), answers
    assert all(a["similarity"] == pytest.approx(answers[0]["similarity"], abs=1e-6) for a in answers)


def test_embeddings_are_cached_in_s3_under_the_prefix(functions: dict[str, LocalLambda], moto_endpoint: str) -> None:
    functions["embed_image"].invoke_json(event("embed_image.http-api"))
    keys = s3_keys(moto_endpoint)
    assert any("/image/" in key for key in keys), keys
    assert keys and all(key.startswith(PREFIX) for key in keys)


def test_api_key_from_ssm_is_required_when_configured(built: BuiltApp, moto_endpoint: str, lambda_python: str,
                                                     tmp_path: Path) -> None:
    spec = built_function(built, "EmbedTextFunction", resources={"CacheBucket": ""},
                          parameters={"ApiKeySource": "ssm", "ApiKeyName": SSM_KEY_NAME})
    assert spec.environment["CLIP_API_KEY_SSM_PARAMETER"] == SSM_KEY_NAME
    with LocalLambda(spec, tmp_path, python=lambda_python, env={"AWS_ENDPOINT_URL_SSM": moto_endpoint}) as fn:
        evt = event("embed_text.http-api")
        body = request_body(evt)
        assert fn.invoke_json(evt)["statusCode"] == 401
        wrong = {**evt, "body": json.dumps({**body, "api_key": "nope"}), "isBase64Encoded": False}
        assert fn.invoke_json(wrong)["statusCode"] == 401
        right = {**evt, "body": json.dumps({**body, "api_key": API_KEY}), "isBase64Encoded": False}
        response = fn.invoke_json(right)
        assert response["statusCode"] == 200 and len(body_of(response)["embeddings"]) == len(body["text"])


def test_an_unreadable_api_key_fails_init_instead_of_serving_open(built: BuiltApp, moto_endpoint: str,
                                                                  lambda_python: str, tmp_path: Path) -> None:
    spec = built_function(built, "EmbedTextFunction", resources={"CacheBucket": ""},
                          parameters={"ApiKeySource": "ssm", "ApiKeyName": "/clip-serverless/missing"})
    with LocalLambda(spec, tmp_path, python=lambda_python, env={"AWS_ENDPOINT_URL_SSM": moto_endpoint}) as fn, \
            pytest.raises(LocalLambdaError, match="failed at init"):
        fn.invoke(event("embed_text.http-api"))


# ---- the container image's layout ----------------------------------------------------------------
def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching line wins; ``!`` re-includes."""
    import fnmatch

    allowed = True
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            allowed = negate
    return allowed


def test_container_image_layout_runs_compare(built: BuiltApp, lambda_python: str, tmp_path: Path,
                                             functions: dict[str, LocalLambda]) -> None:
    model = model_src()
    dockerfile = Dockerfile.parse(REPO / "Dockerfile", {"MODEL_DIR": str(model.relative_to(REPO))})
    assert dockerfile.base == "public.ecr.aws/lambda/python:3.12"
    assert any("requirements-all.txt" in run for run in dockerfile.runs)
    model_arg = dockerfile.args["MODEL_DIR"]
    for sources, _ in dockerfile.copies:
        for source in sources:
            assert source == model_arg or dockerignore_allows(source), f".dockerignore drops {source}"
    for documented in ("build/models/ViT-B-32", "models/clip-tiny"):
        assert dockerignore_allows(documented), f".dockerignore drops {documented}"
    assert not dockerignore_allows(".venv/lib") and not dockerignore_allows("build/layer-cache/x")
    root = assemble(dockerfile, tmp_path / "image", built.layers["DepsAllLayer"].path / "python")
    assert (root / "opt" / "model" / "visual.onnx").exists() and (root / "opt" / "model" / "textual.onnx").exists()
    assert (root / "var" / "task" / "clip_serverless" / "aws_lambda" / "entry.py").exists()
    spec = image_function(dockerfile, root, "CompareFunction", command="functions/compare/app.handler",
                          environment={"CLIP_CACHE": "off"})
    with LocalLambda(spec, tmp_path / "run", python=lambda_python) as fn:
        evt = event("compare.http-api")
        response = fn.invoke_json(evt)
    assert response["statusCode"] == 200
    zip_answer = body_of(functions["compare"].invoke_json(evt))
    assert body_of(response)["similarity"] == pytest.approx(zip_answer["similarity"], abs=1e-5)


# ---- the API key resolver (what the built functions call at init) --------------------------------
def test_api_key_resolution_order_and_stores(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from clip_serverless.aws_lambda.secrets import ApiKeyUnavailable, resolve_api_key
    from moto import mock_aws

    assert resolve_api_key({}) is None
    assert resolve_api_key({"CLIP_API_KEY": "direct", "CLIP_API_KEY_SSM_PARAMETER": "/x"}) == "direct"
    with mock_aws():
        boto3.client("ssm", region_name="us-east-1").put_parameter(Name="/k", Value="from-ssm", Type="SecureString")
        boto3.client("secretsmanager", region_name="us-east-1").create_secret(Name="k", SecretString="from-sm")
        monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        assert resolve_api_key({"CLIP_API_KEY_SSM_PARAMETER": "/k"}) == "from-ssm"
        assert resolve_api_key({"CLIP_API_KEY_SECRET_ID": "k"}) == "from-sm"
        with pytest.raises(ApiKeyUnavailable, match="CLIP_API_KEY_SSM_PARAMETER"):
            resolve_api_key({"CLIP_API_KEY_SSM_PARAMETER": "/absent"})
        with pytest.raises(ApiKeyUnavailable, match="not both"):
            resolve_api_key({"CLIP_API_KEY_SSM_PARAMETER": "/k", "CLIP_API_KEY_SECRET_ID": "k"})


# ---- bulk embedding's functions, built (README: Bulk embedding) -----------------------------------
def test_built_bulk_functions_plan_and_embed_a_shard_under_python312(built: BuiltApp, moto_endpoint: str,
                                                                     lambda_python: str, tmp_path: Path) -> None:
    """The job function runs on the core layer alone (no numpy); the image one on embed_image's layers."""
    import boto3

    from tests.test_bulk_job import image_bytes

    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="built-bulk")
    for i in range(3):
        s3.put_object(Bucket="built-bulk", Key=f"photos/{i}.png", Body=image_bytes(i))
    params = {"BulkSourceBucket": "built-bulk", "BulkSourcePrefix": "photos/", "BulkDestinationBucket": "built-bulk",
              "BulkDestinationPrefix": "out/", "CachePrefix": PREFIX}
    env = {"AWS_ENDPOINT_URL_S3": moto_endpoint, "CLIP_BULK_PLAN_MARGIN_S": "5"}  # the runner's 60 s, not 900
    job = {"src": "s3://built-bulk/photos/", "dst": "s3://built-bulk/out/run/", "batch_size": 2}
    with LocalLambda(built_function(built, "BulkJobFunction", resources={"CacheBucket": BUCKET}, parameters=params),
                     tmp_path / "job", python=lambda_python, env=env) as fn:
        planned = fn.invoke({"step": "plan", "input": {"job": job}}).json()
    assert planned["plan"]["listed"] == 3 and planned["job"]["src"] == job["src"]
    with LocalLambda(built_function(built, "BulkEmbedImageFunction", resources={"CacheBucket": BUCKET},
                                    parameters=params), tmp_path / "img", python=lambda_python, env=env) as fn:
        shard = fn.invoke({"shard": "000000", "batch": "out/run/_plan/batches/000000.jsonl", "count": 2,
                           "job": planned["job"]}).json()
    assert shard == {"shard": "000000", "skipped": False, "embedded": 2, "errors": 0}
    assert s3.head_object(Bucket="built-bulk", Key="out/run/img_emb/img_emb_000000.npy")["ContentLength"] > 0
