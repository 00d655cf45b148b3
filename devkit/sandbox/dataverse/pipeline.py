"""Around every Web API request: who calls, service protection, the request scope, then webhooks.

Runs inside `SandboxMiddleware` (so the bearer token is already checked):
1. the caller: the integration application user, or the systemuser named by
   the documented impersonation headers `CallerObjectId` (Entra object id) or
   `MSCRMCallerID` (systemuserid);
2. service protection for that user (429 with `Retry-After`), and the
   `x-ms-ratelimit-*` headers on every response;
3. a `RequestScope` shared with `$batch` parts (they come back through the
   whole app marked as sub-requests and pass straight through here);
4. once the response has been sent, the request's committed changes go to the
   webhook dispatcher;
5. a request that changed the webhook registration awaits `on_registration`
   (F&O data-event activation, `virtual.DataEventLink.sync`) before its
   response starts, so a registration is in force once its answer arrives.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from devkit.sandbox.common import SUBREQUEST_SCOPE_KEY
from devkit.sandbox.dataverse import scope as request_scope
from devkit.sandbox.dataverse.errors import ODATA, PRIVILEGE, DataverseError, error_response, render
from devkit.sandbox.dataverse.org import Organization
from devkit.sandbox.dataverse.protection import Limiter
from devkit.sandbox.dataverse.seed import INTEGRATION_USER
from devkit.sandbox.dataverse.values import parse_guid
from devkit.sandbox.dataverse.webhooks import Dispatcher

log = logging.getLogger(__name__)


def identify(org: Organization, headers: Headers) -> request_scope.Caller:
    """The caller of a request; 400 for a malformed header, 403 for an unknown or disabled user."""
    application = INTEGRATION_USER.systemuserid
    for header, by_object_id in (("callerobjectid", True), ("mscrmcallerid", False)):
        raw = headers.get(header)
        if raw is None:
            continue
        guid = parse_guid(raw)
        if guid is None:
            raise DataverseError(400, ODATA, f"The value '{raw}' of the {header} header is not a valid GUID.")
        user = org.user_by_object_id(guid) if by_object_id else org.row("systemuser", guid)
        if user is None:
            kind = "Azure Active Directory object id" if by_object_id else "SystemUserId"
            raise DataverseError(
                403, PRIVILEGE, f"The user with {kind} = {guid} to impersonate does not exist in this organization."
            )
        if user.get("isdisabled"):
            raise DataverseError(403, PRIVILEGE, f"The user with SystemUserId={user['systemuserid']} is disabled.")
        # Impersonating yourself is no impersonation: the onbehalfby columns stay empty.
        if user["systemuserid"] == application:
            return request_scope.Caller(application)
        return request_scope.Caller(user["systemuserid"], on_behalf_of=application)
    return request_scope.Caller(application)


class ApiMiddleware:
    """Pure ASGI middleware for `/api/data/v9.2/...` (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        org: Organization,
        limiter: Limiter,
        dispatcher: Dispatcher,
        on_registration: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.app = app
        self.org = org
        self.limiter = limiter
        self.dispatcher = dispatcher
        self.on_registration = on_registration

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get(SUBREQUEST_SCOPE_KEY):
            await self.app(scope, receive, send)
            return
        try:
            caller = identify(self.org, Headers(scope=scope))
        except DataverseError as exc:
            await render(exc)(scope, receive, send)
            return
        user = caller.user_id
        rejection = self.limiter.admit(user)
        if rejection is not None:
            headers = {"Retry-After": str(rejection.retry_after_s), **self.limiter.headers(user)}
            await error_response(429, rejection.code, rejection.message, headers)(scope, receive, send)
            return
        current = request_scope.RequestScope(caller)
        registration = self.org.registration_version

        async def with_limits(message: Message) -> None:
            if message["type"] == "http.response.start":
                if self.on_registration is not None and self.org.registration_version != registration:
                    await self.on_registration()
                headers = MutableHeaders(scope=message)
                for name, value in self.limiter.headers(user).items():
                    headers[name] = value
            await send(message)

        try:
            with request_scope.opened(current):
                await self.app(scope, receive, with_limits)
        finally:
            self.limiter.finish(user, current.cost_ms)
            # After the response went out: committed changes (even of a batch that failed later) notify.
            if current.changes:
                try:
                    self.dispatcher.dispatch(current.changes, current.correlation_id)
                except Exception:  # a broken registration must not turn a committed write into an error
                    log.exception("webhook dispatch failed for correlation %s", current.correlation_id)
