"""Fetching images from caller-supplied URLs without becoming an SSRF proxy.

Roboflow's advisory GHSA-hjmm-hr52-vrp2 is the threat: a URL that points at the instance metadata
service (169.254.169.254), at loopback or at a private network. Each hop of a fetch is checked:

1. https only (http only when configured), no credentials in the URL, a real host name (no IP
   literal, no single-label name such as ``localhost``);
2. the name is resolved once, and *every* address it resolves to must be globally routable
   (IPv4-mapped and 6to4/Teredo-embedded IPv4 included), else the URL is refused;
3. the connection goes to the address that was checked (TLS still verifies the host name), so a
   DNS answer that changes between check and connect (rebinding) cannot redirect it;
4. redirects are followed by hand, each hop checked again, at most ``max_redirects``;
5. connect, read and total timeouts, and a byte cap enforced while streaming.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

_DNS_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="dns")
# Fetches run in workers so that the caller's wait is bounded by the total timeout even when a server
# drips one byte per read-timeout; a worker left behind ends at its own socket timeouts.
_FETCH_POOL = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="fetch")


class UrlFetchError(Exception):
    """The URL was refused or could not be fetched; the message is safe to return to the caller."""


def system_resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def is_public_address(address: IPAddress) -> bool:
    """True for a globally routable unicast address; embedded IPv4 addresses are checked too."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo[1] if address.teredo else None)
        if embedded is not None and not is_public_address(embedded):
            return False
    return address.is_global and not address.is_multicast


@dataclass(frozen=True)
class UrlPolicy:
    allow_http: bool = False
    connect_timeout: float = 3.0
    read_timeout: float = 10.0
    total_timeout: float = 15.0
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 3
    resolve: Resolver = system_resolve
    address_allowed: Callable[[IPAddress], bool] = is_public_address


@dataclass(frozen=True)
class _Target:
    scheme: str
    host: str  # IDNA-encoded, lower case
    port: int
    path: str  # path and query, never empty


def _parse(url: str, policy: UrlPolicy) -> _Target:
    if len(url) > 4096 or any(c.isspace() or ord(c) < 32 or c == "\\" for c in url):
        raise UrlFetchError("Provided image URL is invalid")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlFetchError("Provided image URL is invalid") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http"):
        raise UrlFetchError("Provided image URL is invalid")
    if scheme == "http" and not policy.allow_http:
        raise UrlFetchError("Providing images via non https:// URL is not supported in this configuration.")
    if parts.username is not None or parts.password is not None:
        raise UrlFetchError("Image URLs with credentials are not supported.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlFetchError("Provided image URL is invalid")
    try:
        ipaddress.ip_address(host)
        is_literal = True
    except ValueError:
        is_literal = False
    if is_literal or "." not in host:
        raise UrlFetchError("Providing images via URL without FQDN is not supported in this configuration.")
    try:
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise UrlFetchError("Provided image URL is invalid") from None
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return _Target(scheme=scheme, host=host, port=port or (443 if scheme == "https" else 80), path=path)


def _checked_address(target: _Target, policy: UrlPolicy, deadline: float) -> str:
    # getaddrinfo has no timeout of its own; bound it so a slow resolver cannot hang the request.
    future = _DNS_POOL.submit(policy.resolve, target.host, target.port)
    try:
        addresses = future.result(timeout=max(0.1, min(policy.connect_timeout, deadline - time.monotonic())))
    except concurrent.futures.TimeoutError:
        raise UrlFetchError("Timed out resolving the image URL's host name.") from None
    except OSError:
        raise UrlFetchError("The image URL's host name could not be resolved.") from None
    parsed: list[IPAddress] = []
    for raw in addresses:
        try:
            parsed.append(ipaddress.ip_address(raw.split("%", 1)[0]))
        except ValueError:
            raise UrlFetchError("URL points to a network destination that is not allowed.") from None
    if not parsed or not all(policy.address_allowed(a) for a in parsed):
        raise UrlFetchError("URL points to a network destination that is not allowed.")
    return str(parsed[0])


def fetch_image_url(url: str, policy: UrlPolicy) -> bytes:
    """Download the body at ``url`` under ``policy``; raises :class:`UrlFetchError` with a public message.

    Returns within about ``policy.total_timeout`` seconds whatever the server does.
    """
    deadline = time.monotonic() + policy.total_timeout
    responses: list[Any] = []  # the worker's open response, so a timed-out read can be interrupted
    future = _FETCH_POOL.submit(_fetch, url, policy, deadline, responses)
    try:
        return future.result(timeout=policy.total_timeout + 0.5)
    except concurrent.futures.TimeoutError:
        for response in responses:
            shutdown = getattr(response, "shutdown", None)  # urllib3 >= 2.3: unblocks a read in progress
            if callable(shutdown):
                shutdown()
        raise UrlFetchError("Timed out fetching the image URL.") from None


def _fetch(url: str, policy: UrlPolicy, deadline: float, responses: list[Any]) -> bytes:
    import urllib3  # only callers that fetch URLs pay for it

    current = url
    for _hop in range(policy.max_redirects + 1):
        target = _parse(current, policy)
        address = _checked_address(target, policy, deadline)
        timeout = urllib3.Timeout(connect=policy.connect_timeout, read=policy.read_timeout)
        pool: urllib3.HTTPConnectionPool
        if target.scheme == "https":
            pool = urllib3.HTTPSConnectionPool(
                address, target.port, timeout=timeout, retries=False, maxsize=1,
                server_hostname=target.host, assert_hostname=target.host, cert_reqs="CERT_REQUIRED")
        else:
            pool = urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False, maxsize=1)
        default_port = 443 if target.scheme == "https" else 80
        host_header = target.host if target.port == default_port else f"{target.host}:{target.port}"
        try:
            response = pool.urlopen(
                "GET", target.path, redirect=False, retries=False, preload_content=False,
                headers={"Host": host_header, "User-Agent": "clip-serverless", "Accept": "image/*,*/*;q=0.5",
                         "Accept-Encoding": "identity"})
        except urllib3.exceptions.NewConnectionError:  # a subclass of ConnectTimeoutError in urllib3 2
            pool.close()
            raise UrlFetchError("Could not connect to the image URL.") from None
        except urllib3.exceptions.TimeoutError:
            pool.close()
            raise UrlFetchError("Timed out fetching the image URL.") from None
        except urllib3.exceptions.HTTPError:
            pool.close()
            raise UrlFetchError("Could not connect to the image URL.") from None
        responses.append(response)
        try:
            if response.status in (301, 302, 303, 307, 308):
                location = response.headers.get("Location")
                if not location:
                    raise UrlFetchError("The image URL redirected without a location.")
                current = urljoin(current, location)
                continue
            if response.status != 200:
                raise UrlFetchError(f"The image URL answered HTTP {response.status}.")
            return _read_capped(response, policy, deadline)
        finally:
            response.release_conn()
            pool.close()
    raise UrlFetchError(f"The image URL redirected more than {policy.max_redirects} times.")


def _read_capped(response: Any, policy: UrlPolicy, deadline: float) -> bytes:
    import urllib3

    declared = response.headers.get("Content-Length")
    too_large = f"The image at the URL is larger than {policy.max_bytes} bytes."
    if declared is not None and declared.isdigit() and int(declared) > policy.max_bytes:
        raise UrlFetchError(too_large)
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.stream(16 * 1024, decode_content=False):
            size += len(chunk)
            if size > policy.max_bytes:
                raise UrlFetchError(too_large)
            if time.monotonic() > deadline:
                raise UrlFetchError("Timed out fetching the image URL.")
            chunks.append(chunk)
    except urllib3.exceptions.TimeoutError:
        raise UrlFetchError("Timed out fetching the image URL.") from None
    except urllib3.exceptions.HTTPError:
        raise UrlFetchError("The connection to the image URL failed while reading.") from None
    return b"".join(chunks)
