"""The container image's file layout, assembled without Docker from the Dockerfile's own instructions.

The image cannot be built here, so this reads ``Dockerfile`` (``ARG``, ``ENV``, ``COPY``, ``RUN``,
``CMD``), performs its ``COPY`` steps into a directory that stands for the image's root, and replaces
the one ``RUN`` (``pip install -r requirements-all.txt --target $LAMBDA_TASK_ROOT``) with the
contents of a built layer installed from the same pinned file. A function of that layout then runs
under :class:`~lambda_runtime.runner.LocalLambda` like a zip function: what the image would hold, at
the paths the image would hold it, driven by the same runtime client.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from .runner import FunctionSpec, link_tree
from .sam_build import REPO

# The base image's own environment (public.ecr.aws/lambda/python:3.12).
BASE_ENV = {"LAMBDA_TASK_ROOT": "/var/task", "LAMBDA_RUNTIME_DIR": "/var/runtime"}


@dataclass
class Dockerfile:
    base: str
    args: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    copies: list[tuple[list[str], str]] = field(default_factory=list)  # (sources, destination), expanded
    runs: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, path: Path, build_args: dict[str, str] | None = None) -> Dockerfile:
        lines, current = [], ""
        for raw in path.read_text().splitlines():
            stripped = raw.strip()
            if not stripped or stripped.startswith("#"):
                continue
            current += stripped[:-1] + " " if stripped.endswith("\\") else stripped
            if not stripped.endswith("\\"):
                lines.append(current)
                current = ""
        parsed: Dockerfile | None = None
        variables = dict(BASE_ENV)
        for line in lines:
            op, _, rest = line.partition(" ")
            op = op.upper()
            if op == "FROM":
                parsed = cls(base=rest.strip())
                continue
            if parsed is None:
                raise ValueError(f"{path}: {op} before FROM")
            if op == "ARG":
                name, _, default = rest.strip().partition("=")
                value = (build_args or {}).get(name, default)
                parsed.args[name] = variables[name] = value
            elif op == "ENV":
                name, _, value = rest.strip().partition("=")
                parsed.env[name] = variables[name] = _expand(value, variables)
            elif op == "COPY":
                *sources, dest = (_expand(word, variables) for word in shlex.split(rest))
                parsed.copies.append((sources, dest))
            elif op == "RUN":
                parsed.runs.append(_expand(rest, variables))
            elif op == "CMD":
                parsed.cmd = json.loads(rest)
            else:
                raise ValueError(f"{path}: instruction {op} is not understood by this layout check")
        if parsed is None:
            raise ValueError(f"{path}: no FROM")
        return parsed


def _expand(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m.group(1) or m.group(2), ""), text)


def assemble(dockerfile: Dockerfile, root: Path, pip_target_from: Path, context: Path = REPO) -> Path:
    """Perform the COPY steps into ``root`` (the image's ``/``); the pip RUN step becomes a copy of
    ``pip_target_from`` (a built layer's ``python/`` from the same requirements) into the task root."""
    task_root = root / BASE_ENV["LAMBDA_TASK_ROOT"].lstrip("/")
    task_root.mkdir(parents=True, exist_ok=True)
    for run in dockerfile.runs:
        if "pip install" in run and "--target" in run:
            link_tree(pip_target_from, task_root)
        else:
            raise ValueError(f"RUN step not reproducible without Docker: {run}")
    for sources, dest in dockerfile.copies:
        target = root / dest.lstrip("/")
        for pattern in sources:
            matches = sorted(context.glob(pattern))
            if not matches:
                raise FileNotFoundError(f"COPY {pattern}: nothing in the build context {context} matches")
            for source in matches:
                if source.is_dir():
                    link_tree(source, target)
                else:
                    destination = target / source.name if dest.endswith("/") else target
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    link_tree_file(source, destination)
    return root


def link_tree_file(source: Path, destination: Path) -> None:
    if destination.exists():
        destination.unlink()
    destination.write_bytes(source.read_bytes())


def image_function(dockerfile: Dockerfile, root: Path, name: str, command: str | None = None,
                   environment: dict[str, str] | None = None, memory_mb: int = 3008) -> FunctionSpec:
    """A function of the assembled image: ``command`` overrides CMD, as ``ImageConfig.Command`` does."""
    handler = command or dockerfile.cmd[0]
    task_root = root / BASE_ENV["LAMBDA_TASK_ROOT"].lstrip("/")
    return FunctionSpec(name=name, code=task_root, handler=handler, layers=(root / "opt",),
                        environment={**dockerfile.env, **(environment or {})}, memory_mb=memory_mb)
