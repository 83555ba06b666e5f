"""Serve's URL fetcher against a real HTTP server on loopback: the name resolved, every address checked, the connection
pinned to a checked one, the port policy, the deadline against servers that drip, and every spelling of a
non-public address refused."""

from __future__ import annotations

import http.server
import threading
import time
import urllib.parse
from types import SimpleNamespace

import pytest

from mlcls_ray.infer.fetch import RequestError, _download, check_address, fetch_url, parse_networks, parse_ports

LOOPBACK = ("127.0.0.0/8", "::1/128")  # what an operator's Serve.url_allow_networks would name for a local store
PAYLOAD = b"\xff\xd8\xff\xe0 not really a JPEG, the fetcher does not look" * 100


@pytest.fixture(scope="module")
def http_server():
    """A loopback HTTP server that records each request's Host header; /drip-* send a byte every 0.2 s for 10 s."""
    hosts: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _drip(self, head: bytes) -> None:
            try:
                self.wfile.write(head)
                for _ in range(50):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the fetcher hung up: what the test wants
                pass

        def do_GET(self):
            hosts.append(self.headers["Host"])
            if self.path == "/drip-headers":
                return self._drip(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            if self.path == "/drip-body":
                return self._drip(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(port=server.server_address[1], hosts=hosts)
    server.shutdown()


def test_fetch_resolves_the_name_checks_it_and_connects_to_the_checked_address(http_server):
    port = http_server.port
    url = f"http://localhost:{port}/cat.jpg"
    assert fetch_url(url, 1 << 20, 5.0, ports=(port,), allow=LOOPBACK) == PAYLOAD
    assert http_server.hosts[-1] == f"localhost:{port}"  # the name travels in Host; the socket went to the address
    seen = len(http_server.hosts)
    with pytest.raises(RequestError, match="not a public address") as exc:  # loopback, unless an operator allows it
        fetch_url(url, 1 << 20, 5.0, ports=(port,))
    assert exc.value.status == 403
    with pytest.raises(RequestError, match=f"port {port} is not allowed") as exc:  # 80 and 443 only by default
        fetch_url(url, 1 << 20, 5.0, allow=LOOPBACK)
    assert exc.value.status == 403
    assert len(http_server.hosts) == seen  # both refused before any connection


def test_the_connection_goes_to_the_checked_addresses_not_to_a_new_lookup(http_server):
    port = http_server.port
    # the name does not resolve at all: only the addresses given are used, the first that answers
    parts = urllib.parse.urlsplit(f"http://image-host.invalid:{port}/cat.jpg")
    assert _download(parts, ["127.0.0.2", "127.0.0.1"], port, 1 << 20, time.monotonic() + 5) == PAYLOAD
    assert http_server.hosts[-1] == f"image-host.invalid:{port}"
    with pytest.raises(RequestError, match="over the limit") as exc:
        _download(parts, ["127.0.0.1"], port, 100, time.monotonic() + 5)
    assert exc.value.status == 413
    with pytest.raises(RequestError, match="redirects are not followed"):
        _download(parts._replace(path="/redirect"), ["127.0.0.1"], port, 1 << 20, time.monotonic() + 5)


@pytest.mark.parametrize("path", ["/drip-headers", "/drip-body"])
def test_a_server_that_drips_holds_the_fetch_no_longer_than_its_deadline(http_server, path):
    url = f"http://localhost:{http_server.port}{path}"
    t0 = time.monotonic()
    with pytest.raises(RequestError, match="not done in time"):
        fetch_url(url, 1 << 20, 1.0, ports=(http_server.port,), allow=LOOPBACK)
    assert time.monotonic() - t0 < 2.0  # every recv got a byte within its socket timeout: only the deadline ends it


@pytest.mark.parametrize("url", [
    "http://2130706433/x.jpg",  # 127.0.0.1 in decimal
    "http://0177.0.0.1/x.jpg",  # octal
    "http://0x7f.0.0.1/x.jpg",  # hex
    "http://0x7f000001/x.jpg",
    "http://127.1/x.jpg",  # short form
    "http://0/x.jpg",  # 0.0.0.0
    "http://012.0.0.1/x.jpg",  # 10.0.0.1 in octal
    "http://0xa9fea9fe/latest/meta-data",  # 169.254.169.254 in hex
    "http://[::1]/x.jpg",
    "http://[0:0:0:0:0:0:0:1]/x.jpg",
    "http://[::ffff:127.0.0.1]/x.jpg",  # IPv4-mapped
    "http://[::ffff:7f00:1]/x.jpg",
    "http://[::127.0.0.1]/x.jpg",  # IPv4-compatible
    "http://[64:ff9b::7f00:1]/x.jpg",  # NAT64
    "http://[2002:7f00:1::]/x.jpg",  # 6to4 of 127.0.0.1
    "http://[2002:a9fe:a9fe::1]/x.jpg",  # 6to4 of the metadata service
    "http://[fec0::1]/x.jpg",  # site-local
    "http://[fe80::1]/x.jpg",
    "http://[fd00::1]/x.jpg",
])
def test_every_spelling_of_a_non_public_address_is_refused(url):
    with pytest.raises(RequestError, match="not a public address") as exc:
        fetch_url(url, 1 << 20, 2.0)
    assert exc.value.status == 403


@pytest.mark.parametrize("ip", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0",
                                "100.64.0.1", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "::", "fe80::1",
                                "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002::1",
                                "2002:808:808::1", "fec0::1", "2001::1", "64:ff9b::a00:1"])
def test_check_address_refuses_non_public(ip):
    with pytest.raises(RequestError, match="not a public address"):
        check_address(ip)


@pytest.mark.parametrize("ip", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_check_address_lets_public_through(ip):
    check_address(ip)


def test_allowed_networks_and_the_settings_parsers():
    check_address("10.20.3.4", allow=["10.20.0.0/16"])
    with pytest.raises(RequestError):
        check_address("10.21.0.1", allow=["10.20.0.0/16"])
    assert parse_ports("[80, 8443]") == parse_ports(["80", 8443]) == [80, 8443]
    assert parse_networks("[10.20.0.1/16]") == ["10.20.0.0/16"] and parse_networks("[]") == []
    for bad, words in ((parse_ports, "0"), (parse_ports, "[]"), (parse_networks, "[internal]")):
        with pytest.raises(ValueError):
            bad(words)
