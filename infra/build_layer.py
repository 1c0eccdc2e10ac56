"""Builds the Lambda layers' contents: what ``sam build`` runs through each layer's Makefile.

Three kinds of layer, each a directory that Lambda extracts under ``/opt``::

    deps   python/<third-party packages>   pinned wheels for Lambda's python3.12, slimmed, precompiled
    core   python/clip_serverless/         this project's package, precompiled
    model  model/{manifest.json, <tower files>}   one CLIP tower (or both) of a model directory

    python infra/build_layer.py deps  --requirements layers/deps/requirements-text.txt --out DIR
    python infra/build_layer.py core  --out DIR
    python infra/build_layer.py model --towers textual --src models/clip-tiny --out DIR

Why slim: Lambda allows 250 MiB unzipped for a function plus all its layers, and the packages as pip
installs them are ~180 MiB. Installed with ``--no-deps`` from fully pinned requirement files (so
tokenizers' Hugging Face Hub client and onnxruntime's protobuf/flatbuffers tooling never come along),
then: tests, type stubs and headers removed, onnxruntime's offline tooling and its ``libonnxruntime.so``
removed (the Python binding does not link it: ``readelf -d`` lists no NEEDED entry for it), shared
objects stripped.

Why precompile: ``/opt`` is read-only on Lambda and ``sam build`` writes no ``.pyc``, so every cold
start would compile every module it imports (the layer imports in ~670 ms without, ~300 ms with).
``unchecked-hash`` pycs are used without looking at the source's timestamp, which layer zips do not
keep reliably. They must be compiled by Lambda's Python (3.12): the pyc format is per minor version.

Deps builds are cached under ``build/layer-cache/`` by a hash of the pinned requirements, the target
platform and this file, so a repeated ``sam build`` copies instead of reinstalling.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE_SRC = REPO / "layers" / "core" / "clip_serverless"
CACHE_ROOT = REPO / "build" / "layer-cache"
DEFAULT_MODEL_SRC = REPO / "models" / "clip-tiny"
LAMBDA_PYTHON = (3, 12)
# Where Lambda extracts layers: tracebacks in precompiled modules name these paths.
OPT_PYTHON = "/opt/python"

# Wheel platform tags Lambda's python3.12 (Amazon Linux 2023, glibc 2.34) can load, newest first.
PLATFORMS = {
    "x86_64": ["manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"],
    "arm64": ["manylinux_2_34_aarch64", "manylinux_2_28_aarch64", "manylinux_2_17_aarch64",
              "manylinux2014_aarch64"],
}

# Removed wherever found (directory names, file suffixes).
JUNK_DIRS = frozenset({"tests", "test", "__pycache__"})
JUNK_SUFFIXES = (".pyi", ".pxd", ".pyx", ".h", ".hpp", ".c", ".cpp", ".md")
# Package parts never imported at run time, relative to the site directory.
JUNK_PATHS = (
    "numpy/f2py",  # Fortran wrapper generator
    "numpy/_core/include",
    "numpy/_core/lib/pkgconfig",
    "numpy/_pyinstaller",
    "onnxruntime/capi/libonnxruntime.so*",  # the C API library; the pybind11 module does not load it
    "onnxruntime/transformers",  # offline graph optimisation tools
    "onnxruntime/quantization",  # offline quantisation (clip_export uses the dev venv's copy)
    "onnxruntime/tools",
    "onnxruntime/datasets",
    "onnxruntime/backend",
    "bin",  # console scripts (f2py, numpy-config, ...): nothing runs them on Lambda
)

MiB = 1024 * 1024


def tree_bytes(root: Path) -> int:
    """Sum of file sizes under ``root``: what Lambda counts against the 250 MiB unzipped limit."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def read_requirements(path: Path, seen: set[Path] | None = None) -> list[str]:
    """Requirement lines of ``path`` with ``-r`` includes expanded, comments dropped, duplicates once."""
    seen = set() if seen is None else seen
    path = path.resolve()
    if path in seen:
        return []
    seen.add(path)
    lines: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            lines += read_requirements(path.parent / line.split(None, 1)[1], seen)
        elif line.startswith("-"):
            raise ValueError(f"{path}: only pins and -r includes are supported, got {line!r}")
        else:
            if "==" not in line:
                raise ValueError(f"{path}: {line!r} is not pinned (name==version): the build installs --no-deps")
            lines.append(line)
    return list(dict.fromkeys(lines))


def check_python(python: str) -> None:
    """The interpreter that compiles the layer's .pyc must be Lambda's minor version."""
    out = subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2])"], check=True,
                         capture_output=True, text=True).stdout.split()
    if tuple(map(int, out)) != LAMBDA_PYTHON:
        want = ".".join(map(str, LAMBDA_PYTHON))
        raise SystemExit(f"{python} is Python {'.'.join(out)}; the layers need Python {want} "
                         f"(pyenv: PYENV_VERSION=3.11.7:{want}.1, or --python python{want})")


def pip_install(requirements: Sequence[str], target: Path, arch: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--no-compile", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", ".".join(map(str, LAMBDA_PYTHON)), "--target", str(target)]
    for platform in PLATFORMS[arch]:
        cmd += ["--platform", platform]
    subprocess.run([*cmd, *requirements], check=True)


def slim(site: Path) -> None:
    """Delete what Lambda never imports and strip shared objects (see the module docstring)."""
    for pattern in JUNK_PATHS:
        for path in site.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in sorted(site.rglob("*"), reverse=True):  # children before parents
        if path.is_dir() and path.name in JUNK_DIRS:
            shutil.rmtree(path)
        elif path.is_file() and path.suffix in JUNK_SUFFIXES and ".dist-info" not in str(path.parent):
            path.unlink()
    strip = shutil.which("strip")
    if strip is None:
        print("build_layer: `strip` not found; shared objects keep their symbols (~10 MiB larger)", file=sys.stderr)
        return
    objects = [str(p) for p in site.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    if objects:
        subprocess.run([strip, "--strip-unneeded", *objects], check=True)


def precompile(site: Path, python: str, prefix: str = OPT_PYTHON) -> None:
    subprocess.run([python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
                    "-s", str(site), "-p", prefix, str(site)], check=True, stdout=subprocess.DEVNULL)


def deps_cache_key(requirements: Sequence[str], arch: str) -> str:
    digest = hashlib.sha256()
    for part in (*requirements, arch, repr(LAMBDA_PYTHON), Path(__file__).read_text(encoding="utf-8")):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def build_deps(requirements_file: Path, out: Path, arch: str, python: str, cache_root: Path = CACHE_ROOT) -> Path:
    """Install, slim and precompile the pinned requirements into ``out/python`` (via the cache)."""
    requirements = read_requirements(requirements_file)
    cached = cache_root / f"{requirements_file.stem}-{arch}-{deps_cache_key(requirements, arch)}"
    if not cached.is_dir():
        cache_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cache_root))
        try:
            site = staging / "python"
            pip_install(requirements, site, arch)
            slim(site)
            precompile(site, python)
            staging.rename(cached)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    copy_tree(cached / "python", out / "python")
    return out / "python"


def build_core(out: Path, python: str, src: Path = CORE_SRC) -> Path:
    dest = out / "python" / src.name
    copy_tree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    precompile(out / "python", python)
    return dest


TOWER_FILES = {"visual": ("visual.onnx",), "textual": ("textual.onnx", "tokenizer.json")}


def build_model(src: Path, towers: Iterable[str], out: Path) -> Path:
    """``out/model``: the manifest (whole: it describes the model) and the files of the towers asked for."""
    sys.path.insert(0, str(CORE_SRC.parent))
    from clip_serverless.core.model_dir import MANIFEST_NAME, ModelDir

    model = ModelDir.open(src, verify_checksums=True)
    dest = out / "model"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    names = [MANIFEST_NAME] + [name for tower in towers for name in TOWER_FILES[tower]]
    for name in names:
        source = model.path / name if name == MANIFEST_NAME else model.file(name)
        link_or_copy(source, dest / name)
    return dest


def link_or_copy(src: Path, dest: Path) -> None:
    """Hard-link when possible: a fp32 tower is hundreds of MB, and the build tree is throw-away."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def copy_tree(src: Path, dest: Path, ignore: object = None) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=ignore, copy_function=link_or_copy)  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="kind", required=True)
    deps = sub.add_parser("deps", help="pinned third-party packages under python/")
    deps.add_argument("--requirements", type=Path, required=True)
    core = sub.add_parser("core", help="the clip_serverless package under python/")
    model = sub.add_parser("model", help="one or both towers of a model directory under model/")
    model.add_argument("--towers", required=True, help="textual, visual or textual,visual")
    model.add_argument("--src", type=Path, default=Path(os.environ.get("CLIP_MODEL_SRC") or DEFAULT_MODEL_SRC),
                       help="model directory (default: $CLIP_MODEL_SRC, else models/clip-tiny)")
    for p in (deps, core, model):
        p.add_argument("--out", type=Path, required=True, help="the layer's root (sam's ARTIFACTS_DIR)")
    for p in (deps, core):
        p.add_argument("--python", default=os.environ.get("CLIP_LAMBDA_PYTHON", "python3.12"),
                       help="Lambda's Python, which compiles the .pyc (default python3.12)")
    deps.add_argument("--arch", choices=sorted(PLATFORMS), default=os.environ.get("CLIP_LAMBDA_ARCH", "x86_64"))
    args = parser.parse_args(argv)

    if args.kind == "deps":
        check_python(args.python)
        root = build_deps(args.requirements, args.out, args.arch, args.python)
    elif args.kind == "core":
        check_python(args.python)
        root = build_core(args.out, args.python)
    else:
        src = args.src if args.src.is_absolute() else REPO / args.src
        root = build_model(src, [t.strip() for t in args.towers.split(",") if t.strip()], args.out)
    print(f"build_layer {args.kind}: {root} {tree_bytes(args.out) / MiB:.1f} MiB")


if __name__ == "__main__":
    main()
