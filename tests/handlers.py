"""Loading the Lambda functions' modules (functions/<name>/app.py) in-process, as Lambda's runtime would."""

from __future__ import annotations

import importlib.util
import itertools
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_counter = itertools.count()


def load_function(endpoint: str) -> Any:
    """Import ``functions/<endpoint>/app.py`` as a fresh module (module-level init runs again)."""
    path = REPO / "functions" / endpoint / "app.py"
    name = f"_lambda_{endpoint}_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
