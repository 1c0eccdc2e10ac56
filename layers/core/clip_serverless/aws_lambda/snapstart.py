"""Lambda SnapStart: renew, after a restore, what init created and a snapshot makes stale.

With SnapStart (python3.12+, published versions) Lambda runs init once, snapshots the process, and resumes
copies of that snapshot as new execution environments, minutes to days later. Whatever init created is
then shared by every copy and possibly stale:

- AWS clients' pooled connections (the S3 cache tier's, ``compare``'s Lambda client): closed by the peer
  long ago. Renewed by :func:`renew_clients` and by each client owner's hook.
- the API key read from Secrets Manager or SSM: may have been rotated since, perhaps because it leaked.
  Re-read by :func:`refresh_api_key`.
- ``random``'s Mersenne Twister (botocore's retry jitter draws from it) and numpy's global ``RandomState``:
  identical in every copy, so every copy draws the same numbers and retries in lockstep. Reseeded from the
  OS by :func:`reseed_random`.
- the ``uuid`` that ``GET /info`` reports: identical in every copy. Renewed by :func:`renew_instance_id`.

Lambda's python runtime ships the module ``snapshot_restore_py`` with ``register_before_snapshot(func,
*args, **kwargs)`` and ``register_after_restore(func, *args, **kwargs)``. The runtime runs before-snapshot
hooks in reverse registration order and after-restore hooks in registration order; an after-restore hook
that raises makes the runtime report the restore as failed and exit (the invoke gets ``SnapStartException``),
and the hooks and the runtime's own restore must finish within 10 s (``SnapStartTimeoutException``).
This module registers through it when it is importable, and otherwise keeps the hooks in a local registry
that :func:`run_before_snapshot` and :func:`run_after_restore` run in the same order (tests, and a local
simulation of a restore). On Lambda those two functions run nothing: the runtime runs its own registry.

**The API key fails closed.** When the re-read fails (after the bounded retries of
:mod:`clip_serverless.aws_lambda.secrets`, ≤ 3 s), the hook raises: the runtime discards the environment and the
next invoke restores a fresh one. Keeping the snapshot's key would accept, for the hours an environment
lives, a key that may have been rotated precisely because it leaked; the key holder also refuses every
request from then on, so nothing is served with the old key even if the error were swallowed. It is what
a function without SnapStart does when its init cannot read the key.

Entry point, once at init (the Lambda entry module)::

    snapstart.install(settings=settings, service=service)

Other modules add their own hooks with :func:`register_after_restore` (e.g. a client's ``renew``).
"""

from __future__ import annotations

import importlib
import logging
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

from ..aws_clients import forget_session

if TYPE_CHECKING:
    from ..service import ClipService
    from ..settings import Settings

SNAPSHOT_RESTORE_MODULE = "snapshot_restore_py"
log = logging.getLogger("clip_serverless.aws_lambda.snapstart")

F = TypeVar("F", bound=Callable[..., Any])
Hook = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]

_before_snapshot: list[Hook] = []
_after_restore: list[Hook] = []


def runtime_hooks() -> ModuleType | None:
    """Lambda's ``snapshot_restore_py`` when this runs in a managed python runtime, else None."""
    try:
        return importlib.import_module(SNAPSHOT_RESTORE_MODULE)
    except ImportError:
        return None


def register_before_snapshot(func: F, *args: Any, **kwargs: Any) -> F:
    """Run ``func(*args, **kwargs)`` before Lambda takes the snapshot (reverse registration order)."""
    runtime = runtime_hooks()
    if runtime is not None:
        runtime.register_before_snapshot(func, *args, **kwargs)
    else:
        _before_snapshot.append((func, args, kwargs))
    return func


def register_after_restore(func: F, *args: Any, **kwargs: Any) -> F:
    """Run ``func(*args, **kwargs)`` after Lambda restores a snapshot (registration order).

    A hook that raises fails the restore: raise only when serving would be wrong (see the API key);
    anything optional should log and return. All hooks together must finish well within 10 s.
    """
    runtime = runtime_hooks()
    if runtime is not None:
        runtime.register_after_restore(func, *args, **kwargs)
    else:
        _after_restore.append((func, args, kwargs))
    return func


def run_before_snapshot() -> None:
    """Run the locally registered before-snapshot hooks, last registered first (as the runtime does)."""
    for func, args, kwargs in reversed(list(_before_snapshot)):
        func(*args, **kwargs)


def run_after_restore() -> None:
    """Run the locally registered after-restore hooks in order (as the runtime does); the first error stops."""
    for func, args, kwargs in list(_after_restore):
        func(*args, **kwargs)


def local_hooks() -> tuple[list[Hook], list[Hook]]:
    """(before-snapshot, after-restore) hooks kept locally, i.e. registered off Lambda."""
    return list(_before_snapshot), list(_after_restore)


def clear_local_hooks() -> None:
    """Forget the locally registered hooks (tests)."""
    _before_snapshot.clear()
    _after_restore.clear()


# ---- the hooks ---------------------------------------------------------------------------------------
def reseed_random() -> None:
    """New seeds from the OS for ``random`` and, if loaded, numpy's legacy global generator.

    (``uuid.uuid4``, ``secrets`` and ``random.SystemRandom`` read the kernel on every call and keep no state
    in the process. numpy ``Generator`` objects made at init belong to whoever made them; this code makes none.)
    """
    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def renew_instance_id() -> None:
    """A new ``uuid`` for ``GET /info`` (made at import of the app module, so shared by every restored copy)."""
    app_module = sys.modules.get(f"{__package__.rpartition('.')[0]}.api.app")
    if app_module is not None and "_INSTANCE" in vars(app_module):
        vars(app_module)["_INSTANCE"] = str(uuid.uuid4())  # read by the /info route at each call


def renew_clients(service: ClipService) -> None:
    """New clients (and connection pools) for the service's cache tiers that have them (S3's client).
    Never raises."""
    if service.cache is not None:
        service.cache.renew()


def refresh_api_key(settings: Settings) -> None:
    """Re-read the API key from its store; raises (fails the restore) when it cannot be read."""
    holder = settings.api_key_holder
    started = time.perf_counter()
    try:
        changed = holder.refresh()
    except Exception:
        log.error("snapstart: the API key could not be re-read after restore; refusing to serve")
        raise
    log.info("snapstart: API key re-read after restore in %.0f ms (%s)", (time.perf_counter() - started) * 1000,
             "rotated since the snapshot" if changed else "unchanged")


def install(*, settings: Settings | None = None, service: ClipService | None = None,
            renew: Iterable[Callable[[], object]] = ()) -> list[str]:
    """Register this service's after-restore hooks, once, at init. Returns their names (for a log line).

    Order: random seeds and instance id (cheap, cannot fail), the AWS session, then clients (``service``'s S3
    tier, then each callable of ``renew``), then the API key when it comes from a store (the one hook that may fail the
    restore, bounded by :data:`clip_serverless.aws_lambda.secrets.DEFAULT_RETRY` at 3 s).
    """
    names: list[str] = []

    def add(func: Callable[..., Any], *args: Any) -> None:
        register_after_restore(func, *args)
        names.append(getattr(func, "__qualname__", repr(func)))

    add(reseed_random)
    add(renew_instance_id)
    add(forget_session)  # before any client is renewed: new clients, new session, fresh credentials
    if service is not None:
        add(renew_clients, service)
    for func in renew:
        add(func)
    if settings is not None and settings.api_key_holder.refreshable:
        add(refresh_api_key, settings)
    log.info("snapstart: %d after-restore hook(s) registered with %s: %s", len(names),
             SNAPSHOT_RESTORE_MODULE if runtime_hooks() is not None else "the local registry", ", ".join(names))
    return names
