"""SSRF protection: webhooks reach only global addresses, checked at connect time.

A hostname is resolved once; every address it resolves to must be global (or on the
allowlist), and the connection goes to the checked address itself, the Host header and TLS
SNI keeping the name. A name that answers public now and 127.0.0.1 a second later (DNS
rebinding) is therefore never dialled at its second answer.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]

MAX_URL = 2048
# Host names as resolvers take them (IDNA already applied by httpx), or IP literals.
HOST_RE = re.compile(r"[A-Za-z0-9._:-]+")
SCHEMES = ("http", "https")
# Shared address space (RFC 6598, carrier-grade NAT): not global, and named here because
# older Pythons' is_global rules differ; NAT64's well-known prefix embeds an IPv4 address.
CGNAT = ipaddress.IPv4Network("100.64.0.0/10")
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# getaddrinfo can block for the resolver's whole timeout chain (tens of seconds).
RESOLVE_TIMEOUT = 5.0
_resolver_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sluice-resolve")


class BlockedAddress(Exception):
    """The webhook URL leads to an address Sluice refuses to connect to."""


def parse_allowlist(value: str) -> list[Network]:
    """Comma-separated addresses or CIDR networks (ValueError naming a bad one)."""
    nets: list[Network] = []
    for item in (s.strip() for s in value.split(",")):
        if item:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR network") from None
    return nets


def _embedded_v4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, NAT64, 6to4, Teredo), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


def blocked_reason(ip: IPAddress) -> str | None:
    """Why an address must not be connected to, or None when it is global."""
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_v4(ip)
        if inner is not None:
            why = blocked_reason(inner)
            return f"{why} (inside IPv6 {ip})" if why else None
    for flag, why in (
        (ip.is_loopback, "loopback"),
        (ip.is_unspecified, "unspecified"),
        (ip.is_link_local, "link-local"),
        (ip.is_multicast, "multicast"),
        (ip.is_private, "private"),
        (ip.is_reserved, "reserved"),
        (isinstance(ip, ipaddress.IPv4Address) and ip in CGNAT, "shared (CGNAT)"),
        (not ip.is_global, "not global"),
    ):
        if flag:
            return f"{ip} is {why}"
    return None


def allowed(ip: IPAddress, allowlist: Sequence[Network]) -> str | None:
    """None when ip may be connected to, else the reason it may not."""
    if any(ip.version == net.version and ip in net for net in allowlist):
        return None
    return blocked_reason(ip)


def literal_ip(host: str) -> IPAddress | None:
    """The address a host names by itself, in any form a resolver accepts (2130706433,
    0x7f000001, 127.1, 0177.0.0.1, [::ffff:127.0.0.1]); None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # inet_aton is what resolvers use for IPv4 literals, shorthand and octal included.
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except (OSError, ValueError):
        return None


def check_url(url: str, allowlist: Sequence[Network]) -> str | None:
    """Why a webhook URL is refused at submit time, or None (names are checked on connect)."""
    if len(url) > MAX_URL:
        return f"is longer than {MAX_URL} characters"
    try:
        parsed = httpx.URL(url)
    except Exception as exc:  # httpx.InvalidURL, idna's errors, ...: all one answer
        return f"is not a valid URL ({exc})"
    if parsed.scheme not in SCHEMES:
        return "must be an http:// or https:// URL"
    host = parsed.raw_host.decode("ascii", "replace")  # IDNA-encoded: never raises
    if not host:
        return "has no host"
    if not HOST_RE.fullmatch(host.strip("[]")):
        return f"has an invalid host {host!r}"
    if parsed.port is not None and not 0 < parsed.port < 65536:
        return f"has an invalid port {parsed.port}"
    if parsed.userinfo:
        return "must not carry credentials"
    ip = literal_ip(host)
    if ip is not None and (why := allowed(ip, allowlist)):
        return f"points at a non-public address: {why}"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """Every address the system resolver gives for host, in its order (bounded in time)."""
    future = _resolver_pool.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        infos = future.result(RESOLVE_TIMEOUT)
    except FutureTimeout:
        raise BlockedAddress(f"resolving {host} took over {RESOLVE_TIMEOUT:g}s") from None
    except OSError as exc:
        raise BlockedAddress(f"cannot resolve {host}: {exc}") from None
    return [str(info[4][0]) for info in infos]


def resolve_checked(
    host: str, port: int, allowlist: Sequence[Network], resolver: Resolver
) -> IPAddress:
    """The one address to connect to: every address host resolves to must pass, else
    BlockedAddress (a name with one loopback answer among public ones is refused)."""
    ip = literal_ip(host)
    addresses = [ip] if ip is not None else [ipaddress.ip_address(a) for a in resolver(host, port)]
    if not addresses:
        raise BlockedAddress(f"{host} resolves to no address")
    for address in addresses:
        if why := allowed(address, allowlist):
            raise BlockedAddress(f"{host} resolves to a non-public address: {why}")
    return addresses[0]


class SafeTransport(httpx.BaseTransport):
    """An httpx transport that dials only checked addresses, and only http(s)."""

    def __init__(
        self,
        allowlist: Sequence[Network] = (),
        resolver: Resolver = system_resolver,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.allowlist = list(allowlist)
        self.resolver = resolver
        self.inner = httpx.HTTPTransport(retries=0, verify=verify)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Resolve and check the host, then send to the checked address."""
        url = request.url
        if url.scheme not in SCHEMES:
            raise BlockedAddress(f"{url.scheme}:// is not allowed (http and https only)")
        port = url.port or (443 if url.scheme == "https" else 80)
        host = url.raw_host.decode("ascii", "replace")  # IDNA-encoded, as resolvers take it
        ip = resolve_checked(host, port, self.allowlist, self.resolver)
        extensions = dict(request.extensions)
        if url.scheme == "https" and literal_ip(host) is None:
            # The certificate is checked against the name, not the address dialled.
            extensions["sni_hostname"] = host
        # The Host header was set from the original URL and travels unchanged.
        pinned = httpx.Request(
            request.method,
            url.copy_with(host=str(ip)),
            headers=request.headers,
            stream=request.stream,
            extensions=extensions,
        )
        return self.inner.handle_request(pinned)

    def close(self) -> None:
        """Close pooled connections."""
        self.inner.close()


def safe_client(
    allowlist: Sequence[Network],
    timeout: float,
    resolver: Resolver = system_resolver,
    verify: ssl.SSLContext | bool = True,
) -> httpx.Client:
    """A client for webhook calls: no redirects, no proxies from the environment."""
    return httpx.Client(
        transport=SafeTransport(allowlist, resolver, verify),
        follow_redirects=False,
        trust_env=False,  # a proxy would connect on our behalf, past every check
        timeout=httpx.Timeout(timeout),
    )
