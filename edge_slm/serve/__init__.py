"""The device half's HTTP service: `edge-slm serve BUNDLE` speaks OpenAI's API (the routes that
clients, chat UIs and agents already use) over one model, with a bounded queue. Built on
Starlette, uvicorn and sse-starlette (the `serve` extra); never imports the build half."""
