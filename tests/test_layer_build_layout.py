"""The layers build where `sam build --use-container` builds them: from the mounted project root, nothing else.

For a makefile layer with ``Metadata.ProjectRootDirectory``, SAM's build container mounts that directory
read-only at /tmp/samcli/source and the layer's Makefile folder (``ContextPath``) at /tmp/samcli/manifest,
then runs ``make --makefile /tmp/samcli/manifest/Makefile build-<LogicalId>`` from the source mount with
ARTIFACTS_DIR=/tmp/samcli/artifacts (samcli/local/docker/lambda_build_container.py, get_container_dirs;
aws_lambda_builders/workflows/custom_make/actions.py). Here the same layout is a temporary directory that
holds what a fresh clone has for the layers (infra/build_layer.py, layers/, models/clip-tiny) and nothing
else of the repository, and each layer's target runs there the way SAM runs it, with python3.12.

The dependency layers are built from small pinned requirement files (written into the copy) so that the
test stays fast on a fresh clone; tests/test_built_functions.py builds the real ones. Also here: the
build script's helpers (strip, pip, cache, the demo-model warning).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.handlers import load_module

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra"))

from lambda_runtime import find_python  # noqa: E402

MAKEFILE_LAYERS = {  # logical id: the folder of its Makefile (the template's ContextPath)
    "CoreLayer": "layers/core",
    "DepsTextLayer": "layers/deps", "DepsImageLayer": "layers/deps", "DepsAllLayer": "layers/deps",
    "ModelTextLayer": "layers/model", "ModelVisualLayer": "layers/model",
}
# Small stand-ins for the pinned sets (same pins as the real files): pure Python and one shared object.
TINY_REQUIREMENTS = {
    "requirements-common.txt": "typing-extensions==4.16.0\nannotated-types==0.8.0\n",
    "requirements-text.txt": "-r requirements-common.txt\nftfy==6.3.1\nwcwidth==0.9.4\n",
    "requirements-image.txt": "-r requirements-common.txt\npydantic-core==2.50.5\n",
    "requirements-all.txt": "-r requirements-text.txt\npydantic-core==2.50.5\n",
}
ELF_MACHINE = {0x3E: "x86_64", 0xB7: "arm64"}


build_layer = load_module("build_layer", REPO / "infra" / "build_layer.py")


def template_layers() -> dict[str, dict[str, Any]]:
    from samtranslator.yaml_helper import yaml_parse

    template = yaml_parse((REPO / "template.yaml").read_text())
    return {name: res for name, res in template["Resources"].items()
            if res["Type"] == "AWS::Serverless::LayerVersion" and res.get("Metadata", {}).get("BuildMethod")}


def test_every_makefile_layer_builds_from_the_project_root() -> None:
    """What the container mounts is the root (ProjectRootDirectory), and the Makefile is the layer's own."""
    layers = template_layers()
    assert set(MAKEFILE_LAYERS) <= set(layers)
    for name, res in layers.items():
        meta = res["Metadata"]
        if name not in MAKEFILE_LAYERS:  # any other layer must build from its own folder alone
            assert "ProjectRootDirectory" in meta or "../" not in (REPO / res["Properties"]["ContentUri"] /
                                                                   "Makefile").read_text(), name
            continue
        assert meta["BuildMethod"] == "makefile"
        assert meta["ProjectRootDirectory"] == "."
        assert meta["ContextPath"] == MAKEFILE_LAYERS[name] == res["Properties"]["ContentUri"]
        assert f"build-{name}:" in (REPO / meta["ContextPath"] / "Makefile").read_text()
        if "CompatibleArchitectures" in res["Properties"]:  # SAM's build image follows the deployed arch
            assert meta["BuildArchitecture"] == {"Ref": "Architecture"}


# ---- the container layout ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def samcli(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<tmp>/samcli/source: the project root as a fresh clone has it for the layers (and nothing else)."""
    base = tmp_path_factory.mktemp("container") / "samcli"
    source = base / "source"
    (source / "infra").mkdir(parents=True)
    shutil.copy(REPO / "infra" / "build_layer.py", source / "infra" / "build_layer.py")
    shutil.copy(REPO / "pyproject.toml", source / "pyproject.toml")  # the version the core layer records
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder in sorted(set(MAKEFILE_LAYERS.values())):
        shutil.copytree(REPO / folder, source / folder, ignore=ignore)
    shutil.copytree(REPO / "models" / "clip-tiny", source / "models" / "clip-tiny")
    for name, text in TINY_REQUIREMENTS.items():
        (source / "layers" / "deps" / name).write_text(text)
    return base


@pytest.fixture(scope="module")
def build_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """python3.12 on PATH (as in SAM's python3.12 build image); none of this project's settings."""
    bin_dir = tmp_path_factory.mktemp("py312-bin")
    (bin_dir / "python3.12").symlink_to(find_python())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLIP_", "AWS_", "LAMBDA_PYTHON", "PYTHON3"))}
    env["PATH"] = f"{bin_dir}:{env.get('PATH', '')}"
    return env


def make_layer(samcli: Path, env: dict[str, str], logical_id: str, **extra: str) -> tuple[Path, str]:
    """SAM's way: the ContextPath folder as the manifest mount, make run from the source mount."""
    manifest = samcli / "manifest" / logical_id
    shutil.copytree(samcli / "source" / MAKEFILE_LAYERS[logical_id], manifest)
    artifacts = samcli / "artifacts" / logical_id
    artifacts.mkdir(parents=True)
    done = subprocess.run(["make", "--makefile", str(manifest / "Makefile"), f"build-{logical_id}"],
                          cwd=samcli / "source", env={**env, "ARTIFACTS_DIR": str(artifacts), **extra},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{logical_id}:\n{done.stdout}\n{done.stderr}"
    return artifacts, done.stdout


def record(artifacts: Path, kind: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((artifacts / "clip-build" / f"{kind}.json").read_text())
    return data


def elf_machine(path: Path) -> str:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    return ELF_MACHINE[struct.unpack("<H", header[18:20])[0]]


@pytest.mark.lambda312
def test_core_layer(samcli: Path, build_env: dict[str, str]) -> None:
    artifacts, _ = make_layer(samcli, build_env, "CoreLayer")
    package = artifacts / "python" / "clip_serverless"
    assert (package / "engine" / "model_dir.py").exists()
    assert (package / "engine" / "__pycache__" / "model_dir.cpython-312.pyc").exists()
    assert record(artifacts, "core")["python"] == "3.12"
    # The version as a module (api/app.py reads it: a layer has no distribution metadata).
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert (package / "_version.py").read_text() == f'VERSION = "{version}"\n'
    assert (package / "__pycache__" / "_version.cpython-312.pyc").exists()


@pytest.mark.parametrize(("logical_id", "files", "absent"), [
    ("ModelTextLayer", {"manifest.json", "textual.onnx", "tokenizer.json"}, "visual.onnx"),
    ("ModelVisualLayer", {"manifest.json", "visual.onnx"}, "textual.onnx"),
])
@pytest.mark.lambda312
def test_model_layers_ship_their_tower_and_warn_about_the_demo_model(samcli: Path, build_env: dict[str, str],
                                                                     logical_id: str, files: set[str],
                                                                     absent: str) -> None:
    artifacts, stdout = make_layer(samcli, build_env, logical_id)
    shipped = {p.name for p in (artifacts / "model").iterdir()}
    assert files <= shipped and absent not in shipped
    manifest = json.loads((artifacts / "model" / "manifest.json").read_text())
    assert shipped - {"manifest.json"} <= set(manifest["files"])
    assert record(artifacts, "model")["model_id"] == manifest["model_id"] == "clip/tiny-shapes"
    assert record(artifacts, "model")["demo"] is True
    assert record(artifacts, "model")["source"] == "models/clip-tiny"  # relative: the layer ships it
    # On stdout: `sam build` shows a Makefile's stdout, and its stderr only when the build fails.
    assert "WARNING" in stdout and "DEMO MODEL clip/tiny-shapes" in stdout and "clip_export pretrained" in stdout


@pytest.mark.lambda312
@pytest.mark.parametrize(("logical_id", "arch", "modules"), [
    ("DepsTextLayer", "x86_64", {"ftfy", "wcwidth", "typing_extensions"}),
    ("DepsImageLayer", "arm64", {"pydantic_core", "annotated_types"}),
])
def test_dependency_layers(samcli: Path, build_env: dict[str, str], logical_id: str, arch: str,
                           modules: set[str]) -> None:
    artifacts, stdout = make_layer(samcli, build_env, logical_id, CLIP_LAMBDA_ARCH=arch)
    site = artifacts / "python"
    assert modules <= {p.name.removesuffix(".py") for p in site.iterdir()}
    assert list(site.rglob("*.cpython-312.pyc")), "not precompiled"
    built = record(artifacts, "deps")
    assert built["architecture"] == arch and built["python"] == "3.12"
    assert built["requirements"] == f"requirements-{logical_id.removeprefix('Deps').removesuffix('Layer').lower()}.txt"
    for shared in site.rglob("*.so"):
        assert elf_machine(shared) == arch, shared
    # The cache is the copy's own (build/layer-cache under the mount); pip said which Python it used.
    assert "build_layer: pip of " in stdout


@pytest.mark.lambda312
def test_a_read_only_mount_builds_without_the_cache(samcli: Path, build_env: dict[str, str]) -> None:
    """The container mounts the root read-only: the deps cache (build/layer-cache under it) is skipped.

    Needs a private mount namespace (``unshare -rm``: user namespaces); skipped where there is none.
    """
    mount = samcli / "read-only-source"
    mount.mkdir()
    artifacts = samcli / "artifacts" / "read-only"
    manifest = samcli / "source" / "layers" / "deps" / "Makefile"
    script = (f'mount --bind "{samcli / "source"}" "{mount}" && mount -o remount,bind,ro "{mount}" && '
              f'! touch "{mount}/probe" 2>/dev/null && cd "{mount}" && '
              f'exec make --makefile "{manifest}" build-DepsTextLayer ARTIFACTS_DIR="{artifacts}"')
    try:
        probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        pytest.skip("unshare is not available")
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace here: {probe.stderr.decode().strip()}")
    done = subprocess.run(["unshare", "-rm", "sh", "-c", script], env=build_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    assert "is not writable" in done.stdout and "building without it" in done.stdout
    assert (artifacts / "python" / "ftfy").is_dir() and record(artifacts, "deps")["architecture"] == "x86_64"


def test_the_fallback_root_is_two_levels_above_the_makefile(tmp_path: Path) -> None:
    """`make -C layers/model` (or any directory without infra/): the Makefile's own ../.. is the root."""
    done = subprocess.run(["make", "-n", "-C", str(REPO / "layers" / "model"), "build-ModelTextLayer",
                           "ARTIFACTS_DIR=/x"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{REPO}/infra/build_layer.py" in done.stdout
    (tmp_path / "a" / "b").mkdir(parents=True)
    shutil.copy(REPO / "layers" / "model" / "Makefile", tmp_path / "a" / "b" / "Makefile")
    done = subprocess.run(["make", "-n", "-f", "a/b/Makefile", "build-ModelTextLayer"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode != 0 and "infra/build_layer.py not found" in done.stderr


# ---- build_layer.py helpers --------------------------------------------------------------------------
def fake_tool(directory: Path, name: str, version: str, run: str) -> Path:
    """A stand-in executable: prints ``version`` for --version, else logs its arguments and runs ``run``."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{version}"; exit 0; fi\n'
                    f'echo "{name} $*" >> "{directory / "calls"}"\n{run}\n')
    path.chmod(0o755)
    return path


def test_strip_is_skipped_with_a_message_without_gnu_strip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    obj = tmp_path / "lib.so"
    obj.write_bytes(b"\x7fELF")
    tools = tmp_path / "bin"
    fake_tool(tools, "strip", "Apple LLVM version 15 (strip)", "exit 1")  # macOS: no --strip-unneeded
    monkeypatch.setenv("PATH", str(tools))
    assert build_layer.strip_tool("x86_64") is None
    assert build_layer.strip_objects([str(obj)], "x86_64") is False
    assert "no GNU strip" in capsys.readouterr().out
    assert not (tools / "calls").exists()


def test_a_gnu_strip_that_cannot_read_the_architecture_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    objects = [str(tmp_path / "a.so"), str(tmp_path / "b.so")]
    tools = tmp_path / "bin"
    fake_tool(tools, "strip", "GNU strip (GNU Binutils) 2.40",
              'echo "strip: $2: Unable to recognise the format of the input file" >&2; exit 1')
    monkeypatch.setenv("PATH", str(tools))
    assert build_layer.strip_objects(objects, "arm64") is False
    assert "Unable to recognise the format" in capsys.readouterr().out
    assert (tools / "calls").read_text().splitlines() == [f"strip --strip-unneeded {objects[0]}"]  # one probe
    # A cross strip for the target comes first when installed.
    (tools / "calls").unlink()
    fake_tool(tools, "aarch64-linux-gnu-strip", "GNU strip (GNU Binutils) 2.40", "exit 0")
    assert build_layer.strip_tool("arm64") == str(tools / "aarch64-linux-gnu-strip")
    assert build_layer.strip_objects(objects, "arm64") is True
    assert (tools / "calls").read_text().splitlines() == [
        f"aarch64-linux-gnu-strip --strip-unneeded {obj}" for obj in objects]


def test_pip_comes_from_a_python_that_has_it(tmp_path: Path) -> None:
    no_pip = fake_tool(tmp_path, "python-without-pip", "Python 3.12.1", "exit 1")
    assert build_layer.find_pip_python([str(no_pip), sys.executable]) == sys.executable
    with pytest.raises(SystemExit, match="no Python with pip"):
        build_layer.find_pip_python([str(no_pip), str(tmp_path / "missing")])


def test_an_unwritable_cache_is_not_used(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert build_layer.usable_cache(str(blocker / "cache")) is None
    assert "not writable" in capsys.readouterr().out
    assert build_layer.usable_cache("off") is None
    assert build_layer.usable_cache(str(tmp_path / "cache")) == tmp_path / "cache"


def test_the_warning_quotes_the_local_servers_export_command(tmp_path: Path) -> None:
    from clip_serverless.api.local import EXPORT_HINT

    assert build_layer.export_hint() == EXPORT_HINT
    warning = build_layer.demo_warning("clip/tiny-shapes", {"source": "trained", "note": "shapes only"})
    assert EXPORT_HINT in warning and "clip/tiny-shapes" in warning and "shapes only" in warning


def test_a_pretrained_model_builds_without_the_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "model"
    shutil.copytree(REPO / "models" / "clip-tiny", src)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["provenance"] = {"source": "pretrained", "tag": "openai"}
    (src / "manifest.json").write_text(json.dumps(manifest))
    build_layer.build_model(src, ["visual"], tmp_path / "out")
    assert "WARNING" not in capsys.readouterr().out
    assert record(tmp_path / "out", "model")["demo"] is False
