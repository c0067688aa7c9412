"""Decode speed: the decoder with state (gss-run's path) against upstream-style full recompute.

    python benchmarks/decode.py [--contexts 128,512,2048] [--tokens 32] [--threads 2]

Model: dim 512, depth 4, heads 8, dim_dsconv 512, num_tokens 256, random weights, batch 1.
For each context C: gss-run's Generator prefills C tokens, then its time per generated token
is measured over `--tokens` greedy steps; full recompute is one upstream eager forward of
length C per token (what AutoregressiveWrapper.generate does), measured at C. Same threads,
same run.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gss_export.export import export_model
from gss_export.model import GatedDsConvLM, GSSConfig
from gss_runtime.generate import Generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", default="128,512,2048")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    limit = max(contexts) + args.tokens + 1
    cfg = GSSConfig(num_tokens=256, dim=512, depth=4, heads=8, dim_dsconv=512, max_seq_len=limit)
    model = GatedDsConvLM(cfg).eval()
    from gated_state_spaces_pytorch import GatedDsConvLM as Upstream

    upstream = Upstream(num_tokens=256, dim=512, depth=4, heads=8, dim_dsconv=512, max_seq_len=limit).eval()
    upstream.load_state_dict(model.state_dict())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, "onnx", Path(tmp), validate=False)
        gen = Generator(tmp, provider="cpu", threads=args.threads)
        rng = np.random.default_rng(0)
        for context in contexts:
            prompt = rng.integers(0, 256, size=context).tolist()
            gen.generate(prompt, 2)  # warm-up
            result = gen.generate(prompt, args.tokens)
            ours = result.decode_seconds / result.steps  # the last token needs no step
            ids = torch.tensor([prompt])
            with torch.no_grad():
                upstream(ids)
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    upstream(ids)
                    times.append(time.perf_counter() - start)
            full = statistics.median(times)
            rows.append((context, 1 / ours, 1 / full, full / ours, result.state_bytes / (context + result.steps), result.prefill_seconds))
            print(f"context {context}: gss-run {1 / ours:.1f} tok/s, full recompute {1 / full:.2f} tok/s, {full / ours:.1f}x", flush=True)
    print(f"\ndecode, batch 1, {args.threads} threads, dim 512, depth 4, heads 8, dim_dsconv 512 ({args.tokens} greedy tokens after the context)")
    print("| context | gss-run (decoder with state) | upstream full recompute | speed-up | ms per token | state per token | prefill |")
    print("|---|---|---|---|---|---|---|")
    for context, ours, full, ratio, per_token, prefill in rows:
        print(f"| {context} | {ours:.1f} tok/s | {full:.2f} tok/s | {ratio:.1f}x | {1e3 / ours:.2f} | {per_token / 1024:.1f} KiB | {prefill * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
