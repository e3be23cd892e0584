"""Fetching an image URL for an audit, only where the operator allows it.

A proxied chat may carry its image as an http(s) URL; the model server fetched it, and the
audit needs the same bytes.  Fetching from the sidecar is a server-side request on behalf of
a client, so it is off by default (`image_url_fetch`), and when on:

- only `http` and `https`; the host must match `image_url_allowed_hosts` when that list is set;
- every address the host resolves to is checked, and the connection goes to the checked
  address (the name is not resolved again: no DNS rebinding); loopback, private, link-local,
  multicast, reserved and unspecified addresses are refused unless the allow-list names the
  host or a network holding the address;
- redirects are followed by hand, at most `image_url_max_redirects`, each target checked
  again as above;
- the body is read up to `max_image_bytes` and the whole fetch, redirects included, within
  `image_url_timeout_seconds`.

Every outcome is counted in `guardrail_image_fetches_total{outcome}`.  This runs in the audit
path (the tee's ingest thread), never in the proxy's request path.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

__all__ = [
    "FETCH_OUTCOMES",
    "AllowedHost",
    "ImageFetchError",
    "ImageFetcher",
    "parse_allowed_host",
]

# outcomes that are the operator's policy (the request is not applicable), then failures
POLICY_OUTCOMES = ("disabled", "bad_url", "not_allowed", "blocked_address")
FETCH_OUTCOMES = (
    "fetched",
    *POLICY_OUTCOMES,
    "too_large",
    "timeout",
    "too_many_redirects",
    "http_error",
    "error",
)
_CHUNK = 64 * 1024

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Sequence[str]]


class ImageFetchError(Exception):
    """An image URL that was not fetched; `outcome` is one of `FETCH_OUTCOMES`."""

    def __init__(self, outcome: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome

    @property
    def by_policy(self) -> bool:
        """Refused by the operator's settings (not a failure of a fetch that was allowed)."""
        return self.outcome in POLICY_OUTCOMES


@dataclass(frozen=True, slots=True)
class AllowedHost:
    """One allow-list entry: a host name pattern or an IP network."""

    pattern: str | None = None
    network: IPNetwork | None = None

    def matches_name(self, host: str) -> bool:
        return self.pattern is not None and fnmatch.fnmatchcase(host, self.pattern)

    def holds(self, address: IPAddress) -> bool:
        return self.network is not None and address in self.network


def parse_allowed_host(entry: str) -> AllowedHost:
    """`cdn.example.com`, `*.example.com`, `127.0.0.1`, `::1` or `10.0.0.0/8`.

    Raises:
        ValueError: an entry that is none of those.
    """
    text = entry.strip().lower()
    try:
        return AllowedHost(network=ipaddress.ip_network(text.strip("[]"), strict=False))
    except ValueError:
        pass
    label = text.removeprefix("*.")
    if not label or any(not part or not _LABEL_OK(part) for part in label.split(".")):
        raise ValueError(
            f"image_url_allowed_hosts: {entry!r} is not a host name (`cdn.example.com`, "
            "`*.example.com`), an IP address or a network (`10.0.0.0/8`)"
        )
    return AllowedHost(pattern=text)


def _LABEL_OK(part: str) -> bool:  # noqa: N802 - a predicate on one DNS label
    return len(part) <= 63 and all(c.isalnum() or c == "-" for c in part)


def _system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


class ImageFetcher:
    """Fetches image URLs under the operator's policy; `fetch` raises `ImageFetchError`."""

    def __init__(
        self,
        *,
        enabled: bool,
        allowed_hosts: Sequence[str],
        max_bytes: int,
        timeout_seconds: float,
        max_redirects: int,
        count: Callable[[str], None] = lambda outcome: None,
        resolver: Resolver = _system_resolver,
    ) -> None:
        self.enabled = enabled
        self.allowed = [parse_allowed_host(h) for h in allowed_hosts]
        self.max_bytes = max_bytes
        self.timeout_seconds = timeout_seconds
        self.max_redirects = max_redirects
        self.count = count
        self.resolver = resolver

    def fetch(
        self, url: str, *, max_bytes: int | None = None, deadline: float | None = None
    ) -> bytes:
        """The body at `url` (at most `max_bytes`, never more than the fetcher's), following
        checked redirects, within `timeout_seconds` or by `deadline` (`time.monotonic()`),
        whichever comes first: the URLs of one sample share one timeout.

        Raises:
            ImageFetchError: refused by policy, too large, too slow, or a failed request.
        """
        limit = self.max_bytes if max_bytes is None else min(max_bytes, self.max_bytes)
        own = time.monotonic() + self.timeout_seconds
        try:
            data = self._fetch(url, limit, own if deadline is None else min(own, deadline))
        except ImageFetchError as exc:
            self.count(exc.outcome)
            raise
        self.count("fetched")
        return data

    def _fetch(self, url: str, limit: int, deadline: float) -> bytes:
        if not self.enabled:
            raise ImageFetchError("disabled", "image URLs are not fetched (image_url_fetch)")
        for _ in range(self.max_redirects + 1):
            target, host = self._checked(url)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ImageFetchError("timeout", f"over {self.timeout_seconds} s")
            try:
                location = self._get(target, host, deadline, limit)
            except httpx.TimeoutException:
                raise ImageFetchError(
                    "timeout", f"no answer within {self.timeout_seconds} s"
                ) from None
            except httpx.HTTPError as exc:
                raise ImageFetchError("error", f"{type(exc).__name__}: {exc}") from None
            if isinstance(location, bytes):
                return location
            url = urljoin(url, location)  # checked again at the top of the loop
        raise ImageFetchError("too_many_redirects", f"more than {self.max_redirects} redirects")

    def _checked(self, url: str) -> tuple[httpx.URL, str]:
        """The URL to connect to (the host replaced by a checked address) and the host name."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ImageFetchError("bad_url", f"not a URL: {exc}") from None
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise ImageFetchError("bad_url", "only http and https image URLs are fetched")
        if parts.username or parts.password:
            raise ImageFetchError("bad_url", "image URLs with credentials are not fetched")
        port = port or (443 if parts.scheme == "https" else 80)
        named = any(entry.matches_name(host) for entry in self.allowed)
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        try:
            addresses = [literal] if literal is not None else self._resolve(host, port)
        except OSError as exc:
            raise ImageFetchError("error", f"cannot resolve {host!r}: {exc}") from None
        if not addresses:
            raise ImageFetchError("error", f"{host!r} has no address")
        for address in addresses:
            listed = named or any(entry.holds(address) for entry in self.allowed)
            if self.allowed and not listed:
                raise ImageFetchError("not_allowed", f"{host!r} is not in image_url_allowed_hosts")
            if not address.is_global and not listed:
                raise ImageFetchError(
                    "blocked_address",
                    f"{host!r} resolves to {address}, a loopback, private or link-local "
                    "address; list it in image_url_allowed_hosts to allow it",
                )
        target = httpx.URL(url).copy_with(host=str(addresses[0]), port=port)
        return target, host

    def _resolve(self, host: str, port: int) -> list[IPAddress]:
        return [ipaddress.ip_address(a.split("%")[0]) for a in self.resolver(host, port)]

    def _get(self, target: httpx.URL, host: str, deadline: float, limit: int) -> bytes | str:
        """The body (at most `limit` bytes), or the Location of a redirect."""
        over = f"max_image_bytes ({self.max_bytes} bytes)"
        if limit < self.max_bytes:
            over = f"the {limit} bytes left of {over} for the sample's images"
        remaining = max(0.01, deadline - time.monotonic())
        default_port = 443 if target.scheme == "https" else 80
        name = f"[{host}]" if ":" in host else host
        host_header = name if target.port in (None, default_port) else f"{name}:{target.port}"
        with (
            httpx.Client(timeout=httpx.Timeout(remaining), follow_redirects=False) as client,
            client.stream(
                "GET",
                target,
                headers={"Host": host_header, "Accept": "image/*", "Accept-Encoding": "identity"},
                # TLS is checked against the host name, not the address connected to
                extensions={"sni_hostname": host},
            ) as response,
        ):
            if response.is_redirect:
                location = response.headers.get("location")
                if not location:
                    raise ImageFetchError("http_error", "a redirect without a Location")
                return str(location)
            if response.status_code != 200:
                raise ImageFetchError(
                    "http_error", f"the image URL answered {response.status_code}"
                )
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise ImageFetchError("too_large", f"{declared} bytes, over {over}")
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_raw(_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise ImageFetchError("too_large", f"over {over}")
                if time.monotonic() > deadline:
                    raise ImageFetchError("timeout", f"over {self.timeout_seconds} s")
                chunks.append(chunk)
            return b"".join(chunks)
