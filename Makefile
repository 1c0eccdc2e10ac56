# clip-serverless: every target sets up what it needs. `make serve` and `make test` work on a fresh machine.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
SDK_VENV := .venv-sdk
PORT ?= 9001
HOST ?= 127.0.0.1
CLIP_MODEL_DIR ?= models/clip-tiny
# The reference tokenizer and the BPE merges file ship in these packages; --no-deps keeps torchvision
# (and with it a multi-GB CUDA torch) out of the environment.
NO_DEPS_PKGS := open_clip_torch==3.3.0 clip-anytorch==2.6.0
SDK_PKGS := inference-sdk==1.8.3
SAM_VENV := .venv-sam
SAM := $(SAM_VENV)/bin/sam
export SAM_CLI_TELEMETRY := 0
export AWS_DEFAULT_REGION ?= us-east-1
# python3.12 on PATH for `sam build` (Lambda's runtime); pyenv ignores versions it does not have.
export PYENV_VERSION ?= 3.11.7:3.12.1
CLIP_MODEL_SRC ?= models/clip-tiny
FUNCTION ?= EmbedTextFunction
EVENT ?= events/embed_text.http-api.json

.PHONY: help serve test test-fast check lint bench bench-cold-start bench-cost bench-memory bench-roboflow bench-engine bench-imports models-b32 setup setup-test setup-dev clean \
	sam-setup sam-validate sam-build sam-deploy sam-invoke sam-sizes

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip

# Runtime only: what the local server needs (no torch).
$(VENV)/.serve: pyproject.toml | $(VENV)/bin/python
	$(PIP) install -e '.[serve]'
	@touch $@

# The light test environment (`make test-fast`): test tools, linters and stubs, the references that need no
# torch (transformers' image processor, scikit-image's photos, the reference tokenizers).
$(VENV)/.test: pyproject.toml $(VENV)/.serve
	$(PIP) install -e '.[serve,test]'
	$(PIP) install --no-deps $(NO_DEPS_PKGS)
	@touch $@

# Everything the tests need: the above, export tooling (torch CPU, pinned). The SDK venv is its own target.
$(VENV)/.dev: pyproject.toml $(VENV)/.test
	$(PIP) install -e '.[serve,dev,export]'
	@touch $@

# Roboflow's client in its own venv: it pins numpy/pillow versions that would otherwise replace ours.
$(SDK_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(SDK_VENV)
	$(SDK_VENV)/bin/python -m pip --disable-pip-version-check -q install $(SDK_PKGS)
	@touch $@

# The AWS SAM CLI in its own venv: it pins boto3, jsonschema and others.
$(SAM_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(SAM_VENV)
	$(SAM_VENV)/bin/python -m pip --disable-pip-version-check -q install aws-sam-cli==1.170.0
	@touch $@

setup: $(VENV)/.serve ## create the runtime environment
setup-test: $(VENV)/.test ## the runtime + the light test environment (no torch, SDK or SAM venvs)
setup-dev: $(VENV)/.dev $(SDK_VENV)/.installed $(SAM_VENV)/.installed ## create the full development environment

serve: $(VENV)/.serve ## run the API locally on $(HOST):$(PORT) (model: CLIP_MODEL_DIR, default the demo model)
	CLIP_MODEL_DIR=$(CLIP_MODEL_DIR) $(PY) -m clip_serverless.api.local --host $(HOST) --port $(PORT)

# `make check` first: CI runs `make test`, so a lint or type error fails it before the tests run.
test: setup-dev check ## ruff, mypy --strict, then the whole test suite (no marker deselects anything)
	CLIP_SDK_PYTHON=$(SDK_VENV)/bin/python $(PY) -m pytest

# tests/markers.py: --without deselects the tests with these markers (pyproject.toml registers them) and
# does not import the modules marked with one; a test still selected that cannot run fails, never skips.
# pytest-xdist: one worker per CPU (at most 4), each test file on one worker (its module fixtures once).
FAST_WITHOUT := torch,sam,sdk,lambda312
test-fast: $(VENV)/.test ## the tests that need neither torch, SAM, the SDK venv nor Python 3.12 (< 1 min)
	$(PY) -m pytest -p tests.markers --without $(FAST_WITHOUT) --fail-on-skip -n auto --maxprocesses 4 --dist loadfile

# mypy needs the full environment: the tests' and export tooling's imports (torch, transformers, onnx) are
# typed packages, checked as installed.
check: $(VENV)/.dev ## ruff, then mypy --strict over layers/ infra/ bench/ events/ functions/ tests/
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

lint: check ## the same as check

B32 := build/models/ViT-B-32-synthetic

$(B32)/manifest.json:
	$(MAKE) $(VENV)/.dev
	$(PY) -m clip_export synthetic --arch ViT-B-32 --seed 0 --out $(B32) --int8

models-b32: $(B32)/manifest.json ## full-size seeded ViT-B/32, fp32 and int8, into build/models (for benchmarks)

# PyTorch's OpenMP workers spin after each call and would slow the ORT runs interleaved with them.
bench: models-b32 ## ONNX Runtime vs PyTorch benchmark
	OMP_WAIT_POLICY=PASSIVE $(PY) bench/bench_core.py

sam-setup: $(SAM_VENV)/.installed ## install the AWS SAM CLI into .venv-sam

sam-validate: sam-setup ## sam validate and --lint, both templates
	for t in template.yaml template.image.yaml; do $(SAM) validate -t $$t && $(SAM) validate --lint -t $$t || exit 1; done

# Build and deploy, both flavours (samconfig.toml: default env = zip, env `image` = container image).
#   ARCH=arm64     build for and deploy to Graviton (default: the template's x86_64)
#   CONTAINER=1    build the zip flavour in SAM's build containers (--use-container; needs Docker;
#                  CLIP_MODEL_SRC must then be a directory inside the project)
#   GUIDED=1       sam deploy --guided (asks, and saves the answers in samconfig.toml)
#   SAM_ENV=image  sam-delete deletes the image flavour's stack
# Every deploy first runs infra/predeploy_check.py: it fails when ARCH (or samconfig's parameter_overrides)
# differs from the architecture that was built, warns loudly about a demo model, and passes Architecture
# to sam deploy explicitly (an existing stack would otherwise keep its previous value).
.PHONY: sam-build-image sam-deploy-image sam-delete
PREDEPLOY := $(SAM_VENV)/bin/python infra/predeploy_check.py
SAM_ENV ?= default

sam-build: sam-setup ## sam build, zip flavour (CLIP_MODEL_SRC=model dir, ARCH=arm64, CONTAINER=1)
	CLIP_MODEL_SRC=$(CLIP_MODEL_SRC) $(if $(ARCH),CLIP_LAMBDA_ARCH=$(ARCH)) $(SAM) build \
		$(if $(ARCH),--parameter-overrides Architecture=$(ARCH)) $(if $(CONTAINER),--use-container \
		--container-env-var CLIP_MODEL_SRC=$(CLIP_MODEL_SRC) $(if $(ARCH),--container-env-var CLIP_LAMBDA_ARCH=$(ARCH)))

sam-deploy: sam-build ## check the build against the deploy, then sam deploy (ARCH=, GUIDED=1)
	$(PREDEPLOY) check --config-env default $(if $(ARCH),--arch $(ARCH)) -- $(SAM) deploy $(if $(GUIDED),--guided)

sam-build-image: sam-setup ## sam build, container-image flavour into .aws-sam/build-image (Docker; ARCH=)
	$(SAM) build --config-env image $(if $(ARCH),--parameter-overrides Architecture=$(ARCH))

# --config-file: `sam deploy --guided` saves its answers beside the template it deploys, which for the
# image env is .aws-sam/build-image/template.yaml, not this directory.
sam-deploy-image: sam-build-image ## check, then sam deploy --config-env image (ARCH=, GUIDED=1)
	$(PREDEPLOY) check --config-env image $(if $(ARCH),--arch $(ARCH)) -- \
		$(SAM) deploy --config-env image --config-file "$(CURDIR)/samconfig.toml" $(if $(GUIDED),--guided)

# CloudFormation keeps a bucket that holds objects: the embedding cache (the stack's output CacheBucketName)
# is emptied first (it is only a cache), then `sam delete` asks before it deletes the stack.
sam-delete: sam-setup ## empty the cache bucket, then sam delete the stack (SAM_ENV=default|image)
	$(PREDEPLOY) empty-cache-bucket --config-env $(SAM_ENV)
	$(SAM) delete --config-env $(SAM_ENV) --config-file "$(CURDIR)/samconfig.toml"

sam-invoke: $(VENV)/.dev ## run a built function without Docker (FUNCTION=, EVENT=)
	PYTHONPATH=infra $(PY) -m lambda_runtime invoke $(FUNCTION) -e $(EVENT) --s3 moto

sam-sizes: $(VENV)/.dev ## each built function + its layers against Lambda's 250 MiB
	PYTHONPATH=infra $(PY) -m lambda_runtime sizes

bench-cold-start: models-b32 sam-setup ## cold start of the built functions, two ways (BASELINE=<git ref> to compare)
	$(PY) bench/bench_cold_start.py $(if $(BASELINE),--baseline $(BASELINE))

bench-engine: models-b32 sam-setup ## ONNX Runtime settings per function at Lambda's CPU share (root, cgroup v1)
	$(PY) bench/bench_engine_settings.py

bench-imports: models-b32 sam-setup ## what each built function imports at init, per package (BASELINE=<git ref>)
	$(PY) bench/bench_imports.py $(if $(BASELINE),--baseline $(BASELINE))

# Needs root for CPU cgroups (Lambda's CPU share of each memory size); writes build/bench-lambda/*.json.
bench-cost: models-b32 sam-setup ## $ per million requests per function and memory size, under Lambda's CPU share
	$(PY) bench/bench_cost.py --json build/bench-lambda/cost.json

bench-memory: models-b32 sam-setup ## peak resident memory per function and request, fp32 image and int8 zip
	$(PY) bench/bench_memory.py --ort-options --json build/bench-lambda/memory.json

# Our local server against Roboflow's Inference server on the same seeded weights (../shared/tools), both
# precisions; then the request path's profile, batches against single calls, and the local server under
# concurrent clients.
bench-roboflow: models-b32 ## side by side with Roboflow's server, fp32 and int8 (../shared/tools/peer-bench)
	$(PY) bench/bench_vs_roboflow.py --roboflow fp32
	$(PY) bench/bench_vs_roboflow.py --roboflow int8
	$(PY) bench/bench_request_path.py
	$(PY) bench/bench_batches.py
	$(PY) bench/bench_local_concurrency.py

# Bulk embedding (README: Bulk embedding): infra/bulk_cli. A job is SRC (a prefix of images, or with
# BULK_ARGS=--text a CSV or JSON Lines file of captions) into DST (one folder per job).
#   make bulk SRC=s3://bucket/photos/ DST=s3://bucket/clip-embeddings/photos/   on the deployed stack (STACK=)
#   make bulk-local SRC=... DST=...   on this machine, against AWS_ENDPOINT_URL_S3 (e.g. a moto server), with
#                                     CLIP_MODEL_DIR; ENGINE=python runs the steps without moto's interpreter
#   BULK_ARGS="--batch-size 500 --concurrency 100 --dtype float16 --cache --text --inventory s3://..."
.PHONY: bulk bulk-local
STACK ?= clip-serverless
$(VENV)/.bulk: pyproject.toml $(VENV)/.serve
	$(PIP) install -e '.[serve,bulk]'
	@touch $@

bulk: $(VENV)/.bulk ## start a bulk embedding job on the deployed stack and watch it (SRC=s3://... DST=s3://...)
	@[ -n "$(SRC)" ] && [ -n "$(DST)" ] || { echo "usage: make bulk SRC=s3://bucket/photos/ DST=s3://bucket/clip-embeddings/photos/"; exit 2; }
	$(PY) -m bulk_cli start "$(SRC)" "$(DST)" --stack "$(STACK)" $(BULK_ARGS)

bulk-local: $(VENV)/.bulk ## the same job on this machine against AWS_ENDPOINT_URL_S3 (SRC=, DST=, ENGINE=python)
	@[ -n "$(SRC)" ] && [ -n "$(DST)" ] || { echo "usage: make bulk-local SRC=s3://bucket/photos/ DST=s3://bucket/out/"; exit 2; }
	CLIP_MODEL_DIR=$(CLIP_MODEL_DIR) $(PY) -m bulk_cli local "$(SRC)" "$(DST)" $(if $(ENGINE),--engine $(ENGINE)) $(BULK_ARGS)

clean: ## remove environments and build output
	rm -rf $(VENV) $(SDK_VENV) $(SAM_VENV) build .aws-sam
