"""An optional on-disk tier for the local server: one file per entry under a root directory.

Files hold the codec's bytes at ``<root>/<key>`` (the key is a relative path, checked against the
key pattern so that nothing outside the root is ever touched). Writes go to a temporary file in the
same directory and are renamed into place, so a reader sees a whole old entry or a whole new one;
a file torn by a crash fails the checksum and is recomputed. There is no eviction: an entry is ~2.2 KB;
delete the directory to reclaim space. Faults (permissions, a full disk) are logged, counted as errors
and answered as misses; nothing here raises. A local :class:`~.tier.Tier`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from .codec import MAX_ENTRY_BYTES
from .faultlog import FaultLog
from .keys import KEY_PATTERN
from .tier import ALWAYS, Entry, InProcessTier, Policy, TierResult


class DiskTier(InProcessTier):
    name = "disk"
    remote = False
    policy: Policy = ALWAYS

    def __init__(self, root: str | Path, fault_log: FaultLog | None = None) -> None:
        self.root = Path(root)
        self.faults = fault_log or FaultLog()

    def path(self, key: str) -> Path:
        if not KEY_PATTERN.fullmatch(key):
            raise ValueError(f"not a cache key: {key[:200]!r}")
        return self.root / key

    def get(self, key: str) -> bytes | None:
        """The stored (unverified) bytes, or None for a missing entry or a fault."""
        return self._read(key)[0]

    def _read(self, key: str) -> tuple[bytes | None, bool]:
        """(bytes or None, whether that was a fault)."""
        try:
            with self.path(key).open("rb") as fh:
                return fh.read(MAX_ENTRY_BYTES + 1), False
        except FileNotFoundError:
            return None, False
        except (OSError, ValueError) as exc:
            self.faults.fault(self.name, f"read {type(exc).__name__}", str(exc)[:200])
            return None, True

    def put(self, key: str, blob: bytes) -> bool:
        """Write atomically (temp file + rename); False (logged) on a fault."""
        tmp: str | None = None
        try:
            target = self.path(key)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".part")
            with os.fdopen(fd, "wb") as fh:
                fh.write(blob)
            os.replace(tmp, target)
            return True
        except (OSError, ValueError) as exc:
            self.faults.fault(self.name, f"write {type(exc).__name__}", str(exc)[:200])
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            return False

    # -- the Tier interface ------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> TierResult:
        result = TierResult()
        for key in keys:
            blob, fault = self._read(key)
            if fault:
                result.errors += 1
                continue
            result.ok += 1
            if blob is not None:
                result.found[key] = blob
        return result

    def put_many(self, entries: Mapping[str, Entry], *, wait_for_completion: bool = True) -> TierResult:
        result = TierResult()
        for key, entry in entries.items():
            if self.put(key, entry.blob):
                result.ok += 1
            else:
                result.errors += 1
        return result
