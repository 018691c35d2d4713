"""The process around the app: the listening socket, bound before anything prints "serving", and
uvicorn's server, which cancels generations first when it is told to stop."""

from __future__ import annotations

import socket

import uvicorn

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
