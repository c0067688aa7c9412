"""The server's Prometheus metrics, in a registry of their own (several servers may share a process).

Names follow vLLM's where there is one, so existing dashboards need only the prefix changed.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

# seconds; time to first token includes the queue and the prefill, so its buckets reach further
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """What the engine reports (first_token, next_token, finished) and what the server counts."""

    def __init__(self, running=lambda: 0, waiting=lambda: 0, state=lambda: (0, 0), budget=lambda: 0,
                 prefix_cache=lambda: (0, 0, 0)):
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("gss_num_requests_running", "Requests in the running batch", registry=r).set_function(running)
        Gauge("gss_num_requests_waiting", "Requests queued for a place in the batch", registry=r).set_function(waiting)
        r.register(_StateBytes(state, budget))
        r.register(_PrefixCacheBytes(prefix_cache))
        self.ttft = Histogram("gss_time_to_first_token_seconds", "From arrival to the first sampled token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("gss_time_per_output_token_seconds", "Between consecutive tokens of one request",
                              buckets=TPOT_BUCKETS, registry=r)
        self.generated = Counter("gss_generation_tokens", "Tokens generated", registry=r)
        self.prompt = Counter("gss_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.requests = Counter("gss_request_success", "Requests that ended, by finish reason", ["finished_reason"], registry=r)
        self.rejected = Counter("gss_request_rejected", "Requests refused, by HTTP status", ["status"], registry=r)
        self.cache_hits = Counter("gss_prefix_cache_hits", "Prompts started from a cached decoder state", registry=r)
        self.cache_misses = Counter("gss_prefix_cache_misses", "Prompts computed from their first token, the prefix "
                                    "cache on (echoed prompts included)", registry=r)
        self.cache_tokens = Counter("gss_prefix_cache_cached_tokens", "Prompt tokens taken from cached decoder states, "
                                    "not computed", registry=r)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generated.inc()

    def next_token(self, seconds: float) -> None:
        self.tpot.observe(seconds)
        self.generated.inc()

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        self.requests.labels(reason).inc()
        self.prompt.inc(prompt_tokens)

    def prompt_cache(self, cached_tokens: int) -> None:
        """A prompt computed with the prefix cache on, `cached_tokens` of it from a snapshot (0: a miss)."""
        (self.cache_hits if cached_tokens else self.cache_misses).inc()
        self.cache_tokens.inc(cached_tokens)


class _StateBytes:
    """The engine's decoder-state gauges, read together (`state()` -> (reserved, used)) so that one scrape
    shows one moment: reserved never below used."""

    def __init__(self, state, budget):
        self.state, self.budget = state, budget

    def collect(self):
        reserved, used = self.state()
        yield GaugeMetricFamily("gss_state_reserved_bytes", "Decoder state (with each row's step working memory) "
                                "the running requests can grow to: what the budget admits by", value=reserved)
        yield GaugeMetricFamily("gss_state_used_bytes", "What the running requests hold now (state buffers and each "
                                "row's step working memory)", value=used)
        yield GaugeMetricFamily("gss_state_budget_bytes", "--state-memory (0: no budget)", value=self.budget())


class _PrefixCacheBytes:
    """The prefix cache's gauges, read together (`usage()` -> (bytes, entries, capacity)): its own budget,
    apart from the decoder state's."""

    def __init__(self, usage):
        self.usage = usage

    def collect(self):
        held, entries, capacity = self.usage()
        yield GaugeMetricFamily("gss_prefix_cache_bytes", "What the prefix cache's snapshots hold (states, keys, "
                                "logits)", value=held)
        yield GaugeMetricFamily("gss_prefix_cache_entries", "Snapshots in the prefix cache", value=entries)
        yield GaugeMetricFamily("gss_prefix_cache_capacity_bytes", "--prefix-cache-memory (0: no cache)", value=capacity)
