"""Serve's URL fetcher: an image URL's bytes, without being made to reach inside the network or held by a slow server.

A URL is fetched only over http(s), on an allowed port, and only when every address its host resolves to is public
(or inside a network the operator allowed). The connection goes to an address that was checked, so a second lookup
cannot swap it (DNS rebinding), while the ``Host`` header and TLS keep the name. No redirects, a byte cap, and one
deadline for the whole fetch: when it passes, a watchdog shuts the socket, so a server that drips its headers a byte
at a time holds no thread past it.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Sequence
from typing import Any

__all__ = ["DEFAULT_PORTS", "RequestError", "check_address", "fetch_url", "parse_networks", "parse_ports"]

DEFAULT_PORTS = (80, 443)
# global by Python's reckoning, yet not safe to fetch from: 6to4 (2002::/16) embeds any IPv4 address, the relay's
# to reach; site-local (fec0::/10) is deprecated (RFC 3879) but still routed inside some networks
_NOT_PUBLIC = (ipaddress.ip_network("2002::/16"), ipaddress.ip_network("fec0::/10"))


class RequestError(Exception):
    """Bad input in a request: answered with ``status`` (also PaddleX's ``errorCode``), counted under ``kind``."""

    def __init__(self, status: int, kind: str, message: str):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message


def _items(value: Any) -> list:
    if isinstance(value, str):  # `-o Serve.url_ports=80,443` or `[80, 443]`
        return [t for t in value.strip().strip("[]").split(",") if t.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise ValueError(f"{value!r} is not a list")


def parse_ports(value: Any) -> list[int]:
    """``[80, 443]`` (a list, or its text) -> the ports a URL may name.

    Raises:
        ValueError: an entry is not a port, or the list is empty.
    """
    ports = []
    for item in _items(value):
        text = str(item).strip()
        if isinstance(item, bool) or not text.isdigit() or not 1 <= int(text) <= 65535:
            raise ValueError(f"{item!r} is not a TCP port (1-65535)")
        ports.append(int(text))
    if not ports:
        raise ValueError("no ports: give at least one, e.g. [80, 443]")
    return ports


def parse_networks(value: Any) -> list[str]:
    """``["10.20.0.0/16"]`` (a list, or its text) -> networks URLs may reach although they are not public.

    Raises:
        ValueError: an entry is not an IP network.
    """
    nets = []
    for item in _items(value):
        try:
            nets.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network such as 10.20.0.0/16 or fd00::/8") from None
    return nets


def check_address(ip: str, allow: Sequence[str] = ()) -> None:
    """Refuse an address a server should not be made to fetch from (SSRF).

    Args:
        ip: a resolved address (an IPv6 zone is dropped).
        allow: networks that are fetched from even though they are not public (an internal image store).

    Raises:
        RequestError: the address is private, loopback, link-local, site-local, reserved, multicast, unspecified or
            6to4, and in no network of ``allow``.
    """
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # ::ffff:127.0.0.1 is loopback too
    if any(addr in ipaddress.ip_network(net) for net in allow):
        return
    if (not addr.is_global or addr.is_private or addr.is_loopback or addr.is_link_local or addr.is_reserved
            or addr.is_multicast or addr.is_unspecified or any(addr in net for net in _NOT_PUBLIC)):
        raise RequestError(403, "url_refused", f"image URL resolves to {addr}, which is not a public address")


def fetch_url(url: str, max_bytes: int, timeout_s: float, ports: Sequence[int] = DEFAULT_PORTS,
              allow: Sequence[str] = ()) -> bytes:
    """GET an http(s) URL's bytes: no redirects, at most ``max_bytes``, ``timeout_s`` in all (the lookup included).

    Args:
        ports: the ports a URL may name (or imply: 80 for http, 443 for https).
        allow: networks fetched from although not public (see :func:`check_address`).

    Raises:
        RequestError: the URL is malformed, names a port not allowed, resolves to an address refused, redirects,
            fails, is too large, or is not done in time.
    """
    deadline = time.monotonic() + timeout_s
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise RequestError(422, "bad_url", f"image URL {url!r}: only http:// and https:// URLs with a host are taken")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise RequestError(422, "bad_url", f"image URL {url!r}: {exc}") from None
    if port not in ports:
        raise RequestError(403, "url_refused", f"image URL {url!r}: port {port} is not allowed (allowed: "
                                               f"{', '.join(map(str, ports))}; Serve.url_ports)")
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise RequestError(422, "url_failed", f"image URL {url!r}: cannot resolve the host ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    for ip in addresses:  # every address the name has, so no connection can reach an unchecked one
        check_address(ip, allow)
    return _download(parts, addresses, port, max_bytes, deadline)


class _Pinned(http.client.HTTPConnection):
    """An HTTP connection to checked addresses: ``connect()`` tries them in order and never looks the name up."""

    def __init__(self, host: str, port: int, addresses: Sequence[str], deadline: float):
        super().__init__(host, port, timeout=max(deadline - time.monotonic(), 0.01))
        self.addresses = addresses
        self.deadline = deadline

    def _open(self) -> socket.socket:
        error: OSError = TimeoutError("no time left to connect")
        for ip in self.addresses:
            left = self.deadline - time.monotonic()
            if left <= 0:
                break
            try:
                sock = socket.create_connection((ip, self.port), left)
                sock.settimeout(self.timeout)
                return sock
            except OSError as exc:
                error = exc
        raise error

    def connect(self) -> None:
        self.sock = self._open()


class _PinnedTLS(_Pinned):
    """The same over TLS; the certificate is verified for the name in the URL, not for the address."""

    default_port = http.client.HTTPS_PORT

    def __init__(self, host: str, port: int, addresses: Sequence[str], deadline: float):
        super().__init__(host, port, addresses, deadline)
        self.context = ssl.create_default_context()

    def connect(self) -> None:
        self.sock = self.context.wrap_socket(self._open(), server_hostname=self.host)


def _download(parts: urllib.parse.SplitResult, addresses: Sequence[str], port: int, max_bytes: int,
              deadline: float) -> bytes:
    url = parts.geturl()
    cls = _PinnedTLS if parts.scheme == "https" else _Pinned
    conn = cls(parts.hostname, port, addresses, deadline)
    cut = threading.Event()

    def cut_off() -> None:  # wakes a read blocked on a server that drips bytes within each socket timeout
        cut.set()
        sock = conn.sock
        if sock is not None:
            try:
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, also under TLS
            except OSError:
                pass

    watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), cut_off)
    watchdog.start()
    try:
        conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")))
        resp = conn.getresponse()
        if 300 <= resp.status < 400:
            raise RequestError(422, "url_failed", f"image URL {url!r} redirects (HTTP {resp.status}); redirects are "
                                                  "not followed, give the final URL")
        if resp.status != 200:
            raise RequestError(422, "url_failed", f"image URL {url!r} answered HTTP {resp.status}")
        data = bytearray()
        while chunk := resp.read(min(1 << 16, max_bytes + 1 - len(data))):
            data += chunk
            if len(data) > max_bytes:
                raise RequestError(413, "too_large", f"image URL {url!r} is over the limit of {max_bytes:,} bytes")
        if cut.is_set():  # the cut ends the body early, as a server closing would
            raise TimeoutError
        return bytes(data)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        if cut.is_set():
            raise RequestError(422, "url_failed", f"image URL {url!r}: not done in time (Serve.url_timeout_s)") \
                from None
        raise RequestError(422, "url_failed", f"image URL {url!r}: {type(exc).__name__}: {exc}") from None
    finally:
        watchdog.cancel()
        conn.close()
