"""`GET /metrics`: how the server is doing, in the Prometheus text format (`prometheus_client`).

    tinygpt_requests_total{route, status}        requests answered, by route and HTTP status
    tinygpt_queue_depth                          requests waiting for a slot (len(engine.waiters))
    tinygpt_active_requests                      requests holding a generation slot (engine.active)
    tinygpt_active_sequences                     rows generating in the batch (engine.active_sequences:
                                                 a request's n choices are n rows, from its prefill on)
    tinygpt_generated_tokens_total               tokens generated and delivered, every choice and route
                                                 counted (engine.generated_tokens)
    tinygpt_time_to_first_token_seconds{route}   from a request's arrival to its first generated token
    tinygpt_request_duration_seconds{route}      from a request's arrival to its response's last byte

Each app has its own `CollectorRegistry`, not prometheus_client's global one: several apps in
one process (the tests make many) each count their own requests. Routes are the API's paths;
any other path counts as "other", so that probing for random URLs cannot grow the label set.
Requests refused by the Host check (403) never reach the app and are not counted. The gauges
and the generated-tokens counter read the engine when scraped, so they are never stale and
say what the engine counts.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily

from tinygpt.engine import Engine

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/api/generate",
          "/api/attention", "/api/info", "/")
# a small model answers in milliseconds to a minute (a long generation behind a full queue)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

__all__ = ["CONTENT_TYPE_LATEST", "RequestCounting", "ServerMetrics"]


class ServerMetrics:
    """The instruments of one app, in their own registry."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("tinygpt_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        queue = Gauge("tinygpt_queue_depth", "requests waiting for a generation slot", registry=self.registry)
        queue.set_function(lambda: len(engine.waiters))
        requests = Gauge("tinygpt_active_requests", "requests holding a generation slot", registry=self.registry)
        requests.set_function(lambda: engine.active)
        rows = Gauge("tinygpt_active_sequences", "sequences (rows: a request's n choices) generating in the batch",
                     registry=self.registry)
        rows.set_function(lambda: engine.active_sequences)
        self.registry.register(_GeneratedTokens(engine))
        self.time_to_first_token = Histogram("tinygpt_time_to_first_token_seconds",
                                             "seconds from a request's arrival to its first generated token",
                                             ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.request_duration = Histogram("tinygpt_request_duration_seconds",
                                          "seconds from a request's arrival to the last byte of its response",
                                          ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _GeneratedTokens:
    """tinygpt_generated_tokens_total: the engine's own count, read when scraped (a counter
    of its own here could only count what the adapters pass on, and drift from it)."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        yield CounterMetricFamily("tinygpt_generated_tokens", "tokens generated (every choice of every request)",
                                  value=self.engine.generated_tokens)


def route_of(path: str) -> str:
    return path if path in ROUTES else "other"


class RequestCounting:
    """ASGI middleware: count every HTTP request by route and status, and time it to its
    response's last byte (a stream's included). A request whose client left before any answer
    counts as status 499, nginx's "client closed request"; one the app failed without an
    answer, as 500."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        route = route_of(scope["path"])
        status: list[int] = []

        async def counted_send(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        failed = True
        try:
            await self.app(scope, receive, counted_send)
            failed = False
        finally:
            answered = str(status[0]) if status else ("500" if failed else "499")
            self.metrics.requests.labels(route, answered).inc()
            self.metrics.request_duration.labels(route).observe(time.perf_counter() - started)
