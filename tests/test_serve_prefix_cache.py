"""gss-serve's prefix cache: a request served from a snapshot gets exactly what it would get cold.

Every family: greedy tokens, seeded samples and (within the "logprob" tolerance) log-probabilities equal to
the same request on an engine without a cache; a conversation resumed from completion-end snapshots; a prompt
equal to a key (nothing fed); ragged hits admitted together into a running batch; a branch point; eviction
under a tiny budget, a snapshot evicted between its lookup and its use included; what usage and /metrics say.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import LONG_PROMPT
from serve_support import parse_metrics, wait_for

FAMILIES = ("dsconv", "gss", "mhesa")
TEXT = list(LONG_PROMPT) * 2  # 600 ids to cut prompts from


@pytest.fixture(scope="module")
def decoders(example_onnx, family_exports):
    from gss_runtime import Decoder

    folders = {"dsconv": example_onnx, "gss": family_exports("gss", "onnx"), "mhesa": family_exports("mhesa", "onnx")}
    return {f: Decoder(folder, provider="cpu", threads=1) for f, folder in folders.items()}


class Collector:
    """An engine channel: each request's tokens, log-probabilities and end by tag, and at every step what the
    engine runs and what its prefix cache holds."""

    def __init__(self, engine):
        self.engine, self.tokens, self.logprobs, self.finished = engine, {}, {}, {}
        self.done, self.seen = threading.Semaphore(0), []

    def __call__(self, items):
        from gss_runtime.serve.engine import Failed, Finished, Tokens

        self.seen.append((self.engine.running, self.engine.prefix_cache_usage))
        for request, event in items:
            if isinstance(event, Tokens):
                self.tokens.setdefault(request.tag, []).extend(event.ids)
                self.logprobs.setdefault(request.tag, []).extend(e.logprob for e in event.logprobs or ())
            elif isinstance(event, (Finished, Failed)):
                self.finished[request.tag] = event
                self.done.release()

    def submit(self, completions, tags, groups=None):
        """Submit together; groups: per request, requests with the same one share a prefill (n samples)."""
        from gss_runtime.serve.engine import Request

        groups = groups or [None] * len(completions)
        requests = [Request(c, self, tag=t, group=g) for c, t, g in zip(completions, tags, groups)]
        self.engine.submit(requests)
        return requests

    def wait(self, count):
        for _ in range(count):
            assert self.done.acquire(timeout=120)


def serve(engine, completions):
    """The completions submitted together: [(tokens, logprobs, Finished)] in order."""
    seen = Collector(engine)
    seen.submit(completions, range(len(completions)))
    seen.wait(len(completions))
    return [(seen.tokens.get(i, []), seen.logprobs.get(i, []), seen.finished[i]) for i in range(len(completions))]


def cold(decoder, completion):
    """The completion alone on an engine without a prefix cache: (tokens, logprobs)."""
    from gss_runtime.serve.engine import Engine

    engine = Engine(decoder, max_batch=4, prefix_cache_memory=None).start()
    try:
        (tokens, logprobs, _), = serve(engine, [completion])
    finally:
        engine.stop()
    return tokens, logprobs


def assert_as_cold(decoder, completion, got):
    from gss_export.tolerances import TOLERANCES

    tokens, logprobs = cold(decoder, completion)
    assert got[0] == tokens
    if completion.logprobs is not None:
        assert len(got[1]) == len(logprobs) and np.abs(np.subtract(got[1], logprobs)).max() <= TOLERANCES["logprob"].atol


def counter(metrics, name):
    return metrics.registry.get_sample_value(name) or 0


@pytest.mark.parametrize("family", FAMILIES)
def test_a_conversation_resumes_exactly_from_its_snapshots(decoders, family):
    """Three turns, each prompt the last one plus its completion plus new tokens (the second's rest through the
    step graph, the third's, 140 tokens, through the prefill graph), then the first prompt again and a prompt
    equal to a completion's key: each hit is as long as the snapshot it starts from and equals its cold run."""
    from gss_runtime import Sampling
    from gss_runtime.serve.engine import Completion, Engine
    from gss_runtime.serve.metrics import ServerMetrics

    decoder, metrics = decoders[family], ServerMetrics()
    engine = Engine(decoder, max_batch=4, metrics=metrics).start()
    sampled = Sampling(temperature=0.9)
    try:
        first = Completion(TEXT[:150], 8, logprobs=2)
        (got,) = serve(engine, [first])
        assert got[2].cached_tokens == 0
        assert_as_cold(decoder, first, got)
        second = Completion(TEXT[:150] + got[0] + TEXT[300:330], 8, logprobs=0)
        (got2,) = serve(engine, [second])
        assert got2[2].cached_tokens == 150 + 7  # the completion's state: its last token was never fed
        assert_as_cold(decoder, second, got2)
        third = Completion(list(second.prompt) + got2[0] + TEXT[:140], 6, sampled, seed=5, logprobs=0)
        (got3,) = serve(engine, [third])
        assert got3[2].cached_tokens == len(second.prompt) + 7
        assert_as_cold(decoder, third, got3)
        again = Completion(TEXT[:150], 8, sampled, seed=11)  # the first prompt's own snapshot: nothing fed
        keyed = Completion(TEXT[:150] + got[0][:7], 5, logprobs=1)  # a completion's key exactly: its stored logits
        # the second turn's prompt: a GatedDsConvLM's snapshot of it shares the buffers its batch went on stepping in
        shared = Completion(second.prompt, 4, logprobs=0)
        (got4, got5, got6) = serve(engine, [again, keyed, shared])
        assert [g[2].cached_tokens for g in (got4, got5, got6)] == [150, 157, len(second.prompt)]
        assert_as_cold(decoder, again, got4)
        assert_as_cold(decoder, keyed, got5)
        assert_as_cold(decoder, shared, got6)
        assert counter(metrics, "gss_prefix_cache_hits_total") == 5
        assert counter(metrics, "gss_prefix_cache_misses_total") == 1
        assert counter(metrics, "gss_prefix_cache_cached_tokens_total") == (157 + got3[2].cached_tokens + 150 + 157
                                                                             + len(second.prompt))
        held, entries, capacity = engine.prefix_cache_usage
        assert 0 < held <= capacity and entries == len(engine.prefix_cache)
    finally:
        engine.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_ragged_hits_join_a_running_batch(decoders, family):
    """While a long request runs, seven prompts arrive together: hits on prefixes of different lengths (one
    equal to its key, one a branch point's, one whose 140-token rest goes through the prefill graph, a group
    of two seeded samples), and a cold one. They join the running batch; each equals its cold run."""
    from gss_runtime import Sampling
    from gss_runtime.serve.engine import Completion, Engine

    decoder = decoders[family]
    engine = Engine(decoder, max_batch=10).start()
    try:
        # the cache: A (150 tokens), B (60), and the shared start S (100) of two prompts, found as their branch point
        serve(engine, [Completion(TEXT[:150], 1), Completion(TEXT[200:260], 1)])
        serve(engine, [Completion(TEXT[400:500] + [1] * 20, 1)])
        (branched,) = serve(engine, [Completion(TEXT[400:500] + [2] * 30, 1)])
        assert branched[2].cached_tokens == 0  # split at 100 on the way: the next one finds it
        seen = Collector(engine)
        (running,) = seen.submit([Completion(TEXT[300:340], 1500)], ["running"])  # cancelled once the others are done
        assert wait_for(lambda: len(seen.tokens.get("running", [])) >= 2)
        sampled = Sampling(temperature=0.9)
        asks = {"A+3": Completion(TEXT[:153], 6), "A+30": Completion(TEXT[:180], 5, logprobs=1),
                "A": Completion(TEXT[:150], 4, sampled, seed=1), "B+140": Completion(TEXT[200:400], 5),
                "S+7": Completion(TEXT[400:500] + [3] * 7, 6), "cold": Completion(TEXT[520:580], 5)}
        group, shared = [Completion(TEXT[200:265], 6, sampled, seed=20 + j) for j in range(2)], object()
        seen.submit([*asks.values(), *group], [*asks, "B+5 #0", "B+5 #1"], [None] * len(asks) + [shared, shared])
        seen.wait(len(asks) + len(group))
        assert "running" not in seen.finished
        running.cancel()
        cached = {tag: event.cached_tokens for tag, event in seen.finished.items()}
        assert cached == {"A+3": 150, "A+30": 150, "A": 150, "B+140": 60, "S+7": 100, "cold": 0,
                          "B+5 #0": 60, "B+5 #1": 60}
        assert max(running for running, _ in seen.seen) == 1 + len(asks) + len(group)  # joined, all at once
        for tag, completion in [*asks.items(), ("B+5 #0", group[0]), ("B+5 #1", group[1])]:
            assert_as_cold(decoder, completion, (seen.tokens.get(tag, []), seen.logprobs.get(tag, [])))
    finally:
        engine.stop()


def snapshot_bytes(decoder, tokens: int) -> int:
    """What one snapshot of a `tokens`-token key costs the cache: its state, its key, its logits."""
    from gss_runtime.serve.budget import StateCost

    cost = StateCost.of(decoder)
    return cost.slot_bytes * (tokens + 1) + cost.row_bytes + 4 * tokens + 4 * decoder.config["num_tokens"]


@pytest.mark.parametrize("family", FAMILIES)
def test_a_tiny_cache_evicts_and_stays_exact(decoders, family):
    """A budget of one and a half snapshots: the cache never holds more, the oldest goes, a snapshot evicted
    between its lookup and its use (by a cold prompt prefilled in the same admission) still serves its
    request, and a prompt whose snapshot is gone is computed from the start, every answer as cold."""
    from gss_runtime.serve.engine import Completion, Engine

    decoder = decoders[family]
    budget = snapshot_bytes(decoder, 150) * 3 // 2
    engine = Engine(decoder, max_batch=4, prefix_cache_memory=budget).start()
    try:
        serve(engine, [Completion(TEXT[:150], 1)])
        assert engine.prefix_cache_usage == (snapshot_bytes(decoder, 150), 1, budget)
        other, resumed = Completion(TEXT[160:310], 4), Completion(TEXT[:170], 4, logprobs=0)
        seen = Collector(engine)
        seen.submit([other, resumed], ["other", "resumed"])  # one admission: the cold one is prefilled first
        seen.wait(2)
        assert (seen.finished["other"].cached_tokens, seen.finished["resumed"].cached_tokens) == (0, 150)
        assert all(held <= budget for _, (held, _, _) in seen.seen)
        assert engine.prefix_cache_usage[0] <= budget and engine.prefix_cache_usage[1] == 1
        assert_as_cold(decoder, other, (seen.tokens["other"], []))
        assert_as_cold(decoder, resumed, (seen.tokens["resumed"], seen.logprobs["resumed"]))
        (gone,) = serve(engine, [Completion(TEXT[:160], 4)])  # A's snapshot went with the others
        assert gone[2].cached_tokens == 0
        assert_as_cold(decoder, Completion(TEXT[:160], 4), gone)
    finally:
        engine.stop()


def test_admission_counts_only_the_tokens_computed(decoders):
    """--max-prefill-tokens 64: four 150-token prompts with 10 new tokens each are admitted together from their
    snapshots (40 tokens computed), where cold they would come one admission at a time."""
    from gss_runtime.serve.engine import Completion, Engine

    decoder = decoders["mhesa"]
    asks = [Completion(TEXT[:150] + TEXT[160 + 10 * j : 170 + 10 * j], 3) for j in range(4)]
    for cache, together in (("1M", 4), (None, 1)):
        engine = Engine(decoder, max_batch=8, max_prefill_tokens=64, prefix_cache_memory=cache and 1 << 20).start()
        try:
            serve(engine, [Completion(TEXT[:150], 1)])
            seen = Collector(engine)
            seen.submit(asks, range(4))
            seen.wait(4)
            assert seen.seen[0][0] == together  # what ran from the first step on
            assert [seen.finished[j].cached_tokens for j in range(4)] == [150 if cache else 0] * 4
        finally:
            engine.stop()


def test_usage_and_metrics_report_the_cache(decoders, example_onnx):
    """Over HTTP: usage.prompt_tokens_details.cached_tokens, whole and in the streamed usage chunk, and the
    cache's counters and gauges in /metrics; with the cache off, 0 and no cache."""
    import json

    from gss_runtime.serve.app import ModelHost, build_app
    from gss_runtime.serve.cli import parser

    prompt = TEXT[:100]
    host = ModelHost(example_onnx, threads=1, prefix_cache_memory="64M").load()
    with TestClient(build_app(host, load=False)) as http:
        first = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 4, "temperature": 0}).json()
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        follow = prompt + first["choices"][0]["token_ids"] + TEXT[100:110]
        lines = http.post("/v1/completions", json={"prompt": follow, "max_tokens": 4, "temperature": 0, "stream": True,
                                                   "stream_options": {"include_usage": True}}).text.splitlines()
        usage = [json.loads(line[6:]) for line in lines if line.startswith("data: {")][-1]["usage"]
        assert usage["prompt_tokens"] == len(follow) and usage["prompt_tokens_details"] == {"cached_tokens": 103}
        two = http.post("/v1/completions", json={"prompt": [prompt, TEXT[200:230]], "max_tokens": 2, "n": 2,
                                                 "temperature": 0}).json()
        assert two["usage"]["prompt_tokens_details"] == {"cached_tokens": 100}  # a prompt counts once, n or not
        seen = parse_metrics(http.get("/metrics").text)
    assert (seen["gss_prefix_cache_hits_total"], seen["gss_prefix_cache_misses_total"]) == (2, 2)
    assert seen["gss_prefix_cache_cached_tokens_total"] == 203
    assert seen["gss_prefix_cache_capacity_bytes"] == 64 << 20
    assert 0 < seen["gss_prefix_cache_bytes"] <= 64 << 20 and seen["gss_prefix_cache_entries"] >= 4
    assert parser().parse_args(["m", "--no-prefix-cache"]).no_prefix_cache
    assert parser().parse_args(["m", "--prefix-cache-memory", "2G"]).prefix_cache_memory == 2 << 30
    off = ModelHost(example_onnx, threads=1, prefix_cache_memory="off").load()
    with TestClient(build_app(off, load=False)) as http:
        for _ in range(2):
            reply = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2}).json()
            assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        seen = parse_metrics(http.get("/metrics").text)
    assert off.engine.prefix_cache is None and seen["gss_prefix_cache_capacity_bytes"] == 0
    assert seen["gss_prefix_cache_hits_total"] == seen["gss_prefix_cache_misses_total"] == 0

