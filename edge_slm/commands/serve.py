"""`edge-slm serve BUNDLE [--host 127.0.0.1] [--port 8080] [--threads N] [--max-queue N]`: an
OpenAI-compatible HTTP server on the device (the `serve` extra: Starlette, uvicorn, sse-starlette)."""

from __future__ import annotations

from pathlib import Path

import click

from edge_slm.commands.options import echo_err, threads_option
from edge_slm.core.errors import EdgeSlmError


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@threads_option()
@click.option(
    "--context", type=click.IntRange(min=2), default=None, help="KV cache capacity in tokens [the bundle's context]."
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Requests that may wait; more get 429.",
)
def serve(bundle: Path, host: str, port: int, threads: int | None, context: int | None, max_queue: int) -> None:
    """Serve a bundle over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models)."""
    try:
        import uvicorn

        from edge_slm.serve.app import create_app
    except ImportError as exc:
        raise EdgeSlmError(
            f"edge-slm serve needs the serve extra ({exc.name} is missing): pip install 'edge-slm[serve]'"
        ) from None
    from edge_slm.core.bundle import verify_bundle

    verify_bundle(bundle, checksums=False)  # a wrong path fails here, before the server starts
    echo_err(f"serving {bundle} on http://{host}:{port}/v1 (health: /health, metrics: /metrics)")
    uvicorn.run(create_app(bundle, threads, max_queue, context=context), host=host, port=port, log_level="warning")
