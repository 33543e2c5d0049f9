"""The SSRF guard of webhook targets: a pure check of a URL and of the addresses it resolves to, plus a
resolver adapter. One place, used at registration, at submit and again before every delivery (DNS can
change between the check and the call: a name that resolved to a public address may later resolve to
127.0.0.1).

Refused, unless private targets are allowed (``MLP_WEBHOOK_ALLOW_PRIVATE=true``, development and tests
only; production refuses that setting): a scheme other than http/https, credentials in the URL, and any
address that is loopback, private, link-local, multicast, reserved, unspecified, shared (CGNAT) or a cloud
metadata endpoint (169.254.169.254, fd00:ec2::254), IPv4-mapped IPv6 forms included. A name is refused
when ANY of its addresses is, so a DNS answer mixing a public and a private address cannot slip through.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Final
from urllib.parse import SplitResult, urlsplit

MAX_URL_CHARS: Final = 2048
ALLOWED_SCHEMES: Final = frozenset({"http", "https"})
METADATA_ADDRESSES: Final = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("fd00:ec2::254"),
        ipaddress.ip_address("100.100.100.200"),
    }
)
_SHARED_ADDRESS_SPACE: Final = ipaddress.ip_network("100.64.0.0/10")  # CGNAT, RFC 6598

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# host, port -> the addresses it resolves to (raises OSError when it does not resolve)
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class UnsafeTarget(ValueError):
    """A webhook target the platform refuses to call; the message says why (safe to show the caller)."""


# A DNS name as resolvers take it: ASCII labels (an internationalized name in its punycode form).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,62}[A-Za-z0-9])?"
_HOST = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?")


def parse_target(url: str) -> SplitResult:
    """The URL's parts when its form is acceptable (scheme, host, no credentials, bounded); raises UnsafeTarget."""
    if len(url) > MAX_URL_CHARS:
        raise UnsafeTarget(f"the URL has {len(url)} characters; at most {MAX_URL_CHARS}")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise UnsafeTarget("the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeTarget(f"not a valid URL: {exc}") from exc
    if parts.scheme not in ALLOWED_SCHEMES:
        raise UnsafeTarget(f"scheme {parts.scheme!r} is not allowed; only http and https")
    if not parts.hostname:
        raise UnsafeTarget("the URL has no host")
    if not _HOST.fullmatch(parts.hostname) and literal_address(parts.hostname) is None:
        # A resolver would fail on it anyway (or IDNA-encode it under our feet): ask for the A-label form.
        raise UnsafeTarget("the host must be a DNS name of letters, digits, '-' and '.' (punycode), or an IP address")
    if parts.username is not None or parts.password is not None:
        raise UnsafeTarget("credentials in the URL are not allowed (the signature authenticates the sender)")
    if port == 0:
        raise UnsafeTarget("port 0 is not a valid target")
    return parts


def address_refusal(address: IpAddress) -> str | None:
    """Why a target address is refused (a public unicast address is not), or None. Pure."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address_refusal(address.ipv4_mapped)
        if address.sixtofour is not None:
            return address_refusal(address.sixtofour)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    checks = (
        (address.is_unspecified, "unspecified"),
        (address.is_loopback, "loopback"),
        (address.is_link_local, "link-local"),
        (address.is_multicast, "multicast"),
        (address.is_private, "private"),
        (address.is_reserved, "reserved"),
        (isinstance(address, ipaddress.IPv4Address) and address in _SHARED_ADDRESS_SPACE, "shared (CGNAT)"),
        (not address.is_global, "not globally routable"),
    )
    for refused, what in checks:
        if refused:
            return f"a {what} address"
    return None


def literal_address(host: str) -> IpAddress | None:
    """The host as an IP address when it is one (``[::1]`` arrives as ``::1``), else None."""
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def check_addresses(host: str, addresses: Sequence[str]) -> None:
    """Raise UnsafeTarget when any of the host's addresses is refused (or there are none). Pure."""
    if not addresses:
        raise UnsafeTarget(f"{host} does not resolve")
    for text in addresses:
        address = literal_address(text)
        if address is None:
            raise UnsafeTarget(f"{host} resolved to {text!r}, not an IP address")
        why = address_refusal(address)
        if why is not None:
            raise UnsafeTarget(f"{host} resolves to {address}, {why}; webhook targets must be public")


async def system_resolver(host: str, port: int) -> Sequence[str]:
    """Every address the system resolver gives for ``host`` (A and AAAA)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class TargetGuard:
    """The guard with its resolver and policy: ``await guard.check(url)`` raises UnsafeTarget or returns the URL."""

    def __init__(
        self, *, allow_private: bool, resolver: Resolver = system_resolver, resolve_timeout_s: float = 5.0
    ) -> None:
        self.allow_private = allow_private
        self._resolve = resolver
        self._timeout_s = resolve_timeout_s

    async def check(self, url: str) -> str:
        parts = parse_target(url)  # the form is checked even when private targets are allowed
        if self.allow_private:
            return url
        host = parts.hostname
        assert host is not None
        literal = literal_address(host)
        if literal is not None:
            check_addresses(host, [str(literal)])
            return url
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            async with asyncio.timeout(self._timeout_s):
                addresses = await self._resolve(host, port)
        except (OSError, TimeoutError, UnicodeError) as exc:
            raise UnsafeTarget(f"{host} does not resolve: {type(exc).__name__}") from exc
        check_addresses(host, addresses)
        return url
