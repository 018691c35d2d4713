"""Prometheus metrics of the service (`GET /metrics`), with prometheus_client."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edge_slm.core.system import peak_rss_mb


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "edge_slm_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.prompt_tokens = Counter("edge_slm_prompt_tokens", "Prompt tokens processed", registry=self.registry)
        self.generated_tokens = Counter("edge_slm_generated_tokens", "Tokens generated", registry=self.registry)
        self.reused_tokens = Counter(
            "edge_slm_reused_prompt_tokens", "Prompt tokens whose KV cache was reused", registry=self.registry
        )
        self.ttft = Histogram(
            "edge_slm_time_to_first_token_seconds",
            "Prompt in -> first token out",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.decode_rate = Histogram(
            "edge_slm_decode_tokens_per_second",
            "Tokens after the first, over their time",
            buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320),
            registry=self.registry,
        )
        self.queue_depth = Gauge("edge_slm_queue_depth", "Requests waiting for the model", registry=self.registry)
        self.peak_rss = Gauge(
            "edge_slm_peak_rss_megabytes", "Peak resident memory of the server", registry=self.registry
        )

    def observe(self, result, seconds: float) -> None:
        self.prompt_tokens.inc(len(result.prompt_token_ids))
        self.generated_tokens.inc(len(result.token_ids))
        self.reused_tokens.inc(result.reused_tokens)
        if result.token_ids:
            self.ttft.observe(result.ttft_ms / 1e3)
        if result.decode_tokens_per_s:
            self.decode_rate.observe(result.decode_tokens_per_s)

    def render(self) -> bytes:
        self.peak_rss.set(round(peak_rss_mb(), 1))
        return generate_latest(self.registry)
