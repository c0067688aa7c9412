"""gss-serve under a burst of long prompts, without a decoder-state budget and with one that fits 4 of them.

    python benchmarks/serve_burst.py [--model large-state|reference] [--burst 16] [--prompt-tokens 1500,1800]
                                     [--max-tokens 16] [--fits 4.5] [--threads 2] [--out benchmarks/results/burst]

A GatedDsConvLM with random weights, exported to ONNX: by default one whose state is large per token
(dim 64, depth 4, heads 4, dim_dsconv 2048: 4 * depth * (dim_dsconv + heads) = 32,832 bytes a slot, so
an 1,800-token request holds 57 MiB), or the reference size (dim 512, depth 4, heads 8, dim_dsconv 512:
8,320 bytes a slot). Two runs in one invocation, each against a fresh `gss-serve --threads N
--max-batch BURST` on loopback, so that each server's peak is its own:

- off: `--state-memory off`, every request of the burst runs at once;
- budget: `--state-memory` of `--fits` times the burst's largest reservation (4 run at once, a 5th
  only of shorter prompts; the others wait in the queue).

Each server is warmed with two greedy requests of the longest prompt, one after the other (so that
the first runs' costs, and onnxruntime's arena growth for a prefill, are not in the burst). Then
BURST greedy non-streamed requests with distinct prompts of `--prompt-tokens` lengths (spread
evenly) and `--max-tokens` are sent at once, and 1 s later one short streamed request (a 16-token
prompt, 8 tokens). Measured per run:

- peak RSS: the server's VmHWM at the end (/proc/PID/status), and its VmRSS once warm;
- burst: seconds from sending the burst to its last reply;
- short request: time to its first token (TTFT), and to its last;
- from /metrics, sampled every 50 ms: the most state reserved and held, and requests waiting.

Every burst reply is checked whole (max_tokens tokens), and whether the two runs' tokens are equal is
reported. Writes
OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import torch

from common import REFERENCE, cpu_name

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from serve import start_server  # noqa: E402
from serve_support import parse_metrics  # noqa: E402
from serve_support import process_memory as memory  # noqa: E402

MiB = 2**20
LARGE_STATE = dict(num_tokens=256, dim=64, depth=4, heads=4, dim_dsconv=2048, dim_expansion_factor=2)
MODELS = {"large-state": LARGE_STATE, "reference": REFERENCE}
SHORT_PROMPT, SHORT_TOKENS, SHORT_AFTER = 16, 8, 1.0


def export(config: dict, folder: Path, max_seq_len: int) -> Path:
    from gss_export.export import export_model
    from gss_export.families import DsConvConfig, GatedDsConvLM

    torch.manual_seed(0)
    export_model(GatedDsConvLM(DsConvConfig(**config, max_seq_len=max_seq_len)).eval(), "onnx", folder, validate=False)
    return folder


def slot_bytes(config: dict) -> int:
    return 4 * config["depth"] * (config["dim_dsconv"] + config["heads"])


async def burst(url: str, pid: int, prompts: list[list[int]], max_tokens: int, short: list[int]) -> dict:
    """The burst at once, the short streamed request SHORT_AFTER s later, /metrics sampled meanwhile."""
    samples, done = [], asyncio.Event()
    connector = aiohttp.TCPConnector(limit=len(prompts) + 4)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=1800)) as http:
        async def one(prompt):
            body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
            async with http.post(f"{url}/v1/completions", json=body) as reply:
                if reply.status != 200:
                    raise SystemExit(f"the server answered {reply.status}: {await reply.text()}")
                return (await reply.json())["choices"][0]["token_ids"]

        async def streamed(start):
            await asyncio.sleep(SHORT_AFTER)
            body = {"prompt": short, "max_tokens": SHORT_TOKENS, "temperature": 0, "stream": True}
            sent, first, pending, count = time.perf_counter(), None, b"", 0
            async with http.post(f"{url}/v1/completions", json=body) as reply:
                if reply.status != 200:
                    raise SystemExit(f"the server answered {reply.status}: {await reply.text()}")
                async for data in reply.content.iter_any():  # server-sent events; a read may end mid-line
                    lines = (pending + data).split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        if line.startswith(b"data: {"):
                            ids = json.loads(line[6:])["choices"][0].get("token_ids") or []
                            if ids and first is None:
                                first = time.perf_counter()
                            count += len(ids)
            if count != SHORT_TOKENS:
                raise SystemExit(f"the short request came back with {count} tokens")
            return {"sent_after_s": sent - start, "ttft_s": first - sent, "total_s": time.perf_counter() - sent}

        async def sample():
            while not done.is_set():
                async with http.get(f"{url}/metrics") as reply:
                    samples.append({**parse_metrics(await reply.text()), "rss": memory(pid)["VmRSS"]})
                await asyncio.sleep(0.05)

        sampler = asyncio.create_task(sample())
        start = time.perf_counter()
        short_task = asyncio.create_task(streamed(start))
        tokens = await asyncio.gather(*(one(p) for p in prompts))
        seconds = time.perf_counter() - start
        short_result = await short_task
        done.set()
        await sampler
    return {"tokens": tokens, "burst_s": seconds, "short": short_result, "samples": samples}


def run(folder: Path, state_memory: str, args, prompts, short) -> dict:
    proc, url = start_server(folder, args.threads, len(prompts), "--state-memory", state_memory, ready_within=120)
    try:
        longest = max(len(p) for p in prompts)
        for seed in (1, 2):  # warm: the first runs, and the arena's growth for a prefill of the longest prompt
            warm = np.random.default_rng(seed).integers(0, 256, longest).tolist()
            httpx.post(f"{url}/v1/completions", json={"prompt": warm, "max_tokens": args.max_tokens, "temperature": 0},
                       timeout=600).raise_for_status()
        warm = memory(proc.pid)
        got = asyncio.run(burst(url, proc.pid, prompts, args.max_tokens, short))
        peak = memory(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
    bad = [i for i, t in enumerate(got["tokens"]) if len(t) != args.max_tokens]
    if bad:
        raise SystemExit(f"requests {bad} came back short")
    samples = got["samples"]
    return {
        "state_memory": state_memory, "warm_rss_mib": warm["VmRSS"] / MiB, "peak_rss_mib": peak["VmHWM"] / MiB,
        "burst_s": got["burst_s"], "short_ttft_s": got["short"]["ttft_s"], "short_total_s": got["short"]["total_s"],
        "short_sent_after_s": got["short"]["sent_after_s"],
        "max_reserved_mib": max(s.get("gss_state_reserved_bytes", 0) for s in samples) / MiB,
        "max_used_mib": max(s.get("gss_state_used_bytes", 0) for s in samples) / MiB,
        "max_waiting": max(s.get("gss_num_requests_waiting", 0) for s in samples),
        "max_running": max(s.get("gss_num_requests_running", 0) for s in samples), "samples": len(samples),
        "tokens": got["tokens"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODELS), default="large-state")
    p.add_argument("--burst", type=int, default=16, help="long requests sent at once (default 16)")
    p.add_argument("--prompt-tokens", default="1500,1800", help="shortest,longest prompt of the burst (default 1500,1800)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--fits", type=float, default=4.5, help="the budget: this many of the largest reservation (default 4.5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "burst")
    args = p.parse_args()
    config = MODELS[args.model]
    low, high = (int(x) for x in args.prompt_tokens.split(","))
    lengths = np.linspace(low, high, args.burst).round().astype(int).tolist()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in lengths]
    short = rng.integers(0, 256, SHORT_PROMPT).tolist()
    max_seq_len = 2048 if high + args.max_tokens <= 2048 else high + args.max_tokens
    reservation = slot_bytes(config) * (high + args.max_tokens)  # the longest prompt's slots, + max_tokens - 1 fed + 1
    budget = int(args.fits * reservation)
    with tempfile.TemporaryDirectory() as tmp:
        folder = export(config, Path(tmp) / "model", max_seq_len)
        runs = []
        for label, state_memory in (("off", "off"), (f"{args.fits:g} requests", str(budget))):
            row = run(folder, state_memory, args, prompts, short)
            row["label"] = label
            runs.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "tokens"}), flush=True)
    equal = runs[0]["tokens"] == runs[1]["tokens"]
    for row in runs:
        del row["tokens"]
    report = {"cpu": cpu_name(), "threads": args.threads, "model": args.model, "config": config, "max_seq_len": max_seq_len,
              "slot_bytes": slot_bytes(config), "burst": args.burst, "prompt_tokens": lengths, "max_tokens": args.max_tokens,
              "largest_reservation_mib": reservation / MiB, "budget_mib": budget / MiB,
              "short_request": {"prompt_tokens": SHORT_PROMPT, "max_tokens": SHORT_TOKENS, "sent_after_s": SHORT_AFTER},
              "tokens_equal_between_runs": equal, "runs": runs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    lines = [f"# gss-serve: a burst of {args.burst} long prompts ({args.model} GatedDsConvLM; {cpu_name()}, {args.threads} threads)", "",
             f"{args.burst} greedy requests of {low}-{high}-token prompts and {args.max_tokens} tokens sent at once "
             f"({slot_bytes(config):,} bytes of state a token: the largest request reserves {reservation / MiB:.0f} MiB), "
             f"and {SHORT_AFTER:g} s later a streamed {SHORT_PROMPT}-token prompt for {SHORT_TOKENS} tokens. A fresh "
             f"server per row, warmed with two requests of the longest prompt. Tokens equal between the rows: {equal}.", "",
             "| --state-memory | peak RSS (MiB) | RSS once warm (MiB) | burst done (s) | short request: TTFT / done (s) | "
             "most state reserved / held (MiB) | most running / waiting |",
             "|---|---|---|---|---|---|---|"]
    for row in runs:
        memory_option = "off" if row["state_memory"] == "off" else f"{budget / MiB:.0f} MiB ({row['label']})"
        lines.append(f"| {memory_option} | {row['peak_rss_mib']:.0f} | {row['warm_rss_mib']:.0f} | {row['burst_s']:.2f} | "
                     f"{row['short_ttft_s']:.2f} / {row['short_total_s']:.2f} | {row['max_reserved_mib']:.0f} / "
                     f"{row['max_used_mib']:.0f} | {row['max_running']:.0f} / {row['max_waiting']:.0f} |")
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
