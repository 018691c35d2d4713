"""Who may use the server and by which model name: an API key (`--api-key`, or the environment's
EDGE_SLM_API_KEY: commands/serve.py) checked on every route but /health, CORS origins for browser clients
(`--cors-origin`), and the model names a request may send (`--alias`, `--accept-any-model`)."""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

OPEN_PATHS = ("/health",)  # a load balancer's or systemd's probe needs no key


@dataclass(frozen=True)
class Access:
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()  # the model names clients may send (the first is the listed id)
    accept_any_model: bool = False

    @classmethod
    def from_options(cls, api_key, cors_origins, aliases, accept_any_model) -> Access:
        return cls(
            api_key=api_key or None,
            cors_origins=tuple(cors_origins or ()),
            aliases=tuple(aliases or ()),
            accept_any_model=accept_any_model,
        )


def _unauthorized(message: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    ).encode()


class RequireApiKey:
    """ASGI middleware: a request without `Authorization: Bearer <key>` gets 401 in OpenAI's shape
    (the key compared in constant time). CORS preflights (OPTIONS) are answered by the CORS
    middleware outside this one, so a browser learns the rules before it sends its key."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        body = _unauthorized(
            "incorrect API key provided: send 'Authorization: Bearer KEY' with the server's --api-key"
            if given
            else "no API key provided: send 'Authorization: Bearer KEY' with the server's --api-key"
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def middleware(access: Access) -> list:
    """Starlette middleware for `access`, outermost first: CORS, then the key."""
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware

    stack = []
    if access.cors_origins:
        stack.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(access.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["authorization", "content-type"],
                max_age=600,
            )
        )
    if access.api_key:
        stack.append(Middleware(RequireApiKey, api_key=access.api_key))
    return stack
