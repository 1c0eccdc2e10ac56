"""AWS clients straight from botocore, all from one session per process.

What boto3 adds (resources, s3transfer, multiprocessing managers) these clients never use, and it costs
~35 ms of import on a cold start; ``boto3.client`` is botocore's ``Session.create_client`` underneath. One
session lets the later clients reuse what the first one loaded (endpoint rules, partitions, retry
configuration: ~55 ms for the first client, ~20 ms for the next). botocore sessions are not thread-safe
to create clients from, so creation is serialised; clients themselves are thread-safe.

After a SnapStart restore :func:`forget_session` drops the session (and the credentials it resolved), so
the clients renewed then resolve everything afresh.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import botocore.session

_lock = threading.Lock()
_session: botocore.session.Session | None = None


def client(service: str, **options: Any) -> Any:
    """``botocore``'s client for ``service`` (``"s3"``, ``"lambda"``, ...), created with ``options``
    (``config``, ``endpoint_url``, ``region_name``); region, credentials and endpoint overrides such as
    ``AWS_ENDPOINT_URL_LAMBDA`` come from the environment, as with boto3."""
    global _session
    with _lock:
        if _session is None:
            import botocore.session  # here, not at the top: only a process that calls AWS pays for botocore

            _session = botocore.session.get_session()
        return _session.create_client(service, **options)


def forget_session() -> None:
    """Make the next :func:`client` start a new session (after a SnapStart restore: new credentials)."""
    global _session
    with _lock:
        _session = None
