"""SSRF guards of URL image input, proven with a local server and a stub resolver.

The stub maps made-up public-looking names to addresses, so the checks run exactly as for real DNS;
only 127.0.0.1 (the test server) is let through, by an explicit test policy.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import time
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

import pytest
from clip_serverless.api import url_fetch
from clip_serverless.api.url_fetch import UrlFetchError, UrlPolicy, fetch_image_url, is_public_address

from tests.http_servers import Route, drip, http_server, send, silent_server

LOOPBACK = ipaddress.ip_address("127.0.0.1")


def stub_resolver(table: dict[str, list[str]]) -> url_fetch.Resolver:
    def resolve(host: str, port: int) -> list[str]:
        if host not in table:
            raise OSError("no such host")
        return table[host]

    return resolve


def policy(table: dict[str, list[str]], **overrides: Any) -> UrlPolicy:
    """http allowed (the test server has no TLS) and 127.0.0.1 allowed; every other address is checked for real."""
    base = UrlPolicy(
        allow_http=True, resolve=stub_resolver(table),
        address_allowed=lambda a: a == LOOPBACK or is_public_address(a),
        connect_timeout=1.0, read_timeout=1.0, total_timeout=3.0, max_redirects=3)
    return dataclasses.replace(base, **overrides)


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.0.0.5", "172.16.3.4", "192.168.1.1", "169.254.169.254", "100.64.0.1", "0.0.0.0",
    "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::1", "224.0.0.1",
])
def test_non_global_addresses_are_not_public(address: str) -> None:
    assert not is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700::6810:85e5", "8.8.8.8"])
def test_global_addresses_are_public(address: str) -> None:
    assert is_public_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("resolved", [
    ["10.0.0.5"], ["169.254.169.254"], ["::ffff:127.0.0.1"], ["192.168.0.10"], ["fd00::1"],
    ["93.184.215.14", "10.0.0.5"],  # one bad answer among good ones is enough to refuse
])
def test_names_resolving_to_private_addresses_are_refused(resolved: list[str]) -> None:
    # The default policy: the real address rule, nothing let through.
    p = UrlPolicy(resolve=stub_resolver({"images.example.com": resolved}))
    with pytest.raises(UrlFetchError, match="network destination that is not allowed"):
        fetch_image_url("https://images.example.com/cat.jpg", p)


@pytest.mark.parametrize(("url", "message"), [
    ("http://images.example.com/a.jpg", "non https:// URL"),
    ("https://127.0.0.1/image.jpg", "URL without FQDN"),
    ("https://[::1]/image.jpg", "URL without FQDN"),
    ("https://localhost/image.jpg", "URL without FQDN"),
    ("https://169.254.169.254/latest/meta-data/", "URL without FQDN"),
    ("https://user:pw@images.example.com/a.jpg", "credentials"),
    ("ftp://images.example.com/a.jpg", "invalid"),
    ("file:///etc/passwd", "invalid"),
    ("https://images.example.com\\@evil.com/a.jpg", "invalid"),
    ("https:///nohost", "invalid"),
    ("https://images.example.com:99999/a.jpg", "invalid"),
])
def test_url_shapes_refused_before_any_connection(url: str, message: str) -> None:
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["93.184.215.14"]

    with pytest.raises(UrlFetchError, match=message):
        fetch_image_url(url, UrlPolicy(resolve=resolve))
    assert calls == []


def test_fetches_from_an_allowed_host_connecting_to_the_checked_address() -> None:
    with http_server({"/cat.jpg": lambda h: send(h, 200, b"JPEGDATA", {"Content-Type": "image/jpeg"})}) as (port, seen):
        data = fetch_image_url(f"http://images.example.com:{port}/cat.jpg?x=1",
                               policy({"images.example.com": ["127.0.0.1"]}))
    assert data == b"JPEGDATA"
    assert seen == ["/cat.jpg?x=1"]


def test_redirect_to_a_private_address_is_refused() -> None:
    routes = {"/start": lambda h: send(h, 302, headers={"Location": "http://internal.example.com/secret"})}
    table = {"public.example.com": ["127.0.0.1"], "internal.example.com": ["10.1.2.3"]}
    with http_server(routes) as (port, seen), pytest.raises(UrlFetchError, match="not allowed"):
        fetch_image_url(f"http://public.example.com:{port}/start", policy(table))
    assert seen == ["/start"]


def test_redirect_to_metadata_ip_literal_is_refused() -> None:
    routes = {"/start": lambda h: send(h, 301, headers={"Location": "http://169.254.169.254/latest/meta-data/"})}
    with http_server(routes) as (port, _), pytest.raises(UrlFetchError, match="without FQDN"):
        fetch_image_url(f"http://public.example.com:{port}/start", policy({"public.example.com": ["127.0.0.1"]}))


def test_relative_redirects_are_followed_and_capped() -> None:
    routes = {
        "/a": lambda h: send(h, 302, headers={"Location": "/b"}),
        "/b": lambda h: send(h, 307, headers={"Location": "/img"}),
        "/img": lambda h: send(h, 200, b"IMG"),
        "/loop": lambda h: send(h, 302, headers={"Location": "/loop"}),
    }
    table = {"public.example.com": ["127.0.0.1"]}
    with http_server(routes) as (port, seen):
        assert fetch_image_url(f"http://public.example.com:{port}/a", policy(table)) == b"IMG"
        with pytest.raises(UrlFetchError, match="redirected more than 3 times"):
            fetch_image_url(f"http://public.example.com:{port}/loop", policy(table))
    assert seen.count("/loop") == 4


@pytest.mark.parametrize("location", ["file:///etc/passwd", "ftp://public.example.com/x", "gopher://x.example.com/"])
def test_redirects_to_other_schemes_are_refused(location: str) -> None:
    routes = {"/a": lambda h: send(h, 302, headers={"Location": location})}
    with http_server(routes) as (port, _), pytest.raises(UrlFetchError, match="invalid"):
        fetch_image_url(f"http://public.example.com:{port}/a", policy({"public.example.com": ["127.0.0.1"]}))


def test_redirect_to_http_is_refused_when_http_is_not_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every hop is parsed under the same policy. The test server speaks plain HTTP, so http is let
    # through for its host name only; the redirect to another host over http must be refused.
    original_parse = url_fetch._parse

    def parse(url: str, p: UrlPolicy) -> object:
        first_hop = urlsplit(url).hostname == "public.example.com"
        return original_parse(url, dataclasses.replace(p, allow_http=first_hop))

    monkeypatch.setattr(url_fetch, "_parse", parse)
    table = {"public.example.com": ["127.0.0.1"], "other.example.com": ["127.0.0.1"]}
    routes = {"/a": lambda h: send(h, 302, headers={"Location": "http://other.example.com/b"})}
    with http_server(routes) as (port, seen), pytest.raises(UrlFetchError, match="non https"):
        fetch_image_url(f"http://public.example.com:{port}/a", policy(table))
    assert seen == ["/a"]


@pytest.mark.parametrize("status", [404, 500, 403])
def test_error_statuses_are_reported(status: int) -> None:
    routes = {"/x": lambda h: send(h, status, b"nope")}
    with http_server(routes) as (port, _), pytest.raises(UrlFetchError, match=f"HTTP {status}"):
        fetch_image_url(f"http://public.example.com:{port}/x", policy({"public.example.com": ["127.0.0.1"]}))


def test_size_cap_by_header_and_while_streaming() -> None:
    def chunked(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for _ in range(10):
            h.wfile.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")

    routes: dict[str, Route] = {"/big": lambda h: send(h, 200, b"x" * 5000), "/chunked": chunked}
    table = {"public.example.com": ["127.0.0.1"]}
    with http_server(routes) as (port, _):
        with pytest.raises(UrlFetchError, match="larger than 4096 bytes"):
            fetch_image_url(f"http://public.example.com:{port}/big", policy(table, max_bytes=4096))
        with pytest.raises(UrlFetchError, match="larger than 4096 bytes"):
            fetch_image_url(f"http://public.example.com:{port}/chunked", policy(table, max_bytes=4096))


def test_a_host_that_never_answers_times_out_promptly() -> None:
    with silent_server() as port:
        started = time.monotonic()
        with pytest.raises(UrlFetchError, match="Timed out"):
            fetch_image_url(f"http://public.example.com:{port}/x",
                            policy({"public.example.com": ["127.0.0.1"]}, read_timeout=0.5, total_timeout=2.0))
        assert time.monotonic() - started < 5  # a correctness bound (no hang), not a benchmark


def test_a_slow_drip_is_cut_at_the_total_timeout() -> None:
    with http_server({"/drip": lambda h: drip(h, total=60, pause=0.1)}) as (port, _):
        started = time.monotonic()
        with pytest.raises(UrlFetchError, match="Timed out"):
            fetch_image_url(f"http://public.example.com:{port}/drip",
                            policy({"public.example.com": ["127.0.0.1"]}, read_timeout=1.0, total_timeout=1.5))
        assert time.monotonic() - started < 4


def test_a_hanging_resolver_is_bounded() -> None:
    def slow(host: str, port: int) -> list[str]:
        time.sleep(5)
        return ["93.184.215.14"]

    started = time.monotonic()
    with pytest.raises(UrlFetchError, match="resolving"):
        fetch_image_url("https://images.example.com/a.jpg", UrlPolicy(resolve=slow, connect_timeout=0.5))
    assert time.monotonic() - started < 3


def test_unresolvable_and_refused_hosts() -> None:
    with pytest.raises(UrlFetchError, match="could not be resolved"):
        fetch_image_url("https://nowhere.example.com/a.jpg", UrlPolicy(resolve=stub_resolver({})))
    with silent_server() as port:
        pass  # closed now: connections are refused
    with pytest.raises(UrlFetchError, match="Could not connect"):
        fetch_image_url(f"http://public.example.com:{port}/x", policy({"public.example.com": ["127.0.0.1"]}))
