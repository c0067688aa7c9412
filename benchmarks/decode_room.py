"""What the room past a GatedDsConvLM state's filled slots costs a step, and what keeping it to `headroom` gains.

    python benchmarks/decode_room.py [--threads 2] [--streams 16] [--new-tokens 1024] [--out benchmarks/results/decode/room]

A step multiplies u's whole buffer, its room included (zero taps there), so room reserved for the tokens to
come is read by every step. Untouched, it is the kernel's zero page: no memory, but not free to read.

- Steps: one row after 128 and 16,000 tokens of context, with 17 to 16,000 slots of room, taken in turn
  in one run (median of 12 steps each); the ratio is to the smallest room.
- gss-serve's step loop (the engine in this process): `--streams` greedy requests of `--new-tokens` after
  128-token prompts, each batch keeping `headroom` (what the engine does) against reserving every slot
  its rows may still feed (what it did before), in turn, twice each; the best wall time of each, and the
  tokens checked equal.

Model: the reference GatedDsConvLM (dim 512, depth 4, heads 8, dim_dsconv 512), random weights, exported
to ONNX. Writes OUT/results.json and OUT/results.md.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from common import cpu_name, reference_models, write_results
from gss_export.export import export_model
from gss_runtime.decoder import Decoder
from gss_runtime.serve import engine as engine_module
from gss_runtime.serve.engine import Completion, Engine, Finished, Request, Tokens

ROOMS = {128: [17, 1000, 4000, 16000], 16000: [17, 2000, 4000]}


def step_costs(decoder: Decoder) -> list[dict]:
    rows = []
    for context, rooms in ROOMS.items():
        _, prompt_state = decoder.prefill([np.random.default_rng(context).integers(0, 256, size=context).tolist()])
        states = {room: prompt_state.rows(np.zeros(1, np.int64), spare=room) for room in rooms}
        times = {room: [] for room in rooms}
        for room in rooms:
            _, states[room] = decoder.step([5], states[room])  # onnxruntime's first call at this shape
        for _ in range(12):
            for room in rooms:  # in turn: the machine's drift falls on every room alike
                start = time.perf_counter()
                _, states[room] = decoder.step([5], states[room])
                times[room].append(time.perf_counter() - start)
        base = statistics.median(times[rooms[0]])
        rows += [{"context": context, "room": room, "step_ms": statistics.median(times[room]) * 1e3,
                  "over_least_room": statistics.median(times[room]) / base} for room in rooms]
    return rows


def serve_wall(decoder: Decoder, prompts: list[list[int]], new_tokens: int) -> tuple[float, dict]:
    tokens, done = {}, threading.Semaphore(0)

    def channel(items):
        for request, event in items:
            if isinstance(event, Tokens):
                tokens.setdefault(request.tag, []).extend(event.ids)
            elif isinstance(event, Finished):
                done.release()

    engine = Engine(decoder, max_batch=len(prompts), prefix_cache_memory=None).start()
    try:
        start = time.perf_counter()
        engine.submit([Request(Completion(p, new_tokens), channel, tag=i) for i, p in enumerate(prompts)])
        for _ in prompts:
            assert done.acquire(timeout=3600)
        return time.perf_counter() - start, tokens
    finally:
        engine.stop()


def serve_costs(decoder: Decoder, streams: int, new_tokens: int) -> dict:
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=128).tolist() for _ in range(streams)]
    headroom = engine_module._room
    policies = {"headroom": headroom, "whole extent": lambda slots, feeds: max(feeds, 0)}
    walls, seen = {name: [] for name in policies}, {}
    try:
        for _ in range(2):
            for name, room in policies.items():
                engine_module._room = room
                wall, tokens = serve_wall(decoder, prompts, new_tokens)
                walls[name].append(wall)
                seen[name] = tokens
    finally:
        engine_module._room = headroom
    best = {name: min(w) for name, w in walls.items()}
    return {"streams": streams, "new_tokens": new_tokens, "tokens_per_second": {n: streams * new_tokens / w for n, w in best.items()},
            "headroom_over_whole_extent": best["whole extent"] / best["headroom"], "tokens_equal": seen["headroom"] == seen["whole extent"]}


def markdown(results: dict) -> str:
    lines = [f"# The room a GatedDsConvLM step reads ({results['cpu']}, {results['threads']} threads)", "",
             "| context | room (slots) | step ms | / least room |", "|---|---|---|---|"]
    lines += [f"| {r['context']:,} | {r['room']:,} | {r['step_ms']:.2f} | {r['over_least_room']:.2f}x |" for r in results["steps"]]
    s = results["serve"]
    tps = s["tokens_per_second"]
    lines += ["", f"gss-serve's step loop, {s['streams']} streams of {s['new_tokens']} tokens after 128-token prompts: "
              f"headroom {tps['headroom']:.0f} tokens/s, whole extent reserved {tps['whole extent']:.0f} tokens/s, "
              f"{s['headroom_over_whole_extent']:.2f}x; tokens equal: {s['tokens_equal']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode" / "room")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export_model(reference_models(16000 + 16000 + 64)[0], "onnx", Path(tmp), validate=False)
        decoder = Decoder(tmp, provider="cpu", threads=args.threads)
        results = {"cpu": cpu_name(), "threads": args.threads, "steps": step_costs(decoder),
                   "serve": serve_costs(decoder, args.streams, args.new_tokens)}
    print(write_results(args.out, results, markdown(results)))


if __name__ == "__main__":
    main()
