"""Running one built function as Lambda does, in a fresh python3.12 process, without Docker.

What Lambda does at a cold start, and what :class:`LocalLambda` reproduces:

- the function's code is ``/var/task`` (here: its built directory, the working directory);
- its layers are extracted in order into ``/opt``, later layers overwriting earlier ones (here: a
  per-run ``opt/`` of hard links); ``/opt/python`` and ``/opt/python/lib/python3.12/site-packages``
  are on ``sys.path`` after ``/var/task``; the runtime's own packages (boto3) come after them;
- environment variables are the template's, with the reserved ``AWS_LAMBDA_*`` set; values naming
  ``/opt/...`` or ``/tmp/...`` are mapped to this run's directories;
- ``AWS_LAMBDA_EXEC_WRAPPER``, when set, is run with the runtime command as its arguments;
- other functions are reached through Lambda's Invoke API at ``AWS_ENDPOINT_URL_LAMBDA`` (here:
  :class:`~lambda_runtime.invoke_api.LambdaService`, which runs their built code the same way);
- the runtime client, ``awslambdaric`` (AWS's own, from PyPI, installed for Python 3.12 under
  ``build/lambda-runtime/``), imports the handler module (init) and then polls the Runtime API,
  here :class:`~lambda_runtime.runtime_api.RuntimeApi`.

Not reproduced: Amazon Linux's libraries (the wheels are manylinux and self-contained), the memory
limit, and the CPU share of the configured memory (``cpus`` pins the process to fewer cores).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from .runtime_api import InitError, InvocationResult, RuntimeApi
from .sam_build import REPO, BuiltApp

# The runtime client and the SDK the managed python3.12 runtime provides (not shipped in the layers).
RUNTIME_PACKAGES = ("awslambdaric==4.2.2", "boto3==1.44.8")
RUNTIME_ROOT = REPO / "build" / "lambda-runtime"
PYTHON_VERSION = "3.12"


class LocalLambdaError(RuntimeError):
    pass


def find_python(version: str = PYTHON_VERSION) -> str:
    """The real executable of Python ``version``: ``$CLIP_LAMBDA_PYTHON``, ``python3.12`` on PATH, or pyenv's."""
    candidates = [os.environ.get("CLIP_LAMBDA_PYTHON", ""), shutil.which(f"python{version}") or ""]
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates += sorted(glob.glob(f"{pyenv_root}/versions/{version}.*/bin/python{version}"), reverse=True)
    for candidate in filter(None, candidates):
        try:
            out = subprocess.run([candidate, "-c", "import sys; print(sys.executable, *sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout.split()
        except (OSError, subprocess.SubprocessError):
            continue
        if ".".join(out[1:3]) == version:
            return out[0]
    raise LocalLambdaError(f"Python {version} not found (Lambda's runtime version): set CLIP_LAMBDA_PYTHON, "
                           f"or put python{version} on PATH (pyenv: PYENV_VERSION=<default>:{version}.x)")


def ensure_runtime(python: str) -> Path:
    """``build/lambda-runtime/<key>/`` with ``site/`` (awslambdaric, boto3) and ``bin/python3``.

    Installed once per package set; pip's download cache makes a reinstall cheap.
    """
    key = hashlib.sha256("\n".join((python, *RUNTIME_PACKAGES)).encode()).hexdigest()[:12]
    root = RUNTIME_ROOT / f"py{PYTHON_VERSION.replace('.', '')}-{key}"
    if (root / ".complete").exists():
        return root
    if root.exists():
        shutil.rmtree(root)
    (root / "bin").mkdir(parents=True)
    pip = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          "--only-binary=:all:", "--target", str(root / "site"), *RUNTIME_PACKAGES],
                         capture_output=True, text=True)
    if pip.returncode != 0:
        raise LocalLambdaError(f"installing {' '.join(RUNTIME_PACKAGES)} for Python {PYTHON_VERSION} failed:\n"
                               f"{pip.stdout}{pip.stderr}")
    # The runtime's `python3` (the exec wrapper runs it), as /var/lang/bin/python3 on Lambda.
    (root / "bin" / "python3").symlink_to(python)
    (root / ".complete").write_text("\n".join(RUNTIME_PACKAGES) + "\n")
    return root


def link_tree(src: Path, dest: Path) -> None:
    """Merge ``src`` into ``dest`` with hard links (copies across file systems), overwriting files."""
    for path in sorted(src.rglob("*")):
        target = dest / path.relative_to(src)
        if path.is_dir() and not path.is_symlink():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        if path.is_symlink():
            target.symlink_to(os.readlink(path))
            continue
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)


@dataclass(frozen=True)
class FunctionSpec:
    """What an execution environment is made of: code, layers (in order), handler, environment.

    ``environment`` values may name ``/opt/...`` and ``/tmp/...``: they are mapped to the run's
    directories.
    """

    name: str
    code: Path
    handler: str
    layers: tuple[Path, ...]
    environment: Mapping[str, str]
    memory_mb: int = 2048


# Local runs serve no API key unless asked (``parameters={"ApiKeySource": "ssm", ...}``): the key the
# stack generates by default exists only in a deployed account.
LOCAL_PARAMETERS = {"ApiKeySource": "none"}


def built_function(app: BuiltApp, name: str, *, parameters: Mapping[str, str] | None = None,
                   resources: Mapping[str, str] | None = None) -> FunctionSpec:
    """The spec of a function of a ``sam build`` output, its environment resolved as CloudFormation would."""
    fn = app.function(name)
    resolver = app.resolver({**LOCAL_PARAMETERS, **(parameters or {})}, resources)
    return FunctionSpec(name=name, code=fn.code, handler=fn.handler, layers=tuple(layer.path for layer in fn.layers),
                        environment=app.environment(name, resolver), memory_mb=int(resolver.resolve(fn.raw_memory)))


class LocalLambda:
    """One execution environment of a function: start (init), invoke any number of times, stop."""

    def __init__(self, spec: FunctionSpec, workdir: Path, *, env: Mapping[str, str] | None = None,
                 python: str | None = None, cpus: int | None = None, timeout_s: float = 60.0) -> None:
        self.spec = spec
        self.workdir = Path(workdir)
        self.python = python or find_python()
        self.runtime = ensure_runtime(self.python)
        self.cpus = cpus
        self.extra_env = dict(env or {})
        self.api = RuntimeApi(f"arn:aws:lambda:us-east-1:123456789012:function:{spec.name}", timeout_s=timeout_s)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.log_path = self.workdir / "output.log"
        self._log: IO[bytes] | None = None

    # -- environment -----------------------------------------------------------------------------
    def _prepare_dirs(self) -> tuple[Path, Path]:
        opt, tmp = self.workdir / "opt", self.workdir / "tmp"
        for directory in (opt, tmp):
            if directory.exists():
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
        for layer in self.spec.layers:
            link_tree(layer, opt)
        return opt, tmp

    @staticmethod
    def _map(value: str, opt: Path, tmp: Path) -> str:
        for prefix, local in (("/opt", opt), ("/tmp", tmp)):
            if value == prefix or value.startswith(prefix + "/"):
                return str(local) + value[len(prefix):]
        return value

    def environment(self, opt: Path, tmp: Path) -> dict[str, str]:
        spec = self.spec
        env = {
            "PATH": f"{self.runtime / 'bin'}:{opt / 'bin'}:/usr/local/bin:/usr/bin:/bin",
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "PYTHONPATH": ":".join([str(spec.code), str(opt / "python" / "lib" / f"python{PYTHON_VERSION}"
                                                        / "site-packages"),
                                    str(opt / "python"), str(self.runtime / "site")]),
            "PYTHONNOUSERSITE": "1",
            "LAMBDA_TASK_ROOT": str(spec.code),
            "LAMBDA_RUNTIME_DIR": str(self.runtime / "site"),
            "AWS_EXECUTION_ENV": f"AWS_Lambda_python{PYTHON_VERSION}",
            "AWS_LAMBDA_FUNCTION_NAME": spec.name,
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(spec.memory_mb),
            "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{spec.name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": "local",
            "AWS_LAMBDA_RUNTIME_API": self.api.address,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            # Never real credentials: every AWS call goes to a stand-in.
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_SESSION_TOKEN": "testing",
        }
        env.update({k: self._map(v, opt, tmp) for k, v in {**spec.environment, **self.extra_env}.items()})
        return {k: v for k, v in env.items() if v != ""}

    def prepare(self) -> dict[str, str]:
        """Lay out ``opt/`` and ``tmp/`` afresh and return the process environment (no process started)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        opt, tmp = self._prepare_dirs()
        return self.environment(opt, tmp)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the process: Lambda's init phase runs now (the handler module is imported)."""
        if self.process is not None:
            raise LocalLambdaError("already started")
        env = self.prepare()
        cmd = [self.python, "-m", "awslambdaric", self.spec.handler]
        if env.get("AWS_LAMBDA_EXEC_WRAPPER"):
            cmd = [env["AWS_LAMBDA_EXEC_WRAPPER"], *cmd]
        cpus = self.cpus

        def restrict() -> None:  # runs in the child before exec
            if cpus:
                os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cpus]))

        self._log = self.log_path.open("ab")
        self.started_at = time.perf_counter()
        self.process = subprocess.Popen(cmd, cwd=self.spec.code, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, preexec_fn=restrict if cpus else None)

    def invoke(self, event: bytes | dict[str, Any], timeout_s: float | None = None) -> InvocationResult:
        if self.process is None:
            self.start()
        try:
            return self.api.invoke(event, timeout_s)
        except InitError as exc:
            raise LocalLambdaError(f"{self.spec.name} failed at init: {exc}\n--- output ---\n{self.output()}") from None
        except TimeoutError:
            code = self.process.poll() if self.process else None
            state = "running" if code is None else f"exited {code}"
            raise LocalLambdaError(f"{self.spec.name}: no answer (process {state})"
                                   f"\n--- output ---\n{self.output()}") from None

    def invoke_json(self, event: bytes | dict[str, Any]) -> Any:
        """The handler's JSON answer (an API Gateway response dict); an error result raises."""
        result = self.invoke(event)
        if result.kind != "response":
            raise LocalLambdaError(f"{self.spec.name} raised {result.error_type}: {result.body.decode()}"
                                   f"\n--- output ---\n{self.output()}")
        return result.json()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.api.close()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> LocalLambda:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cold_start(spec: FunctionSpec, event: dict[str, Any], workdir: Path, **kwargs: Any) -> tuple[float, Any]:
    """Seconds from process start to the first response, and that response (parsed), under AWS's runtime
    client (its import and Runtime API calls included, as on Lambda)."""
    with LocalLambda(spec, workdir, **kwargs) as fn:
        future = fn.api.submit(json.dumps(event).encode())  # queued first: the first poll gets it at once
        fn.start()
        result = future.result(timeout=fn.api.timeout_s)
        elapsed = time.perf_counter() - fn.started_at
        if result.kind != "response":
            raise LocalLambdaError(f"{spec.name}: {result.body.decode()}\n{fn.output()}")
        return elapsed, result.json()


# The plain way: a fresh python3.12 that imports the handler and calls it once, no runtime client between.
PLAIN_MARK = "clip-plain-answer: "
PLAIN_DRIVER = """
import importlib, json, sys
module, _, name = sys.argv[1].rpartition(".")
handler = getattr(importlib.import_module(module), name)

class Context:
    function_name = "plain"
    function_version = "$LATEST"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:plain"
    memory_limit_in_mb = 2048
    aws_request_id = "00000000-0000-0000-0000-000000000000"
    log_group_name = log_stream_name = "plain"

    def get_remaining_time_in_millis(self):
        return 30000

with open(sys.argv[2], "rb") as fh:
    event = json.load(fh)
result = handler(event, Context())
sys.stdout.write("\\n" + MARK + json.dumps(result) + "\\n")
sys.stdout.flush()
""".replace("MARK", repr(PLAIN_MARK))


def plain_cold_start(spec: FunctionSpec, event: dict[str, Any], workdir: Path, *, env: Mapping[str, str] | None = None,
                     python: str | None = None, cpus: int | None = None,
                     timeout_s: float = 60.0) -> tuple[float, Any]:
    """Seconds from spawning a plain python3.12 over the function's layout (code, layers under ``opt/``, its
    environment) to its handler's first answer, and that answer: :func:`cold_start` without the runtime client."""
    fn = LocalLambda(spec, workdir, env=env, python=python, cpus=cpus, timeout_s=timeout_s)
    try:
        environment = fn.prepare()
        environment.pop("AWS_LAMBDA_RUNTIME_API", None)
        event_path = workdir / "event.json"
        event_path.write_text(json.dumps(event))

        def restrict() -> None:  # runs in the child before exec
            if cpus:
                os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cpus]))

        answer, elapsed = None, 0.0
        with fn.log_path.open("ab") as log:
            started = time.perf_counter()
            process = subprocess.Popen([fn.python, "-c", PLAIN_DRIVER, spec.handler, str(event_path)],
                                       cwd=spec.code, env=environment, stdout=subprocess.PIPE, stderr=log,
                                       preexec_fn=restrict if cpus else None)
            assert process.stdout is not None
            for line in process.stdout:  # the clock stops at the answer, not at the interpreter's exit
                if line.startswith(PLAIN_MARK.encode()):
                    elapsed = time.perf_counter() - started
                    answer = json.loads(line[len(PLAIN_MARK):])
                    break
            process.stdout.close()
            code = process.wait(timeout=timeout_s)
    finally:
        fn.api.close()
    if answer is None:
        raise LocalLambdaError(f"{spec.name} (plain python) exited {code} without an answer:\n{fn.output()}")
    return elapsed, answer
