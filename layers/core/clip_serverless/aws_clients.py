"""AWS clients straight from botocore, all from one session per process.

What boto3 adds (resources, s3transfer, multiprocessing managers) these clients never use, and it costs
~35 ms of import on a cold start; ``boto3.client`` is botocore's ``Session.create_client`` underneath. One
session lets the later clients reuse what the first one loaded (endpoint rules, partitions, retry
configuration: ~55 ms for the first client, ~20 ms for the next). botocore sessions are not thread-safe
to create clients from, so creation is serialised; clients themselves are thread-safe.

The session's data loader is :class:`NamedServicesLoader`: botocore's own, except that it does not list
every service botocore knows (449 directories) to check that the one asked for exists.

After a SnapStart restore :func:`forget_session` drops the session (and the credentials it resolved), so
the clients renewed then resolve everything afresh.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import botocore.session

_lock = threading.Lock()
_session: botocore.session.Session | None = None
_loader: Any = None  # the session's NamedServicesLoader


def client(service: str, **options: Any) -> Any:
    """``botocore``'s client for ``service`` (``"s3"``, ``"lambda"``, ...), created with ``options``
    (``config``, ``endpoint_url``, ``region_name``); region, credentials and endpoint overrides such as
    ``AWS_ENDPOINT_URL_LAMBDA`` come from the environment, as with boto3."""
    global _session, _loader
    with _lock:
        if _session is None:
            import botocore.session  # here, not at the top: only a process that calls AWS pays for botocore

            session = botocore.session.get_session()
            try:
                loader = named_services_loader(session.get_config_variable("data_path"))
                session.register_component("data_loader", loader)
            except Exception:  # another botocore, whose loader differs: its own loader (slower) will do
                loader = None
            _session, _loader = session, loader
        if _loader is not None:
            _loader.services.add(service)
        return _session.create_client(service, **options)


def forget_session() -> None:
    """Make the next :func:`client` start a new session (after a SnapStart restore: new credentials)."""
    global _session, _loader
    with _lock:
        _session = _loader = None


def named_services_loader(data_path: str | None = None) -> Any:
    """A :class:`NamedServicesLoader` over the search paths botocore's ``create_loader`` would use:
    ``data_path`` (``AWS_DATA_PATH``) first, then ``~/.aws/models`` and botocore's own ``data/``."""
    extra = [os.path.expanduser(os.path.expandvars(path)) for path in data_path.split(os.pathsep)] if data_path else []
    return _loader_class()(extra_search_paths=extra)


@functools.cache
def _loader_class() -> Any:
    """:class:`NamedServicesLoader`, defined on first use (it subclasses botocore's ``Loader``)."""
    from botocore.loaders import Loader

    class NamedServicesLoader(Loader):
        """botocore's ``Loader`` whose list of available services holds only those in ``services`` (the
        ones this process creates clients for) that exist, by botocore's own test: a directory of that
        name in a search path with an API version directory holding the model type's file.

        ``load_service_model`` checks the service against that list, and botocore builds it by walking
        all 449 service directories of its ``data/`` (~900 ``listdir`` and ~2,700 ``stat`` calls), once
        for ``service-2`` and once for ``endpoint-rule-set-1``: ~18 ms of the first client's ~57 ms."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.services: set[str] = set()

        def list_available_services(self, type_name: str) -> list[str]:
            found = set()
            try:
                for root in self.search_paths:
                    for name in self.services:
                        directory = os.path.join(root, name)
                        if name not in found and os.path.isdir(directory) and any(
                                self.file_loader.exists(os.path.join(directory, version, type_name))
                                for version in os.listdir(directory)):
                            found.add(name)
            except Exception:  # another botocore, whose loader works otherwise: its own walk
                listed: list[str] = super().list_available_services(type_name)
                return listed
            return sorted(found)

    return NamedServicesLoader
