"""HTTP through the operator's egress allowlist. Upstream: runtime.workers (the shared
client), activities.connections (one client per sender TLS setting), activities.http."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from soupflow import tls
from soupflow.network import Allowlist


class CheckedTransport(httpx.BaseTransport):
    """Every request goes to an address the operator's `--allowed-http` allows: the URL's
    host is resolved once and checked (a URL prefix entry approves any of its addresses),
    and the connection goes to that address, with the name kept for the Host header, SNI
    and certificate verification (no DNS rebinding). Redirects are never followed (httpx's
    default, kept)."""

    def __init__(self, allowlist: Allowlist, **options: Any) -> None:
        self.allowlist = allowlist
        self._inner = httpx.HTTPTransport(**options)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        approved = self.allowlist.allows_url(str(url))
        address = self.allowlist.address(url.host, port, approved=approved)
        request.url = url.copy_with(host=address)
        request.extensions = {**request.extensions, "sni_hostname": url.host}
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


def checked_client(allowlist: Allowlist, settings: tls.ClientTls | None = None) -> httpx.Client:
    """An HTTP client whose every connection is checked; with `settings`, https verifies
    against them (the system store plus `TrustedCertificatesFile`) and sends their client
    certificate."""
    verify: ssl.SSLContext | bool = True
    if settings is not None:
        verify = tls.cached_client_context(settings)
    return httpx.Client(transport=CheckedTransport(allowlist, verify=verify))
