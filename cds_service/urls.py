"""URLs the service may contact, and allowlist matching: used by auth (JWK Sets), the FHIR client and the CLI.

Every allowlist check runs on the URL as it will be fetched. :func:`canonical_url` parses a URL strictly
(printable ASCII only, no credentials, no backslash, no percent-encoded dot, slash or backslash in the path),
lower-cases scheme and host, drops a default port and resolves ``.`` and ``..`` segments the way httpx does
before sending. So ``<allowed>/keys/../evil.json`` is checked, and fetched, as ``<host>/evil.json``, and
``<allowed>/keys/%2e%2e/evil.json`` (which some servers decode and resolve) is refused outright.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

MAX_URL_LENGTH = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
_PRINTABLE_ASCII = re.compile(r"[!-~]+")
_ENCODED_SEPARATOR = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


class UrlError(ValueError):
    """A URL the service will not use; the message says why (it never repeats the URL)."""


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (a host name or IP address, IPv6 with or without brackets) is this machine's loopback:
    exactly ``localhost`` or a loopback address. ``localhost.evil.example`` is not."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _remove_dot_segments(path: str) -> str:
    """Drop ``.`` and ``..`` segments exactly as httpx does before it sends a request (RFC 3986 5.2.4, with
    httpx's handling of a trailing dot segment), so that the path checked is the path fetched."""
    output: list[str] = []
    for segment in path.split("/"):
        if segment == ".":
            continue
        if segment == "..":
            if output and output != [""]:
                output.pop()
        else:
            output.append(segment)
    result = "/".join(output)
    return result if result.startswith("/") else "/" + result


def canonical_url(url: object) -> str:
    """``url`` as the service would fetch it (fragment dropped), or :class:`UrlError` when the service will
    not use it: not an absolute http(s) URL, too long, characters outside printable ASCII, credentials,
    a backslash, or a percent-encoded dot, slash or backslash in the path."""
    if not isinstance(url, str):
        raise UrlError("not a string")
    if len(url) > MAX_URL_LENGTH:
        raise UrlError(f"longer than {MAX_URL_LENGTH} characters")
    if not _PRINTABLE_ASCII.fullmatch(url):
        raise UrlError("contains a control character, a space or a non-ASCII character")
    if "\\" in url:
        raise UrlError("contains a backslash")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UrlError("is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise UrlError("is not an absolute http(s) URL")
    if "@" in parts.netloc:
        raise UrlError("carries credentials")
    if _ENCODED_SEPARATOR.search(parts.path):
        raise UrlError("has a percent-encoded dot, slash or backslash in its path")
    host = parts.hostname
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != _DEFAULT_PORTS[scheme]:
        netloc += f":{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"{scheme}://{netloc}{_remove_dot_segments(parts.path)}{query}"


def url_under(url: str, prefix: str) -> bool:
    """Whether ``url`` lies under the allowlisted ``prefix``, both canonical (:func:`canonical_url`): same
    scheme, host and port, and a path at or below the prefix's path on a segment boundary. Unlike a plain
    string prefix, "https://keys.example.org" does not admit "https://keys.example.org.attacker.example/",
    and "https://keys.example.org/keys/" does not admit "https://keys.example.org/keys/../evil.json"."""
    try:
        target, allowed = urlsplit(canonical_url(url)), urlsplit(canonical_url(prefix))
    except UrlError:
        return False
    if (target.scheme, target.hostname, target.port) != (allowed.scheme, allowed.hostname, allowed.port):
        return False
    base = allowed.path
    if base.endswith("/"):
        return target.path.startswith(base) or target.path + "/" == base
    return target.path == base or target.path.startswith(base + "/")


def origin_host(url: str) -> str | None:
    """The host name of a canonical-able URL, or None."""
    try:
        return urlsplit(canonical_url(url)).hostname
    except UrlError:
        return None


@dataclass(frozen=True)
class Allowlist:
    """Where a URL may point: under one of ``prefixes`` (see :func:`url_under`), or anywhere on one of
    ``hosts`` (any port)."""

    prefixes: tuple[str, ...] = ()
    hosts: frozenset[str] = frozenset()
    description: str = "this issuer's allowlist"

    def admits(self, url: str) -> bool:
        try:
            host = urlsplit(canonical_url(url)).hostname
        except UrlError:
            return False
        return host in self.hosts or any(url_under(url, prefix) for prefix in self.prefixes)


def loopback_or_https_problem(url: str) -> str | None:
    """Why ``url`` is not fit to fetch keys from (https, or plain http to a loopback host only), or None."""
    try:
        parts = urlsplit(canonical_url(url))
    except UrlError as error:
        return f"is not an acceptable URL: it {error}"
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        return "must use https (plain http is allowed only for loopback hosts)"
    return None


def fhir_server_problem(url: str, allow_http: bool, allowlist: Allowlist | None) -> str | None:
    """Why the service will not contact the FHIR server ``url``, or None when it may (``allowlist`` None:
    any server; only without authentication, on loopback)."""
    try:
        canonical = canonical_url(url)
    except UrlError as error:
        return f"fhirServer is not an acceptable URL: it {error}"
    parts = urlsplit(canonical)
    if parts.query or "#" in url:
        return "fhirServer must not carry a query or a fragment"
    if parts.scheme == "http" and not (allow_http or is_loopback(parts.hostname)):
        return "fhirServer must use https (plain http is allowed only for loopback hosts)"
    if allowlist is not None and not allowlist.admits(canonical):
        return f"fhirServer is not on {allowlist.description}"
    return None
