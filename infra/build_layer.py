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

Deps builds are cached under ``build/layer-cache/`` (``$CLIP_LAYER_CACHE``; ``off`` disables it) by a hash
of the pinned requirements, the target platform and this file, so a repeated ``sam build`` copies instead of
reinstalling. Where the cache cannot be written (SAM's build container mounts the project read-only) the
layer is built without it.

Every layer records what it was built from in ``clip-build/<kind>.json`` at its root (``/opt/clip-build/``
on Lambda): the deps layer its architecture and wheel platforms, the model layer the model id and its
provenance. ``infra/predeploy_check.py`` reads these before ``sam deploy`` (an arm64 stack with x86_64
wheels fails at init; a demo model should never be deployed unnoticed).

Output: progress and warnings go to stdout as well as stderr, because ``sam build`` shows a Makefile's
stdout as it runs but its stderr only when the build fails.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CORE_SRC = REPO / "layers" / "core" / "clip_serverless"
CACHE_ROOT = REPO / "build" / "layer-cache"
DEFAULT_MODEL_SRC = REPO / "models" / "clip-tiny"
# The local server's banner names the export command; the build warning quotes the same text.
LOCAL_SERVER = CORE_SRC / "api" / "local.py"
RECORD_DIR = "clip-build"  # <layer>/clip-build/<kind>.json: what the layer was built from
VERSION_MODULE = "_version.py"  # written into the core layer's package (api/app.py reads it)
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

# GNU binutils target triplets, for a cross-architecture strip (`aarch64-linux-gnu-strip`).
TRIPLETS = {"x86_64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}

MiB = 1024 * 1024


def say(message: str) -> None:
    """Print to stdout and stderr once each (once when both are the same terminal or file).

    ``sam build`` streams a Makefile's stdout but keeps its stderr for the error message of a failed build,
    so a warning printed only to stderr never shows in a successful build's log.
    """
    print(message, flush=True)
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
        same = (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)
    except (OSError, ValueError, AttributeError):  # pytest's capture objects have no file descriptor
        same = False
    if not same:
        print(message, file=sys.stderr, flush=True)


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


def has_pip(python: str) -> bool:
    try:
        subprocess.run([python, "-m", "pip", "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def find_pip_python(candidates: Sequence[str] | None = None) -> str:
    """A Python that has pip: this interpreter, else ``python3`` on PATH.

    Any Python's pip can install wheels for Lambda (``--target --platform --python-version
    --only-binary=:all:``), so the one running this script need not be Lambda's 3.12 (pyenv's and Debian's
    python3.12 may come without pip).
    """
    for python in candidates if candidates is not None else (sys.executable, "python3"):
        if python and has_pip(python):
            return python
    raise SystemExit("build_layer: no Python with pip found (tried this interpreter, then python3): "
                     "install pip for one of them (python3 -m ensurepip --user)")


def pip_install(requirements: Sequence[str], target: Path, arch: str, python: str | None = None) -> None:
    python = python or find_pip_python()
    version = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    say(f"build_layer: pip of {python} (Python {version}) installs {len(requirements)} pinned packages "
        f"for Lambda's Python {'.'.join(map(str, LAMBDA_PYTHON))} on {arch}")
    cmd = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--no-compile", "--only-binary=:all:", "--implementation", "cp",
           "--python-version", ".".join(map(str, LAMBDA_PYTHON)), "--target", str(target)]
    for tag in PLATFORMS[arch]:
        cmd += ["--platform", tag]
    subprocess.run([*cmd, *requirements], check=True)


def slim(site: Path, arch: str = "x86_64") -> None:
    """Delete what Lambda never imports and strip shared objects (see the module docstring)."""
    for pattern in JUNK_PATHS:
        for path in site.glob(pattern):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in sorted(site.rglob("*"), reverse=True):  # children before parents
        if path.is_dir() and path.name in JUNK_DIRS:
            shutil.rmtree(path)
        elif path.is_file() and path.suffix in JUNK_SUFFIXES and ".dist-info" not in str(path.parent):
            path.unlink()
    objects = [str(p) for p in site.rglob("*.so*") if p.is_file() and not p.is_symlink()]
    if objects:
        strip_objects(objects, arch)


def is_gnu_strip(strip: str) -> bool:
    """``--strip-unneeded`` is GNU binutils' option; macOS's (LLVM/cctools) strip has other flags."""
    try:
        done = subprocess.run([strip, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0 and "GNU" in done.stdout


def strip_tool(arch: str) -> str | None:
    """A GNU strip for ``arch``: the cross tool if installed, else ``strip`` (which may still not read it).

    Binutils built for one machine reads only its own ELF files (x86_64's ``strip`` says "Unable to
    recognise the format" of an aarch64 object): for a foreign architecture a cross strip
    (``aarch64-linux-gnu-strip``, Debian's binutils-aarch64-linux-gnu) or a multiarch build is needed.
    """
    for name in (f"{TRIPLETS[arch]}-strip", "strip"):
        path = shutil.which(name)
        if path and is_gnu_strip(path):
            return path
    return None


def strip_objects(objects: Sequence[str], arch: str) -> bool:
    """Strip ``objects`` in place; print why and return False where that is not possible here."""
    strip = strip_tool(arch)
    if strip is None:
        say(f"build_layer: no GNU strip for {arch} here (`strip --version` must say GNU); "
            f"{len(objects)} shared objects keep their symbols (a larger layer)")
        return False
    probe = subprocess.run([strip, "--strip-unneeded", objects[0]], capture_output=True, text=True)
    if probe.returncode != 0:  # e.g. the host's strip and a foreign architecture
        say(f"build_layer: {strip} cannot strip {arch} objects ({probe.stderr.strip()}); "
            f"{len(objects)} shared objects keep their symbols (a larger layer)")
        return False
    if len(objects) > 1:
        subprocess.run([strip, "--strip-unneeded", *objects[1:]], check=True)
    return True


def precompile(site: Path, python: str, prefix: str = OPT_PYTHON) -> None:
    subprocess.run([python, "-m", "compileall", "-q", "-j", "0", "--invalidation-mode", "unchecked-hash",
                    "-s", str(site), "-p", prefix, str(site)], check=True, stdout=subprocess.DEVNULL)


def deps_cache_key(requirements: Sequence[str], arch: str) -> str:
    digest = hashlib.sha256()
    for part in (*requirements, arch, repr(LAMBDA_PYTHON), Path(__file__).read_text(encoding="utf-8")):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:16]


def usable_cache(requested: str | None = None) -> Path | None:
    """The deps cache directory, or None: ``$CLIP_LAYER_CACHE`` (``off``: none), else ``build/layer-cache``.

    None also where it cannot be written: SAM's build container mounts the project read-only.
    """
    raw = os.environ.get("CLIP_LAYER_CACHE", "") if requested is None else requested
    if raw.lower() in ("off", "0", "no", "false"):
        return None
    root = Path(raw) if raw else CACHE_ROOT
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as exc:
        say(f"build_layer: cache {root} is not writable ({exc.strerror or exc}); building without it")
        return None
    return root


def install_site(requirements: Sequence[str], site: Path, arch: str, python: str) -> None:
    pip_install(requirements, site, arch)
    slim(site, arch)
    precompile(site, python)


def build_deps(requirements_file: Path, out: Path, arch: str, python: str,
               cache_root: Path | None = CACHE_ROOT) -> Path:
    """Install, slim and precompile the pinned requirements into ``out/python`` (via the cache, if any)."""
    requirements = read_requirements(requirements_file)
    if cache_root is None:
        if (out / "python").exists():
            shutil.rmtree(out / "python")
        install_site(requirements, out / "python", arch, python)
    else:
        cached = cache_root / f"{requirements_file.stem}-{arch}-{deps_cache_key(requirements, arch)}"
        if not cached.is_dir():
            cache_root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cache_root))
            try:
                install_site(requirements, staging / "python", arch, python)
                staging.rename(cached)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
        copy_tree(cached / "python", out / "python")
    write_record(out, "deps", {
        "architecture": arch, "platforms": PLATFORMS[arch], "python": ".".join(map(str, LAMBDA_PYTHON)),
        "requirements": requirements_file.name, "packages": list(requirements)})
    return out / "python"


def project_version(pyproject: Path = REPO / "pyproject.toml") -> str | None:
    """``[project] version`` of pyproject.toml, or None where it cannot be read."""
    try:
        version = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return None
    return str(version)


def build_core(out: Path, python: str, src: Path = CORE_SRC) -> Path:
    dest = out / "python" / src.name
    copy_tree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", VERSION_MODULE))
    # The package's version as a module: a layer has no distribution metadata to read it from.
    version = project_version()
    if version is None:
        say(f"build_layer: {REPO / 'pyproject.toml'} has no readable version; the layer reports api/app.py's default")
    else:
        (dest / VERSION_MODULE).write_text(f'VERSION = "{version}"\n', encoding="utf-8")
    precompile(out / "python", python)
    write_record(out, "core", {"python": ".".join(map(str, LAMBDA_PYTHON))})
    return dest


def write_record(out: Path, kind: str, fields: dict[str, Any]) -> Path:
    """``<layer>/clip-build/<kind>.json``: what this layer was built from (read by predeploy_check.py)."""
    path = out / RECORD_DIR / f"{kind}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"kind": kind, **fields}, indent=2) + "\n", encoding="utf-8")
    return path


def export_hint(source: Path = LOCAL_SERVER) -> str:
    """``EXPORT_HINT`` of the local server, read without importing it (it needs the API's packages)."""
    fallback = ".venv/bin/python -m clip_export pretrained --arch ViT-B-32 --out build/models/ViT-B-32 --int8"
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return fallback
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "EXPORT_HINT"
                                                for t in node.targets):
            try:
                return str(ast.literal_eval(node.value))
            except ValueError:
                break
    return fallback


def demo_warning(model_id: str, provenance: dict[str, Any]) -> str:
    """The banner for a model that is not OpenAI's weights (``provenance.source`` other than pretrained)."""
    rule = "!" * 100
    return "\n".join([
        rule,
        f"!! WARNING: this layer ships the DEMO MODEL {model_id} (provenance: {provenance.get('source')}), "
        "not OpenAI's CLIP.",
        f"!! {provenance.get('note', 'It exists for tests and demos only.')}",
        "!! Deployed, every embedding it returns is meaningless for real images and text.",
        "!! Export the real weights where you have internet, then build with them:",
        f"!!   {export_hint()}",
        "!!   CLIP_MODEL_SRC=build/models/ViT-B-32-int8 make sam-build",
        rule,
    ])


# "tokenizer" alone: compare tokenizes (its cache keys are token ids) but embeds text in embed_text.
TOWER_FILES = {"visual": ("visual.onnx",), "textual": ("textual.onnx", "tokenizer.json"),
               "tokenizer": ("tokenizer.json",)}


def build_model(src: Path, towers: Iterable[str], out: Path) -> Path:
    """``out/model``: the manifest (whole: it describes the model) and the files of the towers asked for."""
    sys.path.insert(0, str(CORE_SRC.parent))
    from clip_serverless.engine.model_dir import MANIFEST_NAME, ModelDir

    model = ModelDir.open(src, verify_checksums=True)
    dest = out / "model"
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    towers = list(towers)
    names = list(dict.fromkeys([MANIFEST_NAME] + [name for tower in towers for name in TOWER_FILES[tower]]))
    for name in names:
        source = model.path / name if name == MANIFEST_NAME else model.file(name)
        link_or_copy(source, dest / name)
    manifest = model.manifest
    demo = manifest.provenance.get("source") != "pretrained"
    try:  # the record ships in the layer: no build machine's absolute path
        shown = src.resolve().relative_to(REPO)
    except ValueError:
        shown = Path(src.name)
    write_record(out, "model", {
        "model_id": manifest.model_id, "precision": manifest.precision, "provenance": manifest.provenance,
        "demo": demo, "towers": towers, "source": str(shown)})
    if demo:
        say(demo_warning(manifest.model_id, manifest.provenance))
    return dest


def link_or_copy(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> None:
    """Hard-link when possible: a fp32 tower is hundreds of MB, and the build tree is throw-away."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def copy_tree(src: Path, dest: Path, ignore: Callable[[str, list[str]], Iterable[str]] | None = None) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=ignore, copy_function=link_or_copy)


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
        root = build_deps(args.requirements, args.out, args.arch, args.python, usable_cache())
    elif args.kind == "core":
        check_python(args.python)
        root = build_core(args.out, args.python)
    else:
        src = args.src if args.src.is_absolute() else REPO / args.src
        root = build_model(src, [t.strip() for t in args.towers.split(",") if t.strip()], args.out)
    print(f"build_layer {args.kind}: {root} {tree_bytes(args.out) / MiB:.1f} MiB")


if __name__ == "__main__":
    main()
