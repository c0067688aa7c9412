"""Decode speed: the decoder with state (gss-run's path) against upstream-style full recompute, or
(--floor) every family's step against the memory traffic it cannot avoid.

    python benchmarks/decode.py [--contexts 128,512,2048] [--tokens 32] [--threads 2]
    python benchmarks/decode.py --floor [--long] [--contexts 128,4096,16384] [--batches 1,4,16] [--out DIR]

--floor: see `decode_floor.py`, which it runs.

Model: dim 512, depth 4, heads 8, dim_dsconv 512, num_tokens 256, random weights, batch 1.
For each context C: gss-run's Generator prefills C tokens, then its time per generated token
is measured over `--tokens` greedy steps; full recompute is one upstream eager forward of
length C per token (what AutoregressiveWrapper.generate does), measured at C. Same threads,
same run. Also part of `benchmarks/suite.py`.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from common import reference_models, timed
from gss_export.export import export_model
from gss_runtime.generate import Generator


def measure_decode(model, upstream, contexts: list[int], tokens: int, threads: int, export_dir: Path | None = None) -> list[dict]:
    """One row per context: tokens/s of both, speed-up, state bytes per token, prefill seconds."""
    with tempfile.TemporaryDirectory() as tmp:
        if export_dir is None:
            export_dir = Path(tmp)
            export_model(model, "onnx", export_dir, validate=False)
        gen = Generator(export_dir, provider="cpu", threads=threads)
        rng = np.random.default_rng(0)
        rows = []
        for context in contexts:
            prompt = rng.integers(0, 256, size=context).tolist()
            gen.generate(prompt, 2)  # warm-up
            result = gen.generate(prompt, tokens)
            ours = result.decode_seconds / result.steps  # the last token needs no step
            ids = torch.tensor([prompt])
            with torch.inference_mode():
                full = timed(lambda: upstream(ids), min_repeats=3, min_seconds=0.5)
            rows.append({
                "context": context, "tokens_per_second": 1 / ours, "full_recompute_tokens_per_second": 1 / full,
                "speedup": full / ours, "ms_per_token": ours * 1e3,
                "state_bytes_per_token": result.state_bytes / (context + result.steps), "prefill_ms": result.prefill_seconds * 1e3,
            })
    return rows


def main() -> None:
    import sys

    if "--floor" in sys.argv[1:]:
        from decode_floor import main as floor_main

        return floor_main([a for a in sys.argv[1:] if a != "--floor"])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="128,512,2048")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(args.threads)
    model, upstream = reference_models(max(contexts) + args.tokens + 1)
    rows = measure_decode(model, upstream, contexts, args.tokens, args.threads)
    print(f"\ndecode, batch 1, {args.threads} threads, dim 512, depth 4, heads 8, dim_dsconv 512 ({args.tokens} greedy tokens after the context)")
    print("| context | gss-run (decoder with state) | upstream full recompute | speed-up | ms per token | state per token | prefill |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['tokens_per_second']:.1f} tok/s | {r['full_recompute_tokens_per_second']:.2f} tok/s | {r['speedup']:.1f}x "
              f"| {r['ms_per_token']:.2f} | {r['state_bytes_per_token'] / 1024:.1f} KiB | {r['prefill_ms']:.0f} ms |")


if __name__ == "__main__":
    main()
