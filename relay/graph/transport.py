"""HTTP transport plumbing shared by the token provider (MSAL, via `requests`) and the Graph client.

Why this module exists: both HTTP clients must trust exactly the same certificates and use exactly
the same proxy, or an outage looks different depending on which side of the relay hits it first.
Trust and proxy rules therefore live here once, and each client only picks them up:

- `ssl_context_for`: the system trust store plus certifi plus the auth object's `ca_file` (extra
  anchors, e.g. a TLS-inspecting proxy's CA). The Graph client hands it to aiohttp; the token
  provider hands it to urllib3 through `PinnedTrustAdapter`.
- `proxy_for`: `auth.proxy` when set, else HTTPS_PROXY / NO_PROXY by requests' rules.
- `PinnedTrustSession`: the `requests.Session` MSAL gets as `http_client`. `requests` lets
  REQUESTS_CA_BUNDLE replace a session's `verify`, and MSAL only configures the session, so the
  adapter ignores `verify` altogether and hands urllib3 our one `ssl.SSLContext`; the environment
  can neither widen nor narrow that trust. Nothing else is taken from the environment either:
  `trust_env` is off, because with it `requests` would also add a ~/.netrc login as an
  Authorization header to the token request.

Errors are not converted here: `ssl_context_for` raises OSError for a bad `ca_file` and the
session raises `requests` exceptions; each client converts them at its own boundary.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import certifi
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

if TYPE_CHECKING:
    # Stub-only TypedDicts (typeshed's requests-stubs, `@type_check_only`): the declared return
    # type of HTTPAdapter.build_connection_pool_key_attributes. They do not exist at runtime.
    from requests.adapters import _HostParams, _PoolKwargs

__all__ = [
    "PinnedTrustAdapter",
    "PinnedTrustSession",
    "proxy_for",
    "ssl_context_for",
]


def ssl_context_for(ca_file: Path | None) -> ssl.SSLContext:
    """System trust store + certifi + `ca_file` (extra anchors). Shared with the Graph client."""
    context = ssl.create_default_context()
    context.load_verify_locations(cafile=certifi.where())
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def proxy_for(url: str, configured: str | None) -> str | None:
    """The proxy for `url`: the auth object's `proxy`, else HTTPS_PROXY / HTTP_PROXY / ALL_PROXY
    unless NO_PROXY exempts the host (requests' rules). None means: connect directly."""
    proxy = configured
    if proxy is None:
        found = requests.utils.get_environ_proxies(url)
        proxy = found.get(urlparse(url).scheme) or found.get("all")
    if not proxy:
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


class PinnedTrustAdapter(HTTPAdapter):
    """Verifies every HTTPS connection against one SSLContext, whatever `verify` says.

    requests >= 2.32 builds urllib3 pool keys in `build_connection_pool_key_attributes` and puts
    `verify` (REQUESTS_CA_BUNDLE when set) into `ca_certs`, which urllib3 would load on top of our
    context; `cert_verify` would also switch verification off for `verify=False`. Both ignore it.
    """

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        # One retry on connection errors (nothing was sent yet), as MSAL's own default session.
        # Never on an answer: urllib3 would otherwise treat a 503/429 with Retry-After as a
        # retry it has no budget for and raise MaxRetryError, which hides Entra's answer (and
        # its Retry-After, which the token provider's backoff honours) behind "unreachable".
        retry = Retry(
            total=1, connect=1, read=0, redirect=0, status=0, other=0,
            respect_retry_after_header=False,
        )  # fmt: skip
        super().__init__(max_retries=retry)

    def build_connection_pool_key_attributes(
        self,
        request: requests.PreparedRequest,
        verify: bool | str,
        cert: str | tuple[str, str] | None = None,
    ) -> tuple[_HostParams, _PoolKwargs]:
        host, pool = super().build_connection_pool_key_attributes(request, True, None)
        pool.pop("ca_certs", None)
        pool.pop("ca_cert_dir", None)
        pool["ssl_context"] = self._context
        pool["cert_reqs"] = "CERT_REQUIRED"
        return host, pool

    def cert_verify(self, conn: Any, url: str, verify: object, cert: object) -> None:
        conn.cert_reqs = "CERT_REQUIRED"
        conn.ca_certs = None
        conn.ca_cert_dir = None


class PinnedTrustSession(requests.Session):
    """The `http_client` MSAL uses: our trust, the auth object's proxy, a timeout on every call."""

    def __init__(self, context: ssl.SSLContext, *, proxy: str | None, timeout: float) -> None:
        super().__init__()
        self.trust_env = False  # no netrc, no REQUESTS_CA_BUNDLE; proxies come from proxy_for
        self.mount("https://", PinnedTrustAdapter(context))
        self._proxy = proxy
        self._timeout = timeout
        # Retry-After of the last 429/5xx answer (the token provider resets it per request).
        self.retry_after: str | None = None

    # `method` is `str | bytes` as in Session.request; everything after `url` is passed through
    # untouched except the `timeout` default and `proxies`, so it need not be spelled out.
    def request(
        self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any
    ) -> requests.Response:
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self._timeout
        target = url.decode() if isinstance(url, bytes) else url
        proxy = proxy_for(target, self._proxy)
        kwargs["proxies"] = {"http": proxy, "https": proxy} if proxy else {}
        response = super().request(method, url, *args, **kwargs)
        if response.status_code == 429 or response.status_code >= 500:
            self.retry_after = response.headers.get("Retry-After")
        return response
