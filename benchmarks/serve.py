"""gss-serve under load: concurrent streams against the same requests served one after another.

    python benchmarks/serve.py [--concurrency 1,4,16,64] [--prompt-tokens 64] [--new-tokens 128]
                               [--threads 2] [--family dsconv|gss|mhesa] [--repeats 3] [--backend onnxruntime|openvino]
                               [--out benchmarks/results/serve]
    python benchmarks/serve.py --prefix [options of benchmarks/serve_prefix.py]   # the prefix cache

The reference model (dim 512, depth 4; GatedDsConvLM: heads 8, dim_dsconv 512; the recurrent
families with upstream's defaults), random weights, exported to ONNX and served by a live
`gss-serve --threads N` on loopback. A bounded asyncio client (aiohttp, which costs the shared
cores less per chunk than httpx; one connection per stream, a timeout on each) sends greedy streamed completions of `--new-tokens` after distinct prompts of
`--prompt-tokens` bytes. For each concurrency c, in one run:

- concurrent: c streams sent at once (the median of `--repeats` such waves);
- one after another: the same c requests, each sent when the previous one has finished.

Per request, time to first token (TTFT: from sending to the first token's chunk) and time per
output token (TPOT: the mean gap between its later tokens); p50 and p99 over the requests, and
the aggregate output tokens per second (all tokens over the wall time). Every concurrent stream's
tokens are checked equal to its solo run. Beside them, the same requests through the step loop
alone (the engine in this process, no HTTP): what the model and the batching allow before the
server's HTTP side takes its share of the cores. Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import torch

from common import REFERENCE, cpu_name, reference_models
from gss_runtime import Decoder
from gss_runtime.session import SPIN_IN_CALL

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from serve_support import free_port  # noqa: E402


def export(family: str, folder: Path, max_seq_len: int) -> Path:
    from gss_export.export import export_model
    from gss_export.families import FAMILIES

    if family == "dsconv":
        model = reference_models(max_seq_len)[0]
    else:
        entry = FAMILIES[family]
        torch.manual_seed(0)
        config = entry.config(num_tokens=256, dim=512, depth=4, max_seq_len=max_seq_len)
        model = entry.model(config)
    export_model(model, "onnx", folder, validate=False)
    return folder


def start_server(folder: Path, threads: int, max_batch: int, *options: str, ready_within: float = 60.0
                 ) -> tuple[subprocess.Popen, str]:
    """A `gss-serve` on a free loopback port with `options` besides these; (its process, its URL) once healthy."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("gss-serve")), str(folder), "--port", str(port), "--threads", str(threads),
               "--max-batch", str(max_batch), "--max-queue", "1024", "--log-level", "warning", *options]
    proc = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}"
    for _ in range(int(ready_within * 10)):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"gss-serve exited with {proc.returncode}")
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("gss-serve did not become healthy")


async def streamed_events(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[float, list[tuple[float, dict]], float]:
    """POST a streamed completion; (when it was sent, [(arrival time, chunk)] for each `data: {...}` event,
    when its last read arrived).

    What arrives is only timestamped while the streams run, and parsed afterwards, so that the
    client takes as little as it can of the cores it shares with the server.
    """
    sent, received = time.perf_counter(), []
    async with http.post(f"{url}/v1/completions", json=body) as reply:
        if reply.status != 200:
            raise SystemExit(f"the server answered {reply.status}: {await reply.text()}")
        async for data in reply.content.iter_any():
            received.append((time.perf_counter(), data))
    events, pending = [], b""
    for when, data in received:  # server-sent events: "data: {...}" lines; a read may end mid-line
        lines = (pending + data).split(b"\n")
        pending = lines.pop()
        events += [(when, json.loads(line[6:])) for line in lines if line.startswith(b"data: {")]
    return sent, events, received[-1][0]


async def one_stream(http: aiohttp.ClientSession, url: str, prompt: list[int], new: int) -> dict:
    """Send one streamed greedy completion; its token ids and the arrival time of each."""
    sent, events, _ = await streamed_events(http, url, {"prompt": prompt, "max_tokens": new, "temperature": 0, "stream": True})
    arrivals, tokens = [], []
    for when, chunk in events:
        ids = chunk["choices"][0]["token_ids"]
        arrivals += [when] * len(ids)
        tokens += ids
    gaps = np.diff(arrivals)
    return {"tokens": tokens, "ttft": arrivals[0] - sent, "tpot": float(gaps.mean()) if len(gaps) else float("nan")}


async def wave(url: str, prompts: list[list[int]], new: int, together: bool) -> tuple[list[dict], float]:
    """The requests at once (together) or one after another; (per-request results, wall seconds)."""
    connector = aiohttp.TCPConnector(limit=len(prompts) + 1)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as http:
        start = time.perf_counter()
        if together:
            results = await asyncio.gather(*(one_stream(http, url, p, new) for p in prompts))
        else:
            results = [await one_stream(http, url, p, new) for p in prompts]
        return list(results), time.perf_counter() - start


def step_loop_alone(decoder, prompts: list[list[int]], new: int) -> float:
    """The same requests through the engine in this process, no HTTP at all: aggregate tokens per second,
    the bound for what the server can reach (its HTTP side shares the cores with the model)."""
    from gss_runtime.serve.engine import Completion, Engine, Finished, Request

    engine, done = Engine(decoder, max_batch=len(prompts)).start(), threading.Semaphore(0)

    def channel(items):
        for _, event in items:
            if isinstance(event, Finished):
                done.release()

    start = time.perf_counter()
    engine.submit([Request(Completion(p, new), channel) for p in prompts])
    for _ in prompts:
        done.acquire()
    seconds = time.perf_counter() - start
    engine.stop()
    return len(prompts) * new / seconds


def summary(results: list[dict], seconds: float) -> dict:
    ttft, tpot = [r["ttft"] for r in results], [r["tpot"] for r in results]
    return {"ttft_p50_ms": float(np.percentile(ttft, 50) * 1e3), "ttft_p99_ms": float(np.percentile(ttft, 99) * 1e3),
            "tpot_p50_ms": float(np.percentile(tpot, 50) * 1e3), "tpot_p99_ms": float(np.percentile(tpot, 99) * 1e3),
            "tokens": sum(len(r["tokens"]) for r in results), "seconds": seconds,
            "tokens_per_second": sum(len(r["tokens"]) for r in results) / seconds}


def main() -> None:
    if "--prefix" in sys.argv[1:]:  # the prefix cache's runs have their own requests and servers
        from serve_prefix import main as prefix_main

        return prefix_main([a for a in sys.argv[1:] if a != "--prefix"])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--family", default="dsconv", choices=("dsconv", "gss", "mhesa"))
    p.add_argument("--repeats", type=int, default=3, help="concurrent waves per level, the median reported (default 3)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "openvino"), help="gss-serve --backend")
    p.add_argument("--out", type=Path, default=HERE / "results" / "serve")
    args = p.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(32, 127, args.prompt_tokens).tolist() for _ in range(max(levels))]
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(args.family, Path(tmp) / "model", max_seq_len=max(1024, args.prompt_tokens + args.new_tokens))
        proc, url = start_server(folder, args.threads, max(levels), "--backend", args.backend)
        decoder = Decoder(folder, provider="cpu", threads=args.threads, spin=SPIN_IN_CALL, backend=args.backend)  # as the server opens it
        try:
            asyncio.run(wave(url, prompts[:2], 8, together=True))  # warm-up
            rows = []
            for c in levels:
                alone, alone_s = asyncio.run(wave(url, prompts[:c], args.new_tokens, together=False))
                # the concurrent waves and the bound are the median of --repeats: two processes share the cores
                runs = sorted((asyncio.run(wave(url, prompts[:c], args.new_tokens, together=True)) for _ in range(args.repeats)),
                              key=lambda run: run[1])
                together, together_s = runs[len(runs) // 2]
                mismatched = sum(a["tokens"] != b["tokens"] for run in runs for a, b in zip(alone, run[0]))
                bound = float(np.median([step_loop_alone(decoder, prompts[:c], args.new_tokens) for _ in range(args.repeats)]))
                rows.append({"concurrency": c, "concurrent": summary(together, together_s),
                             "one_after_another": summary(alone, alone_s), "streams_not_equal_to_solo": mismatched,
                             "streams_checked": c * args.repeats,
                             "step_loop_alone_tokens_per_second": bound})
                print(json.dumps(rows[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
    single = rows[0]["one_after_another"] if levels[0] == 1 else None
    report = {"cpu": cpu_name(), "threads": args.threads, "family": args.family, "backend": args.backend, "model": REFERENCE if args.family == "dsconv" else
              {"num_tokens": 256, "dim": 512, "depth": 4}, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    lines = [f"# gss-serve under load ({args.family}, {args.backend}; {cpu_name()}, {args.threads} threads)", "",
             f"{args.new_tokens} new tokens after {args.prompt_tokens}-token prompts, greedy, streamed. "
             "Ratios against one stream alone (concurrency 1, served alone).", "",
             "| streams | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | tokens/s | one after another: tokens/s | "
             "x one stream | p99 TPOT / one stream's | equal to solo | step loop alone: tokens/s, x its one stream |",
             "|---|---|---|---|---|---|---|---|---|"]
    base = rows[0]["step_loop_alone_tokens_per_second"] if levels[0] == 1 else float("nan")
    for row in rows:
        c, a = row["concurrent"], row["one_after_another"]
        gain = c["tokens_per_second"] / single["tokens_per_second"] if single else float("nan")
        tpot = c["tpot_p99_ms"] / single["tpot_p50_ms"] if single else float("nan")
        lines.append(f"| {row['concurrency']} | {c['ttft_p50_ms']:.1f} / {c['ttft_p99_ms']:.1f} | {c['tpot_p50_ms']:.2f} / "
                     f"{c['tpot_p99_ms']:.2f} | {c['tokens_per_second']:.0f} | {a['tokens_per_second']:.0f} | {gain:.2f}x | "
                     f"{tpot:.2f}x | {row['streams_checked'] - row['streams_not_equal_to_solo']}/{row['streams_checked']} | "
                     f"{row['step_loop_alone_tokens_per_second']:.0f}, {row['step_loop_alone_tokens_per_second'] / base:.2f}x |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
