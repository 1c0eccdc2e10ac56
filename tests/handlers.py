"""Loading modules from their files: the Lambda functions' (functions/<name>/app.py) in-process, as Lambda's
runtime would, and infra/'s scripts, which are no package."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_counter = itertools.count()


def load_module(name: str, path: Path) -> ModuleType:
    """Import the file ``path`` as the module ``name``, registered in sys.modules (dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_function(endpoint: str) -> Any:
    """Import ``functions/<endpoint>/app.py`` as a fresh module (module-level init runs again)."""
    return load_module(f"_lambda_{endpoint}_{next(_counter)}", REPO / "functions" / endpoint / "app.py")
