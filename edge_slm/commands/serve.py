"""`edge-slm serve BUNDLE [--host 127.0.0.1] [--port 8080] [--threads N] [--max-queue N] ...`: an
OpenAI-compatible HTTP server on the device (the `serve` extra: Starlette, uvicorn, sse-starlette).
Its limits on clients (docs/security.md) are flags here or the bundle's profile."""

from __future__ import annotations

import faulthandler
import sys
from pathlib import Path

import click

from edge_slm.commands.extras import require_extra
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
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Most tokens one reply may have, whatever the client asks [profile runtime.serve_max_tokens].",
)
@click.option(
    "--request-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="A request still running after this is stopped [profile runtime.serve_request_seconds].",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Open connections at once; more get 503 (uvicorn's limit_concurrency).",
)
@click.option(
    "--keep-alive-seconds",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="A connection idle this long, or without a whole request head this long after opening, is closed.",
)
@click.option(
    "--share-prefix-cache",
    is_flag=True,
    help="Reuse (and report in timings.prompt_reused) the KV cache across clients with different API keys: "
    "one tenant only (docs/security.md).",
)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=None,
    help="Requests decoding together, each in its own KV slot of --context tokens [profile runtime.serve_parallel].",
)
@click.option(
    "--kv-budget-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Refuse to start when --parallel slots x --context tokens of KV cache need more memory than this.",
)
@click.option(
    "--api-key",
    envvar="EDGE_SLM_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' on every route but /health (401 otherwise) [env EDGE_SLM_API_KEY].",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    help="A web origin (https://app.example:3000) whose pages may call the server; repeatable, '*' for any.",
)
@click.option(
    "--alias",
    "aliases",
    multiple=True,
    help="The model name clients send (the first is the listed id); others get 404 [the bundle's target].",
)
@click.option("--accept-any-model", is_flag=True, help="Answer whatever model name a request sends.")
@click.option(
    "--index",
    type=click.Path(path_type=Path),
    default=None,
    help="A document index (`edge-slm index`): POST /v1/answers answers from it (BUNDLE: its embedder or a decoder).",
)
@click.option(
    "--embedder",
    type=click.Path(path_type=Path),
    default=None,
    help="With --index and a decoder BUNDLE: the index's embedder, if it moved [the path the index recorded].",
)
def serve(
    bundle: Path,
    host: str,
    port: int,
    threads: int | None,
    context: int | None,
    max_queue: int,
    max_tokens: int | None,
    request_seconds: float | None,
    max_connections: int,
    keep_alive_seconds: float,
    share_prefix_cache: bool,
    parallel: int | None,
    kv_budget_mb: float | None,
    api_key: str | None,
    cors_origins: tuple[str, ...],
    aliases: tuple[str, ...],
    accept_any_model: bool,
    index: Path | None,
    embedder: Path | None,
) -> None:
    """Serve a bundle over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models), and
    with --index answers from documents (/v1/answers)."""
    require_extra("serve", "serve")
    import uvicorn

    from edge_slm.core.bundle import verify_bundle
    from edge_slm.serve.access import Access
    from edge_slm.serve.app import create_app
    from edge_slm.serve.limits import Limits
    from edge_slm.serve.malloc import return_large_blocks_to_system
    from edge_slm.serve.server import Protocol, Server, listen

    if api_key is not None and not api_key.strip():
        raise EdgeSlmError("--api-key (or EDGE_SLM_API_KEY) is empty: give a key, or leave it out for no key")
    access = Access.from_options(api_key, cors_origins, aliases, accept_any_model)
    manifest = verify_bundle(bundle, checksums=False)  # a wrong path fails here, before the server starts
    if index is not None:
        from edge_slm.core.index import read_index

        read_index(index)  # a missing or damaged index too
    elif embedder is not None:
        raise EdgeSlmError("--embedder is the embedder of --index: give --index too")
    parallel, kv_line = kv_budget(manifest, parallel, context, kv_budget_mb)
    listener = listen(host, port)  # a busy port fails here, before "serving" is printed
    # A bus error (a weight file truncated under onnxruntime's memory map) leaves a traceback in the log.
    faulthandler.enable()
    return_large_blocks_to_system()  # before the model loads: its freed load buffers go back
    fatal: list[str] = []
    limits = Limits(max_tokens=max_tokens, request_seconds=request_seconds, share_prefix_cache=share_prefix_cache)

    def on_fatal(message: str) -> None:
        fatal.append(message)
        server.should_exit = True

    app = create_app(
        bundle,
        threads,
        max_queue,
        context=context,
        limits=limits,
        on_fatal=on_fatal,
        parallel=parallel,
        access=access,
        index=index,
        index_embedder=embedder,
    )
    config = uvicorn.Config(
        app,
        log_level="warning",
        http=Protocol,
        timeout_keep_alive=keep_alive_seconds,
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=3,  # then open connections are dropped: SIGTERM exits within 5 s
    )
    server = Server(config, app.state.service)
    echo_err(f"serving {bundle} on http://{host}:{port}/v1 (health: /health, metrics: /metrics){kv_line}")
    server.run(sockets=[listener])
    if fatal:
        sys.exit(1)  # the line is logged; systemd's Restart=on-failure starts a fresh server


def kv_budget(manifest, parallel: int | None, context: int | None, budget_mb: float | None) -> tuple[int, str]:
    """The number of KV slots (--parallel, else the profile's) and their memory, for the start-up
    line; more memory than --kv-budget-mb refuses to start, in one line, before the model is loaded."""
    from edge_slm.core.manifest import DecoderManifest

    if not isinstance(manifest, DecoderManifest):
        return 1, ""
    model = manifest.model
    parallel = parallel or int(getattr(manifest.profile.runtime, "serve_parallel", 1))
    context = context or model.context_length
    if context > model.context_length:
        return parallel, ""  # runtime.load refuses it with its own message
    itemsize = 2 if manifest.precision == "fp16" else 4  # fp16 bundles keep their cache in fp16
    mb = 2 * model.num_layers * model.num_kv_heads * model.head_dim * context * parallel * itemsize / 2**20
    line = f"KV cache: {parallel} slots x {context} tokens = {mb:.1f} MB"
    if budget_mb is not None and mb > budget_mb:
        raise EdgeSlmError(
            f"{line}, over the budget of {budget_mb:g} MB (--kv-budget-mb): lower --parallel or --context"
        )
    return parallel, f"; {line}"
