"""What a built function imports at init, and what each package costs (``python -X importtime``).

For each function: a python3.12 over its layout (code, layers, environment, as bench_cold_start.py's plain
way) runs its init and lists the modules then loaded, in order. Init imports in several threads at once
(the sessions load beside FastAPI's import), which ``-X importtime`` cannot attribute, so a second, fresh
process imports the same modules one after the other under ``-X importtime``; each module's own time (its
body, not the modules it imports) is summed per top-level package. Repeated ``--runs`` times (medians).
With ``--baseline REF``, the same for the core layer of that commit, side by side, run by run.

    .venv/bin/python bench/bench_imports.py [--runs 5] [--baseline REF] [--functions embed_text,compare]

Uses the build of bench_cold_start.py (build/bench-cold-start/sam-int8; ``--reuse-build`` as it is).
Import time is not all of init: the tokenizer's load, the sessions, FastAPI's route and model set-up and
the first request come on top (bench_cold_start.py measures the whole; each function logs its init phases).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "infra"))
sys.path.insert(0, str(REPO / "bench"))

from bench_cold_start import BENCH, INT8, baseline_tree, sam_build, with_baseline  # noqa: E402
from clip_serverless.api.endpoints import REGISTRY  # noqa: E402
from clip_serverless.api.endpoints import endpoint as endpoint_spec  # noqa: E402
from lambda_runtime import BuiltApp, FunctionSpec, LocalLambda, built_function, find_python  # noqa: E402

LIST_MODULES = """
import importlib, json, sys
importlib.import_module("app")
print(json.dumps([name for name, module in list(sys.modules.items()) if module is not None]))
"""
# Imported one by one; a module that cannot be imported on its own (platform stubs, __main__) is skipped.
# Garbage collection off, as in a function's init (entry.handler_for), and so that no collection's pause
# lands in whichever module's import set it off.
IMPORT_ALL = """
import gc, importlib, json, sys
gc.disable()
for name in json.loads(sys.argv[1]):
    try:
        importlib.import_module(name)
    except Exception:
        pass
"""
LINE = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|( *)(\S+)$")


def init_modules(spec: FunctionSpec, python: str, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """The modules loaded by ``spec``'s init, in order, and the environment that ran it."""
    fn = LocalLambda(spec, workdir, python=python, env={"CLIP_CACHE": "off"})
    try:
        env = fn.prepare()
    finally:
        fn.stop()
    env.pop("AWS_LAMBDA_RUNTIME_API", None)
    done = subprocess.run([python, "-c", LIST_MODULES], cwd=spec.code, env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    names = json.loads(done.stdout.strip().splitlines()[-1])
    return [n for n in names if n not in ("__main__", "app") and not n.startswith("_lambda")], env


def package_costs(modules: list[str], spec: FunctionSpec, python: str, env: dict[str, str]) -> dict[str, float]:
    """Milliseconds of each top-level package's own module bodies, ``modules`` imported one after the other."""
    done = subprocess.run([python, "-X", "importtime", "-c", IMPORT_ALL, json.dumps(modules)], cwd=spec.code,
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    costs: dict[str, float] = defaultdict(float)
    for line in done.stderr.splitlines():
        match = LINE.match(line)
        if match:
            costs[match.group(4).split(".")[0]] += int(match.group(1)) / 1000
    return dict(costs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--functions", default=",".join(spec.name for spec in REGISTRY))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline", metavar="REF", help="also the core layer of git commit REF")
    parser.add_argument("--top", type=int, default=14, help="packages listed per function (the rest summed)")
    parser.add_argument("--reuse-build", action="store_true")
    args = parser.parse_args()
    python = find_python()
    built = BuiltApp(BENCH / "sam-int8") if args.reuse_build else sam_build(INT8, python)
    baseline = baseline_tree(args.baseline, python) if args.baseline else None
    for name in (n.strip() for n in args.functions.split(",") if n.strip()):
        spec = built_function(built, endpoint_spec(name).function, resources={"CacheBucket": ""})
        variants = {"now": spec}
        if baseline is not None:
            variants = {args.baseline: with_baseline(spec, built, baseline, name), "now": spec}
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        with tempfile.TemporaryDirectory(prefix="imports-") as workdir:
            listed = {v: init_modules(s, python, Path(workdir) / v) for v, s in variants.items()}
            for _ in range(args.runs):
                for variant, s in variants.items():
                    modules, env = listed[variant]
                    runs[variant].append(package_costs(modules, s, python, env))
        medians = {v: {pkg: statistics.median(r.get(pkg, 0.0) for r in rs) for pkg in {p for r in rs for p in r}}
                   for v, rs in runs.items()}
        seen = {p for m in medians.values() for p in m}
        order = sorted(seen, key=lambda p: -max(m.get(p, 0.0) for m in medians.values()))
        shown, rest = order[: args.top], order[args.top:]
        print(f"\n{name}: import time by top-level package (ms, median of {args.runs}; modules imported at init, "
              f"one after the other):\n")
        print("| package | " + " | ".join(variants) + (" | change |" if baseline else " |"))
        print("|---|" + "---|" * (len(variants) + (1 if baseline else 0)))
        for label, group in [(p, [p]) for p in shown] + [("(other)", rest), ("total", order)]:
            values = {v: sum(medians[v].get(p, 0.0) for p in group) for v in variants}
            cells = [f"{values[v]:.1f}" if values[v] else "-" for v in variants]
            if baseline:
                cells.append(f"{values['now'] - values[args.baseline]:+.1f}")
            print(f"| {label} | " + " | ".join(cells) + " |")
        counts = ", ".join(f"{v}: {len(listed[v][0])}" for v in variants)
        line = f"\nmodules imported at init: {counts}"
        if baseline is not None:
            before = {m.split(".")[0] for m in listed[args.baseline][0]}
            after = {m.split(".")[0] for m in listed["now"][0]}
            line += f"; packages no longer imported: {', '.join(sorted(before - after)) or '-'}"
            line += f"; new: {', '.join(sorted(after - before)) or '-'}"
        print(line)

if __name__ == "__main__":
    main()
