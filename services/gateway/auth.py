"""API keys: who may call /v1/*, and which tenant's cache space each request uses."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from services.gateway.errors import ApiError
from shared.core.errors import ErrorCode
from shared.runtime.config import Settings

TENANT = web.RequestKey("tenant", str)  # the request's tenant, set by the middleware
PROTECTED_PREFIX = "/v1/"  # what needs a key when keys are set (/health, /metrics stay open)


class ApiKeys:
    """The configured keys, by digest (a lookup that does not compare the secret byte by byte)."""

    def __init__(self, tenants: dict[str, str]) -> None:
        self.tenants = {self.digest(key): tenant for key, tenant in tenants.items()}

    @classmethod
    def of(cls, settings: Settings) -> ApiKeys:
        """The keys CAKE_API_KEYS names (none: every request is the single default tenant)."""
        return cls(settings.api_key_tenants())

    @staticmethod
    def digest(key: str) -> bytes:
        """What a key is looked up by."""
        return hashlib.sha256(key.encode()).digest()

    def tenant(self, request: web.Request) -> str:
        """The request's tenant ("" without keys), or 401 in OpenAI's shape."""
        if not self.tenants or not request.path.startswith(PROTECTED_PREFIX):
            return ""
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        tenant = self.tenants.get(self.digest(key.strip())) if scheme.lower() == "bearer" else None
        if tenant is None:
            message = (
                "Incorrect API key provided."
                if key
                else "You didn't provide an API key: send it as `Authorization: Bearer <key>`."
            )
            raise ApiError(ErrorCode.INVALID_API_KEY, message)
        return tenant


def auth_middleware(keys: ApiKeys, refused: Callable[[], None]) -> Middleware:
    """A middleware that puts each request's tenant in request[TENANT], or answers 401 (and
    calls refused)."""

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            request[TENANT] = keys.tenant(request)
        except ApiError as exc:
            refused()
            return exc.response()
        return await handler(request)

    return authenticate
