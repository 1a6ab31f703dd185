"""SSRF: every non-public target is refused at connect time; the allowlist lets tests in."""

from __future__ import annotations

import ipaddress
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from sluice.webhooks.ssrf import BlockedAddress, check_url, parse_allowlist, safe_client
from tests.webhooks.receivers import Answer, Receiver, receiver

LOOPBACK_NAMES = {"loopback.test": ["127.0.0.1"], "v6loop.test": ["::1"]}
# A name answering a public address first and loopback second: the loopback answer alone
# must sink it (a client that dialled the first answer and fell back would reach us).
MIXED = {"mixed.test": ["93.184.216.34", "127.0.0.1"], "mixed6.test": ["2606:4700::1", "::1"]}


def fake_dns(host: str, _port: int) -> list[str]:
    """A resolver for the test names (the system resolver for anything else)."""
    table = {**LOOPBACK_NAMES, **MIXED}
    if host in table:
        return table[host]
    from sluice.webhooks.ssrf import system_resolver

    return system_resolver(host, _port)


@pytest.fixture(scope="module")
def target() -> Iterator[Receiver]:
    """A loopback receiver each loopback form below would reach if it were not blocked."""
    with receiver() as rec:
        yield rec


def _targets(port: int) -> list[str]:
    return [
        f"http://127.0.0.1:{port}/hook",
        f"http://localhost:{port}/hook",
        f"http://2130706433:{port}/hook",
        f"http://0x7f000001:{port}/hook",
        f"http://127.1:{port}/hook",
        f"http://0177.0.0.1:{port}/hook",
        f"http://[::1]:{port}/hook",
        f"http://[::ffff:127.0.0.1]:{port}/hook",
        f"http://[64:ff9b::7f00:1]:{port}/hook",
        f"http://0.0.0.0:{port}/hook",
        f"http://loopback.test:{port}/hook",
        f"http://v6loop.test:{port}/hook",
        f"http://mixed.test:{port}/hook",
        f"http://mixed6.test:{port}/hook",
        "http://10.0.0.1/hook",
        "http://172.16.5.4/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.64.0.1/hook",
        "http://224.0.0.1/hook",
        "http://[fe80::1]/hook",
        "http://[fc00::1]/hook",
        "https://[::ffff:10.0.0.1]/hook",
    ]


def test_the_suite_is_large_enough(target: Receiver) -> None:
    port = httpx.URL(target.url).port or 80
    assert len(_targets(port)) >= 15


@pytest.mark.parametrize("index", range(23))
def test_non_public_targets_are_blocked(target: Receiver, index: int) -> None:
    url = _targets(httpx.URL(target.url).port or 80)[index]
    # httpx itself refuses some forms as URLs (0177.0.0.1): refused all the same.
    refused = pytest.raises((BlockedAddress, httpx.InvalidURL))
    with safe_client([], timeout=2, resolver=fake_dns) as client, refused:
        client.post(url, content=b"{}")
    assert target.calls == []


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/x", "gopher://a/"])
def test_only_http_and_https(url: str) -> None:
    with safe_client([], timeout=2) as client, pytest.raises((BlockedAddress, httpx.HTTPError)):
        client.post(url, content=b"{}")
    assert check_url(url, []) is not None


def test_literal_forms_are_refused_at_submit(target: Receiver) -> None:
    port = httpx.URL(target.url).port or 80
    for url in _targets(port):
        host = urlsplit(url).hostname or ""
        if host.endswith(".test") or host == "localhost":
            continue  # names are judged where they are resolved: on connect
        assert check_url(url, []) is not None, url
    assert check_url("https://hooks.example.com/x", []) is None
    assert check_url("http://user:pw@example.com/", []) is not None


def test_allowlist_lets_a_trusted_receiver_in(target: Receiver) -> None:
    port = httpx.URL(target.url).port
    allow = parse_allowlist("127.0.0.0/8")
    with safe_client(allow, timeout=5, resolver=fake_dns) as client:
        r = client.post(f"http://loopback.test:{port}/hook", content=b"{}")
    assert r.status_code == 200
    # Dialled by address, the name still travels in the Host header.
    assert target.calls[-1].headers["host"] == f"loopback.test:{port}"
    target.calls.clear()
    # The allowlist is exact: 10/8 allowed does not open loopback.
    with (
        safe_client(parse_allowlist("10.0.0.0/8"), timeout=5) as client,
        pytest.raises(BlockedAddress),
    ):
        client.post(target.url, content=b"{}")
    assert target.calls == []


def test_redirect_to_loopback_is_not_followed(target: Receiver) -> None:
    """An allowlisted receiver (127.0.0.2) answering 302 towards 127.0.0.1: not followed."""
    redirect = Answer(302, {"Location": target.url})
    with receiver(lambda _n: redirect, host="127.0.0.2") as hop:
        with safe_client(parse_allowlist("127.0.0.2/32"), timeout=5) as client:
            r = client.post(hop.url, content=b"{}")
        assert r.status_code == 302 and len(hop.calls) == 1
    assert target.calls == []


def test_dns_rebinding_dials_the_checked_address(target: Receiver) -> None:
    """Resolved once: public at check time, loopback a moment later; the later answer is
    never asked for, the checked (public, unreachable here) address is what is dialled."""
    answers = iter([["198.51.100.7"], ["127.0.0.1"], ["127.0.0.1"]])
    asked: list[str] = []
    public = ipaddress.ip_network("198.51.100.0/24")  # TEST-NET-2: treated as public here

    def rebinding(host: str, _port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    port = httpx.URL(target.url).port
    with (
        safe_client([public], timeout=0.5, resolver=rebinding) as client,
        pytest.raises(httpx.TransportError),
    ):
        client.post(f"http://rebind.test:{port}/hook", content=b"{}")
    assert asked == ["rebind.test"]
    assert target.calls == []


def _cert(tmp: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for `name` (openssl's CLI; the test skips without it)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command")
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", f"/CN={name}",
         "-addext", f"subjectAltName=DNS:{name}"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@pytest.mark.parametrize("served_name", ["hooks.test", "other.test"])
def test_https_to_a_pinned_address_verifies_the_name(tmp_path: Path, served_name: str) -> None:
    """Dialled by address, TLS still checks the certificate against the URL's name (SNI)."""
    cert, key = _cert(tmp_path, served_name)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    names = lambda host, _port: ["127.0.0.1"] if host == "hooks.test" else []  # noqa: E731
    with receiver(tls=server_tls) as rec:
        url = f"https://hooks.test:{httpx.URL(rec.url).port}/hook"
        with safe_client(parse_allowlist("127.0.0.1"), 5, names, verify=trust) as client:
            if served_name == "hooks.test":
                assert client.post(url, content=b"{}").status_code == 200
                assert rec.calls[0].headers["host"].startswith("hooks.test:")
            else:  # a certificate for another name is refused, address or not
                with pytest.raises(httpx.ConnectError):
                    client.post(url, content=b"{}")
                assert rec.calls == []
