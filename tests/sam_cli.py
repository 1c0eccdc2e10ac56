"""Where the tests find the AWS SAM CLI: ``$CLIP_SAM``, else .venv-sam (``make sam-setup``).

Tests that use it are marked ``sam`` (``make test-fast`` deselects them); once selected, a missing CLI fails.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def sam_cli() -> str:
    """The ``sam`` executable."""
    candidate = os.environ.get("CLIP_SAM") or str(REPO / ".venv-sam" / "bin" / "sam")
    assert Path(candidate).exists() or shutil.which(candidate), \
        f"AWS SAM CLI not found at {candidate}: `make sam-setup` installs it into .venv-sam"
    return candidate


def sam_python() -> Path:
    """The Python of the SAM CLI's venv, to import samcli's own code."""
    sam = sam_cli()
    python = Path(shutil.which(sam) or sam).parent / "python"
    assert python.exists(), f"the SAM CLI's Python ({python}) is missing: `make sam-setup` installs it"
    return python
