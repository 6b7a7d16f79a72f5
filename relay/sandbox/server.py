# Why this module exists: it is the one object tests and `smtp-graph-relay sandbox` hold. It
# composes the directory, the fake Entra and Graph services, the fault plan and the journal
# into one aiohttp HTTPS server on a loopback port, and exposes the observation API the test
# suite is written against (DESIGN §10).
"""The Sandbox: Entra ID + Microsoft Graph stand-in on one local HTTPS port."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import TracebackType
from typing import Self

from aiohttp import web

from .access_tokens import GRAPH_APP_ID, GRAPH_RESOURCE, AccessTokens
from .backend import REQUEST_ID, Backend
from .control import ControlService
from .directory import Directory
from .drafts import DraftService
from .entra import EntraService
from .faults import FaultPlan
from .graph import GraphService
from .limits import Ndr, SandboxLimits
from .messages import GraphError
from .pki import CA_FILE, ensure_credentials
from .recorder import Journal, MailDir, ReceivedMail
from .throttle import Throttle

__all__ = ["Sandbox"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Sandbox:
    """Entra ID (OpenID discovery + v2.0 token endpoint) and Graph sendMail over TLS, plus the
    large-message endpoints: drafts from MIME, upload sessions, send (Mail.ReadWrite).

    Use as `async with Sandbox(state_dir=tmp) as sandbox:`; give MSAL
    `authority=f"{sandbox.authority_host}/{tenant}"` with `instance_discovery=False`, point the
    Graph client at `sandbox.graph_endpoint`, and trust `sandbox.ca_file`.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        state_dir: Path,
        token_lifetime: int = 3599,
        open_mailboxes: bool = False,
        mail_dir: Path | None = None,
        clock: Callable[[], float] = time.time,
        limits: SandboxLimits = SandboxLimits(),  # noqa: B008 (frozen, so one shared default is safe)
    ) -> None:
        self.host = host
        self.port = port
        self.state_dir = Path(state_dir)
        self.ca_file = self.state_dir / CA_FILE
        self.faults = FaultPlan()
        self._clock = clock
        self._journal = Journal()
        self._directory = Directory(open_mailboxes=open_mailboxes)
        self._tokens = AccessTokens(self._directory, clock, token_lifetime)
        self._mail_dir = MailDir(Path(mail_dir)) if mail_dir is not None else None
        self._throttle = Throttle(limits, clock)
        self._throttle.on_ndr = self._ndr_landed
        backend = Backend(
            self._directory,
            self._tokens,
            self.faults,
            self._journal,
            clock,
            self._own_resources,
            self._throttle,
        )
        self._entra = EntraService(backend)
        self._graph = GraphService(backend, self._mail_dir)
        self._drafts = DraftService(backend, self._graph, self._mail_dir)
        self._control = ControlService(self._throttle)
        self._runner: web.AppRunner | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Write the CA and server certificate into `state_dir` and start serving HTTPS."""
        if self._runner is not None:
            raise RuntimeError("sandbox already started")
        credentials = await asyncio.to_thread(ensure_credentials, self.state_dir)
        if self._mail_dir is not None:
            await self._mail_dir.open()
        self.ca_file = credentials.ca_file
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(credentials.cert_file, credentials.key_file)
        app = web.Application(middlewares=[self._middleware])
        app.add_routes(self._entra.routes())
        app.add_routes(self._graph.routes())
        app.add_routes(self._drafts.routes())
        app.add_routes(self._control.routes())
        runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
            site = web.SockSite(runner, sock, ssl_context=server_tls)
            await site.start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self.port = sock.getsockname()[1]
        self._runner = runner

    async def stop(self) -> None:
        """Let held requests finish, close connections and stop listening."""
        runner, self._runner = self._runner, None
        if runner is not None:
            self.faults.release_graph()
            await runner.cleanup()
            await self._throttle.close()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- endpoints ------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"

    @property
    def authority_host(self) -> str:
        """MSAL authority without the tenant: the relay appends `/{tenant_id}`."""
        return self.base_url

    @property
    def graph_endpoint(self) -> str:
        """Graph root: the relay appends `/v1.0/users/{mailbox}/sendMail`."""
        return self.base_url

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client TLS context trusting only the sandbox CA (for aiohttp sessions)."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _own_resources(self) -> frozenset[str]:
        """Resource ids the sandbox answers to: Graph's, and its own origins under any of the
        names its certificate covers (the relay may be configured with either)."""
        origins = {self.base_url, f"https://localhost:{self.port}"}
        origins |= {f"https://127.0.0.1:{self.port}", f"https://[::1]:{self.port}"}
        return frozenset({GRAPH_RESOURCE, GRAPH_APP_ID, *(o.lower() for o in origins)})

    # -- directory ------------------------------------------------------------------------

    def add_tenant(self, tenant_id: str) -> None:
        self._directory.add_tenant(tenant_id)

    def add_app(
        self,
        tenant_id: str,
        client_id: str,
        *,
        roles: Iterable[str] = ("Mail.Send",),
        secret: str | None = None,
        certificate_pem: bytes | None = None,
    ) -> None:
        """Register an app (creating its tenant if needed) with a secret and/or certificate and
        the application roles admin consent granted it."""
        self._directory.add_app(
            tenant_id, client_id, secret=secret, certificate_pem=certificate_pem, roles=roles
        )

    def remove_app(self, tenant_id: str, client_id: str) -> None:
        self._directory.remove_app(tenant_id, client_id)

    def add_mailbox(
        self, address: str, *, licensed: bool = True, send_as: Iterable[str] = ()
    ) -> None:
        """A mailbox may send as itself and as each address in `send_as` (case-insensitive)."""
        self._directory.add_mailbox(address, licensed=licensed, send_as=send_as)

    def issue_token(self, tenant_id: str, client_id: str, *, expires_in: int | None = None) -> str:
        """Mint an access token for a registered app without the token endpoint (and without
        counting it), e.g. an already expired one with `expires_in=-60`."""
        app = self._directory.find_app(tenant_id, client_id)
        if app is None:
            raise KeyError(f"no app {client_id} in tenant {tenant_id}")
        return self._tokens.issue(app, issuer_host="https://sts.windows.net", expires_in=expires_in)

    def revoke_tokens(self) -> None:
        """Every token issued so far now gets 401 InvalidAuthenticationToken from Graph."""
        self._tokens.revoke_all()

    # -- limits ---------------------------------------------------------------------------

    @property
    def limits(self) -> SandboxLimits:
        """The limits enforced now."""
        return self._throttle.limits

    def set_limits(self, **changes: object) -> SandboxLimits:
        """Replace the given SandboxLimits fields (validated; ValueError otherwise)."""
        return self._throttle.set_limits(changes)

    @property
    def violations(self) -> Counter[str]:
        """Requests that went over each limit, keyed by the SandboxLimits field name."""
        return self._throttle.violations

    @property
    def ndrs(self) -> list[Ndr]:
        """NDRs that landed (exchange_answer "ndr"), oldest first."""
        return self._throttle.ndrs

    async def _ndr_landed(self, ndr: Ndr) -> None:
        if self._mail_dir is not None:
            await self._mail_dir.add_ndr(ndr)
        await self._journal.notify()

    # -- observation ----------------------------------------------------------------------

    @property
    def received(self) -> list[ReceivedMail]:
        return self._journal.received

    @property
    def token_requests(self) -> int:
        return self._journal.token_requests

    @property
    def entra_requests(self) -> int:
        """Every request that reached Entra: discovery, keys and the token endpoint."""
        return self._journal.entra_requests

    @property
    def tokens_issued(self) -> int:
        return self._journal.tokens_issued

    @property
    def graph_requests(self) -> int:
        return self._journal.graph_requests

    @property
    def graph_statuses(self) -> Counter[int]:
        """How many sendMail answers had each status (0 = connection aborted)."""
        return self._journal.graph_statuses

    @property
    def in_flight(self) -> dict[str, int]:
        """sendMail requests per mailbox currently admitted and not yet answered."""
        return self._journal.in_flight

    @property
    def max_concurrency(self) -> dict[str, int]:
        return self._journal.max_concurrency

    @property
    def drafts(self) -> int:
        """Drafts that exist (created and neither sent nor deleted)."""
        return len(self._drafts.drafts)

    @property
    def upload_statuses(self) -> Counter[int]:
        """How many upload-session PUTs got each status."""
        return self._journal.upload_statuses

    def expire_upload_sessions(self) -> None:
        """Every open upload session ends: further PUTs to it answer 404."""
        self._drafts.expire_sessions()

    # ASYNC109: `timeout` is part of the public contract; see Journal.wait_until.
    async def wait_for_mail(self, count: int, timeout: float = 10) -> list[ReceivedMail]:  # noqa: ASYNC109
        """Wait until at least `count` messages were accepted; TimeoutError otherwise."""
        await self._journal.wait_until(lambda: len(self._journal.received) >= count, timeout)
        return list(self._journal.received)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10) -> None:  # noqa: ASYNC109
        """Wait until `predicate()` holds; it is re-checked after every request event."""
        await self._journal.wait_until(predicate, timeout)

    # -- plumbing -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        request_id = str(uuid.uuid4())
        request[REQUEST_ID] = request_id
        try:
            response = await handler(request)
        except web.HTTPMethodNotAllowed as exc:
            response = self._graph.error_response(
                request,
                GraphError(
                    405, "MethodNotAllowed", f"The HTTP method '{request.method}' isn't allowed."
                ),
            )
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
        except web.HTTPNotFound:
            segment = request.path.rstrip("/").rsplit("/", 1)[-1]
            response = self._graph.error_response(
                request,
                GraphError(
                    404, "ResourceNotFound", f"Resource not found for the segment '{segment}'."
                ),
            )
        client_request_id = request.headers.get("client-request-id")
        if request.path.startswith(("/v1.0/", "/beta/")) or response.status in (404, 405):
            response.headers.setdefault("request-id", request_id)
            response.headers.setdefault("client-request-id", client_request_id or request_id)
        else:
            response.headers.setdefault("x-ms-request-id", request_id)
            if client_request_id:
                response.headers.setdefault("client-request-id", client_request_id)
        return response
