"""The process around the app: the listening socket, bound before anything prints "serving", and
uvicorn's server, which cancels generations first when it is told to stop."""

from __future__ import annotations

import json
import socket

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from edge_slm.core.errors import EdgeSlmError


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound here so that a busy port is one line and exit 2 (uvicorn would
    log its own error and exit 3 after the start-up message)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise EdgeSlmError(
            f"cannot listen on {host}:{port}: {exc.strerror or exc}: stop what is using it or pick another --port"
        ) from None
    return sock


class Server(uvicorn.Server):
    """On SIGTERM / SIGINT, first cancel the running and the queued generations (they stop between
    two tokens), so that their connections end at once and the process exits within seconds."""

    def __init__(self, config: uvicorn.Config, service):
        super().__init__(config)
        self.service = service

    def handle_exit(self, sig, frame) -> None:
        self.service.stop()
        super().handle_exit(sig, frame)


class Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, which closes a connection that has not sent a whole request
    head within `timeout_keep_alive` seconds of opening (uvicorn times out only idle connections
    between two requests: a client that connects and stays silent, or sends its head a byte at a
    time, would otherwise hold one of the `limit_concurrency` places for ever)."""

    def __init__(self, config, server_state, app_state, _loop=None):
        super().__init__(config, server_state, app_state, _loop)
        # uvicorn answers requests past `limit_concurrency` itself, in plain text; the same check is
        # made here instead, so that a client told "busy" gets OpenAI's error shape as for a full queue.
        cap, self.limit_concurrency = self.limit_concurrency, None
        if cap is not None:
            self.app = _capped(self.app, cap, server_state)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._head_deadline = self.loop.call_later(self.timeout_keep_alive, self._no_request_yet)

    def connection_lost(self, exc) -> None:
        self._head_deadline.cancel()
        super().connection_lost(exc)

    def _no_request_yet(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()


def _capped(app, cap: int, state):
    """`app` behind uvicorn's own concurrency rule (open connections, this one included, or
    requests in flight, this one included, past `cap`): 503 with OpenAI's error body beyond it."""
    body = json.dumps(
        {
            "error": {
                "message": f"the server has {cap} connections open (--max-connections); retry later",
                "type": "server_error",
                "param": None,
                "code": "too_many_connections",
            }
        }
    ).encode()

    async def capped(scope, receive, send):
        if scope["type"] == "http" and (len(state.connections) >= cap or len(state.tasks) > cap):
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": 503, "headers": headers + [(b"retry-after", b"1")]})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    return capped
