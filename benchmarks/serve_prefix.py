"""gss-serve's prefix cache: time to first token, a long conversation and a shared system prompt, with and without it.

    python benchmarks/serve.py --prefix [--families dsconv,gss,mhesa] [--threads 2] [--repeats 3]
                                        [--cache 256M] [--out benchmarks/results/prefix]

The reference models (serve.py's `export`: dim 512, depth 4; GatedDsConvLM heads 8, dim_dsconv 512; the
recurrent families at upstream's defaults), random weights, served by two live `gss-serve --threads N` on
loopback, one with `--no-prefix-cache` and one with `--prefix-cache-memory CACHE`, each request sent to one
and then the other (only one computes at a time, and a drift of a shared machine's speed reaches both).
Token-id prompts of random ids, greedy, streamed (with the usage chunk, whose
`prompt_tokens_details.cached_tokens` says what the cache served). Per family:

- (a) time to first token of a 4,000-token prefix plus 64 new tokens, 16 generated: cold (a fresh prefix,
  never seen) and cached (a prefix the cache holds), side by side on the cached server, `--repeats` pairs,
  medians. The prefix gets cached as the server does it for any client: a first request on it (P + S) is
  cold, a second (P + T) leaves it at P and is snapshotted there (its branch point, timed too), the third
  (P + U) starts from P. P + U also goes to the server without a cache: the same request cold, and its tokens.
- (b) a 20-turn conversation: each turn sends the whole history plus 100 new user tokens and generates 50.
  Prefill tokens computed (prompt_tokens - cached_tokens), time per turn and in all, both servers.
- (c) a shared 2,000-token system prompt: 16 requests of it plus 64 distinct tokens, 32 generated, sent at
  once; then a second wave of 16 more (the system prompt now cached). Wall time, TTFT p50/p99, prefill
  tokens computed.
- (d) the cache's bytes (its /metrics gauges, sampled after every request) against `--prefix-cache-memory`,
  and the server's resident memory.

Targets: cached TTFT at most 0.1x cold for the recurrent families, 0.2x for GatedDsConvLM; in the
conversation, prefill tokens computed with the cache about the tokens new each turn (within one turn's worth)
and the last turn at least 5x faster than without. Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from common import cpu_name
from serve import export, start_server, streamed_events

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from serve_support import parse_metrics  # noqa: E402
from serve_support import process_memory as memory  # noqa: E402

PREFIX, NEW, TTFT_TOKENS = 4000, 64, 16
TURNS, USER, REPLY = 20, 100, 50
SYSTEM, SUFFIX, SHARED, SHARED_TOKENS = 2000, 64, 16, 32
TARGETS = {"dsconv": 0.2, "gss": 0.1, "mhesa": 0.1}  # cached TTFT / cold, at most
NAMES = {"dsconv": "GatedDsConvLM", "gss": "GatedStateSpacesLM", "mhesa": "GatedExponentialSmoothingLM"}
MiB = 2**20


async def ask(http: aiohttp.ClientSession, url: str, prompt: list[int], new: int) -> dict:
    """One streamed greedy completion: its tokens, TTFT, seconds to its end, prompt and cached tokens."""
    body = {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent, events, finished = await streamed_events(http, url, body)
    tokens, first, usage = [], None, None
    for when, chunk in events:
        if chunk.get("usage"):
            usage = chunk["usage"]
        for choice in chunk["choices"]:
            if choice["token_ids"] and first is None:
                first = when
            tokens += choice["token_ids"]
    return {"tokens": tokens, "ttft": first - sent, "seconds": finished - sent,
            "prompt_tokens": usage["prompt_tokens"], "cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]}


class Client:
    """Requests to one server, one at a time or at once, with its cache's gauges read after each."""

    def __init__(self, url: str, pid: int):
        self.url, self.pid, self.cache = url, pid, []

    async def one(self, prompt, new) -> dict:
        return (await self.many([prompt], new))[0]

    async def many(self, prompts, new) -> list[dict]:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=len(prompts) + 1),
                                         timeout=aiohttp.ClientTimeout(total=900)) as http:
            start = time.perf_counter()
            got = await asyncio.gather(*(ask(http, self.url, p, new) for p in prompts))
            wall = time.perf_counter() - start
        m = parse_metrics(httpx.get(f"{self.url}/metrics", timeout=30).text)
        self.cache.append((m["gss_prefix_cache_bytes"], m["gss_prefix_cache_entries"], m["gss_prefix_cache_capacity_bytes"]))
        for g in got:
            g["wall"] = wall
        return list(got)


def ids(rng: np.random.Generator, n: int) -> list[int]:
    return rng.integers(0, 256, n).tolist()


async def ttft(on: Client, off: Client, rng: np.random.Generator, repeats: int) -> tuple[dict, dict]:
    """(a): per repeat a fresh prefix P: P + S cold, P + T (its branch point), P + U cached; P + U also
    without a cache (the same request cold, and its tokens)."""
    rows, same = [], []
    for _ in range(repeats):
        prefix = ids(rng, PREFIX)
        prompts = [prefix + ids(rng, NEW) for _ in range(3)]
        cold, branch, cached = [await on.one(p, TTFT_TOKENS) for p in prompts]
        rows.append({"cold": cold, "branch": branch, "cached": cached})
        same.append({"cached": await off.one(prompts[2], TTFT_TOKENS)})
    medians = lambda rs, keys: {f"{k}_ttft_ms": 1e3 * float(np.median([r[k]["ttft"] for r in rs])) for k in keys}
    return ({"rows": rows, **medians(rows, ("cold", "branch", "cached"))},
            {"rows": same, **medians(same, ("cached",))})


async def conversation(on: Client, off: Client, rng: np.random.Generator) -> tuple[dict, dict]:
    """(b): each turn the whole history plus USER new tokens, REPLY generated; each turn sent to both servers
    in turn, so that the two see the same moments of a noisy machine."""
    histories, turns = {on: [], off: []}, {on: [], off: []}
    for _ in range(TURNS):
        user = ids(rng, USER)
        for client in (off, on):
            prompt = histories[client] + user
            got = await client.one(prompt, REPLY)
            turns[client].append({k: got[k] for k in ("ttft", "seconds", "prompt_tokens", "cached_tokens", "tokens")})
            histories[client] = prompt + got["tokens"]
    return tuple({"turns": turns[c], "computed": sum(t["prompt_tokens"] - t["cached_tokens"] for t in turns[c]),
                  "seconds": sum(t["seconds"] for t in turns[c])} for c in (on, off))


async def shared_prompt(on: Client, off: Client, rng: np.random.Generator) -> tuple[dict, dict]:
    """(c): SHARED requests of one SYSTEM-token prompt plus SUFFIX distinct tokens, at once; then a second wave.
    Each wave to both servers in turn."""
    system, waves = ids(rng, SYSTEM), {on: [], off: []}
    for _ in range(2):
        prompts = [system + ids(rng, SUFFIX) for _ in range(SHARED)]
        for client in (off, on):
            got = await client.many(prompts, SHARED_TOKENS)
            ttfts = [g["ttft"] for g in got]
            waves[client].append({"wall": got[0]["wall"], "ttft_p50_ms": 1e3 * float(np.percentile(ttfts, 50)),
                                  "ttft_p99_ms": 1e3 * float(np.percentile(ttfts, 99)),
                                  "computed": sum(g["prompt_tokens"] - g["cached_tokens"] for g in got),
                                  "hits": sum(g["cached_tokens"] > 0 for g in got), "tokens": [g["tokens"] for g in got]})
    return {"waves": waves[on]}, {"waves": waves[off]}


async def run_all(on: Client, off: Client, seed: int, repeats: int) -> dict:
    rng = np.random.default_rng(seed)
    runs = {"on": {}, "off": {}}
    for name, phase in (("ttft", ttft(on, off, rng, repeats)), ("conversation", conversation(on, off, rng)),
                        ("shared", shared_prompt(on, off, rng))):
        runs["on"][name], runs["off"][name] = await phase
    for name, client in (("on", on), ("off", off)):
        runs[name]["memory"] = memory(client.pid)
        runs[name]["cache_bytes_max"] = max(b for b, _, _ in client.cache)
        runs[name]["cache_entries_max"] = max(e for _, e, _ in client.cache)
        runs[name]["cache_capacity"] = client.cache[-1][2]
    return runs


def bench(family: str, folder: Path, threads: int, repeats: int, cache: str) -> dict:
    """Both servers at once, each request sent to one then the other: only one computes at a time (their
    threads spin only within a call), and a drift of the machine's speed reaches both alike."""
    servers = [start_server(folder, threads, SHARED, *options, ready_within=300)
               for options in (("--no-prefix-cache",), ("--prefix-cache-memory", cache))]
    try:
        off, on = (Client(url, proc.pid) for proc, url in servers)
        warm = np.random.default_rng(99)
        warmup = [ids(warm, PREFIX + NEW), ids(warm, 200)]
        for client in (off, on):
            asyncio.run(client.many(warmup, 4))  # both graphs, a long prompt
        runs = asyncio.run(run_all(on, off, seed=1, repeats=repeats))
    finally:
        for proc, _ in servers:
            proc.terminate()
            proc.wait(60)
    off, on = runs["off"], runs["on"]
    for name in ("off", "on"):
        print(f"{family} cache {name}: {json.dumps(summary(runs[name]))}", flush=True)
    checks = {  # the cache changes what is computed, not what comes out
        "ttft_cached_equal": sum(r["cached"]["tokens"] == s["cached"]["tokens"]
                                 for r, s in zip(on["ttft"]["rows"], off["ttft"]["rows"])),
        "conversation_turns_equal": sum(x["tokens"] == y["tokens"] for x, y in zip(on["conversation"]["turns"],
                                                                                   off["conversation"]["turns"])),
        "shared_equal": sum(x == y for w, v in zip(on["shared"]["waves"], off["shared"]["waves"])
                            for x, y in zip(w["tokens"], v["tokens"])),
    }
    return {"family": family, "off": off, "on": on, "checks": checks}


def summary(run: dict) -> dict:
    c = run["conversation"]
    return {"ttft_ms": {k[: -len("_ttft_ms")]: round(v, 1) for k, v in run["ttft"].items() if k.endswith("_ttft_ms")},
            "conversation": {"computed": c["computed"], "seconds": round(c["seconds"], 2),
                             "last_turn_s": round(c["turns"][-1]["seconds"], 3)},
            "shared": [{k: w[k] for k in ("wall", "ttft_p50_ms", "computed", "hits")} for w in run["shared"]["waves"]],
            "cache_bytes_max": run["cache_bytes_max"]}


def markdown(results: list[dict], threads: int, cache: str) -> list[str]:
    lines = [f"# gss-serve's prefix cache ({cpu_name()}, {threads} threads)", "",
             "Reference models, random weights, token-id prompts, greedy, streamed; a server with `--no-prefix-cache` and "
             f"one with `--prefix-cache-memory {cache}`, each request sent to one then the other. Medians of the TTFT "
             "repeats.", "",
             f"(a) time to first token, {PREFIX:,}-token prefix + {NEW} new tokens (cold: a fresh prefix; branch: the "
             "second request on it, which leaves it there and snapshots it; cached: the third):", "",
             "| family | cold | branch point | cached | cached / cold | target | the cached request without a cache | "
             "its tokens equal |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        a, f = r["on"]["ttft"], r["family"]
        ratio = a["cached_ttft_ms"] / a["cold_ttft_ms"]
        lines.append(f"| {NAMES[f]} | {a['cold_ttft_ms']:.0f} ms | {a['branch_ttft_ms']:.0f} ms | {a['cached_ttft_ms']:.1f} ms | "
                     f"**{ratio:.3f}x** | <= {TARGETS[f]}x: {'met' if ratio <= TARGETS[f] else 'NOT met'} | "
                     f"{r['off']['ttft']['cached_ttft_ms']:.0f} ms | {r['checks']['ttft_cached_equal']}/{len(a['rows'])} |")
    lines += ["", f"(b) a {TURNS}-turn conversation ({USER} user tokens a turn, {REPLY} generated; the whole history "
              "sent each turn):", "",
              "| family | prefill tokens computed: no cache / cache (user tokens sent) | total time: no cache / cache | "
              "last turn: no cache / cache | last-turn ratio (target >= 5x) | last turn's TTFT: no cache / cache | "
              "turns equal |", "|---|---|---|---|---|---|---|"]
    for r in results:
        off, on = r["off"]["conversation"], r["on"]["conversation"]
        last = off["turns"][-1]["seconds"] / on["turns"][-1]["seconds"]
        within = abs(on["computed"] - TURNS * USER) <= USER + REPLY
        lines.append(f"| {NAMES[r['family']]} | {off['computed']:,} / **{on['computed']:,}** ({TURNS * USER:,}: "
                     f"{'within' if within else 'NOT within'} one turn's {USER + REPLY}) | {off['seconds']:.2f} / "
                     f"{on['seconds']:.2f} s ({off['seconds'] / on['seconds']:.1f}x) | "
                     f"{1e3 * off['turns'][-1]['seconds']:.0f} / {1e3 * on['turns'][-1]['seconds']:.0f} ms | **{last:.1f}x** "
                     f"({'met' if last >= 5 else 'NOT met'}) | {1e3 * off['turns'][-1]['ttft']:.0f} / "
                     f"{1e3 * on['turns'][-1]['ttft']:.0f} ms ({off['turns'][-1]['ttft'] / on['turns'][-1]['ttft']:.1f}x) | "
                     f"{r['checks']['conversation_turns_equal']}/{TURNS} |")
    lines += ["", f"(c) a shared {SYSTEM:,}-token system prompt: {SHARED} requests of it + {SUFFIX} distinct tokens, "
              f"{SHARED_TOKENS} generated, sent at once; then a second wave:", "",
              "| family | wave | wall: no cache / cache | TTFT p50 / p99: no cache | TTFT p50 / p99: cache | "
              "prefill tokens computed: no cache / cache | hits | equal |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for k, (x, y) in enumerate(zip(r["off"]["shared"]["waves"], r["on"]["shared"]["waves"])):
            lines.append(f"| {NAMES[r['family']]} | {k + 1} | {x['wall']:.2f} / {y['wall']:.2f} s ({x['wall'] / y['wall']:.1f}x) | "
                         f"{x['ttft_p50_ms']:.0f} / {x['ttft_p99_ms']:.0f} ms | {y['ttft_p50_ms']:.0f} / {y['ttft_p99_ms']:.0f} ms | "
                         f"{x['computed']:,} / {y['computed']:,} | {y['hits']}/{SHARED} | "
                         f"{sum(a == b for a, b in zip(x['tokens'], y['tokens']))}/{SHARED} |")
    lines += ["", "(d) the cache's memory (its /metrics gauges, read after every request) and the server's:", "",
              "| family | most cache bytes / --prefix-cache-memory | most entries | server VmHWM: no cache / cache |",
              "|---|---|---|---|"]
    for r in results:
        on, off = r["on"], r["off"]
        lines.append(f"| {NAMES[r['family']]} | {on['cache_bytes_max'] / MiB:.1f} / {on['cache_capacity'] / MiB:.0f} MiB | "
                     f"{on['cache_entries_max']} | {off['memory']['VmHWM'] / MiB:.0f} / {on['memory']['VmHWM'] / MiB:.0f} MiB |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", default="dsconv,gss,mhesa")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="TTFT pairs per family, the median reported (default 3)")
    p.add_argument("--cache", default="256M", help="--prefix-cache-memory of the cached server (default 256M)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "prefix")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            folder = export(family, Path(tmp) / family, max_seq_len=4096)
            results.append(bench(family, folder, args.threads, args.repeats, args.cache))
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu_name(), "threads": args.threads, "cache": args.cache, "results": results}
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    lines = markdown(results, args.threads, args.cache)
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
